import importlib
import logging
import os
import pickle
import re
import shutil
import warnings

import datasets
import numpy as np
import pytest
import torch

from modeling_nbp.data import (MovingDigits, SkipSummary, TokenDataset, VideoClipDataset, clip_frame_indices,
                               collate_videos, item_seed, load_clip, load_clip_windows, load_token_dataset,
                               load_video_dataset, merge_token_chunks, pretokenize, resize_center_crop,
                               streaming_video_dataset, window_starts)
from modeling_nbp.training.common import StepBatchSampler
from modeling_nbp.video_io import export_to_mp4


def write_counting_video(path, frames=20, fps=16, height=24, width=32):
    """Grey frames of brightness 10 * index: a decoded frame tells which source frame it came from."""
    video = np.repeat((np.arange(frames) * 10).astype(np.uint8), height * width * 3).reshape(frames, height, width, 3)
    return export_to_mp4(video, path, fps=fps)


def frame_numbers(clip):
    """(3, T, H, W) in [0, 1] -> source frame number of each frame."""
    return np.round(clip.mean(dim=(0, 2, 3)).numpy() * 255 / 10).astype(int).tolist()


def write_corrupt(path, kind):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if kind == "random":
        data = np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    else:  # a real file cut in half
        data = open(write_counting_video(str(path) + ".full.mp4"), "rb").read()
        os.remove(str(path) + ".full.mp4")
        data = data[: len(data) // 2]
    with open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------------------------------- clips


def test_clip_frame_indices_windows_and_too_short_rule():
    assert clip_frame_indices(20, 17, "center").tolist() == list(range(2, 19))  # 20 // 2 - 17 // 2, as the official
    assert clip_frame_indices(19, 17, "center").tolist() == list(range(1, 18))
    assert clip_frame_indices(20, 17, "start").tolist() == list(range(17))
    assert clip_frame_indices(5, 8, "random").tolist() == [0, 1, 2, 3, 4, 4, 4, 4]
    starts = {int(clip_frame_indices(20, 17, "random", torch.Generator().manual_seed(s))[0]) for s in range(40)}
    assert starts == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="sampling"):
        clip_frame_indices(20, 17, "middle")


def test_load_clip_resamples_and_pads_short_videos(tmp_path):
    path = write_counting_video(tmp_path / "v.mp4", frames=20, fps=16)  # 1.25 s
    clip = load_clip(path, num_frames=4, resolution=16, fps=8, sampling="start")
    assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.float32
    assert frame_numbers(clip) == [0, 2, 4, 6]
    # 10 frames at 8 fps < 17 needed: all of them, then the last one repeated
    with pytest.warns(UserWarning, match="fewer than 17 frames at 8 fps are padded by repeating their last frame"):
        short = load_clip(path, num_frames=17, resolution=16, fps=8, sampling="random")
    assert frame_numbers(short) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18] + [18] * 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clip that fits is no warning
        load_clip(path, num_frames=10, resolution=16, fps=8)


def test_a_seeded_item_always_cuts_the_same_random_window(tmp_path):
    write_counting_video(tmp_path / "a" / "0.mp4", frames=20, fps=8)
    data = load_video_dataset(tmp_path, num_frames=4, resolution=8, fps=8)  # split "train": random windows
    windows = [frame_numbers(data[(0, seed)]["video"]) for seed in range(6)]
    assert windows == [clip_frame_indices(20, 4, "random", torch.Generator().manual_seed(seed)).tolist()
                       for seed in range(6)]
    assert len({w[0] for w in windows}) > 1 and frame_numbers(data[(0, 5)]["video"]) == windows[5]


def test_windows_spread_over_the_whole_video(tmp_path):
    assert window_starts(40, 4, 3).tolist() == [0, 18, 36]  # the first and the last window included
    assert window_starts(6, 4, 5).tolist() == [0, 1, 2]  # 3 possible windows: equal starts merged
    assert window_starts(3, 4, 5).tolist() == [0] and window_starts(40, 4, 1).tolist() == [0]
    assert window_starts(40, 4, 10**12).tolist() == list(range(37))  # every start, without 10**12 candidates
    path = write_counting_video(tmp_path / "v.mp4", frames=20, fps=8)
    clips = load_clip_windows(path, 3, num_frames=4, resolution=8, fps=8)
    assert clips.shape == (3, 3, 4, 8, 8)
    assert [frame_numbers(clip) for clip in clips] == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    one = load_clip_windows(path, 1, num_frames=4, resolution=8, fps=8)
    assert torch.equal(one[0], load_clip(path, num_frames=4, resolution=8, fps=8, sampling="start"))
    with pytest.warns(UserWarning, match="fewer than 24 frames at 8 fps are padded"):
        short = load_clip_windows(path, 3, num_frames=24, resolution=8, fps=8)
    assert [frame_numbers(clip) for clip in short] == [list(range(20)) + [19] * 4]


def test_resize_center_crop_keeps_the_middle():
    frames = np.zeros((1, 20, 40, 3), dtype=np.uint8)
    frames[:, :, 8:32] = 255  # white middle, a little wider than the crop (bilinear blurs 2 px)
    out = resize_center_crop(frames, 10)  # 20x40 -> 10x20 -> keep columns 5..14 = source columns 10..29
    assert out.shape == (1, 10, 10, 3)
    assert out.min() == 255
    with pytest.warns(UserWarning, match="enlarging 20x40 video frames to resolution 32"):
        assert resize_center_crop(frames, 32).shape == (1, 32, 32, 3)


# --------------------------------------------------------------------------------------- layouts


def test_folder_layout(tmp_path):
    for name, count in [("dogs", 2), ("Cats", 1), ("birds", 3)]:
        for k in range(count):
            write_counting_video(tmp_path / name / f"{k}.mp4", frames=18, fps=8)
    (tmp_path / "birds" / "notes.txt").write_text("not a video")
    data = load_video_dataset(tmp_path, layout="folder", num_frames=17, resolution=16, fps=8)
    assert data.class_names == ["Cats", "birds", "dogs"]  # sorted folder names
    assert len(data) == 6
    assert sorted(data.index["label"]) == [0, 1, 1, 1, 2, 2]
    item = data[0]
    assert item["video"].shape == (3, 17, 16, 16) and 0 <= item["video"].min() and item["video"].max() <= 1
    assert item["label"] == 0 and item["path"].endswith(os.path.join("Cats", "0.mp4"))
    assert data.sampling == "random"  # split "train"


def test_folders_without_videos_are_not_classes(tmp_path, caplog):
    # an unzipped archive's __MACOSX, an empty class folder, videos one folder too deep: none is a class, so the
    # labels of the real classes do not move and no class without clips reaches the model
    write_counting_video(tmp_path / "cat" / "0.mp4", frames=4)
    write_counting_video(tmp_path / "dog" / "0.mp4", frames=4)
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cat" / "._0.mp4").write_bytes(b"\0")
    (tmp_path / "bird").mkdir()
    write_counting_video(tmp_path / "fish" / "day1" / "0.mp4", frames=4)
    with caplog.at_level(logging.WARNING, logger="modeling_nbp.data.video_datasets"):
        data = load_video_dataset(tmp_path, layout="folder", num_frames=4, resolution=8)
    assert data.class_names == ["cat", "dog"] and data.index["label"] == [0, 1]
    assert re.search(r"these 3 folders .*__MACOSX, .*bird, .*fish", caplog.text)


def test_a_symlink_loop_beside_the_class_folders_is_no_class(tmp_path):
    write_counting_video(tmp_path / "cat" / "0.mp4", frames=4)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # is_dir() raised "Too many levels of symbolic links"
    (tmp_path / "linked").symlink_to(tmp_path / "cat")  # a linked class folder is a class
    data = load_video_dataset(tmp_path, layout="folder", num_frames=4, resolution=8)
    assert data.class_names == ["cat", "linked"]
    (tmp_path / "ucfTrainTestlist").mkdir()  # UCF-101 without classInd.txt: its classes are the folders too
    (tmp_path / "ucfTrainTestlist" / "trainlist01.txt").write_text("cat/0.mp4\n")
    assert load_video_dataset(tmp_path, layout="ucf101", num_frames=4, resolution=8).class_names == ["cat", "linked"]


def test_a_flat_folder_is_refused_with_the_unlabelled_route(tmp_path):
    write_counting_video(tmp_path / "0.mp4", frames=4)
    with pytest.raises(FileNotFoundError, match=r"expects class subfolders in .*, found none; for unlabelled videos "
                                                r"put them in one folder \(.*all\) .*--condition_mode none or frames"):
        load_video_dataset(tmp_path, layout="folder", num_frames=4, resolution=8)


def test_videos_two_levels_down_are_no_dataset_and_the_error_says_where_it_looked(tmp_path):
    write_counting_video(tmp_path / "Train" / "cat" / "0.mp4", frames=4)  # split folders in another case
    with pytest.raises(FileNotFoundError, match=r"none of the folders in .* \(Train\) holds video files .* directly: "
                                                r"the folder layout is ROOT\[/SPLIT\]/<class>/<video>, SPLIT one of "
                                                r"train, test"):  # was "no video files under ROOT", which it has
        load_video_dataset(tmp_path, layout="folder", num_frames=4, resolution=8)


def test_folder_layout_reads_every_common_video_extension(tmp_path):
    # .mpg and the others after it were left out
    for k, ext in enumerate([".mp4", ".MPG", ".mpeg", ".ts", ".flv", ".3gp", ".wmv", ".ogv"]):
        os.replace(write_counting_video(tmp_path / "a" / f"{k}.mp4", frames=4), tmp_path / "a" / f"{k}{ext}")
    data = load_video_dataset(tmp_path, layout="folder", num_frames=4, resolution=8)
    assert len(data) == 8 and data[1]["video"].shape == (3, 4, 8, 8)


def test_a_video_name_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.mp4").touch()
    try:
        open(os.path.join(os.fsencode(tmp_path / "a"), b"caf\xe9.mp4"), "wb").close()  # Latin-1, as old archives
    except OSError:
        pytest.skip("this file system takes UTF-8 names only")
    with pytest.raises(ValueError, match=r"1 video path\(s\) are not valid UTF-8, e.g. b'.*caf\\xe9.mp4'"):
        load_video_dataset(tmp_path, layout="folder", num_frames=4, resolution=8)  # was a UnicodeEncodeError


def test_a_class_folder_dataset_with_its_own_csv_is_no_kinetics(tmp_path):
    write_counting_video(tmp_path / "train" / "cat" / "0.mp4", frames=4)
    (tmp_path / "train.csv").write_text("video_name,tag\ncat/0.mp4,cat\n")  # was read as a Kinetics CSV, and refused
    assert load_video_dataset(tmp_path, num_frames=4, resolution=8).class_names == ["cat"]


def test_folder_layout_with_split_folders(tmp_path):
    write_counting_video(tmp_path / "train" / "a" / "0.mp4", frames=4)
    write_counting_video(tmp_path / "test" / "a" / "1.mp4", frames=4)
    test = load_video_dataset(tmp_path, split="test", num_frames=4, resolution=8)
    assert test.index["path"] == [str(tmp_path / "test" / "a" / "1.mp4")] and test.sampling == "center"
    with pytest.raises(ValueError, match="split folders"):
        load_video_dataset(tmp_path, split="validation")


def make_ucf(tmp_path):
    root = tmp_path / "UCF-101"
    names = {"ApplyEyeMakeup": 2, "Biking": 2, "YoYo": 1}
    train, test = [], []
    for name, count in names.items():
        for group in range(1, count + 1):
            relative = f"{name}/v_{name}_g0{group}_c01.avi"
            write_counting_video(root / relative, frames=12, fps=25)
            (test if group == 1 else train).append(relative)
    lists = tmp_path / "ucfTrainTestlist"  # next to the class folders' root, as in the official archive
    lists.mkdir()
    # classInd numbers differ from the sorted order on purpose: labels must follow sorted names
    (lists / "classInd.txt").write_text("1 YoYo\n2 ApplyEyeMakeup\n3 Biking\n")
    (lists / "trainlist01.txt").write_text("".join(f"{p} 9\n" for p in train) + "Biking/v_Biking_g09_c01.avi 3\n")
    (lists / "testlist01.txt").write_text("".join(f"{p}\n" for p in test))
    return root


def test_ucf101_layout(tmp_path, caplog):
    root = make_ucf(tmp_path)
    with caplog.at_level(logging.WARNING):
        train = load_video_dataset(root, layout="auto", split="train", num_frames=5, resolution=16)
    assert "1 of 3 listed videos are missing" in caplog.text  # v_Biking_g09 is listed but absent
    assert train.class_names == ["ApplyEyeMakeup", "Biking", "YoYo"]
    assert train.class_texts == ["apply eye makeup", "biking", "yo yo"]
    assert [os.path.basename(p) for p in train.index["path"]] == ["v_ApplyEyeMakeup_g02_c01.avi", "v_Biking_g02_c01.avi"]
    assert train.index["label"] == [0, 1]
    test = load_video_dataset(root, layout="ucf101", split="test", num_frames=5, resolution=16)
    assert test.index["label"] == [0, 1, 2]
    assert test[2]["video"].shape == (3, 5, 16, 16)  # an mp4 stream in a .avi name decodes by content
    with pytest.raises(ValueError, match="fold"):
        load_video_dataset(root, layout="ucf101", fold=4)
    # the root as shells complete it: the split lists next to it are still found (the folder layout read them all)
    assert load_video_dataset(f"{root}/", split="train", num_frames=5, resolution=16).index["label"] == [0, 1]
    # without classInd.txt the classes are the class folders; hidden folders (a notebook's checkpoints) are none
    (tmp_path / "ucfTrainTestlist" / "classInd.txt").unlink()
    (root / ".ipynb_checkpoints").mkdir()
    train = load_video_dataset(root, split="train", num_frames=5, resolution=16)
    assert train.class_names == ["ApplyEyeMakeup", "Biking", "YoYo"] and train.index["label"] == [0, 1]


def test_ucf101_lists_with_backslashes_name_the_same_files(tmp_path):
    """A split list saved on Windows separates class and file with a backslash: the same videos on every system."""
    root = make_ucf(tmp_path)
    expected = load_video_dataset(root, split="test", num_frames=5, resolution=16).index
    lists = tmp_path / "ucfTrainTestlist" / "testlist01.txt"
    lists.write_text(lists.read_text().replace("/", "\\"))
    index = load_video_dataset(root, split="test", num_frames=5, resolution=16).index
    assert index["path"] == expected["path"] and index["label"] == [0, 1, 2]


def test_k600_layout(tmp_path):
    header = "label,youtube_id,time_start,time_end,split\n"
    rows = [("playing cello", "abc", 3, 13), ("abseiling", "x_y-z", 0, 10), ("playing cello", "gone", 5, 15)]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text(header + "".join(f"{l},{y},{s},{e},train\n" for l, y, s, e in rows))
    (tmp_path / "annotations" / "test.csv").write_text("youtube_id,time_start,time_end,split\nabc,3,13,test\n")
    for _, youtube_id, start, end in rows[:2]:
        write_counting_video(tmp_path / "train" / f"{youtube_id}_{start:06d}_{end:06d}.mp4", frames=20, fps=16)
    write_counting_video(tmp_path / "test" / "some_class" / "abc_000003_000013.mp4", frames=20, fps=16)

    train = load_video_dataset(tmp_path, split="train", num_frames=8, resolution=16, fps=16)
    assert train.class_names == ["abseiling", "playing cello"]
    assert [os.path.basename(p) for p in train.index["path"]] == ["abc_000003_000013.mp4", "x_y-z_000000_000010.mp4"]
    assert train.index["label"] == [1, 0]
    test = load_video_dataset(tmp_path, layout="k600", split="test", num_frames=8, resolution=16, fps=16)
    assert test.index["label"] == [-1] and test[0]["label"] == -1  # unlabelled split, clip in a subfolder
    # a CSV saved with a byte-order mark (Excel, pandas' utf-8-sig) keeps its label column
    csv_path = tmp_path / "annotations" / "train.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())
    assert load_video_dataset(tmp_path, split="train", num_frames=8, resolution=16, fps=16).index["label"] == [1, 0]
    with pytest.raises(ValueError, match="split"):
        load_video_dataset(tmp_path, layout="k600", split="dev")

    # a clip found twice (a re-download in another format) is the same file whatever order the folders list in
    write_counting_video(tmp_path / "train" / "again" / "abc_000003_000013.mp4", frames=4, fps=16)
    picks = set()
    walk = os.walk
    for order in (list, reversed):  # the folders in either order
        with pytest.MonkeyPatch.context() as m:
            m.setattr(os, "walk", lambda top, **kwargs: order(list(walk(top, **kwargs))))
            picks.add(load_video_dataset(tmp_path, split="train", num_frames=8, resolution=16, fps=16).index["path"][0])
    assert picks == {str(tmp_path / "train" / "abc_000003_000013.mp4")}


def test_a_missing_k600_file_names_the_paths_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no Kinetics annotation CSV for split 'val': looked for "
                                                r".*annotations/\{validate\|val\|validation\}\.csv and .*"):
        load_video_dataset(tmp_path, layout="k600", split="val", num_frames=4, resolution=8)
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text("label,youtube_id,time_start,time_end\nabseiling,abc,0,10\n")
    with pytest.raises(FileNotFoundError, match=r"no Kinetics clip folder for split 'train': looked for .*/\{train\} "
                                                r"and .*videos/\{train\} \(or pass `video_dir`\)"):
        load_video_dataset(tmp_path, split="train", num_frames=4, resolution=8)
    # a path passed that is not there is named (was: looked for others, "pass `video_dir`")
    for given, message in (("video_dir", "is not a folder"), ("annotations", "is not a file")):
        with pytest.raises(FileNotFoundError, match=f"^`{given}` .*mine {message}$"):
            load_video_dataset(tmp_path, split="train", num_frames=4, resolution=8, **{given: str(tmp_path / "mine")})


def test_k600_clips_in_linked_class_folders_are_found(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text("label,youtube_id,time_start,time_end\nabseiling,abc,0,10\n")
    write_counting_video(tmp_path / "elsewhere" / "abseiling" / "abc_000000_000010.mp4", frames=4)
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "abseiling").symlink_to(tmp_path / "elsewhere" / "abseiling")
    (tmp_path / "elsewhere" / "abseiling" / "loop").symlink_to(tmp_path / "train")  # a cycle ends the walk
    train = load_video_dataset(tmp_path, split="train", num_frames=4, resolution=8)
    assert train.index["path"] == [str(tmp_path / "train" / "abseiling" / "abc_000000_000010.mp4")]


# ------------------------------------------------------------------------------ skipping, streaming


@pytest.fixture
def folder_with_corrupt_files(tmp_path):
    for k in range(4):
        write_counting_video(tmp_path / "a" / f"{k}.mp4", frames=6, fps=8)
    write_corrupt(tmp_path / "b" / "random.mp4", "random")
    write_corrupt(tmp_path / "b" / "truncated.mp4", "truncated")
    return tmp_path


def test_corrupt_videos_are_logged_and_skipped(folder_with_corrupt_files, caplog):
    data = load_video_dataset(folder_with_corrupt_files, num_frames=6, resolution=8)
    with caplog.at_level(logging.WARNING):
        items = [data[i] for i in range(len(data))]
    assert len([r for r in caplog.records if "skipping unreadable video" in r.getMessage()]) == 2
    batch = collate_videos(items[3:] + [None])
    assert batch["video"].shape == (1, 3, 6, 8, 8) and batch["label"].tolist() == [0]
    assert [os.path.basename(p) for p in batch["skipped_paths"]] == ["random.mp4", "truncated.mp4", "<unknown>"]
    empty = collate_videos(items[4:])
    assert empty["video"] is None and empty["label"].numel() == 0


def test_dataloader_with_workers_counts_skipped_videos(folder_with_corrupt_files):
    data = load_video_dataset(folder_with_corrupt_files, num_frames=6, resolution=8)
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate_videos)
    summary = SkipSummary()
    labels = []
    for batch in loader:
        summary.update(batch)
        labels += batch["label"].tolist()
    assert labels == [0, 0, 0, 0] and summary.total == 6 and summary.num_skipped == 2
    assert str(summary).startswith("skipped 2 of 6 videos: ") and "truncated.mp4" in str(summary)


def test_datasets_survive_the_pickling_of_spawned_workers(tmp_path):
    """DataLoader workers started by "spawn" (macOS, Windows) get the dataset pickled: every item must come back the
    same (no lambdas, open files or containers held), the random windows included."""
    write_counting_video(tmp_path / "a" / "0.mp4", frames=20)
    data = load_video_dataset(tmp_path, num_frames=6, resolution=8, sampling="random")
    for dataset, key in [(data, (0, 7)), (MovingDigits(2, num_frames=3, size=8, digit_size=4), 1)]:
        torch.testing.assert_close(pickle.loads(pickle.dumps(dataset))[key]["video"], dataset[key]["video"])
    streaming = pickle.loads(pickle.dumps(streaming_video_dataset(data, seed=3)))
    torch.testing.assert_close(next(iter(streaming))["video"], data[(0, item_seed(3, 0, 0))]["video"])


def test_streaming_split_by_node(folder_with_corrupt_files):
    data = load_video_dataset(folder_with_corrupt_files, num_frames=6, resolution=8, sampling="center")
    seen = []
    for rank in range(2):
        part = list(streaming_video_dataset(data, rank=rank, world_size=2))
        assert part and all(item["video"] is None or item["video"].shape == (3, 6, 8, 8) for item in part)
        seen.append({item["path"] for item in part})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(data.index["path"])
    torch.testing.assert_close(next(iter(streaming_video_dataset(data)))["video"], data[0]["video"])
    with pytest.raises(ValueError, match="rank"):
        streaming_video_dataset(data, rank=2, world_size=2)


def test_seeded_streaming_windows_do_not_depend_on_workers_or_processes(tmp_path):
    for k in range(4):
        write_counting_video(tmp_path / "a" / f"{k}.mp4", frames=20, fps=8)
    data = load_video_dataset(tmp_path, num_frames=3, resolution=8, fps=8)  # "random" windows

    def windows(items):
        return {os.path.basename(item["path"]): frame_numbers(item["video"]) for item in items}

    torch.manual_seed(0)  # the global RNG must not matter
    alone = windows(streaming_video_dataset(data, seed=7))
    torch.manual_seed(1)
    loader = torch.utils.data.DataLoader(streaming_video_dataset(data, seed=7), batch_size=None, num_workers=2)
    assert windows(loader) == alone
    split = [windows(streaming_video_dataset(data, rank=r, world_size=2, seed=7)) for r in range(2)]
    assert {**split[0], **split[1]} == alone and len(split[0]) == len(split[1]) == 2
    # the map-style dataset cuts the same clips for the same (index, seed) keys, the training sampler's keys
    assert alone == windows(data[(i, item_seed(7, 0, i))] for i in range(4))
    sampler = StepBatchSampler(4, batch_size=4, seed=7, shuffle=False, item_seeds=True)
    assert next(iter(sampler)) == [(i, item_seed(7, 0, i)) for i in range(4)]
    assert windows(streaming_video_dataset(data, seed=7, epoch=1)) != alone
    assert set(next(iter(streaming_video_dataset(data, seed=7)))) == {"video", "label", "path"}
    for bad in ({"seed": -1}, {"seed": 0, "epoch": 1.5}):
        with pytest.raises(ValueError, match="`seed` must be a non-negative integer or None and `epoch`"):
            streaming_video_dataset(data, **bad)


def test_video_clip_dataset_validates_arguments(folder_with_corrupt_files):
    data = load_video_dataset(folder_with_corrupt_files)
    with pytest.raises(ValueError, match="sampling"):
        VideoClipDataset(data.index, sampling="middle")
    for fps in (0, float("nan"), float("inf")):  # refused before any video is decoded
        with pytest.raises(ValueError, match="fps a finite number > 0 or None"):
            VideoClipDataset(data.index, fps=fps)
    for bad in ({"resolution": 16.0}, {"num_frames": 5.0}, {"num_frames": 0}):  # a float failed inside PIL
        with pytest.raises(ValueError, match="num_frames and resolution integers >= 1"):
            VideoClipDataset(data.index, **bad)
    numpy_sizes = VideoClipDataset(data.index, num_frames=np.int64(4), resolution=np.int64(8))
    assert numpy_sizes[0]["video"].shape[1:] == (4, 8, 8)
    with pytest.raises(ValueError, match="layout"):
        load_video_dataset(folder_with_corrupt_files, layout="kinetics")


# ---------------------------------------------------------------------------------- pre-tokenization


class FakeTokenizer:
    """Average-pools each 1x4x4 block (frames kept) and quantizes the mean to 0..15."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def encode(self, video):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        pooled = torch.nn.functional.avg_pool3d(video.mean(1, keepdim=True), (1, 4, 4))[:, 0]
        return (pooled * 15.999).long()


class WithUnreadable(torch.utils.data.Dataset):
    """Moving digits where items 3 and 9 are 'unreadable'."""

    def __init__(self):
        self.clips = MovingDigits(14, seed=3, num_frames=3, size=16, digit_size=8)

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        return None if i in (3, 9) else self.clips[i]


def read_all(path):
    tokens = load_token_dataset(path)
    return [(item["input_ids"].tolist(), item["label"]) for item in tokens]


def test_pretokenize_round_trip_and_resume(tmp_path):
    data = WithUnreadable()
    reference = pretokenize(data, FakeTokenizer(), tmp_path / "clean", batch_size=2, chunk_size=4)
    assert len(reference) == 12 and reference["index"] == [i for i in range(14) if i not in (3, 9)]
    items = read_all(tmp_path / "clean")
    expected = FakeTokenizer().encode(data[5]["video"][None])[0]
    assert items[4] == (expected.tolist(), data[5]["label"])
    assert torch.tensor(items[0][0]).shape == (3, 4, 4)
    assert not os.path.exists(tmp_path / "clean" / "chunks")  # chunks are removed after the merge
    assert (tmp_path / "clean" / "skipped.json").read_text() == '["item 3", "item 9"]'

    # crash in the third encode call (chunk 1 has two batches): chunk 0 is complete, chunk 1 is not
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretokenize(data, FakeTokenizer(fail_after=2), tmp_path / "resumed", batch_size=2, chunk_size=4)
    assert sorted(os.listdir(tmp_path / "resumed" / "chunks")) == ["chunk_000000"]
    with pytest.raises(ValueError, match="chunk_size"):  # resuming needs the same chunking
        pretokenize(data, FakeTokenizer(), tmp_path / "resumed", batch_size=2, chunk_size=5)
    second = FakeTokenizer()
    pretokenize(data, second, tmp_path / "resumed", batch_size=2, chunk_size=4)
    assert second.calls == 5  # chunks 1..3 only: 2 + 2 + 1 batches
    assert read_all(tmp_path / "resumed") == items


def test_rerun_after_a_merge_killed_part_way_removes_its_leftovers(tmp_path):
    data = WithUnreadable()
    pretokenize(data, FakeTokenizer(), tmp_path, batch_size=2, chunk_size=4)
    # a kill after the merge's rename leaves the chunks; one while it saved, a temporary copy of the tokens
    shutil.copytree(tmp_path / "tokens", tmp_path / "chunks" / "chunk_000000")
    shutil.copytree(tmp_path / "tokens", tmp_path / ".tokens.tmp-123-abcdef01")
    items = read_all(tmp_path)
    assert len(pretokenize(data, FakeTokenizer(), tmp_path, batch_size=2, chunk_size=4)) == 12
    assert sorted(os.listdir(tmp_path)) == ["pretokenize.json", "skipped.json", "tokens"]
    assert read_all(tmp_path) == items


class UnreadableRun(WithUnreadable):
    """Moving digits where items 3, 4 and 5 (a whole chunk of 3) and 9 are 'unreadable'."""

    def __getitem__(self, i):
        return None if 3 <= i <= 5 or i == 9 else self.clips[i]


def test_pretokenize_merges_around_a_chunk_with_no_readable_item(tmp_path):
    merged = pretokenize(UnreadableRun(), FakeTokenizer(), tmp_path / "gap", batch_size=2, chunk_size=3)
    assert merged["index"] == [0, 1, 2, 6, 7, 8, 10, 11, 12, 13]
    assert (tmp_path / "gap" / "skipped.json").read_text() == '["item 3", "item 4", "item 5", "item 9"]'
    nothing = torch.utils.data.Subset(UnreadableRun(), range(3, 6))
    with pytest.raises(ValueError, match=r"none of the 3 items could be read.*skipped\.json"):
        pretokenize(nothing, FakeTokenizer(), tmp_path / "none", chunk_size=2)


def test_pretokenize_sharded_then_merged(tmp_path):
    data = WithUnreadable()
    pretokenize(data, FakeTokenizer(), tmp_path / "one", batch_size=3, chunk_size=3)
    reference = read_all(tmp_path / "one")
    out = tmp_path / "sharded"
    assert pretokenize(data, FakeTokenizer(), out, batch_size=3, chunk_size=3, num_shards=2, shard_index=1) is None
    with pytest.raises(FileNotFoundError, match="chunks are not written"):
        merge_token_chunks(out)
    pretokenize(data, FakeTokenizer(), out, batch_size=3, chunk_size=3, num_shards=2, shard_index=0)
    for folder in (out, out / "tokens"):  # training pointed at a folder whose shards are not merged yet
        with pytest.raises(FileNotFoundError, match=r"not merged yet.*in one process.*merge_token_chunks"):
            load_token_dataset(folder)

    class Untouchable(WithUnreadable):  # the finished chunks are not read again, only merged
        def __getitem__(self, i):
            raise AssertionError("read an item of a finished chunk")

    merged = pretokenize(Untouchable(), FakeTokenizer(), out, batch_size=3, chunk_size=3)  # the command, one process
    assert merged is not None and read_all(out) == reference


def test_pretokenize_keeps_class_names(tmp_path):
    class Named(torch.utils.data.Dataset):
        class_names = ["zero", "one"]

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"video": torch.full((3, 5, 8, 8), i / 3), "label": i % 2}

    merged = pretokenize(Named(), FakeTokenizer(), tmp_path / "named", batch_size=2)
    assert merged.features["label"].names == ["zero", "one"]
    assert merged["label"] == [0, 1, 0]


class TinyClips(torch.utils.data.Dataset):
    """Six flat grey clips carrying the clip settings of `VideoClipDataset`."""

    def __init__(self, resolution=8, fps=8):
        self.num_frames, self.resolution, self.fps, self.sampling = 3, resolution, fps, "center"

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"video": torch.full((3, self.num_frames, self.resolution, self.resolution), i / 6), "label": i % 2}


def test_pretokenize_resumes_only_with_the_same_tokenizer_and_clip_settings(tmp_path):
    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    def tokenizer(seed=0, fsq_levels=(8, 5, 5, 5)):
        torch.manual_seed(seed)
        return NBPVideoTokenizer(block_out_channels=(8, 16), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                                 fsq_levels=fsq_levels, norm_num_groups=4).eval()

    out = tmp_path / "tokens"
    pretokenize(TinyClips(), tokenizer(), out, batch_size=2, chunk_size=2, num_shards=2, shard_index=0)
    written = sorted(os.listdir(out / "chunks"))
    assert written == ["chunk_000000", "chunk_000002"]  # shard 1 (chunk 1) still to do
    refusals = [
        (TinyClips(resolution=16), tokenizer(), r"clip\.resolution 8 on disk, 16 now"),
        (TinyClips(fps=16), tokenizer(), r"clip\.fps 8 on disk, 16 now"),
        (TinyClips(), tokenizer(seed=1), r"tokenizer_weights '\w+' on disk, '\w+' now"),
        (TinyClips(), tokenizer(fsq_levels=(8, 5, 5)), r"tokenizer_config\.fsq_levels \[8, 5, 5, 5\] on disk"),
    ]
    for data, other, message in refusals:
        with pytest.raises(ValueError, match=message + r".*another output_dir \(or delete"):
            pretokenize(data, other, out, batch_size=2, chunk_size=2, num_shards=2, shard_index=1)
        assert sorted(os.listdir(out / "chunks")) == written
    # The same tokenizer loaded from another folder (only diffusers' bookkeeping differs) resumes.
    tokenizer().save_pretrained(tmp_path / "saved")
    reloaded = NBPVideoTokenizer.from_pretrained(tmp_path / "saved").eval()
    pretokenize(TinyClips(), reloaded, out, batch_size=2, chunk_size=2, num_shards=2, shard_index=1)
    merge_token_chunks(out)
    pretokenize(TinyClips(), tokenizer(), tmp_path / "clean", batch_size=2, chunk_size=2)
    assert read_all(out) == read_all(tmp_path / "clean")
    # a finished folder is checked too: another tokenizer never gets the old tokens back
    with pytest.raises(ValueError, match=r"tokenizer_weights '\w+' on disk, '\w+' now"):
        pretokenize(TinyClips(), tokenizer(seed=1), out, batch_size=2, chunk_size=2)


def test_pretokenized_windows_give_each_video_a_new_window_every_epoch(tmp_path):
    for name, frames in (("a/long.mp4", 40), ("a/short.mp4", 5), ("b/mid.mp4", 20)):
        write_counting_video(tmp_path / "videos" / name, frames=frames, fps=8)
    data = load_video_dataset(tmp_path / "videos", num_frames=4, resolution=8, fps=8, sampling="center")
    tokens = pretokenize(data, FakeTokenizer(), tmp_path / "tokens", batch_size=2, chunk_size=2, windows_per_video=3)
    assert list(tokens["index"]) == [0, 0, 0, 1, 1, 2, 2, 2]  # the 5-frame video has 2 possible windows, 3 wanted
    assert list(tokens["window"]) == [0, 1, 2, 0, 1, 0, 1, 2]
    windows = load_token_dataset(tmp_path / "tokens")
    assert len(windows) == 3 and windows.num_windows == 8
    for i, path in enumerate(data.index["path"]):
        expected = [FakeTokenizer().encode(clip[None])[0] for clip in load_clip_windows(path, 3, 4, 8, 8)]
        drawn = [windows[(i, seed)]["input_ids"] for seed in range(12)]
        assert {tuple(t.flatten().tolist()) for t in drawn} == {tuple(t.flatten().tolist()) for t in expected}
        assert torch.equal(windows[i]["input_ids"], expected[(len(expected) - 1) // 2])  # no seed: the middle one
        assert windows[(i, 5)]["label"] == data.index[i]["label"]

    # the training loop's sampler: a video per slot, its window drawn from (seed, epoch, video)
    sampler = iter(StepBatchSampler(len(windows), 3, seed=0, item_seeds=True))
    epochs = [[windows[key]["input_ids"] for key in sorted(next(sampler))] for _ in range(6)]
    assert any(not torch.equal(a[0], b[0]) for a in epochs for b in epochs)  # the long video's window changes
    again = iter(StepBatchSampler(len(windows), 3, seed=0, item_seeds=True, start_step=5))
    assert all(torch.equal(x, windows[key]["input_ids"]) for x, key in zip(epochs[5], sorted(next(again))))

    twice = TokenDataset(datasets.concatenate_datasets([tokens, tokens]))  # indices repeat, in two runs each
    assert len(twice) == 6 and all(torch.equal(twice[i + 3]["input_ids"], windows[i]["input_ids"]) for i in range(3))
    # rows without window numbers are an item each, whatever their index: e.g. a folder oversampled by repeating rows
    repeated = TokenDataset(tokens.remove_columns("window").select([0, 0, 0, 3]))
    assert len(repeated) == 4 and repeated.num_windows == 4
    assert len(TokenDataset(tokens.remove_columns(["window", "index"]).add_column("index", list("aabbbccc")))) == 8

    with pytest.raises(ValueError, match=r"windows_per_video 3 on disk, 2 now"):
        pretokenize(data, FakeTokenizer(), tmp_path / "tokens", batch_size=2, chunk_size=2, windows_per_video=2)
    with pytest.raises(TypeError, match=r"windows_per_video=2 needs a dataset that cuts videos into windows"):
        pretokenize(TinyClips(), FakeTokenizer(), tmp_path / "other", windows_per_video=2)
    with pytest.raises(ValueError, match=r"`windows_per_video` must be an integer >= 1, got 0"):
        pretokenize(data, FakeTokenizer(), tmp_path / "other", windows_per_video=0)


def test_a_folder_without_tokens_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no pre-tokenized videos \(the output_dir of `nbp "
                                                r"pretokenize` or its tokens folder\)$"):
        load_token_dataset(tmp_path / "empty")
    write_counting_video(tmp_path / "videos" / "a" / "0.mp4", frames=2)  # the video folder given instead of tokens
    with pytest.raises(FileNotFoundError, match=r"videos holds no pre-tokenized videos .*; it holds videos: tokenize "
                                                r"them first \(`nbp pretokenize --data"):
        load_token_dataset(tmp_path / "videos")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_token_dataset(tmp_path / "missing")


def test_pretokenize_starts_over_after_a_run_that_wrote_no_tokens(tmp_path):
    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    torch.manual_seed(0)
    tok = NBPVideoTokenizer(block_out_channels=(8, 16), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                            fsq_levels=(8, 5, 5, 5), norm_num_groups=4).eval()
    digits = {"size": 16, "digit_size": 8}
    with pytest.raises(ValueError, match="frame count"):  # 4 frames: the tokenizer takes 1 + 2n
        pretokenize(MovingDigits(2, num_frames=4, **digits), tok, tmp_path / "tokens", batch_size=2)
    assert len(pretokenize(MovingDigits(2, num_frames=5, **digits), tok, tmp_path / "tokens", batch_size=2)) == 2


def test_pretokenize_resumes_only_with_the_same_videos(tmp_path):
    from modeling_nbp.data import MovingDigits
    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    torch.manual_seed(0)
    tok = NBPVideoTokenizer(block_out_channels=(8, 16), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                            fsq_levels=(8, 5, 5, 5), norm_num_groups=4).eval()
    digits = dict(num_frames=3, size=16, digit_size=8)
    pretokenize(MovingDigits(4, seed=0, **digits), tok, tmp_path / "digits", batch_size=2, chunk_size=2, num_shards=2)
    with pytest.raises(ValueError, match=r"clip\.seed 0 on disk, 1 now"):  # same length, other clips
        pretokenize(MovingDigits(4, seed=1, **digits), tok, tmp_path / "digits", batch_size=2, chunk_size=2,
                    num_shards=2, shard_index=1)
    for k in range(3):
        write_counting_video(tmp_path / "videos" / "a" / f"{k}.mp4", frames=6)
    first = load_video_dataset(tmp_path / "videos", num_frames=3, resolution=8)
    pretokenize(first, tok, tmp_path / "files", batch_size=2, chunk_size=2, num_shards=2)
    (tmp_path / "videos" / "a" / "2.mp4").rename(tmp_path / "videos" / "a" / "3.mp4")  # same count, another video
    with pytest.raises(ValueError, match=r"videos '\w+' on disk, '\w+' now"):
        pretokenize(load_video_dataset(tmp_path / "videos", num_frames=3, resolution=8), tok, tmp_path / "files",
                    batch_size=2, chunk_size=2, num_shards=2, shard_index=1)


def test_pretokenize_resumes_whichever_way_the_video_folder_is_written(tmp_path, monkeypatch):
    for k in range(3):
        write_counting_video(tmp_path / "videos" / "a" / f"{k}.mp4", frames=6)

    def clips(root):
        return load_video_dataset(root, num_frames=3, resolution=8, sampling="center")

    pretokenize(clips(tmp_path / "videos"), FakeTokenizer(), tmp_path / "tokens", chunk_size=2, num_shards=2)
    monkeypatch.chdir(tmp_path)  # the same videos by a relative path: not other videos
    pretokenize(clips("videos"), FakeTokenizer(), "tokens", chunk_size=2, num_shards=2, shard_index=1)
    assert merge_token_chunks(tmp_path / "tokens")["index"] == [0, 1, 2]


def test_pretokenize_processes_take_their_own_gpu(monkeypatch):
    module = importlib.import_module("modeling_nbp.data.pretokenize")  # the package exports the function by that name
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert module.default_device() == "cuda:3"
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: False)
    assert module.default_device() == "cpu"


def test_settings_files_from_before_a_setting_existed(tmp_path):
    from modeling_nbp.run_files import read_settings_differences, write_json

    path = tmp_path / "pretokenize.json"
    assert read_settings_differences(path, {"clip": {"fps": 8}}) is None
    write_json(path, {"clip": {"fps": 8}, "chunk_size": 4})  # written before clips could be squashed
    earlier = {"clip": {"resize": "crop"}}
    assert read_settings_differences(path, {"clip": {"fps": 8, "resize": "crop"}, "chunk_size": 4}, earlier) == []
    assert read_settings_differences(path, {"clip": {"fps": 8, "resize": "squash"}, "chunk_size": 4}, earlier) == [
        "clip.resize 'crop' on disk, 'squash' now"]
    assert read_settings_differences(path, {"clip": {"fps": 8, "resize": "crop"}, "chunk_size": 4}) == [
        "clip.resize None on disk, 'crop' now"]


def test_pretokenize_command_defaults_to_the_tokenizers_training_clips(tmp_path, monkeypatch, caplog):
    """A tokenizer trained on 3-frame 8x8 16 fps cropped clips (as `nbp train-tokenizer` records them) tokenizes such
    clips unless a flag says otherwise (17 frames at 128x128, 8 fps, squashed, were cut whatever it was trained on)."""
    module = importlib.import_module("modeling_nbp.data.pretokenize")
    from modeling_nbp.run_files import write_json
    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    tokenizer = NBPVideoTokenizer(block_out_channels=(8, 16), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                                  fsq_levels=(8, 5, 5, 5), norm_num_groups=4)
    tokenizer.save_pretrained(tmp_path / "plain")  # as a converted official tokenizer: no training clips
    tokenizer.save_pretrained(tmp_path / "trained")
    recorded = tmp_path / "trained" / module.TRAINING_CLIPS_FILE
    write_json(recorded, {"num_frames": 3, "resolution": 8, "fps": 16.0, "resize": "crop"})
    for k in range(2):
        write_counting_video(tmp_path / "videos" / "a" / f"{k}.mp4", frames=6)

    def clips(tokenizer_folder, *flags):
        """The clip settings of the dataset that `nbp pretokenize` tokenizes."""
        module.main(["--data", str(tmp_path / "videos"), "--tokenizer", str(tmp_path / tokenizer_folder),
                     "--output_dir", str(tmp_path / "tokens"), "--device", "cpu", *flags])
        return [getattr(tokenized[-1], k) for k in ("num_frames", "resolution", "fps", "resize")]

    tokenized, pretokenize = [], module.pretokenize
    monkeypatch.setattr(module, "pretokenize", lambda data, *args, **kwargs: tokenized.append(data) or pretokenize(
        data, *args, **kwargs))
    assert clips("trained") == [3, 8, 16, "crop"]
    assert load_token_dataset(tmp_path / "tokens")[0]["input_ids"].shape == (2, 4, 4)
    module.main(["--data", str(tmp_path / "videos"), "--tokenizer", str(tmp_path / "trained"), "--output_dir",
                 str(tmp_path / "windows"), "--device", "cpu", "--windows_per_video", "2"])
    assert load_token_dataset(tmp_path / "windows").num_windows == 4  # 6 frames: windows from frames 0 and 3
    calls = []  # settings only from here on
    monkeypatch.setattr(module, "pretokenize",
                        lambda data, *args, **kwargs: tokenized.append(data) or calls.append(kwargs))
    with caplog.at_level(logging.WARNING, logger=module.__name__):
        assert clips("trained", "--fps", "16") == [3, 8, 16, "crop"] and not caplog.records
        assert clips("trained", "--fps", "8", "--resize", "squash") == [3, 8, 8, "squash"]  # a flag wins
    assert [r.getMessage() for r in caplog.records] == [
        f"--fps 8.0 differs from the tokenizer's training clips (fps 16.0 in {recorded})",
        f"--resize squash differs from the tokenizer's training clips (resize crop in {recorded})"]
    assert clips("plain") == [17, 128, 8, "squash"]  # a folder without the file: the defaults as before
    assert calls[-1]["num_workers"] == min(4, len(os.sched_getaffinity(0)))  # videos decode beside the tokenizer
    assert module.training_clips("someone/tokenizer") == {}  # nor has a Hub id
    recorded.write_text('{"num_frames": 3,')  # cut off
    with pytest.raises(ValueError, match="training_clips.json is not readable JSON"):
        module.training_clips(tmp_path / "trained")


def test_pretokenize_command_checks_its_flags_before_reading_videos(tmp_path, capsys):
    from modeling_nbp.data.pretokenize import main
    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    NBPVideoTokenizer(block_out_channels=(8, 16), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                      fsq_levels=(8, 5, 5, 5), norm_num_groups=4).save_pretrained(tmp_path / "tok")
    base = ["--data", str(tmp_path / "none"), "--tokenizer", str(tmp_path / "tok"), "--output_dir", str(tmp_path / "o")]
    for flags, message in [(["--batch_size", "0"], "argument --batch_size: expected an integer >= 1"),
                           (["--fps", "0"], "argument --fps"),
                           (["--num_frames", "4"], "--num_frames / --resolution: `num_frames` must be 1 \\+ 2 \\* n"),
                           (["--resolution", "9"], "--num_frames / --resolution: `height` must be a multiple of")]:
        with pytest.raises(SystemExit) as exited:  # were found after the dataset was read, or not at all
            main([*base, *flags])
        assert exited.value.code == 2 and re.search(message, capsys.readouterr().err), flags


def test_a_tokenizer_on_the_hub_is_found_with_its_training_clips(tmp_path, local_hub):
    """`nbp pretokenize --tokenizer owner/name` (and `nbp train --tokenizer`): a pipeline repo's tokenizer (not its
    generator) or a tokenizer repo is downloaded, with the clips it was trained on."""
    from huggingface_hub import HfApi

    from modeling_nbp import NBPConfig, NBPForVideoGeneration, NBPVideoPipeline
    from modeling_nbp.run_files import write_json
    from modeling_nbp.video_tokenizer import NBPVideoTokenizer

    module = importlib.import_module("modeling_nbp.data.pretokenize")
    tokenizer = NBPVideoTokenizer(block_out_channels=(8, 16), layers_per_block=(1, 1), downsample_strides=((2, 2),),
                                  fsq_levels=(8, 5, 5, 5), norm_num_groups=4)
    generator = NBPForVideoGeneration(NBPConfig(latent_shape=[2, 4, 4], block_shape=[1, 1, 4], video_vocab_size=1000,
                                                num_classes=2, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2))
    NBPVideoPipeline(transformer=generator, video_tokenizer=tokenizer).save_pretrained(tmp_path / "pipe")
    write_json(tmp_path / "pipe" / "video_tokenizer" / module.TRAINING_CLIPS_FILE, {"num_frames": 3, "resolution": 8})
    api = HfApi()
    for repo, folder in (("test-user/pipe", tmp_path / "pipe"), ("test-user/tok", tmp_path / "pipe/video_tokenizer")):
        api.create_repo(repo)
        api.upload_folder(repo_id=repo, folder_path=folder)
    uploads = len(local_hub.requests)

    for repo in ("test-user/pipe", "test-user/tok"):
        folder = module.tokenizer_folder(repo)
        assert module.training_clips(folder) == {"num_frames": 3, "resolution": 8}
        assert NBPVideoTokenizer.from_pretrained(folder).codebook_size == tokenizer.codebook_size
    assert not [path for _, path in local_hub.requests[uploads:] if "transformer" in path]  # nor is the generator
    assert module.tokenizer_folder(tmp_path / "pipe") == str(tmp_path / "pipe" / "video_tokenizer")
    with pytest.raises(FileNotFoundError, match=r"tokenizer '\./tok': no folder at .* \(a Hub repo id has the form"):
        module.tokenizer_folder("./tok")
    with pytest.raises(OSError, match=r"tokenizer 'test-user/none' is neither a local folder .* nor a Hub repo that"):
        module.tokenizer_folder("test-user/none")

    for k in range(2):
        write_counting_video(tmp_path / "videos" / "a" / f"{k}.mp4", frames=6)
    module.main(["--data", str(tmp_path / "videos"), "--tokenizer", "test-user/pipe", "--output_dir",
                 str(tmp_path / "tokens"), "--device", "cpu"])
    assert load_token_dataset(tmp_path / "tokens")[0]["input_ids"].shape == (2, 4, 4)  # 3 frames of 8x8: the record
