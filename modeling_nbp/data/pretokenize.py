"""Pre-tokenization: run a video tokenizer over a dataset once and store the token grids.

Output folder layout::

    output_dir/pretokenize.json      # what made the tokens (see `_run_settings`): checked when a run resumes
    output_dir/chunks/chunk_000000/  # one `datasets` Arrow dataset per chunk of `chunk_size` items,
    output_dir/chunks/chunk_000001/  #   written under a temporary name and renamed into place
    output_dir/tokens/               # the merged dataset (chunks are deleted once it exists)
    output_dir/skipped.json          # paths of items that could not be decoded

Rows: ``tokens`` (flat int32 list), ``latent_shape`` ([T', H', W']), ``label`` (int64) and ``index``
(position in the source dataset); a video cut into several windows (``windows_per_video`` > 1) has a row per window, one
after another, with its index and a ``window`` column (0, 1, ... in the video). Chunk ``k`` holds items
``[k * chunk_size, (k + 1) * chunk_size)`` and belongs to shard ``k % num_shards``, so processes can split the work by
index and a killed run restarted with the same arguments skips the chunks already on disk; a rerun with another
tokenizer or other clip settings is refused rather than mixed with them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping

import datasets
import numpy as np
import torch

from ..hub_folders import component_folder
from ..run_files import read_settings_differences, write_json
from ..value_checks import is_integer
from ..video_io import atomic_output_path, decoding_workers
from .video_datasets import collate_videos, is_video_file

logger = logging.getLogger(__name__)

TOKEN_FEATURES = datasets.Features({
    "tokens": datasets.List(datasets.Value("int32")),
    "latent_shape": datasets.List(datasets.Value("int32")),
    "label": datasets.Value("int64"),
    "index": datasets.Value("int64"),
})


def token_features(dataset, windows: bool = False) -> datasets.Features:
    """The token rows' features; the label column carries the source's class names when it has them, and rows of
    several windows per video their window number."""
    features = dict(TOKEN_FEATURES, window=datasets.Value("int32")) if windows else dict(TOKEN_FEATURES)
    names = getattr(dataset, "class_names", None)
    if names:
        features["label"] = datasets.ClassLabel(names=list(names))
    return datasets.Features(features)


class _IndexedItems(torch.utils.data.Dataset):
    """Items ``indices`` of ``dataset``, each tagged with its source index; None becomes a skipped item. With
    ``windows_per_video`` > 1 an item's video is its windows, ``(n, 3, T, H, W)``
    (`VideoClipDataset.decode_windows`)."""

    def __init__(self, dataset, indices: range, windows_per_video: int = 1):
        self.dataset, self.indices, self.windows_per_video = dataset, indices, windows_per_video

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> dict:
        index = self.indices[j]
        if self.windows_per_video > 1:
            item = self.dataset.decode_windows(index, self.windows_per_video)
        else:
            item = self.dataset[index]
        if item is None or item.get("video") is None:
            return {"video": None, "path": str(item.get("path", f"item {index}")) if item else f"item {index}"}
        video = item["video"] if self.windows_per_video > 1 else item["video"][None]
        return {"video": video, "label": int(item["label"]), "index": index}


def _collate_windows(items: list[dict]) -> dict:
    """`collate_videos` over every window of the items: a video of n windows becomes n clips with its label and
    index, numbered by ``"window"``."""
    return collate_videos([dict(item, video=clip, window=k) for item in items if item["video"] is not None
                           for k, clip in enumerate(item["video"])] + [item for item in items if item["video"] is None])


# Dataset attributes that change the clips, hence the tokens (those of `VideoClipDataset`, then `MovingDigits`').
CLIP_SETTINGS = ("num_frames", "resolution", "fps", "sampling", "resize")
# kept since 2026-11-26: folders written before are not checked for them
LATER_SETTINGS = ("seed", "size", "digit_size", "num_digits", "speed_range", "styles_per_class")


def weights_digest(module: torch.nn.Module) -> str:
    """A short digest of a module's weights (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _run_settings(dataset, tokenizer, chunk_size: int, windows_per_video: int) -> dict:
    """Everything that decides the chunks' contents, as plain JSON values."""
    config = getattr(tokenizer, "config", None)
    config = dict(config) if isinstance(config, Mapping) else {}
    settings = {
        "num_items": len(dataset),
        "chunk_size": chunk_size,
        "windows_per_video": windows_per_video,
        "clip": {name: getattr(dataset, name) for name in CLIP_SETTINGS + LATER_SETTINGS if hasattr(dataset, name)},
        "tokenizer": type(tokenizer).__name__,
        # diffusers' bookkeeping keys (`_name_or_path`, `_diffusers_version`, ...) do not change the tokens.
        "tokenizer_config": {k: v for k, v in config.items() if not k.startswith("_")},
    }
    index = getattr(dataset, "index", None)
    if index is not None and "path" in getattr(index, "column_names", ()):  # which videos, not only how many
        # absolute paths: the same videos whether their folder was given by a relative or an absolute path
        paths = "\n".join(os.path.abspath(path) for path in index["path"])
        settings["videos"] = hashlib.sha256(paths.encode()).hexdigest()[:16]
    if isinstance(tokenizer, torch.nn.Module):  # the config alone cannot tell two checkpoints apart
        settings["tokenizer_weights"] = weights_digest(tokenizer)
    return json.loads(json.dumps(settings, default=str))  # tuples -> lists, as they read back from the file


def _check_metadata(output_dir: str, wanted: dict) -> None:
    meta_path = os.path.join(output_dir, "pretokenize.json")
    # folders from before clips could be squashed were cropped; the settings kept later are not checked in them
    later = {k: v for k, v in wanted["clip"].items() if k in LATER_SETTINGS}
    differences = read_settings_differences(meta_path, wanted, earlier_defaults={
        "clip": {"resize": "crop", **later}, "videos": wanted.get("videos"), "windows_per_video": 1})
    if differences and not _holds_tokens(output_dir):  # an earlier run that failed before its first chunk
        logger.warning("%s holds no tokens yet: its settings file is replaced (%s)", output_dir,
                       "; ".join(differences))
        differences = None
    if differences is None:
        write_json(meta_path, wanted)
        return
    if differences:
        raise ValueError(f"{output_dir} holds a pre-tokenization made with other settings ({'; '.join(differences)}); "
                         "resuming would mix their tokens. Rerun with the same dataset, tokenizer, clip settings and "
                         f"chunk_size, or start over in another output_dir (or delete {output_dir})")


def _holds_tokens(output_dir: str) -> bool:
    chunks = os.path.join(output_dir, "chunks")
    return os.path.isdir(os.path.join(output_dir, "tokens")) or (
        os.path.isdir(chunks) and any(name.startswith("chunk_") for name in os.listdir(chunks)))


def _chunk_dir(output_dir: str, chunk: int) -> str:
    return os.path.join(output_dir, "chunks", f"chunk_{chunk:06d}")


@torch.inference_mode()
def _tokenize_chunk(dataset, tokenizer, indices: range, batch_size: int, num_workers: int, device: torch.device,
                    windows_per_video: int) -> tuple[dict, list[str]]:
    # about batch_size clips per read; the clips of the videos read together are encoded batch_size at a time
    loader = torch.utils.data.DataLoader(_IndexedItems(dataset, indices, windows_per_video),
                                         batch_size=max(1, batch_size // windows_per_video),
                                         num_workers=num_workers, collate_fn=_collate_windows)
    rows = {"tokens": [], "latent_shape": [], "label": [], "index": []}
    if windows_per_video > 1:
        rows["window"] = []
    skipped = []
    for batch in loader:
        skipped += batch["skipped_paths"]
        if batch["video"] is None:
            continue
        tokens = torch.cat([_encode(tokenizer, clips.to(device)) for clips in batch["video"].split(batch_size)])
        grid = tokens.cpu().numpy().astype(np.int32)
        rows["tokens"] += list(grid.reshape(len(grid), -1))
        rows["latent_shape"] += [list(grid.shape[1:])] * len(grid)
        rows["label"] += batch["label"].tolist()
        rows["index"] += batch["index"]
        if "window" in rows:
            rows["window"] += batch["window"]
    return rows, skipped


def _encode(tokenizer, clips: torch.Tensor) -> torch.Tensor:
    tokens = tokenizer.encode(clips)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 4 or tokens.shape[0] != len(clips):
        raise ValueError("tokenizer.encode must return a LongTensor (B, T', H', W'), got "
                         f"{type(tokens).__name__} {tuple(getattr(tokens, 'shape', ()))}")
    if tokens.is_floating_point() or tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max:
        raise ValueError("tokenizer.encode must return non-negative integer ids that fit in int32")
    return tokens


def pretokenize(dataset, tokenizer, output_dir: str | os.PathLike, batch_size: int = 8, num_shards: int = 1,
                shard_index: int = 0, chunk_size: int = 256, num_workers: int = 0,
                device: str | torch.device | None = None, windows_per_video: int = 1) -> datasets.Dataset | None:
    """Tokenize this process's share of ``dataset`` into ``output_dir`` (see the module docstring).

    Args:
        dataset: a map-style dataset of ``{"video": (3, T, H, W) in [0, 1], "label"}`` items; items that
            are None or have ``"video"`` None (unreadable files) are skipped and listed in skipped.json.
        tokenizer: any object with ``encode(video (B, 3, T, H, W) float in [0, 1]) -> LongTensor
            (B, T', H', W')``.
        batch_size: clips per `encode` call (and about as many decoded per DataLoader batch).
        num_workers: DataLoader workers for decoding.
        num_shards, shard_index: this process handles chunks ``k`` with ``k % num_shards == shard_index``.
        chunk_size: items per chunk file (the unit of resumption).
        device: where videos are sent; default the tokenizer's parameters' device, else CPU.
        windows_per_video: 1 tokenizes each item's clip (a `VideoClipDataset`'s ``sampling`` window); more cuts each
            video of a `VideoClipDataset` into that many windows spread evenly over it, the first and last included
            (`VideoClipDataset.decode_windows`; fewer for videos with fewer spare frames), a row each, so that
            training can draw a new window of each video every epoch (`TokenDataset`) as the official loader does.

    Returns:
        With ``num_shards == 1``, the merged dataset (as `merge_token_chunks`). With several shards,
        None: once every process is done, call `merge_token_chunks(output_dir)` from one of them.
    """
    if batch_size < 1 or chunk_size < 1 or num_workers < 0:
        raise ValueError(f"need batch_size >= 1, chunk_size >= 1, num_workers >= 0; got {batch_size}, "
                         f"{chunk_size}, {num_workers}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
    if not is_integer(windows_per_video) or windows_per_video < 1:
        raise ValueError(f"`windows_per_video` must be an integer >= 1, got {windows_per_video!r}")
    if windows_per_video > 1 and not callable(getattr(dataset, "decode_windows", None)):
        raise TypeError(f"windows_per_video={windows_per_video} needs a dataset that cuts videos into windows "
                        f"(VideoClipDataset), got {type(dataset).__name__}; use windows_per_video=1")
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"`tokenizer` must have an encode(video) method, got {type(tokenizer).__name__}")
    output_dir = os.fspath(output_dir)
    if device is None:
        parameter = next(iter(tokenizer.parameters()), None) if isinstance(tokenizer, torch.nn.Module) else None
        device = parameter.device if parameter is not None else torch.device("cpu")

    num_items = len(dataset)
    if num_items == 0:
        raise ValueError("`dataset` is empty")
    _check_metadata(output_dir, _run_settings(dataset, tokenizer, chunk_size, windows_per_video))  # a finished one too
    if os.path.isdir(os.path.join(output_dir, "tokens")):
        logger.info("%s is already merged; nothing to do", output_dir)
        return merge_token_chunks(output_dir) if num_shards == 1 else None
    num_chunks = math.ceil(num_items / chunk_size)
    for chunk in range(shard_index, num_chunks, num_shards):
        target = _chunk_dir(output_dir, chunk)
        if os.path.isdir(target):
            logger.info("chunk %d/%d already on disk, skipped", chunk + 1, num_chunks)
            continue
        indices = range(chunk * chunk_size, min(num_items, (chunk + 1) * chunk_size))
        rows, skipped = _tokenize_chunk(dataset, tokenizer, indices, batch_size, num_workers, device,
                                        windows_per_video)
        with atomic_output_path(target) as tmp:
            datasets.Dataset.from_dict(rows, features=token_features(dataset, windows_per_video > 1)).save_to_disk(tmp)
            write_json(os.path.join(tmp, "skipped.json"), skipped)
        logger.info("chunk %d/%d written (%d items, %d skipped)", chunk + 1, num_chunks, len(rows["label"]), len(skipped))
    return merge_token_chunks(output_dir) if num_shards == 1 else None


def merge_token_chunks(output_dir: str | os.PathLike) -> datasets.Dataset:
    """Concatenate all chunks (in index order) into ``output_dir/tokens``, delete the chunks and return
    the merged dataset. Does nothing but load it (and remove what a merge killed part-way left) if the merge
    already happened; raises if chunks are missing."""
    output_dir = os.fspath(output_dir)
    final = os.path.join(output_dir, "tokens")
    if not os.path.isdir(final):
        with open(os.path.join(output_dir, "pretokenize.json"), encoding="utf-8") as f:
            meta = json.load(f)
        num_chunks = math.ceil(meta["num_items"] / meta["chunk_size"])
        missing = [k for k in range(num_chunks) if not os.path.isdir(_chunk_dir(output_dir, k))]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {num_chunks} chunks are not written yet, e.g. "
                                    f"{_chunk_dir(output_dir, missing[0])}; finish every shard first")
        parts, skipped = [], []
        for k in range(num_chunks):
            with open(os.path.join(_chunk_dir(output_dir, k), "skipped.json"), encoding="utf-8") as f:
                chunk_skipped = json.load(f)
            skipped += chunk_skipped
            # a chunk none of whose items could be read holds no rows, and `datasets` cannot load an empty save
            if len(chunk_skipped) < min(meta["num_items"], (k + 1) * meta["chunk_size"]) - k * meta["chunk_size"]:
                parts.append(datasets.load_from_disk(_chunk_dir(output_dir, k)))
        write_json(os.path.join(output_dir, "skipped.json"), skipped)
        if not parts:
            raise ValueError(f"none of the {meta['num_items']} items could be read (they are listed in "
                             f"{os.path.join(output_dir, 'skipped.json')})")
        with atomic_output_path(final) as tmp:
            datasets.concatenate_datasets(parts).save_to_disk(tmp)
        if skipped:
            logger.warning("pre-tokenization skipped %d of %d items: %s", len(skipped), meta["num_items"],
                           ", ".join(skipped[:20]))
    # once the tokens exist, the chunks (left by a merge killed after its rename) and temporary copies of the tokens
    # (by one killed while saving) are leftovers, each about as large as the tokens
    temporary = [name for name in os.listdir(output_dir) if name.startswith((".tokens.tmp-", ".tokens.old-"))]
    for name in ["chunks"] + temporary:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return datasets.load_from_disk(final)


class TokenDataset(torch.utils.data.Dataset):
    """Pre-tokenized videos: item ``i`` is ``{"input_ids": LongTensor (T', H', W'), "label": int}`` of the ``i``-th
    video (in source order).

    A video pre-tokenized with several windows (``windows_per_video``) has a row per window, numbered 0, 1, ... one
    after another (the ``window`` column): the key ``(i, seed)`` picks one from ``seed`` (the training loop's per-epoch
    item seeds, so each epoch draws a new window of every video, as the official loader does), ``i`` alone the middle
    one (the earlier of two). Each video counts once whatever its number of windows. Without a ``window`` column
    every row is an item. ``tokens`` holds the rows."""

    def __init__(self, tokens: datasets.Dataset):
        self.tokens = tokens.with_format("numpy")
        if "window" in tokens.column_names:
            window = np.asarray(self.tokens["window"][:])
            self._first = np.flatnonzero(np.diff(window, prepend=window[:1]) != 1)  # where a video's windows start
        else:
            self._first = np.arange(len(tokens))
        self._count = np.diff(self._first, append=len(tokens))

    def __len__(self) -> int:
        return len(self._first)

    @property
    def num_windows(self) -> int:
        """Rows (windows) over all videos."""
        return len(self.tokens)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = key if isinstance(key, tuple) else (key, None)
        count = int(self._count[i])
        row = self.tokens[int(self._first[i]) + ((count - 1) // 2 if seed is None else seed % count)]
        grid = torch.from_numpy(row["tokens"].astype(np.int64)).view(*row["latent_shape"].tolist())
        return {"input_ids": grid, "label": int(row["label"])}


def load_token_dataset(path: str | os.PathLike) -> TokenDataset:
    """Open a finished pre-tokenization: ``path`` is the ``output_dir`` of `pretokenize` or its ``tokens``
    folder."""
    path = os.fspath(path)
    merged = os.path.join(path, "tokens")
    try:
        return TokenDataset(datasets.load_from_disk(merged if os.path.isdir(merged) else path))
    except FileNotFoundError as err:
        for output_dir in (path, os.path.dirname(os.path.abspath(path))):  # the output_dir or its tokens folder
            if os.path.isdir(os.path.join(output_dir, "chunks")):
                raise FileNotFoundError(f"the pre-tokenization in {output_dir} is not merged yet: once every shard is "
                                        "done, run the same nbp pretokenize command in one process (it finds every "
                                        f"chunk on disk and merges them) or merge_token_chunks({output_dir!r})") from err
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no folder at {path}") from err
        videos = any(is_video_file(name) for _, _, names in os.walk(path) for name in names)
        hint = (f"; it holds videos: tokenize them first (`nbp pretokenize --data {path} --tokenizer ... --output_dir "
                "...`) and pass that output_dir") if videos else ""
        raise FileNotFoundError(f"{path} holds no pre-tokenized videos (the output_dir of `nbp pretokenize` or its "
                                f"tokens folder){hint}") from err


# written by `nbp train-tokenizer` beside a tokenizer's weights: the clips it was trained on
TRAINING_CLIPS_FILE = "training_clips.json"
# `nbp pretokenize`'s clip flags, and their defaults for a tokenizer without that file (the official UCF-101 clips)
CLIP_FLAG_DEFAULTS = {"num_frames": 17, "resolution": 128, "fps": 8, "resize": "squash"}


def tokenizer_folder(source: str | os.PathLike, revision: str | None = None) -> str:
    """The local folder of the video tokenizer that ``source`` names: a tokenizer folder, a pipeline folder (its
    ``video_tokenizer/``), or a Hub repo id of either (only the tokenizer's files are downloaded, with its
    `TRAINING_CLIPS_FILE` if the repo has one)."""
    return component_folder(source, "video_tokenizer", ["config.json", "diffusion_pytorch_model*",
                                                        TRAINING_CLIPS_FILE], "tokenizer", revision)


def training_clips(folder: str | os.PathLike) -> dict:
    """The clip settings (of `CLIP_FLAG_DEFAULTS`) a tokenizer folder (`tokenizer_folder`) records in
    `TRAINING_CLIPS_FILE`; {} for a folder without it."""
    path = os.path.join(folder, TRAINING_CLIPS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not readable JSON ({error}): give the clip flags and remove or fix the "
                         "file") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path} must hold a JSON object of clip settings, got {type(recorded).__name__}")
    return {key: recorded[key] for key in CLIP_FLAG_DEFAULTS if key in recorded}


def default_device() -> str:
    """This process's GPU under torchrun / accelerate launch (LOCAL_RANK), else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def main(argv=None):
    """`nbp pretokenize`: encode a video dataset with a tokenizer once; several processes (torchrun / accelerate
    launch) split the chunks by rank, and a rerun resumes."""
    import argparse

    from ..training.common import non_negative_int, positive_float, positive_int
    from ..video_tokenizer import NBPVideoTokenizer
    from .video_datasets import load_video_dataset

    p = argparse.ArgumentParser(allow_abbrev=False, prog="nbp pretokenize", description=main.__doc__, epilog=(
        "The clip flags (--num_frames, --resolution, --fps, --resize) default to the clips the tokenizer was trained "
        f"on when its folder holds {TRAINING_CLIPS_FILE} (written by nbp train-tokenizer), else to the values shown; "
        "a flag that differs from the tokenizer's training clips is warned about."))
    p.add_argument("--data", required=True, help="video dataset root (folder of class folders, UCF-101, K600)")
    p.add_argument("--layout", default="auto", choices=["auto", "folder", "ucf101", "k600"])
    p.add_argument("--split", default="train")
    p.add_argument("--tokenizer", required=True, help="NBPVideoTokenizer folder, or a pipeline folder, or a Hub repo "
                   "id of either, or demo (the bundled moving-digits model's)")
    p.add_argument("--tokenizer_revision", help="with a Hub repo id: its branch, tag or commit (default: main)")
    p.add_argument("--output_dir", required=True)
    trained = "default: the tokenizer's training clips (see below), else"
    p.add_argument("--num_frames", type=positive_int, help=f"{trained} 17")
    p.add_argument("--resolution", type=positive_int, help=f"{trained} 128")
    p.add_argument("--fps", type=positive_float, help=f"clip frame rate (paper: 8 for UCF, 16 for K600); {trained} 8")
    p.add_argument("--resize", choices=["squash", "crop"], help="squash: whole frames to the square (the official "
                   f"loader); crop: shorter side + centre crop; {trained} squash")
    p.add_argument("--windows_per_video", type=positive_int, default=1,
                   help="1: each video's centre window; more: that many windows spread evenly over each video (first "
                        "and last included, fewer for short videos), of which training draws one per video each epoch, "
                        "as the official loader cuts a new random window at every read (costs that many times the "
                        "tokenizing and the disk space)")
    p.add_argument("--batch_size", type=positive_int, default=8, help="clips per tokenizer call")
    p.add_argument("--chunk_size", type=positive_int, default=256)
    p.add_argument("--num_workers", type=non_negative_int, default=4,
                   help="processes decoding videos while the tokenizer runs (at most this process's CPUs; 0: decode in "
                        "this process)")
    p.add_argument("--device", help="default: this process's GPU (cuda:LOCAL_RANK) if there is one, else cpu")
    args = p.parse_args(argv)
    args.device = args.device or default_device()
    folder = tokenizer_folder(args.tokenizer, args.tokenizer_revision)
    recorded = training_clips(folder)
    for key, default in CLIP_FLAG_DEFAULTS.items():
        given = getattr(args, key)
        if given is None:
            setattr(args, key, recorded.get(key, default))
        elif key in recorded and given != recorded[key]:
            logger.warning("--%s %s differs from the tokenizer's training clips (%s %s in %s)", key, given, key,
                           recorded[key], os.path.join(folder, TRAINING_CLIPS_FILE))
    tokenizer = NBPVideoTokenizer.from_pretrained(folder).to(args.device).eval()
    try:  # sizes the tokenizer cannot take, before any video is read
        tokenizer.latent_shape(args.num_frames, args.resolution, args.resolution)
    except ValueError as error:
        p.error(f"--num_frames / --resolution: {error}")
    dataset = load_video_dataset(args.data, layout=args.layout, split=args.split, num_frames=args.num_frames,
                                 resolution=args.resolution, fps=args.fps, sampling="center", resize=args.resize)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    result = pretokenize(dataset, tokenizer, args.output_dir, batch_size=args.batch_size, num_shards=world,
                         shard_index=rank, chunk_size=args.chunk_size, num_workers=decoding_workers(args.num_workers),
                         device=args.device, windows_per_video=args.windows_per_video)
    if result is not None:
        print(f"{len(result)} token grids in {os.path.join(args.output_dir, 'tokens')}")
    else:
        print(f"shard {rank}/{world} done; once all shards finished, run this command again in one process to "
              f"merge them (or merge_token_chunks({args.output_dir!r}))")
