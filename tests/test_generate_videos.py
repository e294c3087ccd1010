"""`nbp generate`: files per video, resuming, sharing the work between processes, context clips from folders."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from modeling_nbp.cli import main as nbp
from modeling_nbp.generate_videos import generate_to_folder, name_seed, plan_videos
from modeling_nbp.video_io import export_to_gif, export_to_mp4, read_video
from test_pipeline import tiny_pipeline


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny class-conditional pipeline and its folder."""
    pipe = tiny_pipeline()
    path = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(path)
    return pipe, str(path)


def assert_same_video(a, b):
    """Decoded files made from the same frames: a pixel that kernel rounding moves by one level may move a lossy
    codec's choices (palette, quantisation) by a few levels nearby, never the video."""
    a, b = np.asarray(a, dtype=int), np.asarray(b, dtype=int)
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0, np.abs(a - b).mean()


def generate(model, out, *flags):
    nbp(["generate", "--model", str(model), "--output_dir", str(out), "--device", "cpu", *map(str, flags)])


def refused(capsys, model, out, *flags) -> str:
    """The one-line usage error (exit status 2) of `nbp generate` with these arguments."""
    with pytest.raises(SystemExit) as exited:
        generate(model, out, *flags)
    assert exited.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_files_hold_the_pipeline_videos(saved, tmp_path):
    pipe, model = saved
    generate(model, tmp_path / "out", "--class_labels", "0", "square", "--seed", "3")
    # each video's generator is seeded from --seed and the video's name
    expected = pipe(class_labels=[0, 1], generator=[gen(name_seed(3, n)) for n in ("circle_0", "square_0")],
                    output_type="np").frames
    for i, name in enumerate(["circle_0", "square_0"]):
        for fmt, export in (("mp4", export_to_mp4), ("gif", export_to_gif)):
            frames, _ = read_video(str(tmp_path / "out" / f"{name}.{fmt}"))
            assert frames.shape == (5, 8, 8, 3)
            # the file holds the pipeline's frames: identical to encoding them directly ...
            reference, _ = read_video(export(expected[i], str(tmp_path / f"ref.{fmt}"), fps=8))
            assert_same_video(frames, reference)
            # ... and within the codec's loss of them (8x8 noise-like frames: 4:2:0 chroma / a 256-colour palette)
            assert np.abs(frames.astype(np.float32) - expected[i] * 255).mean() < (40 if fmt == "mp4" else 12)
    with PIL.Image.open(tmp_path / "out" / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 5 * 8
    # npy: the frames themselves, as uint8 (what an exact FVD reads)
    generate(model, tmp_path / "npy", "--class_labels", "square", "--seed", "3", "--formats", "npy")
    frames = np.load(tmp_path / "npy" / "square_0.npy")
    assert frames.dtype == np.uint8 and np.array_equal(frames, np.round(expected[1] * 255).astype(np.uint8))
    assert (tmp_path / "npy" / "contact_sheet.png").exists()
    settings = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert settings["seed"] == 3 and settings["dtype"] == "torch.float32"
    # one video per call, and a run that makes only one of them: the same videos
    generate(model, tmp_path / "one", "--class_labels", "square", "--seed", "3", "--batch_size", "1", "--formats",
             "gif", "--contact_sheet", "0")
    assert sorted(os.listdir(tmp_path / "one")) == ["generate.json", "square_0.gif"]
    one, _ = read_video(str(tmp_path / "one" / "square_0.gif"))
    assert_same_video(one, read_video(str(tmp_path / "out" / "square_0.gif"))[0])
    # a longer video: its first window is the 5-frame video
    generate(model, tmp_path / "long", "--class_labels", "0", "--seed", "3", "--num_frames", "9",
             "--window_context_frames", "1", "--formats", "gif")
    long, _ = read_video(str(tmp_path / "long" / "circle_0.gif"))
    assert long.shape == (9, 8, 8, 3)
    assert_same_video(long[:5], read_video(str(tmp_path / "out" / "circle_0.gif"))[0])


def test_bad_arguments(saved, tmp_path, capsys):
    _, model = saved
    error = refused(capsys, model, tmp_path / "bad", "--class_labels", "0", "--num_frames", "9",
                    "--window_context_frames", "2")
    assert "--window_context_frames / --num_frames: context_frames must be one of [1, 3]" in error
    assert not os.path.exists(tmp_path / "bad" / "generate.json")  # refused before the run's settings are written
    for flag, value in (("--batch_size", "0"), ("--num_videos_per_class", "0"), ("--context_fps", "0"),
                        ("--context_fps", "nan"), ("--clip_fps", "-8")):  # refused by the parser, before any model loads
        with pytest.raises(SystemExit):
            nbp(["generate", "--model", str(tmp_path / "missing"), flag, value])
    for flags, reader in [(["--clip_fps", "16"], "--dataset"), (["--num_clips=3"], "--dataset"),
                          (["--context_frames", "5"], "--context or --dataset"), (["--context_fps", "8"], "--context")]:
        error = refused(capsys, model, tmp_path / "x", *flags)
        assert f"{flags[0].split('=')[0]} would be ignored: only {reader} reads it" in error
    with pytest.raises(SystemExit):  # no abbreviations: --num_videos was taken as --num_videos_per_class
        nbp(["generate", "--model", model, "--num_videos", "3"])
    assert "unrecognized arguments: --num_videos 3" in capsys.readouterr().err
    # found before any video is made: a usage error, not a traceback
    assert "unknown class name 'hexagon'" in refused(capsys, model, tmp_path / "bad", "--class_labels", "hexagon")
    assert "two videos would be called 'circle_0'" in refused(capsys, model, tmp_path / "bad", "--class_labels", "0",
                                                              "circle")
    assert "neither a video file nor a folder" in refused(capsys, model, tmp_path / "bad", "--context",
                                                          tmp_path / "nothing.mp4", "--class_labels", "0")
    assert "missing': no folder at" in refused(capsys, tmp_path / "missing", tmp_path / "bad")
    (tmp_path / "file").write_text("")
    assert "file is a file, not a folder" in refused(capsys, model, tmp_path / "file")


def test_context_lengths_the_model_cannot_take_are_refused_before_any_video(saved, tmp_path, capsys):
    _, model = saved  # contexts of 1 or 3 frames (whole latent frames, fewer than the 5 of a window)
    export_to_mp4(np.zeros((3, 8, 8, 3), np.uint8), str(tmp_path / "clips" / "a.mp4"), fps=8)
    error = refused(capsys, model, tmp_path / "out", "--context", tmp_path / "clips", "--class_labels", "0",
                    "--context_frames", "2")
    assert "--context_frames must be one of [1, 3] for this model" in error
    error = refused(capsys, model, tmp_path / "out", "--window_context_frames", "2")  # also without --num_frames
    assert "--window_context_frames / --num_frames: context_frames must be one of [1, 3]" in error
    assert not (tmp_path / "out").exists()  # no settings written, no clip read


def test_a_rerun_resumes_and_other_settings_are_refused(saved, tmp_path):
    _, model = saved
    out = tmp_path / "out"
    generate(model, out, "--num_videos_per_class", "2", "--formats", "gif")
    names = [f"{c}_{k}" for c in ("circle", "square", "TriangleUp") for k in range(2)]
    assert sorted(p for p in os.listdir(out) if p.endswith(".gif")) == sorted(f"{n}.gif" for n in names)
    before = {n: (out / f"{n}.gif").read_bytes() for n in names}
    stamps = {n: os.stat(out / f"{n}.gif").st_mtime_ns for n in names}
    os.remove(out / "square_1.gif")
    generate(model, out, "--num_videos_per_class", "2", "--formats", "gif")  # remakes only the missing video
    assert (out / "square_1.gif").read_bytes() == before["square_1"]
    assert all(os.stat(out / f"{n}.gif").st_mtime_ns == stamps[n] for n in names if n != "square_1")
    # more videos per class: the old ones stay, the new ones are added
    generate(model, out, "--num_videos_per_class", "3", "--formats", "gif")
    assert (out / "circle_2.gif").exists() and os.stat(out / "circle_0.gif").st_mtime_ns == stamps["circle_0"]
    # other sampling would mix two runs' videos
    with pytest.raises(SystemExit, match=r"other settings \(top_k None on disk, 5 now\).*--overwrite"):
        generate(model, out, "--formats", "gif", "--top_k", "5")
    generate(model, out, "--formats", "gif", "--top_k", "5", "--overwrite", "--class_labels", "circle")
    assert os.stat(out / "circle_0.gif").st_mtime_ns != stamps["circle_0"]
    assert json.loads((out / "generate.json").read_text())["top_k"] == 5


def test_speed_options_give_the_same_videos_and_are_recorded(saved, tmp_path):
    """The fast paths (here the Triton attention and norms under Triton's interpreter, the 2D convolutions) make the
    default path's videos; a folder started without the options (or before they existed) resumes only with their
    defaults."""
    _, model = saved
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    generate(model, plain, "--class_labels", "0", "--formats", "npy")
    speed = ("--compile_decode", "triton-attention", "--norm_implementation", "triton",
             "--conv_implementation", "frames2d")
    generate(model, fast, "--class_labels", "0", "--formats", "npy", *speed)
    a, b = np.load(plain / "circle_0.npy"), np.load(fast / "circle_0.npy")
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # uint8 frames: at most a rounding apart
    settings = json.loads((fast / "generate.json").read_text())
    assert (settings["compile_decode"], settings["norm_implementation"], settings["conv_implementation"]) == (
        "triton-attention", "triton", "frames2d")
    with pytest.raises(SystemExit, match=r"conv_implementation 'conv3d' on disk, 'frames2d' now"):
        generate(model, plain, "--class_labels", "0", "--formats", "npy", *speed)
    written = json.loads((plain / "generate.json").read_text())
    for key in ("compile_decode", "norm_implementation", "conv_implementation"):
        del written[key]
    (plain / "generate.json").write_text(json.dumps(written))  # as an earlier version wrote it
    generate(model, plain, "--class_labels", "0", "--formats", "npy")


def test_files_appear_batch_by_batch_and_a_crash_loses_only_the_batch_under_way(saved, tmp_path, monkeypatch):
    pipe, _ = saved
    jobs = plan_videos(pipe, seed=0, num_videos_per_class=2)
    calls = []
    original = type(pipe).__call__

    def failing_second_call(self, *args, **kwargs):
        calls.append(sorted(os.listdir(tmp_path)))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", failing_second_call)
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_to_folder(pipe, jobs, str(tmp_path), formats=("gif",), batch_size=4, show_progress=False)
    assert calls[1] == sorted(f"{j.name}.gif" for j in jobs[:4])  # the first batch was on disk before the second
    assert sorted(os.listdir(tmp_path)) == calls[1]  # no partial or temporary file of the failed batch
    monkeypatch.undo()
    (tmp_path / f"{jobs[0].name}.gif").write_bytes(b"")  # a file whose contents a power cut lost: made again
    summary = generate_to_folder(pipe, jobs, str(tmp_path), formats=("gif",), batch_size=4, show_progress=False)
    assert (summary.made, summary.existing) == (3, 3) and os.path.getsize(tmp_path / f"{jobs[0].name}.gif") > 0


def test_processes_share_the_work_without_changing_the_videos(saved, tmp_path):
    pipe, _ = saved
    jobs = plan_videos(pipe, seed=1, num_videos_per_class=2)
    alone = generate_to_folder(pipe, jobs, str(tmp_path / "alone"), formats=("gif",), batch_size=6,
                               show_progress=False)
    shares = [generate_to_folder(pipe, jobs, str(tmp_path / "shared"), formats=("gif",), batch_size=2,
                                 process_index=p, num_processes=2, show_progress=False) for p in range(2)]
    assert alone.made == 6 and [s.made for s in shares] == [3, 3]
    assert {os.path.basename(f) for s in shares for f in s.written} == {os.path.basename(f) for f in alone.written}
    for job in jobs:
        a, _ = read_video(str(tmp_path / "alone" / f"{job.name}.gif"))
        b, _ = read_video(str(tmp_path / "shared" / f"{job.name}.gif"))
        assert_same_video(a, b)  # batched kernels may round differently


def test_accelerate_launch_two_processes(saved, tmp_path):
    _, model = saved
    out = tmp_path / "out"
    # --multi_gpu starts torchrun; with --device cpu the processes join over gloo (accelerate's --cpu would start one)
    with socket.socket() as s:  # a free port: another launch on this machine may hold the default one
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "modeling_nbp.cli",
               "generate", "--model", model, "--output_dir", str(out), "--formats", "gif", "--num_videos_per_class", "2",
               "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0: made 3 videos" in result.stdout and "process 1: made 3 videos" in result.stdout
    assert len([p for p in os.listdir(out) if p.endswith(".gif")]) == 6 and (out / "contact_sheet.png").exists()
    single = tmp_path / "single"
    generate(model, single, "--formats", "gif", "--num_videos_per_class", "2")
    for name in ("circle_1", "TriangleUp_0"):
        a, _ = read_video(str(out / f"{name}.gif"))
        assert_same_video(a, read_video(str(single / f"{name}.gif"))[0])


def test_context_clips_from_folders(tmp_path, capsys):
    pipe = tiny_pipeline(mode="frames")  # continues 1 frame (one latent frame) into 5
    pipe.save_pretrained(tmp_path / "pipe")
    clips = tmp_path / "clips"
    rng = np.random.default_rng(0)
    export_to_mp4(rng.integers(0, 256, (6, 16, 24, 3), dtype=np.uint8), str(clips / "walk" / "a.mp4"), fps=8)
    export_to_mp4(rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), str(clips / "b.mp4"), fps=8)
    export_to_mp4(rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8), str(clips / "c.mp4"), fps=8)
    (clips / "broken.mp4").write_bytes(b"not a video")
    (clips / "notes.txt").write_text("not a video either")
    out = tmp_path / "out"
    assert "--class_labels given, but this model is not class-conditional" in refused(
        capsys, tmp_path / "pipe", out, "--context", clips, "--class_labels", "0")
    generate(tmp_path / "pipe", out, "--context", clips, "--num_videos_per_class", "2", "--formats", "mp4")
    made = sorted(p for p in os.listdir(out) if p.endswith(".mp4"))
    assert made == ["b_0.mp4", "b_1.mp4", "c_0.mp4", "c_1.mp4", "walk_a_0.mp4", "walk_a_1.mp4"]
    assert "skipped context clip" in capsys.readouterr().out  # the broken file, reported
    # the continuation of a clip: its first frame, squashed to 8x8, given to the pipeline
    from modeling_nbp.data.clips import resize_frames

    first, _ = read_video(str(clips / "walk" / "a.mp4"))
    expected = pipe(video=resize_frames(first[:1], 8, "squash"), generator=gen(name_seed(0, "walk_a_1")),
                    output_type="np").frames[0]
    got, _ = read_video(str(out / "walk_a_1.mp4"))
    reference, _ = read_video(export_to_mp4(expected, str(tmp_path / "ref.mp4"), fps=8))
    assert_same_video(got, reference)
    # three context frames (two latent frames): the 2-frame clip is reported and skipped, the others continue
    generate(tmp_path / "pipe", tmp_path / "three", "--context", clips / "walk", clips / "b.mp4", clips / "c.mp4",
             "--context_frames", "3", "--formats", "gif")
    printed = capsys.readouterr().out
    assert "c.mp4 has 2 frames at its own frame rate; the context needs 3" in printed
    assert sorted(p for p in os.listdir(tmp_path / "three") if p.endswith(".gif")) == ["a_0.gif", "b_0.gif"]
    context, _ = read_video(str(clips / "b.mp4"))
    expected = pipe(video=context, generator=gen(name_seed(0, "b_0")), output_type="np").frames[0]
    reference, _ = read_video(export_to_gif(expected, str(tmp_path / "ref.gif"), fps=8))
    assert_same_video(read_video(str(tmp_path / "three" / "b_0.gif"))[0], reference)


def test_triton_options_the_device_cannot_run_are_refused_before_any_video(saved, tmp_path, capsys, monkeypatch):
    _, model = saved
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU runs no Triton kernel outside the tests
    for flags in (("--compile_decode", "triton"), ("--norm_implementation", "triton")):
        assert f"{' '.join(flags)} runs on a CUDA device" in refused(capsys, model, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_among_the_inputs_and_an_ignored_rate_are_refused(saved, tmp_path, capsys, monkeypatch):
    _, model = saved
    clips = tmp_path / "my clips"  # a space in the path, and relative paths, as a user writes them
    export_to_mp4(np.zeros((3, 8, 8, 3), dtype=np.uint8), str(clips / "walk" / "a.mp4"), fps=8)
    monkeypatch.chdir(tmp_path)
    # a rerun would continue its own videos as context clips, or read them as dataset clips
    for out in ("my clips", "my clips/out", "my clips/walk"):
        assert "inside --context folder my clips" in refused(capsys, model, out, "--context", "my clips",
                                                             "--class_labels", "0")
        assert "inside --dataset my clips" in refused(capsys, model, out, "--dataset", "my clips")
    # a frame rate that the clips would not be read at
    assert "--dataset clips are read at --clip_fps" in refused(capsys, model, "out", "--dataset", "my clips",
                                                               "--context_fps", "16")
    # --overwrite would delete a context clip that lies among the videos
    assert "--context my clips/walk/a.mp4 is in --output_dir" in refused(
        capsys, model, "my clips/walk", "--context", "my clips/walk/a.mp4", "--class_labels", "0")
    assert sorted(os.listdir(clips)) == ["walk"] and os.listdir(clips / "walk") == ["a.mp4"]


def test_a_class_model_continues_one_block_of_latent_frames_by_default(tmp_path):
    pipe = tiny_pipeline(block=(2, 4, 4), latent_shape=(4, 4, 4))  # blocks of 2 latent frames: contexts of 3 frames
    pipe.save_pretrained(tmp_path / "pipe")
    clip = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    export_to_mp4(clip, str(tmp_path / "clips" / "a.mp4"), fps=8)
    generate(tmp_path / "pipe", tmp_path / "out", "--context", tmp_path / "clips", "--class_labels", "1",
             "--formats", "mp4")
    context, _ = read_video(str(tmp_path / "clips" / "a.mp4"))
    expected = pipe(video=context[:3], class_labels=[1], generator=gen(name_seed(0, "a_0")), output_type="np")
    reference, _ = read_video(export_to_mp4(expected.frames[0], str(tmp_path / "ref.mp4"), fps=8))
    assert_same_video(read_video(str(tmp_path / "out" / "a_0.mp4"))[0], reference)


def test_an_interrupted_overwrite_resumes_without_the_old_videos(saved, tmp_path, monkeypatch):
    pipe, model = saved
    out, flags = tmp_path / "out", ("--formats", "npy", "--batch_size", "2", "--contact_sheet", "0")
    generate(model, out, "--seed", "0", *flags)
    old = {p: np.load(out / p) for p in os.listdir(out) if p.endswith(".npy")}
    calls = []
    original = type(pipe).__call__

    def killed_in_the_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", killed_in_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate(model, out, "--seed", "1", "--overwrite", *flags)
    monkeypatch.undo()
    assert len([p for p in os.listdir(out) if p.endswith(".npy")]) == 2  # the old videos went first
    generate(model, out, "--seed", "1", *flags)  # resumes: makes the missing ones with seed 1
    generate(model, tmp_path / "clean", "--seed", "1", *flags)
    for name in old:
        assert np.array_equal(np.load(out / name), np.load(tmp_path / "clean" / name))
        assert not np.array_equal(np.load(out / name), old[name])


def test_a_run_that_failed_before_any_video_does_not_lock_its_folder(saved, tmp_path, monkeypatch):
    pipe, model = saved
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError, match="oom"):
        generate(model, tmp_path / "out", "--top_k", "5", "--formats", "gif")
    monkeypatch.undo()
    generate(model, tmp_path / "out", "--top_k", "6", "--formats", "gif")  # other settings, but no video yet
    assert json.loads((tmp_path / "out" / "generate.json").read_text())["top_k"] == 6
    with pytest.raises(SystemExit):  # refused by the parser
        nbp(["generate", "--model", model, "--contact_sheet", "-1"])
    with pytest.raises(SystemExit):
        nbp(["generate", "--model", model, "--fps", "0"])


def test_a_model_changed_in_place_is_another_model(tmp_path):
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    generate(tmp_path / "pipe", tmp_path / "out", "--formats", "gif", "--contact_sheet", "0")
    pipe.save_pretrained(tmp_path / "pipe")  # retrained or converted again at the same path
    weights = tmp_path / "pipe" / "transformer" / "model.safetensors"
    later = os.stat(weights).st_mtime_ns + 2 * 10**9  # a later save, also where file times have 1-2 s resolution
    os.utime(weights, ns=(later, later))
    with pytest.raises(SystemExit, match="other settings.*model.files"):
        generate(tmp_path / "pipe", tmp_path / "out", "--formats", "gif")


def test_a_folder_keeps_the_frame_rate_it_was_started_with(saved, tmp_path, capsys):
    _, model = saved
    generate(model, tmp_path / "out", "--class_labels", "0", "--formats", "npy", "--fps", "5", "--contact_sheet", "0")
    generate(model, tmp_path / "out", "--class_labels", "0", "square", "--formats", "npy", "--contact_sheet", "0")
    assert "made 1 videos, 1 were already in" in capsys.readouterr().out  # resumed: no --fps means the folder's


def test_demo_names_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from anywhere, not only the repository's root
    generate("demo", tmp_path / "out", "--class_labels", "3", "--formats", "npy", "--contact_sheet", "0")
    from modeling_nbp.demo import DEMO_MODEL

    assert sorted(os.listdir(tmp_path / "out")) == ["3_0.npy", "generate.json"]
    assert json.loads((tmp_path / "out" / "generate.json").read_text())["model"]["path"] == DEMO_MODEL


def test_demo_names_the_bundled_model_unless_a_pipeline_folder_is_called_so(tmp_path, monkeypatch):
    import modeling_nbp.generate_videos as generate_videos
    from modeling_nbp.demo import DEMO_MODEL

    models = []
    monkeypatch.setattr(generate_videos, "run_generate", lambda args, **kwargs: models.append(args.model))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("a file, not a pipeline folder")
    nbp(["generate", "--model", "demo"])
    os.remove(tmp_path / "demo")
    os.mkdir(tmp_path / "demo")  # a folder that is not a pipeline (`nbp demo --output_dir demo`'s videos)
    nbp(["generate", "--model", "demo"])
    (tmp_path / "demo" / "model_index.json").write_text("{}")
    nbp(["generate", "--model", "demo"])
    assert models == [DEMO_MODEL, DEMO_MODEL, "demo"]


def test_context_files_are_read_and_videos_written_at_the_models_training_rate(tmp_path):
    pipe = tiny_pipeline(mode="frames")
    pipe.transformer.config.fps = 4  # trained on 4 fps clips (nbp train records it; converted K600 models: 16)
    pipe.save_pretrained(tmp_path / "pipe")
    clip = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    export_to_mp4(clip, str(tmp_path / "clips" / "a.mp4"), fps=8)
    generate(tmp_path / "pipe", tmp_path / "out", "--context", tmp_path / "clips", "--context_frames", "3",
             "--formats", "mp4", "--contact_sheet", "0")
    settings = json.loads((tmp_path / "out" / "generate.json").read_text())
    assert settings["context_fps"] == 4 and settings["fps"] == 4
    context, _ = read_video(str(tmp_path / "clips" / "a.mp4"))
    expected = pipe(video=context[[0, 2, 4]], generator=gen(name_seed(0, "a_0")), output_type="np").frames[0]
    got, fps = read_video(str(tmp_path / "out" / "a_0.mp4"))
    assert fps == 4
    assert_same_video(got, read_video(export_to_mp4(expected, str(tmp_path / "ref.mp4"), fps=4))[0])


def test_a_hub_model_is_recorded_with_its_commit(local_hub, saved, tmp_path, capsys):
    """`nbp generate --model owner/name` recorded the repo id alone, so a rerun after a push to the repo added the new
    model's videos to the old ones; and no flag could pin a revision."""
    pipe = tiny_pipeline()
    first = pipe.push_to_hub("test-user/pipe").oid
    out, flags = tmp_path / "out", ("--formats", "gif", "--contact_sheet", "0", "--class_labels", "circle")
    generate("test-user/pipe", out, *flags)
    assert json.loads((out / "generate.json").read_text())["model"] == {"repo": "test-user/pipe", "commit": first}
    pipe.transformer.generation_config.update(do_sample=True, top_k=3)
    pipe.push_to_hub("test-user/pipe")  # another model under the same id
    with pytest.raises(SystemExit, match=r"other settings \(model.commit '[0-9a-f]{40}' on disk, '[0-9a-f]{40}' now"):
        generate("test-user/pipe", out, *flags)
    generate("test-user/pipe", out, *flags, "--revision", first)  # the recorded version resumes
    assert "made 0 videos, 1 were already" in capsys.readouterr().out
    # a folder that recorded the repo id alone (made before commits were recorded) resumes as it did
    settings = json.loads((out / "generate.json").read_text())
    (out / "generate.json").write_text(json.dumps({**settings, "model": "test-user/pipe"}))
    generate("test-user/pipe", out, *flags)
    assert "made 0 videos, 1 were already" in capsys.readouterr().out
    assert refused(capsys, "test-user/pipe", out, "--revision", "v2").endswith("the repo has no revision 'v2' (a "
                                                                               "branch, tag or commit id)")
    assert refused(capsys, saved[1], tmp_path / "other", "--revision", "main").endswith(
        f"--revision selects a version of a Hub repo; --model {saved[1]} is a local folder")


def test_names_too_long_for_a_file_are_refused_before_any_video(tmp_path):
    from modeling_nbp.generate_videos import context_files

    pipe = tiny_pipeline(id2label={0: "é" * 114, 1: "é" * 113, 2: "x"})  # 2 bytes a letter, and "_0"
    with pytest.raises(ValueError, match=r"would have a name of 230 bytes; file names allow 229"):
        plan_videos(pipe, 0, 1)
    assert [job.name for job in plan_videos(pipe, 0, 1, class_labels=[1])] == ["é" * 113 + "_0"]
    (tmp_path / ("v" * 236 + ".mp4")).write_bytes(b"")  # a file name that fits; its videos' temporary names would not
    with pytest.raises(ValueError, match=r"'vvv.*would have a name of 238 bytes"):
        plan_videos(tiny_pipeline(mode="frames"), 0, 1, contexts=context_files([str(tmp_path)]))
