"""Cutting fixed-size training clips out of video files.

A clip is ``num_frames`` consecutive frames of the video resampled to ``fps`` (nearest frame by
timestamp), brought to ``resolution x resolution`` (PIL bilinear, which averages over the source pixels when
shrinking) in one of two ways (``resize``): "squash" (the default) resizes the whole frame to the square, as the
official NBP data loader does (decord's ``VideoReader(width=, height=)``: the official models were trained and
evaluated on squashed frames); "crop" resizes the shorter side to ``resolution`` and centre-crops, keeping the
aspect ratio.

Too-short rule: a video with fewer than ``num_frames`` frames at the target rate is used whole and
padded at the end by repeating its last frame, with a warning (shown once: a whole dataset padded usually means
the clip length or frame rate is not the one meant).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from ..video_io import read_video

SAMPLING_MODES = ("random", "center", "start")
RESIZE_MODES = ("squash", "crop")


def clip_frame_indices(num_available: int, num_frames: int, sampling: str = "center",
                       generator: torch.Generator | None = None) -> np.ndarray:
    """Indices (into ``num_available`` frames) of a clip of ``num_frames`` consecutive frames.

    ``sampling``: "random" picks a uniformly random start (from ``generator``, else torch's global RNG, which
    differs between DataLoader workers and runs),
    "center" takes the middle window, "start" the first one. Short videos follow the too-short rule:
    all frames, then the last index repeated.
    """
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"`sampling` must be one of {SAMPLING_MODES}, got {sampling!r}")
    if num_frames < 1 or num_available < 1:
        raise ValueError(f"need num_frames >= 1 and num_available >= 1, got {num_frames}, {num_available}")
    if num_available < num_frames:
        return np.minimum(np.arange(num_frames), num_available - 1)
    spare = num_available - num_frames
    if sampling == "random":
        start = int(torch.randint(0, spare + 1, (1,), generator=generator))
    elif sampling == "center":
        start = num_available // 2 - num_frames // 2  # the official loader's middle (one later than spare // 2 for
        # an odd spare)
    else:
        start = 0
    return np.arange(start, start + num_frames)


def window_starts(num_available: int, num_frames: int, num_windows: int) -> np.ndarray:
    """Starts of ``num_windows`` windows of ``num_frames`` frames spread evenly over ``num_available`` frames, the
    first and the last possible window included, equal starts merged: a video with fewer spare frames than windows
    gives fewer windows, one shorter than a window gives one (start 0, padded by the too-short rule)."""
    if num_windows < 1 or num_frames < 1 or num_available < 1:
        raise ValueError(f"need num_windows, num_frames and num_available >= 1, got {num_windows}, {num_frames}, "
                         f"{num_available}")
    spare = max(num_available - num_frames, 0)
    return np.unique(np.round(np.linspace(0, spare, min(num_windows, spare + 1))).astype(np.int64))


def _warn_if_enlarging(height: int, width: int, resolution: int) -> None:
    if min(height, width) < resolution:
        warnings.warn(f"enlarging {height}x{width} video frames to resolution {resolution}: the clips (and their "
                      "token grids) get larger than the videos; pass the resolution the tokenizer expects",
                      stacklevel=3)


def resize_center_crop(frames: np.ndarray, resolution: int) -> np.ndarray:
    """Resize ``uint8`` frames ``(T, H, W, 3)`` so the shorter side is ``resolution``, then centre crop. Frames
    smaller than that are enlarged, with a warning (shown once): usually the resolution was not meant."""
    _, height, width, _ = frames.shape
    _warn_if_enlarging(height, width, resolution)
    scale = resolution / min(height, width)
    new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    box = (left, top, left + resolution, top + resolution)
    if (new_h, new_w) == (height, width):
        return np.ascontiguousarray(frames[:, top:top + resolution, left:left + resolution])
    return np.stack([np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BILINEAR).crop(box))
                     for frame in frames])


def resize_frames(frames: np.ndarray, resolution: int, resize: str = "squash") -> np.ndarray:
    """``uint8`` frames ``(T, H, W, 3)`` -> ``(T, resolution, resolution, 3)`` by resizing whole frames to the square
    ("squash", the official loader's way) or by `resize_center_crop` ("crop")."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"`resize` must be one of {RESIZE_MODES}, got {resize!r}")
    if resize == "crop":
        return resize_center_crop(frames, resolution)
    if frames.shape[1:3] == (resolution, resolution):
        return np.ascontiguousarray(frames)
    _warn_if_enlarging(*frames.shape[1:3], resolution)
    return np.stack([np.asarray(Image.fromarray(f).resize((resolution, resolution), Image.BILINEAR)) for f in frames])


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8`` ``(T, H, W, 3)`` -> float ``(3, T, H, W)`` in ``[0, 1]``."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(255.0)


def load_clip(path: str, num_frames: int = 17, resolution: int = 128, fps: float | None = 8,
              sampling: str = "center", generator: torch.Generator | None = None, resize: str = "squash") -> torch.Tensor:
    """Read one training clip: FloatTensor ``(3, num_frames, resolution, resolution)`` in ``[0, 1]``.

    ``fps=None`` keeps the file's own frame rate; ``resize`` is "squash" or "crop" (see the module docstring).
    Raises `VideoDecodeError` for unreadable files.
    """
    return _read_clips(path, num_frames, resolution, fps, resize,
                       lambda count: clip_frame_indices(count, num_frames, sampling, generator))[0]


def load_clip_windows(path: str, num_windows: int, num_frames: int = 17, resolution: int = 128,
                      fps: float | None = 8, resize: str = "squash") -> torch.Tensor:
    """Read the clips of one video at `window_starts` (``num_windows`` spread evenly, each frame decoded once):
    FloatTensor ``(n, 3, num_frames, resolution, resolution)`` in ``[0, 1]``, ``n <= num_windows``.

    Arguments as `load_clip`. Raises `VideoDecodeError` for unreadable files.
    """
    def select(count: int) -> np.ndarray:
        starts = window_starts(count, num_frames, num_windows)
        return np.concatenate([start + clip_frame_indices(count - start, num_frames, "start") for start in starts])

    return _read_clips(path, num_frames, resolution, fps, resize, select)


def _read_clips(path: str, num_frames: int, resolution: int, fps: float | None, resize: str, select) -> torch.Tensor:
    """The clips whose frame indices `select(number of frames at fps)` gives, ``num_frames`` after another:
    ``(n, 3, num_frames, resolution, resolution)``. A frame that several clips share is decoded and resized once."""
    if resize not in RESIZE_MODES:  # before decoding
        raise ValueError(f"`resize` must be one of {RESIZE_MODES}, got {resize!r}")
    available, positions = [], []

    def counted(count: int) -> np.ndarray:
        available.append(count)
        frames, where = np.unique(select(count), return_inverse=True)
        positions.append(torch.from_numpy(where.reshape(-1)))
        return frames

    frames, _ = read_video(path, fps=fps, select=counted)
    if available[-1] < num_frames:  # the too-short rule; all of a folder's clips padded is usually a wrong num_frames
        rate = f" at {fps:g} fps" if fps is not None else ""
        warnings.warn(f"videos with fewer than {num_frames} frames{rate} are padded by repeating their last frame; "
                      "pass the num_frames (and fps) the tokenizer expects", stacklevel=3)
    clips = frames_to_tensor(resize_frames(frames, resolution, resize))[:, positions[-1]]  # (3, n * num_frames, H, W)
    return clips.unflatten(1, (-1, num_frames)).transpose(0, 1).contiguous()
