"""Evaluation clip sets (the official evaluation's pairing of generated videos with dataset clips): the set itself,
`nbp generate --dataset` and `nbp evaluate --real-dataset`."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from modeling_nbp.cli import main as nbp
from modeling_nbp.data.evaluation_clips import EvaluationClips, clip_order
from modeling_nbp.evaluation import fvd as fvd_module
from modeling_nbp.generate_videos import name_seed
from modeling_nbp.video_io import VideoDecodeError, export_to_mp4, read_video
from test_fvd import _tiny_i3d
from test_generate_videos import assert_same_video
from test_pipeline import tiny_pipeline


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Class folders (sorted: TriangleUp, square) of 16x16 videos of 12 frames at 8 fps, and one broken file."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for name in ("TriangleUp/a", "TriangleUp/b", "square/c"):
        export_to_mp4(rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8), str(root / f"{name}.mp4"), fps=8)
    (root / "square" / "broken.mp4").write_bytes(b"not a video")
    return root


def test_clip_order_is_a_seeded_permutation_repeated():
    order = clip_order(4, 10, seed=3)
    assert sorted(v for v, _ in order[:4]) == [0, 1, 2, 3] and order[4:8] == [(v, 1) for v, _ in order[:4]]
    assert [p for _, p in order] == [0] * 4 + [1] * 4 + [2] * 2
    assert clip_order(4, 10, seed=3) == order and clip_order(4, 10, seed=4) != order
    assert clip_order(4, 2, seed=3) == order[:2]  # a smaller set is the start of a larger one
    with pytest.raises(ValueError, match="needs videos and clips"):
        clip_order(0, 3, seed=0)


def test_clips_are_the_same_in_every_instance(dataset):
    clips = EvaluationClips(dataset, num_clips=8, num_frames=5, resolution=8, sampling="random", seed=1)
    again = EvaluationClips(dataset, num_clips=8, num_frames=5, resolution=8, sampling="random", seed=1)
    names = [clips.name(i) for i in range(8)]  # two passes over the 4 videos
    assert len(set(names)) == 8 and all(n.endswith(("_0", "_1")) for n in names)
    readable = [i for i in range(8) if "broken" not in clips.path(i)]
    assert len(readable) == 6
    for i in readable:
        clip = clips.clip(i)
        assert clip.shape == (3, 5, 8, 8) and torch.equal(clip, again.clip(i))
    starts = {clips.clip(i)[:, 0].sum().item() for i in readable if clips.path(i).endswith("a.mp4")}
    assert len(starts) == 2  # the two passes over video a draw their own random starts
    with pytest.raises(VideoDecodeError):
        clips.clip(next(i for i in range(8) if "broken" in clips.path(i)))


def test_generate_pairs_videos_with_clips(dataset, tmp_path, capsys):
    pipe = tiny_pipeline()  # classes circle, square, TriangleUp: the dataset's labels are mapped by name
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    nbp(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(out), "--device", "cpu",
         "--dataset", str(dataset), "--num_clips", "5", "--formats", "gif", "--contact_sheet", "0"])
    clips = EvaluationClips(dataset, num_clips=5, num_frames=5, resolution=8)
    names = sorted(p[:-4] for p in os.listdir(out) if p.endswith(".gif"))
    assert names == sorted(f"{clips.name(i)}_0" for i in range(5))  # class models do not read the clips
    triangle = next(i for i in range(5) if "TriangleUp" in clips.path(i))
    name = f"{clips.name(triangle)}_0"
    expected = pipe(class_labels=[2], generator=gen(name_seed(0, name)), output_type="np").frames[0]
    from modeling_nbp.video_io import export_to_gif

    reference, _ = read_video(export_to_gif(expected, str(tmp_path / "ref.gif"), fps=8))
    assert_same_video(read_video(str(out / f"{name}.gif"))[0], reference)
    with pytest.raises(SystemExit) as exited:  # a usage error
        nbp(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(out), "--device", "cpu",
             "--dataset", str(dataset), "--class_labels", "0"])
    assert exited.value.code == 2 and "--class_labels and --dataset exclude each other" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"dataset.seed 0 on disk, 1 now"):  # another clip set: refused
        nbp(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(out), "--device", "cpu",
             "--dataset", str(dataset), "--clips_seed", "1", "--formats", "gif"])


def test_frame_prediction_continues_each_clip(dataset, tmp_path, capsys):
    pipe = tiny_pipeline(mode="frames")
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    nbp(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(out), "--device", "cpu",
         "--dataset", str(dataset), "--clip_fps", "4", "--formats", "mp4", "--contact_sheet", "0"])
    printed = capsys.readouterr().out
    assert "skipped context clip" in printed and "broken.mp4" in printed
    clips = EvaluationClips(dataset, num_frames=5, resolution=8, fps=4)
    assert len(clips) == 4 and len([p for p in os.listdir(out) if p.endswith(".mp4")]) == 3
    i = next(i for i in range(4) if clips.path(i).endswith("c.mp4"))
    context = clips.clip(i)[:, :1].transpose(0, 1)  # the clip's first frame: (1, 3, 8, 8)
    name = f"{clips.name(i)}_0"
    expected = pipe(video=context, generator=gen(name_seed(0, name)), output_type="np").frames[0]
    reference, _ = read_video(export_to_mp4(expected, str(tmp_path / "ref.mp4"), fps=4))
    frames, fps = read_video(str(out / f"{name}.mp4"))
    assert_same_video(frames, reference)
    assert fps == 4  # the continuation plays at the rate of the clip it continues


def test_context_reading_workers_do_not_change_the_videos(dataset, tmp_path):
    pipe = tiny_pipeline(mode="frames")
    pipe.save_pretrained(tmp_path / "pipe")
    for workers in ("0", "2"):
        nbp(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / workers), "--device", "cpu",
             "--dataset", str(dataset), "--num_clips", "6", "--batch_size", "2", "--num_workers", workers,
             "--formats", "npy", "--contact_sheet", "0"])
    names = sorted(p for p in os.listdir(tmp_path / "0") if p.endswith(".npy"))
    assert len(names) == 5 and names == sorted(p for p in os.listdir(tmp_path / "2") if p.endswith(".npy"))
    for name in names:
        assert np.array_equal(np.load(tmp_path / "0" / name), np.load(tmp_path / "2" / name))


def test_the_set_does_not_depend_on_how_its_folder_is_written(dataset, monkeypatch):
    absolute = EvaluationClips(dataset, num_clips=4, num_frames=5, resolution=8)
    monkeypatch.chdir(dataset.parent)
    relative = EvaluationClips(dataset.name, num_clips=4, num_frames=5, resolution=8)
    # `nbp evaluate` compares the recorded digest of the split's files: a relative path is not other videos
    assert relative.settings == absolute.settings
    assert [relative.path(i) for i in range(4)] == [absolute.path(i) for i in range(4)]
    assert [relative.name(i) for i in range(4)] == [absolute.name(i) for i in range(4)]


def test_videos_whose_names_would_collide_are_refused(tmp_path):
    video = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    for name in ("a/take 1.mp4", "a/take_1.mp4"):  # both would be generated as a_take_1_<copy>
        export_to_mp4(video, str(tmp_path / name), fps=8)
    with pytest.raises(ValueError, match=r"take 1\.mp4 and .*take_1\.mp4 .* 'a_take_1'"):
        EvaluationClips(tmp_path, num_frames=4, resolution=8)


def test_evaluate_reads_the_clips_as_the_real_set(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(fvd_module, "_load_detector", lambda weights, device: _tiny_i3d())
    fake = tmp_path / "fake"
    rng = np.random.default_rng(1)
    for k in range(3):
        export_to_mp4(rng.integers(0, 256, (17, 16, 16, 3), dtype=np.uint8), str(fake / f"{k}.mp4"), fps=8)
    (fake / "3.mp4").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="skipping"):
        results = fvd_module.main([str(fake), str(dataset), "--real-dataset", "--real-num-clips", "5",
                                   "--real-resolution", "16", "--real-fps", "16", "--no-progress"])
    assert results["skipped_unreadable"] == {"fake": [str(fake / "3.mp4")],
                                             "real": [str(dataset / "square" / "broken.mp4")]}
    # the same FVD from the clips and files given as tensors
    clips = EvaluationClips(dataset, num_clips=5, resolution=16, fps=16)
    real = torch.stack([clips.clip(i) for i in range(5) if "broken" not in clips.path(i)])
    fakes = torch.cat([fvd_module.load_video_file(fake / f"{k}.mp4", 16) for k in range(3)])
    calculator = fvd_module.FVDCalculator(_tiny_i3d(), progress=False)
    assert results["fvd"]["mean"] == pytest.approx(calculator.fvd(fakes, real)["mean"], rel=1e-5)
    with pytest.raises(SystemExit):  # --reconstruction pairs files by name
        fvd_module.main([str(fake), str(dataset), "--real-dataset", "--reconstruction", "--no-progress"])


def test_squash_keeps_the_whole_frame_and_crop_its_centre(tmp_path):
    from modeling_nbp.data.clips import load_clip, resize_frames
    from modeling_nbp.data.video_datasets import VideoClipDataset

    frames = np.zeros((2, 16, 32, 3), dtype=np.uint8)  # a 2:1 frame: red at the left edge, blue at the right
    frames[:, :, :6, 0] = 255
    frames[:, :, 26:, 2] = 255
    squashed, cropped = resize_frames(frames, 8, "squash"), resize_frames(frames, 8, "crop")
    assert squashed.shape == cropped.shape == (2, 8, 8, 3)
    assert squashed[:, :, 0, 0].min() == 255 and squashed[:, :, -1, 2].min() == 255  # both edges, squeezed
    assert cropped[..., 0].max() == 0 and cropped[..., 2].max() == 0  # the centre half holds neither
    path = export_to_mp4(np.repeat(frames, 3, axis=0), str(tmp_path / "wide.mp4"), fps=8)
    clip = load_clip(path, num_frames=4, resolution=8, resize="squash")
    assert clip.shape == (3, 4, 8, 8) and clip[0, :, :, 0].min() > 0.8  # red survives the codec on the left
    with pytest.raises(ValueError, match=r"`resize` must be one of \('squash', 'crop'\), got 'stretch'"):
        load_clip(path, resize="stretch")
    import datasets

    with pytest.raises(ValueError, match="`resize` must be one of"):
        VideoClipDataset(datasets.Dataset.from_dict({"path": [path], "label": [0]}), resize="fit")


def test_evaluate_takes_the_clip_settings_from_generate_json(dataset, tmp_path, capsys):
    import argparse

    pipe = tiny_pipeline(mode="frames")
    pipe.save_pretrained(tmp_path / "pipe")
    fake = tmp_path / "fake"
    nbp(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(fake), "--device", "cpu", "--dataset",
         str(dataset), "--num_clips", "6", "--clip_fps", "4", "--clip_sampling", "random", "--clips_seed", "3",
         "--formats", "npy", "--contact_sheet", "0"])
    given = argparse.Namespace(real=str(dataset), real_num_clips=None,
                               **{option: None for option in fvd_module.REAL_CLIP_OPTIONS})
    settings, generated = fvd_module._real_clip_settings(given, fake)
    videos = EvaluationClips(dataset).settings["videos"]
    assert generated and settings == dict(split="train", layout="auto", seed=3, fps=4.0, sampling="random",
                                               resolution=8, resize="squash", num_frames=5, videos=videos)
    # videos longer than the model's window are paired with clips of their length (the real set FVD compares)
    nbp(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "long"), "--device", "cpu",
         "--dataset", str(dataset), "--num_clips", "2", "--num_frames", "9", "--formats", "npy",
         "--contact_sheet", "0"])
    given.real = str(dataset)
    assert fvd_module._real_clip_settings(given, tmp_path / "long")[0]["num_frames"] == 9
    capsys.readouterr()
    with pytest.raises(SystemExit):  # refused before any video is read
        fvd_module.main([str(fake), str(dataset), "--real-dataset", "--real-sampling", "center", "--no-progress"])
    assert "--real-sampling 'center' disagrees with the clips" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fvd_module.main([str(fake), str(tmp_path), "--real-dataset", "--no-progress"])
    assert "were made from clips of" in capsys.readouterr().err
    # a video added to the split changes which video every clip comes from: refused by both commands
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    settings = json.loads((fake / "generate.json").read_text())
    settings["dataset"]["source"] = str(moved)
    (fake / "generate.json").write_text(json.dumps(settings))
    shutil.copy(moved / "square" / "c.mp4", moved / "square" / "d.mp4")
    with pytest.raises(SystemExit):
        fvd_module.main([str(fake), str(moved), "--real-dataset", "--no-progress"])
    assert "holds other videos than when the videos" in capsys.readouterr().err


def test_the_real_set_is_the_clips_the_videos_were_made_from(dataset, tmp_path):
    from pathlib import Path

    pipe = tiny_pipeline(mode="frames")
    pipe.save_pretrained(tmp_path / "pipe")
    fake = tmp_path / "fake"
    nbp(["generate", "--model", str(tmp_path / "pipe"), "--output_dir", str(fake), "--device", "cpu", "--dataset",
         str(dataset), "--num_clips", "6", "--num_videos_per_class", "2", "--formats", "npy", "--contact_sheet", "0"])
    clips = EvaluationClips(dataset, num_clips=6, num_frames=5, resolution=8)
    assert all(clips.position(clips.name(i)) == i for i in range(6)) and clips.position("nothing_0") is None
    fakes = sorted(Path(fake).glob("*.npy"))
    paired = [i for i in range(6) if "broken" not in clips.path(i)]  # the broken video's clip made no video
    assert len(fakes) == 2 * len(paired)
    # each clip once, whatever the number of its videos; not the first N clips of the order
    assert fvd_module._paired_clips(clips.position, fakes, fake) == paired
    (fake / "stray_0.npy").write_bytes((fake / fakes[0].name).read_bytes())
    with pytest.raises(ValueError, match="stray_0.npy was not made from a clip"):
        fvd_module._paired_clips(clips.position, sorted(Path(fake).glob("*.npy")), fake)


def test_a_replaced_dataset_file_is_not_served_from_the_feature_cache(dataset, tmp_path):
    # a broken download fixed (or any video re-encoded) under the same name: its clip's cached features, or its
    # place in the cache's list of unreadable files, must not be reused
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    clips = EvaluationClips(copy, num_frames=5, resolution=8)
    key = fvd_module._clips_cache_key(clips, range(len(clips)))
    assert fvd_module._clips_cache_key(EvaluationClips(copy, num_frames=5, resolution=8), range(4)) == key
    export_to_mp4(np.zeros((12, 16, 16, 3), dtype=np.uint8), str(copy / "square" / "broken.mp4"), fps=8)
    assert fvd_module._clips_cache_key(EvaluationClips(copy, num_frames=5, resolution=8), range(4)) != key
