"""Moving digits: a procedural, class-labelled video dataset for demos and tests (no download).

Each clip shows white handwritten digits (scikit-learn's bundled 8x8 digits, upscaled bicubically)
bouncing inside a black square frame at a constant speed. The class is the digit. Clip ``i`` depends
only on ``(seed, i)``: its class is ``i % 10``; the writing sample, start position and velocity come
from a generator seeded with ``(seed, i)``. Positions are rounded to whole pixels and the digit always
lies fully inside the frame, so each frame holds the same digit pixels.

With ``num_digits=2`` both digits show the clip's class (two writing samples, moving independently);
where they overlap the brighter pixel wins.

Folder class names are "0".."9", so sorted folder names give label == digit.
"""

from __future__ import annotations

import functools
import os

import datasets
import numpy as np
import torch
from PIL import Image

from ..video_io import export_to_mp4

DIGIT_CLASS_NAMES = tuple(str(d) for d in range(10))
DIGIT_TEXTS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@functools.lru_cache(maxsize=8)
def digit_sprites(digit_size: int = 24, styles_per_class: int | None = None) -> tuple[np.ndarray, ...]:
    """Per class, the upscaled writing samples: a tuple of 10 float32 arrays ``(n_c, size, size)`` in [0, 1].

    ``styles_per_class`` keeps the first n samples of each class (all when None).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    sprites = []
    for digit in range(10):
        images = digits.images[digits.target == digit][:styles_per_class] / 16.0
        upscaled = [np.asarray(Image.fromarray(img.astype(np.float32), mode="F")
                               .resize((digit_size, digit_size), Image.BICUBIC)) for img in images]
        sprites.append(np.clip(np.stack(upscaled), 0.0, 1.0).astype(np.float32))
    return tuple(sprites)


def _bounce(start: float, velocity: float, steps: np.ndarray, limit: int) -> np.ndarray:
    """Whole-pixel positions in [0, limit] of a point moving at ``velocity`` and reflecting at both ends."""
    if limit == 0:
        return np.zeros(len(steps), dtype=np.int64)
    folded = np.mod(start + velocity * steps, 2 * limit)  # triangle wave of period 2 * limit
    return np.round(np.where(folded > limit, 2 * limit - folded, folded)).astype(np.int64)


class MovingDigits(torch.utils.data.Dataset):
    """``num_clips`` deterministic moving-digit clips: items ``{"video": (3, T, H, W) in [0, 1], "label"}``.

    Args:
        num_clips: dataset length.
        seed: together with the clip index, fixes everything about a clip.
        num_frames, size: clip length T and frame side H = W.
        digit_size: side of the upscaled digit (<= size).
        num_digits: 1 or 2 digits per clip.
        speed_range: (min, max) speed in pixels per frame; each clip draws one constant speed.
        styles_per_class: restrict each class to its first n writing samples (None: all, ~180).
    """

    class_names = list(DIGIT_CLASS_NAMES)
    class_texts = list(DIGIT_TEXTS)

    def __init__(self, num_clips: int, seed: int = 0, num_frames: int = 17, size: int = 64,
                 digit_size: int = 24, num_digits: int = 1, speed_range: tuple[float, float] = (1.0, 3.0),
                 styles_per_class: int | None = None):
        if num_clips < 0 or seed < 0:
            raise ValueError(f"`num_clips` and `seed` must be >= 0, got {num_clips}, {seed}")
        if num_frames < 1 or not 1 <= digit_size <= size:
            raise ValueError(f"need num_frames >= 1 and 1 <= digit_size <= size, got {num_frames}, {digit_size}, {size}")
        if num_digits not in (1, 2):
            raise ValueError(f"`num_digits` must be 1 or 2, got {num_digits}")
        if not 0 <= speed_range[0] <= speed_range[1]:
            raise ValueError(f"`speed_range` must be (min, max) with 0 <= min <= max, got {speed_range}")
        if styles_per_class is not None and styles_per_class < 1:
            raise ValueError(f"`styles_per_class` must be >= 1 or None, got {styles_per_class}")
        self.num_clips, self.seed = num_clips, seed
        self.num_frames, self.size, self.digit_size, self.num_digits = num_frames, size, digit_size, num_digits
        self.speed_range, self.styles_per_class = tuple(speed_range), styles_per_class
        self.sprites = digit_sprites(digit_size, styles_per_class)

    def __len__(self) -> int:
        return self.num_clips

    @staticmethod
    def label_of(index: int) -> int:
        return index % 10

    def render(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Grayscale clip ``index``: float32 ``(T, size, size)`` in [0, 1] (written into ``out`` if given)."""
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip index {index} out of range for {self.num_clips} clips")
        rng = np.random.default_rng([self.seed, index])
        samples = self.sprites[self.label_of(index)]
        steps = np.arange(self.num_frames)
        limit = self.size - self.digit_size
        video = np.zeros((self.num_frames, self.size, self.size), dtype=np.float32) if out is None else out
        if out is not None:
            video.fill(0.0)
        for _ in range(self.num_digits):
            sprite = samples[rng.integers(len(samples))]
            start = rng.uniform(0, limit, size=2)
            angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(*self.speed_range)
            ys = _bounce(start[0], speed * np.sin(angle), steps, limit)
            xs = _bounce(start[1], speed * np.cos(angle), steps, limit)
            for t, (y, x) in enumerate(zip(ys, xs)):
                window = video[t, y:y + self.digit_size, x:x + self.digit_size]
                np.maximum(window, sprite, out=window)
        return video

    def __getitem__(self, index: int) -> dict:
        rgb = np.empty((3, self.num_frames, self.size, self.size), dtype=np.float32)
        self.render(int(index), out=rgb[0])
        rgb[1:] = rgb[0]
        return {"video": torch.from_numpy(rgb), "label": self.label_of(int(index))}

    def _transform(self, batch: dict) -> dict:
        items = [self[i] for i in batch["index"]]
        return {"video": [item["video"] for item in items], "label": [item["label"] for item in items]}


def moving_digits_dataset(num_clips: int, seed: int = 0, **kwargs) -> datasets.Dataset:
    """`MovingDigits` as a `datasets.Dataset`: columns ``index`` and ``label`` (ClassLabel "0".."9"),
    with a transform that renders ``{"video": (3, T, H, W), "label"}`` on access (no pixels stored).
    ``kwargs`` go to `MovingDigits`."""
    clips = MovingDigits(num_clips, seed=seed, **kwargs)
    features = datasets.Features({"index": datasets.Value("int64"),
                                  "label": datasets.ClassLabel(names=list(DIGIT_CLASS_NAMES))})
    table = {"index": list(range(num_clips)), "label": [clips.label_of(i) for i in range(num_clips)]}
    return datasets.Dataset.from_dict(table, features=features).with_transform(clips._transform)


def write_moving_digits_folder(root: str | os.PathLike, num_clips_per_class: int, seed: int = 0,
                               fps: float = 8, **kwargs) -> str:
    """Write clips as MP4 in the folder layout ``root/<digit>/clip_<j:05d>.mp4`` and return ``root``.

    Clip ``j`` of class ``c`` is ``MovingDigits(...)[10 * j + c]``, so the files match the in-memory
    dataset with the same ``seed`` and ``kwargs`` (up to H.264 compression).
    """
    if num_clips_per_class < 1:
        raise ValueError(f"`num_clips_per_class` must be >= 1, got {num_clips_per_class}")
    if kwargs.get("size", 64) % 2:
        raise ValueError(f"`size` must be even (MP4 stores even frame sizes), got {kwargs['size']}")
    root = os.fspath(root)
    earlier = [name for name in DIGIT_CLASS_NAMES if os.path.isdir(os.path.join(root, name))
               and any(f.startswith("clip_") for f in os.listdir(os.path.join(root, name)))]
    if earlier:  # a second run would overwrite some clips and keep the rest
        raise FileExistsError(f"{root} already holds clips (class folders {earlier[:3]}...): choose another output "
                              "folder or delete it")
    clips = MovingDigits(10 * num_clips_per_class, seed=seed, **kwargs)
    for j in range(num_clips_per_class):
        for digit, name in enumerate(DIGIT_CLASS_NAMES):
            gray = clips.render(10 * j + digit)
            export_to_mp4(np.repeat(gray[..., None], 3, axis=-1), os.path.join(root, name, f"clip_{j:05d}.mp4"), fps=fps)
    return root


def main(argv=None):
    """`nbp make-digits`: write moving-digits clips as MP4 files in the folder layout (root/<digit>/clip_*.mp4)."""
    import argparse

    from ..training.common import non_negative_int, positive_int

    p = argparse.ArgumentParser(allow_abbrev=False, prog="nbp make-digits", description=main.__doc__)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--clips_per_class", type=positive_int, default=100)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--num_frames", type=positive_int, default=17)
    p.add_argument("--size", type=positive_int, default=64)
    p.add_argument("--digit_size", type=positive_int, default=24, help="at most --size")
    p.add_argument("--speed_range", type=float, nargs=2, default=(1.0, 3.0))
    p.add_argument("--styles_per_class", type=positive_int, default=None,
                   help="writing samples used per digit (default: all)")
    p.add_argument("--num_digits", type=positive_int, default=1)
    args = p.parse_args(argv)
    try:
        write_moving_digits_folder(args.output_dir, args.clips_per_class, seed=args.seed, num_frames=args.num_frames,
                                   size=args.size, digit_size=args.digit_size, speed_range=tuple(args.speed_range),
                                   styles_per_class=args.styles_per_class, num_digits=args.num_digits)
    except (ValueError, FileExistsError) as error:  # sizes that do not fit together, a folder that holds clips
        p.error(str(error))
    print(f"wrote {10 * args.clips_per_class} clips to {args.output_dir}")
