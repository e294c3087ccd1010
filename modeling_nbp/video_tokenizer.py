"""NBP's video tokenizer: a MAGVIT-v2-style causal 3D CNN with finite scalar quantization (FSQ).

Video (B, C, T, H, W) in [0, 1] -> causal 3D conv encoder -> FSQ ids (B, T', H', W') -> causal decoder ->
video. Time is causal: frame 0 is encoded alone, then every `temporal_compression` frames form one latent
frame, so T = 1 + temporal_compression * (T' - 1) (official: 17 frames <-> 5 latent frames).

With the default configuration the module tree mirrors the official checkpoint: `encoder_layers.{0..26}`
and `decoder_layers.{0..29}` hold the same layers at the same indices (layers without weights keep their
index), so the official state dict loads after stripping its `module.` prefix. For the official config:

    encoder_layers: 0 conv 3->128 | 1-4 res 128 | 5 conv stride (1,2,2) | 6 res 128->256 | 7-9 res 256
                    | 10 conv stride (2,2,2) | 11-14 res 256 | 15 conv stride (2,2,2) | 16 res 256->512
                    | 17-23 res 512 | 24 GroupNorm | 25 Swish | 26 Conv3d 1x1x1 512->6
    decoder_layers: 0 conv 6->512 | 1-8 res 512 | 9 conv 512->4096 | 10 depth-to-space (2,2,2)
                    | 11 res 512->256 | 12-14 res 256 | 15 conv 256->2048 | 16 depth-to-space (2,2,2)
                    | 17-20 res 256 | 21 conv 256->1024 | 22 depth-to-space (1,2,2) | 23 res 256->128
                    | 24-26 res 128 | 27 GroupNorm | 28 Swish | 29 conv 128->3
"""

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

from .fsq import FSQ
from .triton_support import require_triton
from .value_checks import all_finite, check_in_range, is_integer, require

logger = logging.getLogger(__name__)

# Float rounding may take [0, 1] pixels this far outside the range (the FVD and PSNR checks use the same).
_RANGE_TOLERANCE = 1e-3

# how the tokenizer computes each norm, Swish and conv padding (`NBPVideoTokenizer.norm_implementation`): "torch",
# PyTorch's modules one after another; "triton", two kernels (`norm_kernels`; CUDA, or CPU under Triton's
# interpreter), used where no gradient is recorded
NORM_IMPLEMENTATIONS = ("torch", "triton")
# how it computes each convolution (`NBPVideoTokenizer.conv_implementation`): "conv3d", PyTorch's 3D convolution;
# "frames2d", one 2D convolution over the frames each output frame sees, stacked as input channels (`FrameConv3d`)
CONV_IMPLEMENTATIONS = ("conv3d", "frames2d")


def depth_to_space(x: torch.Tensor, time_factor: int, space_factor: int) -> torch.Tensor:
    """(B, C*t*s*s, T, H, W) -> (B, C, T*t, H*s, W*s).

    Channel layout (the official one, which the upsampling conv weights depend on): input channel
    ((dt * s + dh) * s + dw) * C + c goes to output channel c at offset (dt, dh, dw).
    """
    b, c, f, h, w = x.shape
    t, s = time_factor, space_factor
    c_out = c // (t * s * s)
    x = x.reshape(b, t, s, s, c_out, f, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)  # b c f dt h dh w dw
    return x.reshape(b, c_out, f * t, h * s, w * s)


def space_to_depth(x: torch.Tensor, space_factor: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, s*s*C, T, H/s, W/s); the exact inverse of `depth_to_space(x, 1, s)`."""
    b, c, f, h, w = x.shape
    s = space_factor
    x = x.reshape(b, c, f, h // s, s, w // s, s).permute(0, 4, 6, 1, 2, 3, 5)  # b dh dw c f h w
    return x.reshape(b, s * s * c, f, h // s, w // s)


def replicate_pad(x: torch.Tensor, padding: tuple) -> torch.Tensor:
    """`F.pad(x, padding, mode="replicate")` of a 5-D x, padding = (W left, W right, H top, H bottom, T front, T back).
    While torch.compile traces, the same values come from concatenated edge slices: inductor (torch 2.13) fails on
    replicate padding after the decoder's depth-to-space (an assert in its scheduler), not on concatenations."""
    if not any(padding):
        return x
    if not torch.compiler.is_compiling():
        return F.pad(x, padding, mode="replicate")
    for dim, (before, after) in zip((4, 3, 2), zip(padding[::2], padding[1::2])):
        n = x.shape[dim]
        x = torch.cat([x.narrow(dim, 0, 1)] * before + [x] + [x.narrow(dim, n - 1, 1)] * after, dim)
    return x


class Swish(nn.Module):
    """x * sigmoid(beta * x) with a learnable per-channel beta of shape (1, C, 1, 1, 1), initialised to 1."""

    def __init__(self, channels: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm applied to every frame on its own: statistics over (channels in group, H, W), never time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


class FrameConv3d(nn.Conv3d):
    """nn.Conv3d (no padding, dilation or groups) that can also run as one 2D convolution: the kt frames each output
    frame sees are stacked as kt * C input channels (time tap major, as the weight is reordered), the output frames
    are the batch, channels-last. The same function up to float rounding (the sums run in another order), in the
    2D kernels GPUs tune most; it costs one copy of kt times the input and a reordered copy of the weight per call
    (so that training updates reach it). `as_frames` is set by the tokenizer's `conv_implementation`."""

    as_frames = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding != (0, 0, 0) or self.dilation != (1, 1, 1) or self.groups != 1:
            raise ValueError("FrameConv3d takes no padding, dilation or groups (the causal padding is done before it)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.as_frames:
            return super().forward(x)
        y = F.conv2d(self.stacked_frames(x), self.stacked_weight(), self.bias, stride=self.stride[1:])  # (B T', ...)
        return y.unflatten(0, (x.shape[0], -1)).transpose(1, 2)  # (B, out, T', H', W'), a view

    def stacked_frames(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B T', kt C, H, W), channels-last: the kt frames each output frame sees (one copy)."""
        kt, st = self.kernel_size[0], self.stride[0]
        B, C, _, H, W = x.shape
        frames = x.unfold(2, kt, st)  # (B, C, T', H, W, kt), a view
        return frames.permute(0, 2, 3, 4, 5, 1).reshape(-1, H, W, kt * C).permute(0, 3, 1, 2)

    def stacked_weight(self) -> torch.Tensor:
        """The weight (out, C, kt, kh, kw) as the 2D one (out, kt C, kh, kw) that reads `stacked_frames`."""
        out, C, kt, kh, kw = self.weight.shape
        return self.weight.permute(0, 2, 1, 3, 4).reshape(out, kt * C, kh, kw)


class CausalConv3d(nn.Module):
    """Conv3d that sees only the current and past frames.

    Time is padded at the front by 2 * (k_t // 2) frames, space symmetrically by k // 2 pixels, all with
    replicate padding (official), so a stride-1 conv keeps T, H, W and a stride-2 conv maps T = 1 + 2n to
    1 + n and H to H / 2.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=(1, 1, 1)):
        super().__init__()
        self.conv = FrameConv3d(in_channels, out_channels, kernel_size, stride=stride)
        half = kernel_size // 2
        self.padding = (half, half, half, half, 2 * half, 0)  # (W left/right, H top/bottom, T front/back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(replicate_pad(x, self.padding))


def _norm_act(norm: FrameGroupNorm, act: Swish, x: torch.Tensor, padding: tuple, fused: bool) -> torch.Tensor:
    """act(norm(x)) padded as `F.pad(..., padding, mode="replicate")`; fused: all three in Triton kernels."""
    if fused:
        # imports triton; `from .x import` is the form that the Hub loaders copy with remote code
        from .norm_kernels import group_norm_swish

        return group_norm_swish(x, norm.num_groups, norm.weight, norm.bias, norm.eps, act.beta, padding)
    return replicate_pad(act(norm(x)), padding)


def _norm_act_conv(norm: FrameGroupNorm, act: Swish, conv: nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """conv(act(norm(x))), the causal conv's padding done with the norm (`_norm_act`)."""
    if isinstance(conv, CausalConv3d):
        return conv.conv(_norm_act(norm, act, x, conv.padding, fused))
    return conv(_norm_act(norm, act, x, (0,) * 6, fused))


class ResidualUnit(nn.Module):
    """Pre-norm residual unit: [GroupNorm, Swish, conv 3x3x3, GroupNorm, Swish, conv 3x3x3] + shortcut.

    The shortcut is a 1x1x1 causal conv when the channel count changes, else the identity. Submodule names
    (`fn.{0..5}`, `residual_fn.0`) match the official checkpoint keys.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_num_groups: int):
        super().__init__()
        self.fn = nn.Sequential(
            FrameGroupNorm(norm_num_groups, in_channels),
            Swish(in_channels),
            CausalConv3d(in_channels, out_channels),
            FrameGroupNorm(norm_num_groups, out_channels),
            Swish(out_channels),
            CausalConv3d(out_channels, out_channels),
        )
        if in_channels != out_channels:
            self.residual_fn = nn.Sequential(CausalConv3d(in_channels, out_channels, kernel_size=1))
        else:
            self.residual_fn = nn.Identity()

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """fused: norms, activations and paddings in Triton kernels (`NBPVideoTokenizer.norm_implementation`)."""
        norm1, act1, conv1, norm2, act2, conv2 = self.fn
        h = _norm_act_conv(norm2, act2, conv2, _norm_act_conv(norm1, act1, conv1, x, fused), fused)
        return h + self.residual_fn(x)


class CausalDepthToSpace(nn.Module):
    """Upsampling by rearranging channels; drops the first t-1 frames so that T' latent frames give
    1 + t * (T' - 1) frames (latent frame 0 stays a single frame)."""

    def __init__(self, time_factor: int, space_factor: int):
        super().__init__()
        self.time_factor = time_factor
        self.space_factor = space_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(x, self.time_factor, self.space_factor)[:, :, self.time_factor - 1:]

    def extra_repr(self) -> str:
        return f"time_factor={self.time_factor}, space_factor={self.space_factor}"


@dataclass
class NBPVideoTokenizerOutput(BaseOutput):
    """Output of `NBPVideoTokenizer.forward`.

    Args:
        reconstruction: `(batch, channels, frames, height, width)` decoded video, NOT clamped (so that a
            training loss gets gradients everywhere); clamp to [0, 1] before viewing it.
        ids: `(batch, latent_frames, latent_height, latent_width)` int64 FSQ token ids.
    """

    # defaults as in diffusers' outputs: Accelerate's mixed precision rebuilds outputs as `type(out)(dict)`
    reconstruction: torch.Tensor = None
    ids: torch.Tensor = None


def _is_int(value) -> bool:
    """A Python int: config values are saved as JSON, which takes no numpy integers."""
    return isinstance(value, int) and not isinstance(value, bool)


def _decode_batch_size(value) -> int | None:
    """`decode_batch_size` checked: None, or a positive integer (numpy's too) as an int."""
    if value is None:
        return None
    if not is_integer(value) or value < 1:
        raise ValueError(f"`decode_batch_size` must be a positive integer or None; got {value!r}")
    return int(value)


def _check_positive_ints(name: str, values, example: str) -> tuple:
    values = tuple(values) if isinstance(values, (list, tuple)) else None
    if not values or not all(_is_int(v) and v >= 1 for v in values):
        raise ValueError(f"`{name}` must be a non-empty sequence of positive integers, e.g. {example}")
    return values


class NBPVideoTokenizer(ModelMixin, ConfigMixin):
    r"""Causal 3D CNN video tokenizer with FSQ, as used by Next-Block Prediction (MAGVIT-v2 style, no attention).

    The defaults build the official NBP tokenizer (370.37M parameters, 17x128x128 video -> 5x16x16 ids from a
    64000-code FSQ codebook).

    Parameters:
        in_channels (`int`, defaults to 3): channels of the video (also the output channels).
        block_out_channels (`tuple[int]`, defaults to `(128, 256, 256, 512)`): width of each resolution level.
        layers_per_block (`tuple[int]`, defaults to `(4, 4, 4, 8)`): residual units per level (the decoder
            mirrors the encoder). The first unit of a level changes the width.
        downsample_strides (`tuple[tuple[int, int]]`, defaults to `((1, 2), (2, 2), (2, 2))`): the
            (time, space) factor, each 1 or 2, between consecutive levels; the decoder upsamples by the same
            factors in reverse order. Official: 4x in time, 8x in space.
        fsq_levels (`tuple[int]`, defaults to `(8, 8, 8, 5, 5, 5)`): FSQ levels; the latent has one channel
            per level and the codebook `prod(fsq_levels)` codes.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups; must divide every width.
        patch_size (`int`, defaults to 1): space-to-depth factor applied before the first conv (and
            depth-to-space after the last). 2 makes small models much faster to train; the spatial
            compression becomes `patch_size * prod(space strides)`.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: tuple[int, ...] = (128, 256, 256, 512),
        layers_per_block: tuple[int, ...] = (4, 4, 4, 8),
        downsample_strides: tuple[tuple[int, int], ...] = ((1, 2), (2, 2), (2, 2)),
        fsq_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5),
        norm_num_groups: int = 32,
        patch_size: int = 1,
    ):
        super().__init__()
        widths = _check_positive_ints("block_out_channels", block_out_channels, "(128, 256, 256, 512)")
        units = _check_positive_ints("layers_per_block", layers_per_block, "(4, 4, 4, 8)")
        if len(units) != len(widths):
            raise ValueError(f"`layers_per_block` needs one entry per level of `block_out_channels` "
                             f"({len(widths)}); got {len(units)}")
        strides = tuple(tuple(s) if isinstance(s, (list, tuple)) else s for s in downsample_strides)
        if len(strides) != len(widths) - 1 or not all(
            isinstance(s, tuple) and len(s) == 2 and all(f in (1, 2) and _is_int(f) for f in s) for s in strides
        ):
            raise ValueError(f"`downsample_strides` must hold len(block_out_channels) - 1 = {len(widths) - 1} "
                             f"(time, space) pairs with factors 1 or 2, e.g. ((1, 2), (2, 2), (2, 2)); got "
                             f"{downsample_strides}")
        for name, value in (("in_channels", in_channels), ("norm_num_groups", norm_num_groups),
                            ("patch_size", patch_size)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}")
        if any(w % norm_num_groups for w in widths):
            raise ValueError(f"`norm_num_groups` ({norm_num_groups}) must divide every width in "
                             f"`block_out_channels` {widths}")

        self.quantizer = FSQ(fsq_levels)
        self._time_factors = tuple(t for t, _ in strides)
        self._space_factors = tuple(s for _, s in strides)
        self._patch_size = patch_size
        self._in_channels = in_channels
        self.gradient_checkpointing = False
        self._norm_implementation = "torch"

        latent_dim = self.quantizer.dim
        pixel_channels = in_channels * patch_size * patch_size
        # Index order matters: it reproduces the official `encoder_layers` / `decoder_layers` numbering.
        encoder = [CausalConv3d(pixel_channels, widths[0])]
        width = widths[0]
        for level, (level_width, n_units) in enumerate(zip(widths, units)):
            if level > 0:
                t, s = strides[level - 1]
                encoder.append(CausalConv3d(width, width, stride=(t, s, s)))
            for _ in range(n_units):
                encoder.append(ResidualUnit(width, level_width, norm_num_groups))
                width = level_width
        encoder += [FrameGroupNorm(norm_num_groups, width), Swish(width), FrameConv3d(width, latent_dim, 1)]
        self.encoder_layers = nn.ModuleList(encoder)

        decoder = [CausalConv3d(latent_dim, widths[-1])]
        width = widths[-1]
        for level in reversed(range(len(widths))):
            for _ in range(units[level]):
                decoder.append(ResidualUnit(width, widths[level], norm_num_groups))
                width = widths[level]
            if level > 0:
                t, s = strides[level - 1]
                decoder += [CausalConv3d(width, width * t * s * s), CausalDepthToSpace(t, s)]
        decoder += [FrameGroupNorm(norm_num_groups, width), Swish(width), CausalConv3d(width, pixel_channels)]
        self.decoder_layers = nn.ModuleList(decoder)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """diffusers' reading of config.json; a folder holding an NBP generator's config (a transformers one) instead
        of a tokenizer's, or a pipeline folder, is named with the subfolder of a pipeline's tokenizer."""
        where = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "").rstrip("/")
        hint = "in a pipeline (a folder or repo with model_index.json) the tokenizer is subfolder='video_tokenizer'"
        try:
            loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as err:
            if os.path.isfile(os.path.join(where, "model_index.json")):
                raise OSError(f"{where} is a pipeline folder: {hint}") from err
            raise
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if "model_type" in config:
            raise OSError(f"{where} holds the config of a transformers model ({config['model_type']}), not of a video "
                          f"tokenizer; {hint}")
        return loaded

    @property
    def norm_implementation(self) -> str:
        """How encode and decode compute each group norm, Swish and conv padding, one of `NORM_IMPLEMENTATIONS`:
        "torch" (the default) or "triton" (two kernels instead of about seven passes over the activation; CUDA; used
        where no gradient is recorded: under `torch.no_grad()`, as in the pipeline, `encode` and
        `incremental_decoder()`; training keeps PyTorch's modules). Not saved with the model."""
        return self._norm_implementation

    @norm_implementation.setter
    def norm_implementation(self, value: str):
        if value not in NORM_IMPLEMENTATIONS:
            raise ValueError(f"norm_implementation must be one of {NORM_IMPLEMENTATIONS}, got {value!r}")
        self._norm_implementation = value

    @property
    def conv_implementation(self) -> str:
        """How every convolution runs, one of `CONV_IMPLEMENTATIONS`: "conv3d" (the default) or "frames2d" (one 2D
        convolution over stacked frames, `FrameConv3d`; everywhere: encode, decode, the incremental decoder,
        training). Not saved with the model."""
        frames = any(m.as_frames for m in self.modules() if isinstance(m, FrameConv3d))  # the modules' own flags
        return "frames2d" if frames else "conv3d"

    @conv_implementation.setter
    def conv_implementation(self, value: str):
        if value not in CONV_IMPLEMENTATIONS:
            raise ValueError(f"conv_implementation must be one of {CONV_IMPLEMENTATIONS}, got {value!r}")
        for module in self.modules():
            if isinstance(module, FrameConv3d):
                module.as_frames = value == "frames2d"

    # ----------------------------------------------------------------------------------------- geometry
    @property
    def temporal_compression(self) -> int:
        """Pixel frames per latent frame after the first (official: 4)."""
        return math.prod(self._time_factors)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent position along height and width (official: 8)."""
        return math.prod(self._space_factors) * self._patch_size

    @property
    def codebook_size(self) -> int:
        """Number of token ids, `prod(fsq_levels)` (official: 64000)."""
        return self.quantizer.codebook_size

    def _allowed_frame_counts(self) -> str:
        return ", ".join(str(1 + self.temporal_compression * n) for n in range(5)) + ", ..."

    def _latent_shape(self, num_frames, height, width, names) -> tuple[int, int, int]:
        for name, value in zip(names, (num_frames, height, width)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        num_frames, height, width = int(num_frames), int(height), int(width)
        tc, sc = self.temporal_compression, self.spatial_compression
        if (num_frames - 1) % tc:
            raise ValueError(
                f"{names[0]} must be 1 + {tc} * n (one of {self._allowed_frame_counts()}): the first frame is "
                f"encoded alone and the rest in groups of {tc}; got {num_frames}")
        for name, value in zip(names[1:], (height, width)):
            if value % sc:
                raise ValueError(f"{name} must be a multiple of the spatial compression {sc} "
                                 f"(e.g. {4 * sc} or {8 * sc}); got {value}")
        return 1 + (num_frames - 1) // tc, height // sc, width // sc

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The id grid `(T', H', W')` for a video of the given size; raises ValueError for sizes it cannot encode."""
        return self._latent_shape(num_frames, height, width, ("`num_frames`", "`height`", "`width`"))

    def num_frames_for_latent(self, latent_frames: int) -> int:
        """Number of pixel frames that `latent_frames` latent frames decode to: 1 + temporal_compression * (t - 1)."""
        if not is_integer(latent_frames) or latent_frames < 1:
            raise ValueError(f"`latent_frames` must be a positive integer; got {latent_frames!r}")
        return 1 + self.temporal_compression * (int(latent_frames) - 1)

    # ------------------------------------------------------------------------------------- validation
    def _check_video(self, video) -> None:
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"`video` must be a torch.Tensor of shape (batch, channels, frames, height, width); "
                            f"got {type(video).__name__}")
        if not video.is_floating_point():
            raise TypeError(f"`video` must be a floating-point tensor with values in [0, 1]; got dtype "
                            f"{video.dtype} (for 0..255 pixels use `video.float() / 255`)")
        if video.ndim != 5 or video.shape[0] == 0:
            raise ValueError(f"`video` must have shape (batch, channels, frames, height, width) with batch >= 1; "
                             f"got shape {tuple(video.shape)}")
        if video.shape[1] != self._in_channels:
            if video.shape[-1] == self._in_channels:
                hint = ("a channels-last (batch, frames, height, width, channels) tensor needs "
                        "`video.permute(0, 4, 1, 2, 3)`")
            else:
                hint = "a (batch, frames, channels, height, width) tensor needs `video.permute(0, 2, 1, 3, 4)`"
            raise ValueError(f"`video` must have {self._in_channels} channels in dim 1 (batch, channels, frames, "
                             f"height, width); got shape {tuple(video.shape)} ({hint})")
        self._latent_shape(*video.shape[2:], names=("`video` frame count (dim 2)", "`video` height (dim 3)",
                                                    "`video` width (dim 4)"))
        self._check_device(video, "video")
        if video.device.type == "meta":  # shape-only run: there are no values to check
            return
        if torch.compiler.is_compiling():  # no host read inside a compiled graph: a device-side assert instead
            inside = (video >= -_RANGE_TOLERANCE) & (video <= 1 + _RANGE_TOLERANCE)  # False for NaN
            torch._assert_async(inside.all(), "`video` values must lie in [0, 1] (NaN and infinities refused)")
            return
        low, high = (v.item() for v in torch.aminmax(video.detach()))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("`video` contains NaN or infinite values")
        if low < -_RANGE_TOLERANCE or high > 1 + _RANGE_TOLERANCE:
            if high > 1.5:
                hint = "it looks like 0..255 pixels: pass `video / 255`"
            elif low < 0:
                hint = "for [-1, 1] pixels pass `(video + 1) / 2`; clamp rounding errors with `video.clamp(0, 1)`"
            else:
                hint = "clamp rounding errors with `video.clamp(0, 1)`"
            raise ValueError(f"`video` values must lie in [0, 1]; got min {low:.4g}, max {high:.4g} ({hint})")

    def _check_device(self, tensor: torch.Tensor, name: str) -> None:
        # A model whose weights are on "meta" is offloaded (accelerate moves inputs itself) or shape-only.
        if self.device.type != "meta" and tensor.device != self.device:
            raise ValueError(f"`{name}` is on {tensor.device} but the model is on {self.device}; pass "
                             f"`{name}.to({str(self.device)!r})`")

    def _check_ids(self, ids, allow_no_frames: bool = False) -> None:
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise TypeError(f"`ids` must be an integer tensor of token ids (e.g. torch.long); got {got}")
        sizes = (ids.shape[0], *ids.shape[2:]) if allow_no_frames else ids.shape
        if ids.ndim != 4 or 0 in sizes:
            raise ValueError(f"`ids` must have shape (batch, latent_frames, latent_height, latent_width) with every "
                             f"size >= 1; got shape {tuple(ids.shape)} (reshape a flat sequence to the grid first)")
        self._check_device(ids, "ids")
        if ids.device.type == "meta" or not ids.numel():
            return
        check_in_range(ids, 0, self.codebook_size,
                       f"`ids` must lie in [0, {self.codebook_size}) (the FSQ codebook size)")

    def _check_pixels(self, video: torch.Tensor) -> None:
        """FloatingPointError for NaN in clamped decoded pixels, which would show as black frames (an infinity clamps
        to 0 or 1, as a large finite value does; NaN stays, so finite means no NaN here)."""
        fp16 = self.dtype == torch.float16
        hint = "; float16 overflows easily in its decoder: run it in bfloat16 or float32" if fp16 else ""
        require(all_finite(video), FloatingPointError,
                f"the video tokenizer decoded NaN pixels from NaN or infinite values in its decoder (weights in "
                f"{self.dtype}{hint})")

    # ------------------------------------------------------------------------------------ quantizer
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FSQ of encoder latents `z` (B, D, T', H', W') -> (codes float32 (B, D, T', H', W') with straight-through
        gradients, ids int64 (B, T', H', W'))."""
        if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[1] != self.quantizer.dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"`z` must have shape (batch, {self.quantizer.dim}, latent_frames, latent_height, "
                             f"latent_width), one channel per FSQ level; got {got}")
        codes, ids = self.quantizer(z.movedim(1, -1))
        return codes.movedim(-1, 1), ids

    def indices_to_codes(self, ids: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Token ids (B, T', H', W') -> float32 FSQ codes (B, D, T', H', W'). `validate=False` skips the checks
        of the ids (their range check reads them back to the host), for ids already checked."""
        if validate:
            self._check_ids(ids)
        return self.quantizer.indices_to_codes(ids, validate=False).movedim(-1, 1)

    # -------------------------------------------------------------------------------- encoder/decoder
    def _run_layers(self, layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """Both layer lists end with norm, Swish and a conv, which run together (`_norm_act_conv`)."""
        checkpoint = self.gradient_checkpointing and torch.is_grad_enabled()
        fused = self._norm_implementation == "triton" and not torch.is_grad_enabled()
        if fused:
            require_triton(x.device, "norm_implementation='triton'")
        *body, norm, act, conv = layers
        for layer in body:
            if checkpoint and isinstance(layer, ResidualUnit):
                x = self._gradient_checkpointing_func(layer, x)
            elif isinstance(layer, ResidualUnit):
                x = layer(x, fused)
            else:
                x = layer(x)
        return _norm_act_conv(norm, act, conv, x, fused)

    def _encode_latents(self, video: torch.Tensor) -> torch.Tensor:
        x = video.to(self.dtype)
        if self._patch_size > 1:
            x = space_to_depth(x, self._patch_size)
        return self._run_layers(self.encoder_layers, x)

    def _decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        x = self._run_layers(self.decoder_layers, codes.to(self.dtype))
        if self._patch_size > 1:
            x = depth_to_space(x, 1, self._patch_size)
        return x

    @apply_forward_hook
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Tokenize a video.

        Args:
            video: `(batch, channels, frames, height, width)` float video in [0, 1]; frames = 1 + 4n and
                height/width multiples of 8 for the official configuration.

        Returns:
            int64 ids of shape `(batch, latent_frames, latent_height, latent_width)`, see `latent_shape`.
        """
        self._check_video(video)
        with torch.no_grad():  # ids are discrete: no gradient can flow through them
            latents = self._encode_latents(video)
        # checked outside no_grad: an assert failing in a compiled no_grad block leaves grad mode off (torch 2.13)
        if torch.compiler.is_compiling():  # no host read inside a compiled graph
            torch._assert_async(all_finite(latents), "the video tokenizer encoded NaN or infinite latents")
        elif latents.device.type != "meta" and not all_finite(latents):
            # FSQ would turn NaN into ids far outside the codebook (INT64_MIN on CPU)
            bad = int((~torch.isfinite(latents)).sum())
            fp16 = self.dtype == torch.float16
            hint = "; float16 overflows easily in its encoder: run it in bfloat16 or float32" if fp16 else ""
            raise FloatingPointError(f"the video tokenizer encoded {bad} NaN or infinite latent values (weights in "
                                     f"{self.dtype}{hint}); no valid ids can be made from them")
        return self.quantize(latents)[1]  # latents made under no_grad: FSQ (no parameters) records no graph

    @apply_forward_hook
    def decode(self, ids: torch.Tensor, decode_batch_size: int | None = None) -> torch.Tensor:
        """Turn token ids back into video.

        Args:
            ids: `(batch, latent_frames, latent_height, latent_width)` integer ids in `[0, codebook_size)`.
            decode_batch_size: decode at most this many videos at a time (bounds peak memory); `None` decodes
                the whole batch in one pass. The result depends on it only by float rounding. When a pass runs out
                of GPU memory, the batch is split in halves and decoded again (with a warning), down to one video.

        Returns:
            `(batch, channels, 1 + temporal_compression * (latent_frames - 1), H' * s, W' * s)` video in [0, 1],
            in the model's dtype. The decoder is causal in time, so decoding `ids[:, :k]` gives the first
            `num_frames_for_latent(k)` frames of decoding `ids`, up to float rounding.

        Raises FloatingPointError when the decoder makes NaN pixels (float16 overflow), as `encode` does for latents.
        """
        self._check_ids(ids)
        size = _decode_batch_size(decode_batch_size) or ids.shape[0]
        while True:
            try:
                videos = [self._decode_codes(self.indices_to_codes(chunk, validate=False)).clamp(0, 1)
                          for chunk in ids.split(size)]
                break
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
            # outside the handler, so the failed pass's tensors are free before the retry
            failed, size = size, (size + 1) // 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("out of memory decoding %d videos at once: retrying with decode_batch_size=%d", failed, size)
        video = videos[0] if len(videos) == 1 else torch.cat(videos)
        self._check_pixels(video)
        return video

    def incremental_decoder(self, decode_batch_size: int | None = None) -> "IncrementalDecoder":
        """A stateful decoder for latent frames that arrive in order: `dec(ids[:, a:b])` returns the pixel frames
        that latent frames [a, b) add (each causal convolution keeps the input frames it still needs), so a
        streamed video costs one decode instead of one per prefix. The concatenated chunks equal `decode(ids)`
        up to float rounding."""
        return IncrementalDecoder(self, decode_batch_size)

    def forward(self, video: torch.Tensor, return_dict: bool = True) -> NBPVideoTokenizerOutput | tuple:
        """Training pass: encode, quantize with straight-through gradients, decode (unclamped).

        Returns `NBPVideoTokenizerOutput(reconstruction, ids)`, or the tuple `(reconstruction, ids)` when
        `return_dict=False`.
        """
        self._check_video(video)
        codes, ids = self.quantize(self._encode_latents(video))
        reconstruction = self._decode_codes(codes)
        if not return_dict:
            return reconstruction, ids
        return NBPVideoTokenizerOutput(reconstruction=reconstruction, ids=ids)


class IncrementalDecoder:
    """Decodes latent frames chunk by chunk (`NBPVideoTokenizer.incremental_decoder`). Per batch chunk it keeps,
    for every causal convolution of the decoder, the last input frames its temporal kernel still reaches, and
    whether the time-upsampling layers have dropped their leading frames yet (only the video's first chunk)."""

    def __init__(self, tokenizer: NBPVideoTokenizer, decode_batch_size: int | None = None):
        self.tokenizer, self.decode_batch_size = tokenizer, _decode_batch_size(decode_batch_size)
        self.states, self.batch_size, self.grid = None, None, None

    @property
    def fused(self) -> bool:
        """Norms, activations and paddings in Triton kernels (the tokenizer's `norm_implementation`, read at each
        chunk: the frames kept between chunks are the same either way)."""
        return self.tokenizer.norm_implementation == "triton"

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """ids (B, k, H', W') of the next k latent frames -> their pixel frames (B, C, f, H, W) in [0, 1]:
        f = 1 + t (k - 1) for the first chunk (k >= 1), t k after (t = temporal compression). `validate=False` skips the
        checks that read back to the host, of the ids' range and of NaN pixels (as `decode` raises), for ids a model
        has just produced."""
        tok = self.tokenizer
        if validate:
            tok._check_ids(ids, allow_no_frames=self.states is not None)
        if self.batch_size is not None and ids.shape[0] != self.batch_size:
            raise ValueError(f"this incremental decoder holds a batch of {self.batch_size} videos; got ids for "
                             f"{ids.shape[0]} (use a new `incremental_decoder()` per video batch)")
        if self.grid is not None and tuple(ids.shape[2:]) != self.grid:
            raise ValueError(f"this incremental decoder holds videos with a {self.grid[0]}x{self.grid[1]} latent grid; "
                             f"got ids of shape {tuple(ids.shape)} (use a new `incremental_decoder()` per video batch)")
        if ids.shape[1] == 0:
            if self.states is None:
                raise ValueError(f"the first chunk of `ids` needs at least one latent frame; got shape "
                                 f"{tuple(ids.shape)}")
            sc = tok.spatial_compression
            return torch.empty(ids.shape[0], tok._in_channels, 0, ids.shape[2] * sc, ids.shape[3] * sc,
                               dtype=tok.dtype, device=ids.device)
        chunks = ids.split(self.decode_batch_size) if self.decode_batch_size else (ids,)
        if self.fused:
            require_triton(ids.device, "norm_implementation='triton'")
        if self.states is None:
            self.batch_size, self.grid, self.states = ids.shape[0], tuple(ids.shape[2:]), [{} for _ in chunks]
        videos = []
        *body, norm, act, conv = tok.decoder_layers
        for chunk, state in zip(chunks, self.states):
            x = tok.indices_to_codes(chunk, validate=False).to(tok.dtype)
            for layer in body:
                x = self._layer(layer, x, state)
            x = self._norm_act_conv(norm, act, conv, x, state)
            if tok._patch_size > 1:
                x = depth_to_space(x, 1, tok._patch_size)
            videos.append(x.clamp(0, 1))
        video = videos[0] if len(videos) == 1 else torch.cat(videos)
        if validate:
            tok._check_pixels(video)
        return video

    def _layer(self, layer: nn.Module, x: torch.Tensor, state: dict) -> torch.Tensor:
        if isinstance(layer, ResidualUnit):
            norm1, act1, conv1, norm2, act2, conv2 = layer.fn
            h = self._norm_act_conv(norm2, act2, conv2, self._norm_act_conv(norm1, act1, conv1, x, state), state)
            shortcut = x if isinstance(layer.residual_fn, nn.Identity) else self._layer(layer.residual_fn[0], x, state)
            return h + shortcut
        if isinstance(layer, CausalConv3d) and layer.padding[4]:
            return self._causal_conv(layer, replicate_pad(x, layer.padding[:4] + (0, 0)), state)
        if isinstance(layer, CausalDepthToSpace):
            y = depth_to_space(x, layer.time_factor, layer.space_factor)
            first = layer not in state
            state[layer] = True
            return y[:, :, layer.time_factor - 1:] if first else y
        return layer(x)

    def _norm_act_conv(self, norm: FrameGroupNorm, act: Swish, conv: nn.Module, x: torch.Tensor,
                       state: dict) -> torch.Tensor:
        """`_norm_act_conv` of the full decode for this chunk: a causal conv takes its past frames from `state`."""
        if not (isinstance(conv, CausalConv3d) and conv.padding[4]):
            return _norm_act_conv(norm, act, conv, x, self.fused)
        return self._causal_conv(conv, _norm_act(norm, act, x, conv.padding[:4] + (0, 0), self.fused), state)

    @staticmethod
    def _causal_conv(conv: CausalConv3d, x: torch.Tensor, state: dict) -> torch.Tensor:
        """conv of a chunk `x` already padded in space, after the frames before it that the temporal kernel reaches:
        the previous chunks' last ones, or copies of the first frame at the start (the full decode's padding)."""
        front = conv.padding[4]
        past = state[conv] if conv in state else x[:, :, :1].expand(-1, -1, front, -1, -1)
        x = torch.cat([past, x], dim=2)
        state[conv] = x[:, :, -front:].clone()  # not a view: it would keep the whole chunk alive
        return conv.conv(x)
