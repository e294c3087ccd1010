"""`nbp generate`: videos from a pipeline written to a folder, from a few for a look to the 10k-50k of an FVD run.

Every video has a name (class_k, video_k, or the context clip's name_k) and its own generator, seeded from --seed
and that name, so a video does not depend on the batch size, on how many processes share the work (under
`accelerate launch` process p makes videos p, p + P, ...), or on which other videos a run makes. A run skips the
videos whose files are already there, once it has checked that the folder's `generate.json` holds the settings
asked for: an interrupted run is resumed by running the same command again. Files appear as each batch finishes,
each written under a temporary name and renamed; only one batch of frames is held in memory.

One video of a run is made again on its own by the pipeline call that the run made for it, with the folder's
`generate.json` settings (sampling, num_frames, dtype) and a generator on the run's device seeded with
`name_seed(seed, name)`, e.g. for `3_5.mp4` of `--seed 0` on a CPU:
`pipe(class_labels=[3], generator=torch.Generator("cpu").manual_seed(name_seed(0, "3_5")), output_type="np")`
(`video=` the context frames that `load_context` reads, for a continuation). `--seed` alone is not a video's seed.
"""

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm

from .data.clips import frames_to_tensor, resize_frames
from .data.evaluation_clips import EvaluationClips
from .data.video_datasets import VIDEO_EXTENSIONS, is_video_file
from .pipelines.pipeline_nbp_video import pipeline_folder
from .run_files import read_settings_differences, write_json
from .triton_support import require_triton
from .video_io import (VideoDecodeError, as_uint8_frames, atomic_output_path, decoding_workers, export_to_gif,
                       export_to_mp4, make_contact_sheet, read_video, safe_file_name)

logger = logging.getLogger(__name__)

SETTINGS_FILE = "generate.json"
# the longest video name, in bytes: its temporary file, ".<name>.tmp-<pid>-<8 hex digits>.mp4" (`atomic_output_path`),
# must fit in a file name's 255
MAX_NAME_BYTES = 229


def export_to_npy(frames, path: str, fps: float = 8) -> str:
    """The frames as a uint8 (T, H, W, 3) .npy file: lossless, what `nbp evaluate` reads for an exact FVD (MP4
    compression moves it a little). `fps` is not stored."""
    with atomic_output_path(path) as tmp:
        np.save(tmp, as_uint8_frames(frames))
    return path


EXPORTERS = {"mp4": export_to_mp4, "gif": export_to_gif, "npy": export_to_npy}


def read_back(path: str) -> np.ndarray:
    return np.load(path, allow_pickle=False) if path.endswith(".npy") else read_video(path)[0]


@dataclass(frozen=True)
class VideoJob:
    """One video to make: its file name (without extension), the seed of its generator and its inputs."""
    name: str
    seed: int
    class_label: int | None = None
    context: str | None = None  # the context clip's path (frame prediction)
    clip: int | None = None  # its position in the run's `EvaluationClips` (`--dataset`)


def name_seed(seed: int, name: str) -> int:
    """The seed of the video called `name` in a run with --seed `seed` (63 bits of a hash of both)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def context_files(paths: list[str]) -> list[tuple[str, str]]:
    """(path, name) of every context clip: files as given, folders searched for video files (sorted); the name is
    the path below the folder (or the file's stem) made file-name safe."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files
                            if is_video_file(f))
            if not inside:
                raise ValueError(f"--context folder {path} holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
            found += [(f, safe_file_name(os.path.splitext(os.path.relpath(f, path))[0])) for f in inside]
        elif os.path.isfile(path):
            found.append((path, safe_file_name(os.path.splitext(os.path.basename(path))[0])))
        else:
            raise ValueError(f"--context {path} is neither a video file nor a folder")
    return found


def plan_videos(pipe, seed: int, num_videos_per_class: int, class_labels=None,
                contexts: list[tuple[str, str]] | None = None, clips: EvaluationClips | None = None) -> list[VideoJob]:
    """The videos of a run, in order: per clip of an evaluation set (its class, or the continuation of its first
    frames), else per context clip (frame prediction; a class-conditional model continues every clip as the one
    class given), else per class (every class by default), else unconditional."""
    cfg = pipe.transformer.config
    copies = range(num_videos_per_class)
    if class_labels and cfg.condition_mode != "class":
        raise ValueError(f"--class_labels given, but this model is not class-conditional (condition_mode "
                         f"{cfg.condition_mode!r})")
    if clips is not None:
        if class_labels:
            raise ValueError("--class_labels and --dataset exclude each other: with --dataset every video takes the "
                             "class of its clip")
        if cfg.condition_mode == "none":
            raise ValueError("--dataset pairs videos with clips by class or context; this model takes neither")
        labels = [clips.label(i) for i in range(len(clips))] if cfg.condition_mode == "class" else None
        if labels is not None and pipe.class_names:  # the dataset's classes by name, in the model's numbering
            used = [clips.class_names[i] for i in sorted(set(labels))]
            unknown = [n for n in used if n.lower() not in {str(c).lower() for c in pipe.class_names}]
            if unknown:
                raise ValueError(f"--dataset classes {unknown[:5]} are not classes of this model "
                                 f"({pipe.class_names[:5]}...): the clips' classes must be the model's")
            ids = dict(zip(sorted(set(labels)), pipe._class_ids(used)))
            labels = [ids[i] for i in labels]
        jobs = [VideoJob(f"{clips.name(i)}_{k}", 0, None if labels is None else labels[i],
                         None if labels is not None else clips.path(i), i)
                for i in range(len(clips)) for k in copies]
    elif contexts:
        label = None
        if cfg.condition_mode == "class":  # the continuation's class
            if not class_labels or len(class_labels) != 1:
                raise ValueError("--context with a class-conditional model needs one --class_labels: the class the "
                                 f"continuations are conditioned on (got {class_labels})")
            label = pipe._class_ids(class_labels)[0]
        jobs = [VideoJob(f"{name}_{k}", 0, label, path) for path, name in contexts for k in copies]
    elif cfg.condition_mode == "class":
        ids = pipe._class_ids(class_labels or list(range(cfg.num_classes)))
        names = [safe_file_name(str(pipe.class_names[i] if pipe.class_names else i)) for i in ids]
        jobs = [VideoJob(f"{name}_{k}", 0, i) for i, name in zip(ids, names) for k in copies]
    else:
        if cfg.condition_mode == "frames":
            raise ValueError("this model predicts frames: pass --context with video files or folders of them, or "
                             "--dataset")
        jobs = [VideoJob(f"video_{k}", 0) for k in copies]
    seen = set()
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"two videos would be called {job.name!r} (context files whose names differ only in "
                             "characters that file names replace, or a class listed twice); rename or list them once")
        seen.add(job.name)
        if len(job.name.encode()) > MAX_NAME_BYTES:  # else writing its files fails once it is made
            raise ValueError(f"the video {job.name[:50]!r}... would have a name of {len(job.name.encode())} bytes; "
                             f"file names allow {MAX_NAME_BYTES} here: shorten the name of its class, context file or "
                             "dataset video")
    return [VideoJob(j.name, name_seed(seed, j.name), j.class_label, j.context, j.clip) for j in jobs]


def load_context(path: str, num_frames: int, resolution: tuple[int, int], fps: float | None,
                 resize: str = "squash") -> torch.Tensor:
    """The first `num_frames` frames of a video file (resampled to `fps` when given), brought to the model's square
    resolution by `resize` ("squash" or "crop", see `data.clips`): float (T, 3, H, W) in [0, 1]. Raises
    VideoDecodeError for unreadable or short files."""
    frames, _ = read_video(path, fps=fps, select=lambda n: np.arange(min(n, num_frames)))
    if len(frames) < num_frames:
        rate = f"at {fps} fps" if fps else "at its own frame rate"
        raise VideoDecodeError(f"{path} has {len(frames)} frames {rate}; the context needs {num_frames}")
    height, width = resolution
    if height != width:
        raise ValueError(f"context clips are resized to a square; this model is {height}x{width}")
    return frames_to_tensor(resize_frames(frames, height, resize)).transpose(0, 1)


def files_of(output_dir: str, job: VideoJob, formats) -> list[str]:
    return [os.path.join(output_dir, f"{job.name}.{fmt}") for fmt in formats]


@dataclass
class GenerationSummary:
    written: list  # files written by this process
    made: int  # videos this process made
    existing: int  # videos of this process's share that were already there
    failed: dict  # context clip -> why it was skipped


def read_context(job: VideoJob, clips: EvaluationClips | None, num_frames: int, resolution: tuple[int, int],
                 fps: float | None, resize: str) -> torch.Tensor:
    """The context frames of `job` (T, 3, H, W): the first `num_frames` of its clip in `clips`, else of its file."""
    if job.clip is not None:
        return clips.clip(job.clip)[:, :num_frames].transpose(0, 1)
    return load_context(job.context, num_frames, resolution, fps, resize)


class ContextLoader(torch.utils.data.Dataset):
    """Jobs with their context frames, read in DataLoader workers while the pipeline generates:
    (job, frames or None, why it could not be read or None)."""

    def __init__(self, jobs: list[VideoJob], read):
        self.jobs, self.read = jobs, read

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        job = self.jobs[i]
        if job.context is None:
            return job, None, None
        try:
            return job, self.read(job), None
        except VideoDecodeError as e:
            return job, None, str(e)


def generate_to_folder(pipe, jobs: list[VideoJob], output_dir: str, formats=("mp4", "gif"), fps: float = 8,
                       batch_size: int = 16, overwrite: bool = False, process_index: int = 0, num_processes: int = 1,
                       context_clip_frames: int | None = None, context_fps: float | None = None,
                       context_resize: str = "squash", clips: EvaluationClips | None = None, num_workers: int = 0,
                       show_progress=True, **call_kwargs) -> GenerationSummary:
    """Make this process's share of `jobs` (every `num_processes`-th, from `process_index`) with `pipe`, `batch_size`
    videos per call, and write each as `output_dir/<name>.<format>`. Videos whose files all exist are skipped unless
    `overwrite`. `call_kwargs` go to every pipeline call (sampling, num_frames, ...). The first `context_clip_frames`
    (default: the model's context) frames of each context are given: of the job's clip in `clips`, else of its file
    resampled to `context_fps` when set and resized by `context_resize`; `num_workers` DataLoader workers read them
    ahead of the generation. Context clips that cannot be read are reported and skipped."""
    bad = [f for f in formats if f not in EXPORTERS]
    if bad or not formats:
        raise ValueError(f"formats must be a non-empty list of {list(EXPORTERS)}; got {list(formats)}")
    mine = jobs[process_index::num_processes]
    def written(path):  # an empty file is one a crash cut short
        return os.path.isfile(path) and os.path.getsize(path) > 0

    todo = [j for j in mine if overwrite or not all(map(written, files_of(output_dir, j, formats)))]
    if context_clip_frames is None and any(j.context for j in todo):
        cfg = pipe.transformer.config  # a class-conditional model continues at least one block of latent frames
        latent = cfg.num_context_frames or cfg.block_shape[0]
        context_clip_frames = pipe.video_tokenizer.num_frames_for_latent(latent)
    device = pipe._execution_device
    summary = GenerationSummary([], 0, len(mine) - len(todo), {})
    os.makedirs(output_dir, exist_ok=True)
    read = partial(read_context, clips=clips, num_frames=context_clip_frames, resolution=pipe.resolution,
                   fps=context_fps, resize=context_resize)
    workers = decoding_workers(num_workers) if any(j.context for j in todo) else 0
    loader = torch.utils.data.DataLoader(ContextLoader(todo, read), batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    bar = tqdm(total=len(todo), unit="video", desc="videos", disable=not show_progress)
    for items in loader:
        batch, contexts = [], []
        for job, frames, why in items:
            if why is not None:
                summary.failed[job.context] = why
                logger.warning("skipping %s: %s", job.name, why)
                bar.update()
                continue
            batch.append(job)
            if frames is not None:
                contexts.append(frames)
        if not batch:
            continue
        kwargs = dict(call_kwargs, generator=[torch.Generator(device).manual_seed(j.seed) for j in batch],
                      output_type="np")
        if contexts:
            kwargs["video"] = torch.stack(contexts)
        if batch[0].class_label is not None:
            kwargs["class_labels"] = [j.class_label for j in batch]
        elif not contexts:
            kwargs["batch_size"] = len(batch)
        videos = pipe(**kwargs).frames
        for job, video in zip(batch, videos):
            for fmt, path in zip(formats, files_of(output_dir, job, formats)):
                summary.written.append(EXPORTERS[fmt](video, path, fps=fps))
            summary.made += 1
            bar.update()
    bar.close()
    return summary


def output_files(output_dir: str) -> list[str]:
    """The videos and contact sheet in `output_dir` (what a run with other settings replaces)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(os.path.join(output_dir, f) for f in os.listdir(output_dir)
                  if f.rsplit(".", 1)[-1] in EXPORTERS or f == "contact_sheet.png")


def write_contact_sheet(output_dir: str, jobs: list[VideoJob], formats, limit: int) -> str | None:
    """A PNG of the first `limit` of `jobs` that are on disk (read back from their files), one row each."""
    videos, labels = [], []
    for job in jobs:
        if len(videos) == limit:
            break
        path = files_of(output_dir, job, formats[:1])[0]
        if os.path.exists(path):
            videos.append(read_back(path))
            labels.append(job.name)
    if not videos:
        return None
    length = min(len(v) for v in videos)  # a GIF merges repeated frames: rows are cut to the shortest
    path = os.path.join(output_dir, "contact_sheet.png")
    make_contact_sheet([v[:length] for v in videos], path, labels=labels)
    return path


def model_identity(model: str, folder: str):
    """A local pipeline folder by its absolute path and a digest of its files' names, sizes and modification times
    (a model retrained or converted again in place is another model); a Hub repo id with the commit of its snapshot
    `folder` (a repo pushed to again is another model)."""
    if not os.path.isdir(model):
        return dict(repo=model, commit=os.path.basename(folder))
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(model)):
        for name in sorted(files):
            if name != "README.md" and not name.startswith("."):
                stat = os.stat(os.path.join(root, name))
                digest.update(f"{os.path.relpath(os.path.join(root, name), model)}:{stat.st_size}:"
                              f"{stat.st_mtime_ns}\n".encode())
    return dict(path=os.path.abspath(model), files=digest.hexdigest()[:16])


def run_settings(args, pipe, device, clips: EvaluationClips | None, folder: str) -> dict:
    """What decides the files' contents, as `generate.json` keeps it (the set of videos, and the number of an
    evaluation set's clips, may grow between runs; `nbp evaluate --real-dataset` reads the clip settings). `folder`:
    the pipeline's local folder."""
    config = pipe.transformer.config
    dataset = None if clips is None else {k: v for k, v in clips.settings.items() if k != "num_clips"}
    context = [os.path.abspath(p) for p in args.context] if args.context else None
    return dict(model=model_identity(args.model, folder), dtype=str(pipe.transformer.dtype),
                device=torch.device(device).type, seed=args.seed, context=context,
                guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p,
                temperature=args.temperature, num_frames=args.num_frames,
                window_context_frames=args.window_context_frames, context_frames=args.context_frames,
                context_fps=args.context_fps, resize=args.resize, fps=args.fps,
                context_class=args.class_labels if args.context and config.condition_mode == "class" else None,
                dataset=dataset, compile_decode=args.compile_decode, norm_implementation=args.norm_implementation,
                conv_implementation=args.conv_implementation)


def check_output_dir(output_dir: str, context: list[str] | None = None, dataset: str | None = None) -> None:
    """Refuse an output folder that is a file or overlaps the inputs: inside a --context folder or the --dataset
    root, a rerun would read its videos as clips; a context file in it would go with the videos --overwrite deletes."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder")
    out = os.path.realpath(output_dir)

    def inside(folder):
        return os.path.commonpath([out, os.path.realpath(folder)]) == os.path.realpath(folder)

    for path in context or []:
        if os.path.isdir(path) and inside(path):
            raise ValueError(f"--output_dir {output_dir} is inside --context folder {path}: a rerun would continue "
                             "its videos as context clips; choose an output folder outside it")
        if os.path.isfile(path) and os.path.dirname(os.path.realpath(path)) == out:
            raise ValueError(f"--context {path} is in --output_dir {output_dir}, whose videos --overwrite deletes; "
                             "choose another --output_dir")
    if dataset and inside(dataset):
        raise ValueError(f"--output_dir {output_dir} is inside --dataset {dataset}: a rerun could read its videos as "
                         "dataset clips; choose an output folder outside it")


def run_generate(args, usage_error=None) -> GenerationSummary:
    """`nbp generate` (see `nbp generate --help`); under `accelerate launch` every process takes its share.
    `usage_error(message)` (argparse's `parser.error`) reports arguments that cannot work (no such model, class,
    clip or dataset), found before any video is made; without it they raise."""
    from accelerate import PartialState

    from . import NBPVideoPipeline
    from .training.common import use_cpu

    @contextmanager
    def arguments_checked(errors):
        try:
            yield
        except errors as error:
            if usage_error is None:
                raise
            usage_error(str(error))

    with arguments_checked(ValueError):
        if args.dataset and args.context:
            raise ValueError("--dataset and --context exclude each other: with --dataset the contexts are its clips")
        if args.dataset and args.context_fps is not None:  # it would be ignored: the clips are not read at that rate
            raise ValueError("--context_fps resamples --context files; --dataset clips are read at --clip_fps")
        check_output_dir(args.output_dir, args.context, args.dataset)
        if args.revision is not None and os.path.isdir(args.model):
            raise ValueError(f"--revision selects a version of a Hub repo; --model {args.model} is a local folder")
    state = PartialState(cpu=use_cpu(args.device == "cpu"))
    device = args.device or state.device
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    with arguments_checked(ValueError):  # now, not after the first batch
        for option in ("compile_decode", "norm_implementation"):
            if getattr(args, option).startswith("triton"):
                require_triton(torch.device(device), f"--{option} {getattr(args, option)}")
    with arguments_checked(OSError):  # no such model folder or Hub repo
        folder = pipeline_folder(args.model, revision=args.revision)
        pipe = NBPVideoPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar over the videos instead
    model_fps = getattr(pipe.transformer.config, "fps", None)  # the training clips' rate, when the model records it
    if args.context and args.context_fps is None:
        args.context_fps = model_fps  # context files continued at the rate the model learned (None: their own)
    if args.fps is None:  # the files play at the rate of the frames the model continued; a folder keeps its own
        recorded = os.path.join(args.output_dir, SETTINGS_FILE)
        if os.path.isfile(recorded) and not args.overwrite:
            with open(recorded, encoding="utf-8") as f:
                args.fps = json.load(f).get("fps")
        args.fps = args.fps or max(1, round(args.context_fps or (args.clip_fps if args.dataset else model_fps or 8)))
    pipe.video_tokenizer.norm_implementation = args.norm_implementation
    pipe.video_tokenizer.conv_implementation = args.conv_implementation
    with arguments_checked((OSError, ValueError)):
        # more windows: their context length (a given one is checked by the pipeline even for one window)
        if (args.num_frames or 0) > pipe.num_frames or args.window_context_frames is not None:
            try:
                pipe._window_context(args.window_context_frames)
            except ValueError as error:
                raise ValueError(f"--window_context_frames / --num_frames: {error}") from None
        if args.context_frames is not None and (args.context or args.dataset):  # else `nbp` refuses it
            allowed = pipe._context_lengths()
            if args.context_frames not in allowed:
                raise ValueError(f"--context_frames must be one of {allowed} for this model (whole blocks of latent "
                                 f"frames, fewer than its {pipe.num_frames}); got {args.context_frames}")
        contexts = context_files(args.context) if args.context else None
        clips = None
        if args.dataset:
            height, width = pipe.resolution
            if height != width:
                raise ValueError(f"--dataset clips are square; this model is {height}x{width}")
            # as long as the videos made from them: `nbp evaluate --real-dataset` scores the videos against them
            clip_frames = max(pipe.num_frames, args.num_frames or 0)
            clips = EvaluationClips(args.dataset, args.dataset_split, args.num_clips, args.clips_seed,
                                    clip_frames, height, args.clip_fps, args.clip_sampling, args.dataset_layout,
                                    args.resize)
        jobs = plan_videos(pipe, args.seed, args.num_videos_per_class, args.class_labels, contexts, clips)

    settings = run_settings(args, pipe, device, clips, folder)
    settings_path = os.path.join(args.output_dir, SETTINGS_FILE)
    if os.path.isfile(settings_path):  # folders made before a Hub repo was recorded with its commit keep the id
        with open(settings_path, encoding="utf-8") as f:
            if json.load(f).get("model") == args.model:
                settings["model"] = args.model
    # folders started before the speed options existed were made with their defaults
    differences = read_settings_differences(settings_path, settings, earlier_defaults=dict(
        compile_decode="off", norm_implementation="torch", conv_implementation="conv3d"))
    stale = output_files(args.output_dir) if differences else []  # videos of other settings
    if stale and not args.overwrite:  # every process finds this out by itself: none waits for another
        raise SystemExit(f"{args.output_dir} holds videos made with other settings ({'; '.join(differences)}); "
                         "run the same command to resume it, pass --overwrite to replace its videos with these "
                         "settings' (the old ones are deleted first), or choose another --output_dir")
    if state.is_main_process and (differences is None or differences):
        for path in stale:  # first, so that an interrupted --overwrite run resumes without the old videos
            os.remove(path)
        write_json(settings_path, settings, indent=2)
    state.wait_for_everyone()  # no process writes a video before the old ones are gone

    summary = generate_to_folder(
        pipe, jobs, args.output_dir, formats=args.formats, fps=args.fps, batch_size=args.batch_size,
        overwrite=args.overwrite, process_index=state.process_index, num_processes=state.num_processes,
        context_clip_frames=args.context_frames, context_fps=args.context_fps, context_resize=args.resize, clips=clips,
        num_workers=args.num_workers, show_progress=state.is_main_process,
        guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
        num_frames=args.num_frames, context_frames=args.window_context_frames,
        compile_decode=False if args.compile_decode == "off" else args.compile_decode)
    for clip, why in summary.failed.items():
        print(f"skipped context clip {clip}: {why}")
    print(f"process {state.process_index}: made {summary.made} videos, {summary.existing} were already in "
          f"{args.output_dir}" + (f", {len(summary.failed)} context clips unreadable" if summary.failed else ""))
    if state.is_main_process and args.contact_sheet:  # its own share: complete without waiting for the others
        sheet = write_contact_sheet(args.output_dir, jobs[::state.num_processes], args.formats, args.contact_sheet)
        if sheet:
            print(sheet)
    return summary
