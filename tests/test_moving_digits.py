import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.datasets import load_digits

from modeling_nbp.data import MovingDigits, load_video_dataset, moving_digits_dataset, write_moving_digits_folder


def class_templates(digit_size=24):
    """Mean 8x8 digit of each class, upscaled by pixel repetition (independent of the dataset's bicubic)."""
    digits = load_digits()
    scale = digit_size // 8
    means = [digits.images[digits.target == c].mean(0) / 16 for c in range(10)]
    return np.stack([np.kron(m, np.ones((scale, scale))) for m in means])


def best_matching_class(frame, templates):
    """Class whose template has the highest cosine similarity with some window of the frame."""
    windows = sliding_window_view(frame, templates.shape[1:])  # (P, Q, s, s)
    dots = np.einsum("pqij,cij->pqc", windows, templates)
    norms = np.sqrt(np.einsum("pqij,pqij->pq", windows, windows))[..., None] * np.linalg.norm(templates, axis=(1, 2))
    return int(np.argmax((dots / np.maximum(norms, 1e-8)).max(axis=(0, 1))))


def test_same_seed_same_clips_and_any_subset_is_deterministic():
    a, b = MovingDigits(30, seed=7), MovingDigits(12, seed=7)
    for i in (0, 5, 11):
        torch.testing.assert_close(a[i]["video"], b[i]["video"], rtol=0, atol=0)
        assert a[i]["label"] == b[i]["label"] == i % 10
    other = MovingDigits(30, seed=8)
    assert all(not torch.equal(a[i]["video"], other[i]["video"]) for i in range(10))


def test_clip_format_and_digit_stays_inside_frame():
    clips = MovingDigits(20, seed=0, speed_range=(3.0, 3.0))
    for i in range(len(clips)):
        video = clips[i]["video"]
        assert video.shape == (3, 17, 64, 64) and video.dtype == torch.float32
        assert 0.0 <= video.min() and video.max() <= 1.0
        assert torch.equal(video[0], video[1]) and torch.equal(video[0], video[2])  # white on black
        mass = video[0].sum(dim=(1, 2))
        assert mass[0] > 20 and torch.allclose(mass, mass[0].expand_as(mass), rtol=1e-5)  # never clipped
        assert not torch.equal(video[0, 0], video[0, -1])  # it moves


def test_labels_match_the_drawn_digit():
    templates = class_templates()
    clips = MovingDigits(60, seed=1)
    hits = sum(best_matching_class(clips.render(i)[0], templates) == clips[i]["label"] for i in range(len(clips)))
    assert hits >= 48, hits  # nearest-mean-template classification, not a perfect classifier


def test_knobs():
    clips = MovingDigits(4, seed=0, num_frames=5, size=32, digit_size=16, num_digits=2, styles_per_class=1)
    assert clips[0]["video"].shape == (3, 5, 32, 32) and clips[0]["video"].max() <= 1.0
    single_style = MovingDigits(30, seed=0, num_frames=1, size=24, digit_size=24, styles_per_class=1)
    torch.testing.assert_close(single_style[1]["video"], single_style[11]["video"])  # same class, same sample
    for bad in (dict(num_digits=3), dict(digit_size=80), dict(speed_range=(3, 1)), dict(styles_per_class=0)):
        with pytest.raises(ValueError):
            MovingDigits(4, **bad)
    with pytest.raises(IndexError):
        clips[4]


def test_hugging_face_dataset_matches_torch_dataset():
    ds = moving_digits_dataset(12, seed=2, num_frames=5, size=32, digit_size=16)
    assert ds.features["label"].names == [str(d) for d in range(10)]
    clips = MovingDigits(12, seed=2, num_frames=5, size=32, digit_size=16)
    torch.testing.assert_close(ds[7]["video"], clips[7]["video"])
    assert ds[7]["label"] == 7 and ds["label"][:3] == [0, 1, 2]


def test_written_folder_reads_back_through_the_folder_loader(tmp_path):
    kwargs = dict(num_frames=9, size=32, digit_size=16)
    write_moving_digits_folder(tmp_path, num_clips_per_class=2, seed=4, fps=8, **kwargs)
    data = load_video_dataset(tmp_path, layout="folder", num_frames=9, resolution=32, fps=8, sampling="start")
    assert data.class_names == [str(d) for d in range(10)] and len(data) == 20
    clips = MovingDigits(20, seed=4, **kwargs)
    for i in (0, 13):  # folder order: class 0 clips 0, 1; class 1 clips 0, 1; ...
        item = data[i]
        digit, j = divmod(i, 2)
        assert item["label"] == digit and item["path"].endswith(f"clip_{j:05d}.mp4")
        assert (item["video"] - clips[10 * j + digit]["video"]).abs().mean() < 0.03
    # a second run into the same folder would mix two runs' clips; an odd size would be padded by the MP4 writer
    with pytest.raises(FileExistsError, match="already holds clips"):
        write_moving_digits_folder(tmp_path, num_clips_per_class=1, seed=7, **kwargs)
    with pytest.raises(ValueError, match="`size` must be even"):
        write_moving_digits_folder(tmp_path / "odd", num_clips_per_class=1, size=17, digit_size=8)


def test_make_digits_reports_bad_arguments_as_usage_errors(tmp_path, capsys):
    from modeling_nbp.data.moving_digits import main

    for flags, message in [(["--clips_per_class", "0"], "argument --clips_per_class: expected an integer >= 1"),
                           (["--size", "8"], "1 <= digit_size <= size"),  # were tracebacks
                           (["--seed", "-1"], "argument --seed: expected an integer >= 0")]:
        with pytest.raises(SystemExit) as exited:
            main(["--output_dir", str(tmp_path / "digits"), *flags])
        assert exited.value.code == 2 and message in capsys.readouterr().err
