"""Video datasets on disk (folder, UCF-101, Kinetics-600 layouts) as Hugging Face `datasets` indexes.

The index is a `datasets.Dataset` with two columns, ``path`` (string) and ``label``
(`datasets.ClassLabel`, -1 when unlabelled); no pixels are stored. `VideoClipDataset` wraps it as a
map-style torch dataset that decodes with PyAV on access, and `streaming_video_dataset` turns it into a
`datasets.IterableDataset` split across processes.

Items are ``{"video": FloatTensor (3, T, H, W) in [0, 1], "label": int, "path": str}``. A file that
cannot be decoded is logged (one line) and returned with ``"video": None``; `collate_videos` drops such
items and reports them, and `SkipSummary` totals them over a run.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
from typing import Sequence

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from ..text_condition import class_name_to_text
from ..value_checks import is_integer
from ..video_io import VideoDecodeError
from .clips import RESIZE_MODES, SAMPLING_MODES, load_clip, load_clip_windows

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".3gp", ".wmv",
                    ".ogv")
LAYOUTS = ("auto", "folder", "ucf101", "k600")
FOLDER_SPLIT_NAMES = ("train", "test", "val", "validation", "valid")
K600_SPLIT_ALIASES = {
    "train": ("train",),
    "validation": ("validate", "val", "validation"),
    "test": ("test",),
}


def is_video_file(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def _subfolders(root: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Sorted names of the folders in `root` (linked ones too), hidden ones and `exclude` left out; a link that
    leads nowhere or loops is none (`os.path.isdir` is False where `DirEntry.is_dir` raises)."""
    return sorted(e.name for e in os.scandir(root)
                  if not e.name.startswith(".") and e.name not in exclude and os.path.isdir(e.path))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # os.listdir escapes the bytes of a name in another encoding as surrogates
        return False
    return True


def _make_index(paths: list[str], labels: list[int], class_names: list[str]) -> datasets.Dataset:
    # Arrow stores text as UTF-8: a name in another encoding (from an old archive, on Linux) fails it, unnamed
    unnamed = [path for path in paths if not _is_utf8(path)]
    if unnamed:
        raise ValueError(f"{len(unnamed)} video path(s) are not valid UTF-8, e.g. {os.fsencode(unnamed[0])}: rename "
                         "them to UTF-8 names")
    features = datasets.Features({"path": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=class_names)})
    return datasets.Dataset.from_dict({"path": paths, "label": labels}, features=features)


def _keep_existing(paths: list[str], labels: list[int], what: str) -> tuple[list[str], list[int]]:
    """Drop listed files that are not on disk (one log line); fail if none is there."""
    present = [os.path.isfile(p) for p in paths]
    if paths and not any(present):
        raise FileNotFoundError(f"none of the {len(paths)} videos listed for {what} exist, e.g. {paths[0]}")
    missing = len(paths) - sum(present)
    if missing:
        logger.warning("%s: %d of %d listed videos are missing on disk and left out", what, missing, len(paths))
    return [p for p, ok in zip(paths, present) if ok], [y for y, ok in zip(labels, present) if ok]


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------


def _folder_index(root: str, split: str | None) -> datasets.Dataset:
    """root[/split]/<class_name>/<video>: labels are the positions of the sorted class folder names."""
    if split is not None and os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)
    else:
        split_folders = [n for n in FOLDER_SPLIT_NAMES if os.path.isdir(os.path.join(root, n))]
        if split_folders:
            raise ValueError(f"{root} has split folders {split_folders} but no {split!r} folder; pick one of them")
        logger.info("folder layout: no %r subfolder in %s, using the whole folder", split, root)
    class_names = _subfolders(root)
    if not class_names:
        raise FileNotFoundError(f"folder layout expects class subfolders in {root}, found none; for unlabelled "
                                f"videos put them in one folder ({os.path.join(root, 'all')}) and train the generator "
                                "with --condition_mode none or frames")
    files = {name: sorted(f for f in os.listdir(os.path.join(root, name)) if is_video_file(f)) for name in class_names}
    if not any(files.values()):
        raise FileNotFoundError(f"none of the folders in {root} ({', '.join(class_names[:5])}"
                                f"{', ...' if len(class_names) > 5 else ''}) holds video files "
                                f"({', '.join(VIDEO_EXTENSIONS)}) directly: the folder layout is "
                                f"ROOT[/SPLIT]/<class>/<video>, SPLIT one of {', '.join(FOLDER_SPLIT_NAMES)}")
    # a folder without videos (__MACOSX, an empty class, videos nested deeper) is no class: the model would get a
    # label it never sees, and every later label would move
    empty = [name for name in class_names if not files[name]]
    if empty:
        logger.warning("folder layout: %s holds no video files directly, so is not a class (videos in its subfolders "
                       "are not read): %s", "this folder" if len(empty) == 1 else f"these {len(empty)} folders",
                       ", ".join(os.path.join(root, name) for name in empty[:20]))
    class_names = [name for name in class_names if files[name]]
    paths = [os.path.join(root, name, f) for name in class_names for f in files[name]]
    labels = [label for label, name in enumerate(class_names) for _ in files[name]]
    return _make_index(paths, labels, class_names)


def _find_ucf_lists(root: str) -> str | None:
    parent = os.path.dirname(os.path.abspath(root))  # also for "UCF-101/" and "."
    for candidate in (os.path.join(root, "ucfTrainTestlist"), os.path.join(parent, "ucfTrainTestlist")):
        if os.path.isdir(candidate):
            return candidate
    return None


def _ucf101_index(root: str, split: str, fold: int) -> datasets.Dataset:
    """UCF-101: root/<Class>/<video>.avi plus ucfTrainTestlist/{train,test}list0<fold>.txt (in root or
    next to it). Labels follow the sorted class names (classInd.txt's names when present, else the class
    folders), as in the official NBP code; the numbers in the list files are not used."""
    if split not in ("train", "test"):
        raise ValueError(f"UCF-101 `split` must be 'train' or 'test', got {split!r}")
    if fold not in (1, 2, 3):
        raise ValueError(f"UCF-101 `fold` must be 1, 2 or 3, got {fold!r}")
    lists = _find_ucf_lists(root)
    if lists is None:
        raise FileNotFoundError(f"no ucfTrainTestlist folder in or next to {root}")
    class_index = os.path.join(lists, "classInd.txt")
    if os.path.isfile(class_index):
        with open(class_index, encoding="utf-8") as f:
            class_names = sorted(line.split()[1] for line in f if line.strip())
    else:
        class_names = _subfolders(root, exclude=("ucfTrainTestlist",))
    label_of = {name: i for i, name in enumerate(class_names)}
    paths, labels = [], []
    with open(os.path.join(lists, f"{split}list0{fold}.txt"), encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            parts = line.split()[0].replace("\\", "/").split("/")  # lists edited on Windows: backslashes
            class_name = parts[0]
            if class_name not in label_of:
                raise ValueError(f"{split}list0{fold}.txt names class {class_name!r}, not among {len(class_names)} classes")
            paths.append(os.path.join(root, *parts))
            labels.append(label_of[class_name])
    paths, labels = _keep_existing(paths, labels, f"UCF-101 {split} fold {fold}")
    return _make_index(paths, labels, class_names)


def _k600_aliases(split: str | None) -> tuple[str, ...] | None:
    return next((names for key, names in K600_SPLIT_ALIASES.items() if split == key or split in names), None)


def _k600_split_files(root: str, split: str) -> tuple[str | None, str | None]:
    """(annotation CSV, clip folder) for a Kinetics split, searched under their usual names."""
    aliases = _k600_aliases(split)
    if aliases is None:
        raise ValueError(f"Kinetics `split` must be one of {sorted(K600_SPLIT_ALIASES)} (or val/validate), got {split!r}")
    csv_path = next((p for a in aliases for p in (os.path.join(root, "annotations", f"{a}.csv"),
                                                   os.path.join(root, f"{a}.csv")) if os.path.isfile(p)), None)
    video_dir = next((p for a in aliases for p in (os.path.join(root, a), os.path.join(root, "videos", a))
                      if os.path.isdir(p)), None)
    return csv_path, video_dir


def _k600_index(root: str, split: str, annotations: str | None, video_dir: str | None) -> datasets.Dataset:
    """Kinetics-600: a CSV (label,youtube_id,time_start,time_end,split; no label column for test) and
    clips named {youtube_id}_{time_start:06d}_{time_end:06d}.<ext> anywhere under the split folder.
    Labels follow the sorted label names of the CSV; CSV rows whose clip is missing are left out."""
    found_csv, found_dir = _k600_split_files(root, split)
    if annotations and not os.path.isfile(annotations):
        raise FileNotFoundError(f"`annotations` {annotations} is not a file")
    if video_dir and not os.path.isdir(video_dir):
        raise FileNotFoundError(f"`video_dir` {video_dir} is not a folder")
    annotations, video_dir = annotations or found_csv, video_dir or found_dir
    names = "|".join(_k600_aliases(split))  # in the order they are searched
    if annotations is None:
        raise FileNotFoundError(f"no Kinetics annotation CSV for split {split!r}: looked for "
                                f"{os.path.join(root, 'annotations', '{' + names + '}.csv')} and "
                                f"{os.path.join(root, '{' + names + '}.csv')} (or pass `annotations`)")
    if video_dir is None:
        raise FileNotFoundError(f"no Kinetics clip folder for split {split!r}: looked for "
                                f"{os.path.join(root, '{' + names + '}')} and "
                                f"{os.path.join(root, 'videos', '{' + names + '}')} (or pass `video_dir`)")
    with open(annotations, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark would hide "label"
        rows = list(csv.DictReader(f))
    required = {"youtube_id", "time_start", "time_end"}
    if not rows or not required <= set(rows[0]):
        raise ValueError(f"{annotations} must have columns {sorted(required)} (+ label), got {list(rows[0]) if rows else []}")
    files, seen = {}, set()
    for folder, subfolders, names in os.walk(video_dir, followlinks=True):  # class folders may be links
        if os.path.realpath(folder) in seen:  # a link back up the tree, or a second link to one folder
            subfolders.clear()
            continue
        seen.add(os.path.realpath(folder))
        for name in names:
            if is_video_file(name):  # a clip found twice: the first path in sorted order, whichever folder lists first
                key, path = os.path.splitext(name)[0], os.path.join(folder, name)
                files[key] = min(files.get(key, path), path)
    has_labels = "label" in rows[0]
    class_names = sorted({row["label"] for row in rows}) if has_labels else []
    label_of = {name: i for i, name in enumerate(class_names)}
    paths, labels, missing = [], [], 0
    for row in rows:
        key = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        if key not in files:
            missing += 1
            continue
        paths.append(files[key])
        labels.append(label_of[row["label"]] if has_labels else -1)
    if not paths:
        raise FileNotFoundError(f"none of the {len(rows)} clips in {annotations} were found under {video_dir}")
    if missing:
        logger.warning("Kinetics %s: %d of %d clips in the CSV are missing on disk and left out", split, missing, len(rows))
    return _make_index(paths, labels, class_names)


def _is_kinetics_csv(path: str | None) -> bool:
    if path is None:
        return False
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        return "youtube_id" in next(csv.reader(f), [])


def detect_layout(root: str, split: str = "train") -> str:
    """'k600' if a Kinetics CSV for ``split`` exists, 'ucf101' if ucfTrainTestlist exists, else 'folder'. A CSV
    without Kinetics' youtube_id column (the metadata that class folder datasets often carry) is no Kinetics CSV."""
    if _k600_aliases(split) is not None and _is_kinetics_csv(_k600_split_files(root, split)[0]):
        return "k600"
    if _find_ucf_lists(root) is not None:
        return "ucf101"
    return "folder"


def build_video_index(source: str | os.PathLike, layout: str = "auto", split: str | None = "train",
                      fold: int = 1, annotations: str | None = None,
                      video_dir: str | None = None) -> datasets.Dataset:
    """Index the videos of one split: a `datasets.Dataset` with ``path`` and ``label`` (ClassLabel).

    Layouts:
      * "folder": ``source[/split]/<class_name>/<file>`` (``source/split`` is used when it exists,
        otherwise ``source`` itself whatever ``split`` is); labels = sorted class folder names.
      * "ucf101": class folders + ``ucfTrainTestlist`` (split "train"/"test", ``fold`` 1-3).
      * "k600": CSV annotations + clip folder (split "train"/"validation"/"test"); ``annotations`` and
        ``video_dir`` override the CSV file and clip folder searched for by name.
      * "auto": `detect_layout`.
    """
    root = os.fspath(source)
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root} is not a folder")
    if layout == "auto":
        layout = detect_layout(root, split or "train")
    if layout == "folder":
        return _folder_index(root, split)
    if layout == "ucf101":
        return _ucf101_index(root, split, fold)
    return _k600_index(root, split, annotations, video_dir)


# --------------------------------------------------------------------------------------------------
# Decoding wrappers
# --------------------------------------------------------------------------------------------------


class VideoClipDataset(torch.utils.data.Dataset):
    """Map-style torch dataset over a video index; decodes one clip per item with PyAV.

    A video with fewer than ``num_frames`` frames at ``fps`` is used whole and padded by repeating its last frame
    (see `clips`). Picklable, so it works with DataLoader workers. Use ``collate_fn=collate_videos``.
    """

    def __init__(self, index: datasets.Dataset, num_frames: int = 17, resolution: int = 128,
                 fps: float | None = 8, sampling: str = "center", resize: str = "squash"):
        if not {"path", "label"} <= set(index.column_names):
            raise ValueError(f"`index` needs 'path' and 'label' columns, got {index.column_names}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"`sampling` must be one of {SAMPLING_MODES}, got {sampling!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"`resize` must be one of {RESIZE_MODES}, got {resize!r}")
        if not all(is_integer(v) and v >= 1 for v in (num_frames, resolution)) or (
                fps is not None and not (math.isfinite(fps) and fps > 0)):
            raise ValueError(f"need num_frames and resolution integers >= 1, fps a finite number > 0 or None; got "
                             f"{num_frames!r}, {resolution!r}, {fps!r}")
        self.index = index
        self.num_frames, self.resolution, self.fps, self.sampling = num_frames, resolution, fps, sampling
        self.resize = resize

    @property
    def class_names(self) -> list[str]:
        feature = self.index.features["label"]
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else []

    @property
    def class_texts(self) -> list[str]:
        """Class names as text prompts: camel case split and lower-cased."""
        return [class_name_to_text(name) for name in self.class_names]

    def __len__(self) -> int:
        return len(self.index)

    def decode_example(self, example: dict, generator: torch.Generator | None = None) -> dict:
        """{"path", "label"} -> item; ``"video"`` is None (and one line is logged) if decoding fails. "random"
        sampling draws the window from ``generator`` (default: torch's global RNG)."""
        return self._decode(example, lambda path: load_clip(path, self.num_frames, self.resolution, self.fps,
                                                            self.sampling, generator, self.resize))

    def decode_windows(self, i: int, num_windows: int) -> dict:
        """Video ``i`` cut into windows spread evenly over it (`load_clip_windows`, whatever ``sampling`` is):
        ``"video"`` ``(n, 3, T, H, W)`` with ``n <= num_windows``, or None (logged) if decoding fails."""
        return self._decode(self.index[int(i)], lambda path: load_clip_windows(
            path, num_windows, self.num_frames, self.resolution, self.fps, self.resize))

    @staticmethod
    def _decode(example: dict, load) -> dict:
        path, label = example["path"], int(example["label"])
        try:
            video = load(path)
        except VideoDecodeError as err:
            logger.warning("skipping unreadable video %s (%s)", path, err)
            video = None
        return {"video": video, "label": label, "path": path}

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """Item ``key``: an index, or (index, seed) to draw a "random" window from a generator seeded with ``seed``,
        the same whichever process or DataLoader worker reads it (an index alone draws from torch's global RNG)."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return self.decode_example(self.index[int(i)], generator)


def load_video_dataset(source: str | os.PathLike, layout: str = "auto", split: str | None = "train",
                       num_frames: int = 17, resolution: int = 128, fps: float | None = 8, fold: int = 1,
                       sampling: str | None = None, annotations: str | None = None,
                       video_dir: str | None = None, resize: str = "squash") -> VideoClipDataset:
    """Index a video dataset on disk (see `build_video_index`) and wrap it for decoding.

    ``fps``: clips are sampled at this rate (the paper: 8 for UCF-101, 16 for Kinetics-600; None keeps
    each file's rate). ``sampling``: "random" window start (default for split "train"), "center"
    (default otherwise) or "start". ``resize``: "squash" (whole frames to the square, as the official NBP loader)
    or "crop" (keep the aspect ratio, centre crop).
    """
    index = build_video_index(source, layout, split, fold, annotations, video_dir)
    if sampling is None:
        sampling = "random" if split == "train" else "center"
    return VideoClipDataset(index, num_frames, resolution, fps, sampling, resize)


_INDEX_COLUMN = "_nbp_item_index"  # the position in the index, carried through a seeded streaming dataset


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s randomness (its "random" window) in ``epoch`` of a run seeded with ``seed``; the
    training loops' `StepBatchSampler(item_seeds=True)` hands out the same (index, seed) keys."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0])


def _decode_seeded(dataset: VideoClipDataset, seed: int, epoch: int, example: dict) -> dict:
    generator = torch.Generator().manual_seed(item_seed(seed, epoch, example[_INDEX_COLUMN]))
    return dataset.decode_example(example, generator)


def streaming_video_dataset(dataset: VideoClipDataset, rank: int = 0, world_size: int = 1,
                            num_shards: int | None = None, seed: int | None = None,
                            epoch: int = 0) -> datasets.IterableDataset:
    """An iterable copy of ``dataset`` holding only this process's part (``rank`` of ``world_size``).

    The index is cut into ``num_shards`` contiguous shards (default ``4 * world_size``, at most one per
    video); when that number divides by ``world_size`` each process reads whole shards, otherwise every
    ``world_size``-th example. DataLoader workers then share out this process's shards. Items are the
    same dicts as `VideoClipDataset`'s (``"video"`` None for unreadable files). Shuffle with
    ``.shuffle(seed=..., buffer_size=...)`` using the same seed on every process.

    ``seed``: "random" windows are drawn from a generator seeded with ``item_seed(seed, epoch, i)`` for the
    ``i``-th video of the index, so they do not depend on the number of processes or DataLoader workers, nor on
    what else drew random numbers (``dataset[(i, item_seed(seed, epoch, i))]`` cuts the same clip); None draws from
    torch's global RNG. ``set_epoch`` on the returned dataset only reorders shards and shuffle buffers (`datasets`
    does not pass it on to the decoding): for new windows each epoch, build the dataset per epoch with its ``epoch``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if not (seed is None or (is_integer(seed) and seed >= 0)) or not (is_integer(epoch) and epoch >= 0):
        raise ValueError(f"`seed` must be a non-negative integer or None and `epoch` a non-negative integer; got "
                         f"seed={seed!r}, epoch={epoch!r}")
    num_shards = num_shards or min(len(dataset.index), 4 * world_size)
    index = dataset.index
    if seed is not None:
        index = index.add_column(_INDEX_COLUMN, list(range(len(index))))
    iterable = split_dataset_by_node(index.to_iterable_dataset(num_shards=num_shards), rank=rank, world_size=world_size)
    if seed is None:
        return iterable.map(dataset.decode_example)
    decode = functools.partial(_decode_seeded, dataset, int(seed), int(epoch))
    return iterable.map(decode, remove_columns=[_INDEX_COLUMN])


# --------------------------------------------------------------------------------------------------
# Batching and skip accounting
# --------------------------------------------------------------------------------------------------


def _is_skipped(item) -> bool:
    return item is None or item.get("video") is None


def collate_videos(batch: Sequence[dict | None]) -> dict:
    """Stack items into a batch, dropping unreadable ones (None, or ``"video"`` None).

    Returns ``{"video": FloatTensor (B, 3, T, H, W) or None if every item was dropped,
    "label": LongTensor (B,), "skipped_paths": list[str], <other keys>: list}``.
    """
    kept = [item for item in batch if not _is_skipped(item)]
    skipped = [str(item.get("path", "<unknown>")) if item is not None else "<unknown>"
               for item in batch if _is_skipped(item)]
    out = {
        "video": torch.stack([item["video"] for item in kept]) if kept else None,
        "label": torch.tensor([int(item["label"]) for item in kept], dtype=torch.long),
        "skipped_paths": skipped,
    }
    for key in kept[0] if kept else ():
        if key not in out:
            out[key] = [item[key] for item in kept]
    return out


class SkipSummary:
    """Totals of videos seen and skipped over a run; feed it every batch from `collate_videos`."""

    def __init__(self):
        self.total = 0
        self.skipped_paths: list[str] = []

    def update(self, batch: dict) -> None:
        self.total += len(batch["label"]) + len(batch["skipped_paths"])
        self.skipped_paths.extend(batch["skipped_paths"])

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_paths)

    def __str__(self) -> str:
        text = f"skipped {self.num_skipped} of {self.total} videos"
        if self.skipped_paths:
            shown = self.skipped_paths[:20]
            text += ": " + ", ".join(shown) + (f", ... ({self.num_skipped - 20} more)" if self.num_skipped > 20 else "")
        return text
