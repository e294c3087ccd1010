import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from modeling_nbp.evaluation.reconstruction import psnr, ssim


def _reference_ssim_frame(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al. SSIM of one 2D frame with scipy: 2D Gaussian window, 'valid' region only."""
    half = 5
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    g = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()

    def blur(image):
        return ndimage.correlate(image, window, mode="constant")[half:-half, half:-half]

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def _video_pair(seed=0, shape=(2, 3, 2, 24, 20)):
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
    pred = (target + noise).clamp(0, 1)
    return pred, target


def test_ssim_matches_independent_scipy_computation():
    pred, target = _video_pair()
    got = ssim(pred, target)
    assert got.shape == (2,)
    for video in range(2):
        per_plane = [
            _reference_ssim_frame(pred[video, c, t].numpy(), target[video, c, t].numpy())
            for c in range(3)
            for t in range(2)
        ]
        assert got[video].item() == pytest.approx(np.mean(per_plane), abs=1e-10)


def test_ssim_data_range_scales_constants():
    pred, target = _video_pair(seed=1, shape=(1, 1, 1, 16, 16))
    got = ssim(pred * 255, target * 255, data_range=255.0)
    expected = _reference_ssim_frame(pred[0, 0, 0].numpy() * 255, target[0, 0, 0].numpy() * 255, data_range=255.0)
    assert got.item() == pytest.approx(expected, abs=1e-10)
    assert got.item() == pytest.approx(ssim(pred, target).item(), abs=1e-10)


def test_ssim_identical_is_one_and_degraded_is_lower():
    pred, target = _video_pair()
    assert torch.allclose(ssim(target, target), torch.ones(2, dtype=torch.float64))
    noise = torch.randn(target.shape, dtype=target.dtype, generator=torch.Generator().manual_seed(0))
    noisier = (target + 0.3 * noise).clamp(0, 1)
    assert (ssim(noisier, target) < ssim(pred, target)).all()


def test_psnr_constant_offset_has_known_value():
    target = torch.full((2, 3, 4, 8, 8), 0.25)
    # MSE = 0.1^2 = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert torch.allclose(psnr(target + 0.1, target), torch.full((2,), 20.0), atol=1e-4)
    # With data_range 255: offset 25.5 -> same 20 dB.
    assert torch.allclose(psnr((target + 0.1) * 255, target * 255, data_range=255.0), torch.full((2,), 20.0), atol=1e-4)


def test_psnr_of_the_clip_or_averaged_over_frames_and_capped_for_exact_frames():
    target = torch.full((1, 1, 2, 4, 4), 0.5, dtype=torch.float64)
    pred = target.clone()
    pred[:, :, 0] += 0.01  # frame 0: MSE 1e-4 -> 40 dB
    pred[:, :, 1] += 0.1  # frame 1: MSE 1e-2 -> 20 dB
    # the official evaluation's video PSNR: one MSE over the clip, (1e-4 + 1e-2) / 2
    assert psnr(pred, target).item() == pytest.approx(10 * math.log10(2 / 0.0101), abs=1e-9)
    assert psnr(pred, target, per_frame=True).item() == pytest.approx(30.0, abs=1e-9)
    # An exact frame counts as 100 dB when frames are averaged: (100 + 20) / 2.
    pred[:, :, 0] = 0.5
    assert psnr(pred, target, per_frame=True).item() == pytest.approx(60.0, abs=1e-9)
    assert psnr(pred, target).item() == pytest.approx(10 * math.log10(2 / 0.01), abs=1e-9)
    assert psnr(target, target).item() == pytest.approx(100.0)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_bad_inputs_raise_clear_errors(metric):
    video = torch.rand(1, 3, 2, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        metric(video, video[:, :, :1])
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        metric(video[0], video[0])
    with pytest.raises(ValueError, match="must lie in"):
        metric(video * 2 - 1, video)
    for bad in (float("nan"), float("inf")):
        broken = video.clone()
        broken[0, 1, 1, 3, 4] = bad  # one pixel of one frame
        with pytest.raises(ValueError, match=r"target must lie in .* got NaN or infinite"):
            metric(video, broken)
        with pytest.raises(ValueError, match=r"pred must lie in .* got NaN or infinite"):
            metric(broken, video)
    with pytest.raises(TypeError, match="floating-point"):
        metric((video * 255).to(torch.uint8), video)
    with pytest.raises(ValueError, match="data_range"):
        metric(video, video, data_range=0)


def test_ssim_rejects_frames_smaller_than_window():
    video = torch.rand(1, 1, 1, 8, 32)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(video, video)
