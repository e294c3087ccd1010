"""Per-video reconstruction metrics: PSNR and SSIM for video tensors (B, C, T, H, W).

One value per video, in the convention of the official NBP tokenizer evaluation (`evaluation/metrics.py`, video
mode): PSNR of the mean squared error over the whole clip, SSIM per frame averaged over frames (`psnr(...,
per_frame=True)` averages per-frame PSNRs instead, as some other video-tokenizer code does; the two differ when
the error varies between frames). Inputs must already lie in [0, data_range] (clamp decoder outputs first): a range
check catches tensors in [-1, 1] or [0, 255] passed by mistake.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]

# PSNR of a video (or frame) reproduced exactly (MSE 0) is infinite; it is capped here so averages stay finite.
PSNR_MAX_DB = 100.0

# Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

_RANGE_TOLERANCE = 1e-3


def _check_pair(pred: torch.Tensor, target: torch.Tensor, data_range: float) -> None:
    for name, value in (("pred", pred), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, T, H, W), got {type(value).__name__}")
        if value.dim() != 5:
            raise ValueError(f"{name} must have shape (B, C, T, H, W), got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [0, data_range], got dtype {value.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    tolerance = _RANGE_TOLERANCE * data_range
    for name, value in (("pred", pred), ("target", target)):
        low, high = value.min().item(), value.max().item()
        if not (math.isfinite(low) and math.isfinite(high)):  # min and max propagate NaN
            raise ValueError(f"{name} must lie in [0, {data_range}] (data_range), got NaN or infinite values")
        if low < -tolerance or high > data_range + tolerance:
            raise ValueError(
                f"{name} must lie in [0, {data_range}] (data_range), got values in [{low:.4g}, {high:.4g}]; "
                "clamp model outputs to the data range and rescale [-1, 1] or uint8 videos first"
            )


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, per_frame: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each video's mean squared error (per_frame: of each frame's, averaged
    over frames): a tensor of shape (B,). Zero error counts as PSNR_MAX_DB (100 dB)."""
    _check_pair(pred, target, data_range)
    error = (pred.double() - target.double()).square()
    mse = error.mean(dim=(1, 3, 4)) if per_frame else error.mean(dim=(1, 2, 3, 4))  # (B, T) or (B,)
    min_mse = data_range**2 * 10.0 ** (-PSNR_MAX_DB / 10.0)
    value = 10.0 * torch.log10(data_range**2 / mse.clamp_min(min_mse))
    return (value.mean(dim=1) if per_frame else value).to(pred.dtype)


def _gaussian_kernel_1d(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW_SIZE, dtype=torch.float64, device=device) - (SSIM_WINDOW_SIZE - 1) / 2
    kernel = torch.exp(-offsets.square() / (2 * SSIM_SIGMA**2))
    return kernel / kernel.sum()


def _gaussian_filter_valid(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) images without padding ('valid': output shrinks by 10)."""
    images = F.conv2d(images, kernel.view(1, 1, -1, 1))
    return F.conv2d(images, kernel.view(1, 1, 1, -1))


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per video, a tensor of shape (B,).

    SSIM maps use an 11x11 Gaussian window (sigma 1.5) over the valid region of each frame and each
    channel; the mean of each map is averaged over channels and frames.
    """
    _check_pair(pred, target, data_range)
    batch, channels, frames, height, width = pred.shape
    if min(height, width) < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"ssim needs frames of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} pixels, got {height}x{width}"
        )
    # (B, C, T, H, W) -> (B*C*T, 1, H, W): every channel of every frame is filtered on its own.
    x = pred.double().reshape(-1, 1, height, width)
    y = target.double().reshape(-1, 1, height, width)
    kernel = _gaussian_kernel_1d(x.device)
    mu_x = _gaussian_filter_valid(x, kernel)
    mu_y = _gaussian_filter_valid(y, kernel)
    var_x = _gaussian_filter_valid(x * x, kernel) - mu_x.square()
    var_y = _gaussian_filter_valid(y * y, kernel) - mu_y.square()
    cov_xy = _gaussian_filter_valid(x * y, kernel) - mu_x * mu_y
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )
    per_plane = ssim_map.mean(dim=(1, 2, 3)).view(batch, channels * frames)
    return per_plane.mean(dim=1).to(pred.dtype)
