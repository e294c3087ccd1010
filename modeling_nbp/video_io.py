"""Reading and writing videos with PyAV and PIL.

Conventions used throughout this module:

* Decoded videos are ``uint8`` numpy arrays of shape ``(T, H, W, 3)`` (RGB).
* Writers accept one of
    - a list of ``PIL.Image`` frames or of ``(H, W, 3)`` numpy arrays,
    - a numpy array ``(T, H, W, 3)``, ``uint8`` or float in ``[0, 1]``,
    - a torch tensor ``(T, 3, H, W)`` (one video of the pipeline's ``output_type="pt"`` frames) or ``(3, T, H, W)``
      (channels first, the dataset/tokenizer layout), ``uint8`` or float in ``[0, 1]``; ``(3, 3, H, W)`` could be
      either and is refused (pass a numpy array).
  Float values slightly outside ``[0, 1]`` are clipped; values far outside it (0..255 or [-1, 1] pixels) and NaN
  or infinite values are refused.
* Every file is written under a temporary name in the target folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import fractions
import math
import numbers
import os
import shutil
import uuid
from typing import Callable, Iterator, Sequence

import av
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "VideoDecodeError",
    "read_video",
    "resample_frame_indices",
    "as_uint8_frames",
    "export_to_mp4",
    "export_to_gif",
    "make_contact_sheet",
    "atomic_output_path",
    "safe_file_name",
    "decoding_workers",
]


def decoding_workers(requested: int) -> int:
    """`requested` worker processes for decoding videos, at most as many as this process may use CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(requested, cpus))


def safe_file_name(text: str) -> str:
    """`text` with every character other than letters, digits, '-' and '_' replaced by '_'."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


class VideoDecodeError(RuntimeError):
    """A video file could not be opened or decoded (missing, corrupt, truncated, no video stream)."""


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def flush_to_disk(path: str | os.PathLike, entries_only: bool = False) -> None:
    """fsync a file, or every file and folder of a folder tree (after a crash, a power cut, a rename is only as good
    as the contents it names); `entries_only`: just the folder's own entries (a rename inside it)."""
    path = os.fspath(path)
    if entries_only or not os.path.isdir(path):
        _fsync(path)
        return
    for root, _, names in os.walk(path):
        for name in names:
            _fsync(os.path.join(root, name))
        _fsync(root)


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    Works for files and for directories (e.g. ``datasets.Dataset.save_to_disk``); an existing folder at
    ``path`` is replaced only once the new one is complete, and the contents reach the disk before the rename
    (`flush_to_disk`). On failure the temporary file or folder is removed and the exception propagates. The
    temporary name keeps the extension of ``path`` so that format detection by extension still works.
    """
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(name)
    tmp = os.path.join(folder, f".{stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{ext}")
    try:
        yield tmp
        flush_to_disk(tmp)
        if os.path.isdir(tmp) and os.path.isdir(path):  # a folder cannot be renamed onto a non-empty one
            old = os.path.join(folder, f".{stem}.old-{uuid.uuid4().hex[:8]}{ext}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        flush_to_disk(folder, entries_only=True)  # the rename itself
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _resampled_count(timestamps: np.ndarray, native_fps: float, fps: float) -> int:
    duration = timestamps[-1] - timestamps[0] + 1.0 / native_fps
    return max(1, int(np.floor(duration * fps + 1e-6)))


def resample_frame_indices(timestamps: np.ndarray, native_fps: float, fps: float) -> np.ndarray:
    """Indices of the source frames that represent the video at ``fps`` (nearest frame by timestamp).

    The video is taken to last ``(last - first timestamp) + 1 / native_fps`` seconds, so ``n`` frames
    at ``native_fps`` give ``floor(n * fps / native_fps)`` frames (at least one). Target times are
    ``first + k / fps``; ties go to the earlier frame.
    """
    _check_fps(fps)
    timestamps = np.asarray(timestamps, dtype=np.float64)
    count = _resampled_count(timestamps, native_fps, fps)
    if count > 1000 * len(timestamps):  # a rate typed wrong: fps=1e12 asked for terabytes
        raise ValueError(f"`fps` {fps:g} would repeat each of the video's {len(timestamps)} frames (at "
                         f"{native_fps:g} fps) {count // len(timestamps)} times; give a rate near the video's")
    targets = timestamps[0] + np.arange(count) / fps
    right = np.clip(np.searchsorted(timestamps, targets, side="left"), 0, len(timestamps) - 1)
    left = np.clip(right - 1, 0, len(timestamps) - 1)
    closer_left = np.abs(targets - timestamps[left]) <= np.abs(timestamps[right] - targets) + 1e-9
    return np.where(closer_left, left, right)


def _open_error(path: str, err: Exception) -> VideoDecodeError:
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    return VideoDecodeError(f"cannot decode {path}: {message}")


def _stream_rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _native_fps(rate: float | None, timestamps: np.ndarray) -> float:
    """The stream's rate, else the rate the timestamps imply, else 25."""
    if rate:
        return rate
    if len(timestamps) > 1 and timestamps[-1] > timestamps[0]:
        return (len(timestamps) - 1) / (timestamps[-1] - timestamps[0])
    return 25.0


def _packet_times(path: str) -> tuple[np.ndarray, float, float] | None:
    """Without decoding: the sorted presentation timestamps (in stream time-base units) of the first video stream's
    packets, the time base and the stream's rate; None when a packet has no timestamp or two share one (then
    frames cannot be matched to packets, and `_decode_all` decides)."""
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path} is a folder, not a video file" if os.path.isdir(path) else
                               f"video file not found: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"no video stream in {path}")
            stream = container.streams.video[0]
            # a discarded packet (before an MP4 edit list's start) is decoded as a reference but never output
            pts = [packet.pts for packet in container.demux(stream) if packet.size and not packet.is_discard]
            time_base, rate = stream.time_base, _stream_rate(stream)
    except VideoDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        raise _open_error(path, err) from err
    if not pts or time_base is None or any(p is None for p in pts) or len(set(pts)) < len(pts):
        return None
    return np.sort(np.asarray(pts, dtype=np.int64)), float(time_base), rate


def _upright_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as RGB (H, W, 3), turned as players show it: phone videos store their frames sideways with a
    display matrix in the container, whose rotation (counter-clockwise degrees) PyAV reads from the frame."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k=quarter_turns)) if quarter_turns else rgb


def _decoded_frames(container) -> Iterator[av.VideoFrame]:
    """The frames of the first video stream. A packet the decoder refuses (damaged, or cut off at the end of a
    truncated file) is left out, as players do, rather than failing the whole video."""
    for packet in container.demux(container.streams.video[0]):
        try:
            yield from packet.decode()
        except av.InvalidDataError:
            continue


def _stack(frames: list[np.ndarray], path: str) -> np.ndarray:
    sizes = sorted({frame.shape[:2] for frame in frames})
    if len(sizes) > 1:
        raise VideoDecodeError(f"the frame size changes within {path}: " + ", ".join(f"{h}x{w}" for h, w in sizes))
    return np.stack(frames)


def _decode_wanted(path: str, wanted: set[int]) -> dict[int, np.ndarray] | None:
    """RGB arrays of the frames whose timestamps are in `wanted`, decoding only up to the last of them; None when
    a wanted frame does not come out of the decoder (a packet that does not decode, say)."""
    found, last = {}, max(wanted)
    try:
        with av.open(path) as container:
            for frame in _decoded_frames(container):
                if frame.pts in wanted and frame.pts not in found:
                    found[frame.pts] = _upright_rgb(frame)
                    if len(found) == len(wanted):
                        break
                elif frame.pts is not None and frame.pts > last:
                    break  # frames come out in presentation order: the missing ones will not come
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        raise _open_error(path, err) from err
    return found if len(found) == len(wanted) else None


def _decode_all(path: str) -> tuple[list, np.ndarray, float]:
    """Decode every frame of the first video stream: (frames as av.VideoFrame, timestamps in s, fps)."""
    try:
        with av.open(path) as container:
            frames = list(_decoded_frames(container))
            rate = _stream_rate(container.streams.video[0])
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as err:
        raise _open_error(path, err) from err
    if not frames:
        raise VideoDecodeError(f"no decodable frames in {path}")

    times = [frame.time for frame in frames]
    if any(t is None for t in times):  # no usable timestamps: assume a constant rate
        native_fps = rate or 25.0
        return frames, np.arange(len(frames)) / native_fps, native_fps
    timestamps = np.asarray(times, dtype=np.float64)
    order = np.argsort(timestamps, kind="stable")  # decoders emit presentation order; be safe
    return [frames[i] for i in order], timestamps[order], _native_fps(rate, timestamps[order])


def _pick(count: int, timestamps: np.ndarray, native_fps: float, fps: float | None, select, path: str) -> np.ndarray:
    """Indices into the stream's frames of the returned frames (see `read_video`)."""
    if fps is not None and len(timestamps) > 1 and _resampled_count(timestamps, native_fps, fps) > 1000 * count:
        # most frames a normal interval apart: not a wrong `fps` (`resample_frame_indices` refuses those) but a
        # damaged file, or recordings joined without retiming, that would resample to hours of one frame
        if np.median(np.diff(timestamps)) * fps <= 1000:
            raise VideoDecodeError(f"cannot decode {path}: its frames' timestamps leap: {count} frames span "
                                   f"{timestamps[-1] - timestamps[0]:.0f} s")
    indices = np.arange(count) if fps is None else resample_frame_indices(timestamps, native_fps, fps)
    if select is not None:
        chosen = np.asarray(select(len(indices)))
        if chosen.size and not np.issubdtype(chosen.dtype, np.integer):  # 0.5 would be cut to frame 0
            raise ValueError(f"`select` must return integer indices, got {chosen.dtype} values {chosen.tolist()[:5]}")
        chosen = chosen.astype(np.int64)
        if chosen.ndim != 1 or chosen.size == 0 or chosen.min() < 0 or chosen.max() >= len(indices):
            raise ValueError(f"`select` must return indices in [0, {len(indices)}), got {chosen.tolist()}")
        indices = indices[chosen]
    return indices


def read_video(
    path: str | os.PathLike,
    fps: float | None = None,
    select: Callable[[int], Sequence[int]] | None = None,
) -> tuple[np.ndarray, float]:
    """Decode a video file with PyAV.

    The frames' timestamps are read from the container first (no decoding), then only the frames up to the last
    one returned are decoded, and only the returned ones are converted to RGB: a short clip from the start of a
    long video costs what the clip does. Files whose packets carry no usable timestamps are decoded whole. Frames
    come out upright: a rotation in the container's display matrix (phone videos) is applied, in quarter turns.

    Args:
        path: the video file.
        fps: when given, resample in time to this rate (nearest frame by timestamp, see
            `resample_frame_indices`); otherwise keep every frame.
        select: optional function mapping the number ``n`` of (resampled) frames to the indices
            (``0 <= i < n``, repeats allowed) of the frames to return.

    Returns:
        ``(frames, fps)``: ``uint8`` array ``(T, H, W, 3)`` and the frame rate of the returned sequence
        (``fps`` if given, else the stream's rate).

    Raises:
        VideoDecodeError: the file is missing, unreadable or has no decodable video frames, or its frame size
            changes, or (with ``fps``) its timestamps leap by far more than its frames' usual interval (a damaged
            file: hours of one frame at ``fps``). Packets the decoder refuses are left out: a truncated or damaged
            file gives the frames that decode (a truncated one those before the damage), resampled by their
            timestamps.
    """
    path = os.fspath(path)
    if fps is not None:
        _check_fps(fps)
    packets = _packet_times(path)
    if packets is not None:
        pts, time_base, rate = packets
        timestamps = pts * time_base
        native_fps = _native_fps(rate, timestamps)
        indices = _pick(len(pts), timestamps, native_fps, fps, select, path)
        found = _decode_wanted(path, {int(p) for p in pts[indices]})
        if found is not None:
            return _stack([found[int(p)] for p in pts[indices]], path), float(fps if fps is not None else native_fps)
    frames, timestamps, native_fps = _decode_all(path)
    indices = _pick(len(frames), timestamps, native_fps, fps, select, path)
    try:
        rgb = [_upright_rgb(frames[i]) for i in indices]
    except (av.FFmpegError, ValueError) as err:
        raise VideoDecodeError(f"cannot convert frames of {path} to RGB: {err}") from err
    return _stack(rgb, path), float(fps if fps is not None else native_fps)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _tensor_frames(video: torch.Tensor) -> np.ndarray:
    """A (T, 3, H, W) or (3, T, H, W) video tensor (see the module docstring) -> a (T, H, W, 3) array."""
    if video.ndim != 4 or 3 not in video.shape[:2]:
        raise ValueError(f"a video tensor must have shape (T, 3, H, W) or (3, T, H, W), got {tuple(video.shape)}")
    if video.shape[:2] == (3, 3):
        raise ValueError("a (3, 3, H, W) video tensor is either (T, 3, H, W) or (3, T, H, W) with T = 3: pass a "
                         "(T, H, W, 3) numpy array instead, e.g. `video.permute(0, 2, 3, 1).numpy()` for (T, 3, H, W)")
    if video.shape[0] == 3 and video.shape[-1] == 3:  # (3, T, H, 3) would be 3 pixels wide: (T = 3, H, W, 3)
        raise ValueError(f"a video tensor of shape {tuple(video.shape)} looks channels-last (T = 3, H, W, 3): pass "
                         "a (T, H, W, 3) numpy array for that, or a (T, 3, H, W) / (3, T, H, W) tensor")
    video = video.detach().cpu().permute((1, 2, 3, 0) if video.shape[0] == 3 else (0, 2, 3, 1))
    return (video.float() if video.is_floating_point() else video).numpy()  # numpy has no bfloat16


def _float_to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8; a small overshoot is clipped, values far outside [0, 1] are refused."""
    low, high = float(frames.min()), float(frames.max())  # NaN if any value is NaN
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("float frames must lie in [0, 1], got NaN or infinite values")
    if high > 1.5:
        raise ValueError(f"float frames must lie in [0, 1], got values up to {high:.4g}: for 0..255 pixels pass "
                         "`frames / 255` (or uint8 frames)")
    if low < -0.5:
        raise ValueError(f"float frames must lie in [0, 1], got values down to {low:.4g}: for [-1, 1] pixels pass "
                         "`(frames + 1) / 2`")
    return np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)


def as_uint8_frames(frames) -> np.ndarray:
    """Convert any accepted frame container (see module docstring) to ``uint8`` ``(T, H, W, 3)``."""
    if isinstance(frames, torch.Tensor):
        frames = _tensor_frames(frames)
    elif isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("`frames` is empty")
        frames = [np.asarray(f.convert("RGB")) if isinstance(f, Image.Image) else np.asarray(f) for f in frames]
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"the frames of `frames` must have one shape, got {sorted({f.shape for f in frames})}")
        frames = np.stack(frames)
    elif not isinstance(frames, np.ndarray):
        raise TypeError(
            "`frames` must be a list of PIL images / (H, W, 3) arrays, a (T, H, W, 3) numpy array or a "
            f"(T, 3, H, W) or (3, T, H, W) torch tensor, got {type(frames).__name__}"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must have shape (T, H, W, 3) with T, H, W >= 1, got {frames.shape}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if np.issubdtype(frames.dtype, np.floating):
        return _float_to_uint8(frames)
    raise TypeError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")


def _check_fps(fps, low: float = 0.0) -> None:
    """`fps` must be a real number (numpy's too) above 0, and at least `low` (the least rate a format stores)."""
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"`fps` must be a positive finite number, got {fps!r}")
    if fps < low:
        raise ValueError(f"`fps` must be at least {low:.3g} for this format, got {fps!r}")


def export_to_mp4(frames, path: str | os.PathLike, fps: float = 8, crf: int = 12) -> str:
    """Write an H.264 MP4 (libx264, yuv420p) and return its path.

    yuv420p needs even sizes: an odd height or width is padded by repeating the last row or column,
    so a 63x63 video is stored (and read back) as 64x64. ``crf`` sets the quality (0 lossless luma,
    higher = smaller files); the default of 12 keeps small frames such as 64x64 close to the input.
    """
    _check_fps(fps, low=1 / 1001)  # the stream rate is a fraction with a denominator of at most 1001
    if not isinstance(crf, numbers.Real) or isinstance(crf, bool) or not 0 <= crf <= 51:
        raise ValueError(f"`crf` must be a number in [0, 51], got {crf!r}")
    video = as_uint8_frames(frames)
    _, height, width, _ = video.shape
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    if height % 2 or width % 2:
        video = np.pad(video, pad, mode="edge")
    path = os.fspath(path)
    with atomic_output_path(path) as tmp:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fractions.Fraction(float(fps)).limit_denominator(1001))
            stream.width, stream.height = video.shape[2], video.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in video:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():  # flush
                container.mux(packet)
    return path


def export_to_gif(frames, path: str | os.PathLike, fps: float = 8) -> str:
    """Write an animated GIF that loops forever and return its path.

    GIF stores frame durations in whole hundredths of a second, so the rate is rounded (8 fps: 125 ms
    is stored as 12 cs and plays at 8.33 fps); rates above 50 fps are stored as 50 fps, since players show
    shorter delays at 10 fps. Each frame gets its own 256-colour palette. Pillow merges
    identical consecutive frames into one longer frame, so a video with repeated frames reads back with
    fewer frames: GIFs are for viewing, not for evaluation (FVD refuses them).
    """
    _check_fps(fps, low=100 / 65535)  # a frame lasts at most 65535 hundredths of a second
    images = [Image.fromarray(frame) for frame in as_uint8_frames(frames)]
    path = os.fspath(path)
    with atomic_output_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=10 * max(2, round(100 / fps)), loop=0)
    return path


def make_contact_sheet(
    videos,
    path: str | os.PathLike | None = None,
    columns: int | None = None,
    labels: Sequence[str] | None = None,
    gap: int = 2,
) -> Image.Image:
    """Lay videos out as a grid: one row per video, one column per frame.

    Args:
        videos: a list of videos (each in any form `as_uint8_frames` accepts), a batch tensor
            ``(B, T, 3, H, W)`` (the pipeline's ``output_type="pt"``) or ``(B, 3, T, H, W)``, or a numpy array
            ``(B, T, H, W, 3)``. All videos must share H and W.
        path: when given, the sheet is saved there (PNG by extension) atomically.
        columns: number of frames shown per video, picked evenly from first to last frame; default
            all frames of the longest video. Shorter videos leave their trailing cells black.
        labels: one text per video, drawn with PIL's default font in a margin left of each row.
        gap: pixels between cells.

    Returns:
        The sheet as an RGB ``PIL.Image``.
    """
    if isinstance(videos, (torch.Tensor, np.ndarray)) and videos.ndim == 5:
        videos = list(videos)
    if not isinstance(videos, (list, tuple)) or not videos:
        raise ValueError("`videos` must be a non-empty list of videos or a 5-D batch")
    clips = [as_uint8_frames(video) for video in videos]
    height, width = clips[0].shape[1:3]
    if any(clip.shape[1:3] != (height, width) for clip in clips):
        raise ValueError(f"all videos must share one frame size, got {[c.shape[1:3] for c in clips]}")
    if isinstance(labels, str):
        raise ValueError(f"`labels` must be a list of one text per video, got the string {labels!r}")
    if labels is not None and len(labels) != len(clips):
        raise ValueError(f"`labels` has {len(labels)} entries for {len(clips)} videos")
    longest = max(len(clip) for clip in clips)
    columns = longest if columns is None else columns
    if not isinstance(columns, numbers.Integral) or isinstance(columns, bool) or columns < 1:
        raise ValueError(f"`columns` must be an int >= 1, got {columns!r}")
    if not isinstance(gap, numbers.Integral) or isinstance(gap, bool) or gap < 0:
        raise ValueError(f"`gap` must be an int >= 0, got {gap!r}")

    font = ImageFont.load_default()
    margin = 0
    if labels is not None:  # one line each: PIL cannot measure a line break, and a tab or other control has no glyph
        labels = ["".join(c if c.isprintable() else " " for c in str(text)) for text in labels]
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = max(int(np.ceil(probe.textlength(text, font=font))) for text in labels) + 2 * gap + 4
    sheet = Image.new("RGB", (margin + columns * (width + gap) + gap, len(clips) * (height + gap) + gap))
    draw = ImageDraw.Draw(sheet)
    for row, clip in enumerate(clips):
        top = gap + row * (height + gap)
        if labels is not None:
            draw.text((gap + 2, top + 2), labels[row], fill=(255, 255, 255), font=font)
        picks = np.round(np.linspace(0, longest - 1, columns)).astype(int) if columns > 1 else [0]
        for col, index in enumerate(picks):
            if index < len(clip):
                sheet.paste(Image.fromarray(clip[index]), (margin + gap + col * (width + gap), top))
    if path is not None:
        with atomic_output_path(path) as tmp:
            sheet.save(tmp)
    return sheet
