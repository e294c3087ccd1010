"""The clips of an evaluation set drawn from a video dataset, as the official NBP evaluation draws them.

The official `transformer_eval.py` walks the split's videos in a seeded random order (DistributedSampler) and starts
over when it reaches the end (itertools.cycle) until it has its sample count: UCF-101 10,000 clips of the 9,537
training videos of split 1 (8 fps, centre clip), Kinetics-600 50,000 of the validation videos. Every generated video
is paired with one clip: it takes the clip's class (class-conditional models) or continues the clip's first frames
(frame prediction), and the clip itself is the real video of the FVD.

The official loader resizes whole frames to the square (decord's width/height: 4:3 and 16:9 videos are squashed,
not cropped); so do the clips here by default (`resize="squash"`).

`EvaluationClips` is that set, reproducible from its settings alone: `nbp generate --dataset` makes one video per
clip and `nbp evaluate --real-dataset` reads the same clips as the real set. "random" clip sampling draws each
clip's start from a generator seeded by the set's seed and the clip's position, so both commands cut the same clips.
"""

from __future__ import annotations

import functools
import hashlib
import os

import torch

from ..video_io import safe_file_name
from .clips import load_clip
from .video_datasets import load_video_dataset


def video_order(num_videos: int, seed: int) -> list[int]:
    """The videos in the random order fixed by `seed` (one pass of the clips)."""
    return torch.randperm(num_videos, generator=torch.Generator().manual_seed(seed)).tolist()


def clip_order(num_videos: int, num_clips: int, seed: int) -> list[tuple[int, int]]:
    """(video index, pass) of each clip: the videos in a random order fixed by `seed`, repeated until `num_clips`."""
    if num_videos < 1 or num_clips < 1:
        raise ValueError(f"an evaluation set needs videos and clips; got {num_videos} videos, {num_clips} clips")
    order = video_order(num_videos, seed)
    return [(order[i % num_videos], i // num_videos) for i in range(num_clips)]


class EvaluationClips:
    """`num_clips` clips (default: one per video) of `num_frames` frames from a dataset split (any layout of
    `load_video_dataset`), resampled to `fps`, cut by `sampling` and brought to `resolution` by `resize`."""

    def __init__(self, source: str | os.PathLike, split: str = "train", num_clips: int | None = None, seed: int = 0,
                 num_frames: int = 17, resolution: int = 128, fps: float | None = 8, sampling: str = "center",
                 layout: str = "auto", resize: str = "squash"):
        # absolute, so that the files (and their digest below) are the same whichever way the folder is written
        self.source = os.path.abspath(source)
        self.dataset = load_video_dataset(self.source, layout, split, num_frames, resolution, fps, sampling=sampling,
                                          resize=resize)
        self.order = clip_order(len(self.dataset), num_clips or len(self.dataset), seed)
        self.paths, self.labels = self.dataset.index["path"], self.dataset.index["label"]  # read once, not per clip
        # each video's file-name-safe name (its path below the root): the generated videos are named after them
        self._names = [safe_file_name(os.path.splitext(os.path.relpath(p, self.source))[0]) for p in self.paths]
        if len(set(self._names)) < len(self._names):
            first = {}
            for path, name in zip(self.paths, self._names):
                if name in first:
                    raise ValueError(f"{first[name]} and {path} would both give videos named {name!r}: rename one")
                first[name] = path
        # the split's files decide which video each clip comes from: a video added or removed changes every clip
        videos = hashlib.sha256("\n".join(self.paths).encode()).hexdigest()[:16]
        self.settings = dict(source=self.source, split=split, layout=layout, seed=seed,
                             num_clips=len(self.order), num_frames=num_frames, resolution=resolution, fps=fps,
                             sampling=sampling, resize=resize, videos=videos)

    def __len__(self) -> int:
        return len(self.order)

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names

    def path(self, i: int) -> str:
        return self.paths[self.order[i][0]]

    def label(self, i: int) -> int:
        return int(self.labels[self.order[i][0]])

    def name(self, i: int) -> str:
        """The clip's file-name-safe name: its path below the dataset root, and its pass over the videos."""
        video, repeat = self.order[i]
        return f"{self._names[video]}_{repeat}"

    def position(self, name: str) -> int | None:
        """The position in the clip order (of any length: this set's `num_clips` aside) of the clip called `name`;
        None when no video of the split has that name."""
        video, _, repeat = name.rpartition("_")
        if video not in self._rank or not repeat.isdigit():
            return None
        return int(repeat) * len(self.paths) + self._rank[video]

    @functools.cached_property
    def _rank(self) -> dict[str, int]:
        """Each video's place in one pass of the clip order, by its name."""
        return {self._names[v]: r for r, v in enumerate(video_order(len(self.paths), self.settings["seed"]))}

    def clip(self, i: int) -> torch.Tensor:
        """Clip `i`: float (3, T, H, W) in [0, 1]. Raises `VideoDecodeError` for an unreadable file."""
        d = self.dataset
        generator = None
        if d.sampling == "random":
            generator = torch.Generator().manual_seed(self.settings["seed"] * 1_000_003 + i)
        return load_clip(self.path(i), d.num_frames, d.resolution, d.fps, d.sampling, generator, d.resize)
