"""Triton kernels for the video tokenizer's norm and activation (`NBPVideoTokenizer.norm_implementation="triton"`).

Every convolution of the tokenizer but the first is preceded by the same three steps: a group norm of each frame, the
learnable Swish x * sigmoid(beta * x), and the causal convolution's replicate padding. In PyTorch they take about
seven passes over the activation (the frame-major copy of the group norm, its two reads and write, three
elementwise kernels for the Swish, the padded copy): at the official size, decoding 17 frames at 128x128 moves
about 19 GB, most of it in these steps. Here they take two kernels: one reads each (frame, group) once for its mean
and variance, the other reads the input once and writes the padded, normalised and activated result, computed in
float32 and rounded once. Both memory layouts are read and written as they are: contiguous (B, C, T, H, W) and
channels-last (`torch.channels_last_3d`, channels innermost), so a tokenizer converted to channels-last keeps its
activations so from one convolution to the next. Inference only (no backward). Runs on CUDA, or on CPU tensors under
Triton's interpreter (`TRITON_INTERPRET=1`), which is how the tests check it."""

import torch
try:  # the remote-code loaders check the imports outside try blocks: a saved folder carries this file and loads
    import triton  # without triton; the kernels need it when they run
    import triton.language as tl
except ImportError as error:
    raise ImportError("this project's Triton kernels need the triton package (pip install triton; CUDA builds of "
                      "torch bring it)") from error

BLOCK = 1024  # elements per program of the normalising kernel
# elements per load of the statistics kernel, whose few programs (one per frame and group: 544 at the official
# decoder's widest level) each loop over their group: 4 KB per load and 8 warps keep more bytes in flight
STATS_BLOCK, STATS_WARPS = 2048, 8


@triton.jit
def _welford(v, ok, count, mean, m2):
    """One value per lane (where ok) into each lane's running count, mean and sum of squared deviations."""
    count += ok.to(tl.float32)
    delta = tl.where(ok, v - mean, 0.0)
    mean += delta / tl.maximum(count, 1.0)
    return count, mean, m2 + delta * (v - mean)


@triton.jit
def _group_stats_kernel(x_ptr, stats_ptr, T, HW, groups, group_size, s_b, s_c, s_t, s_hw, eps,
                        CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b * groups + g) * T + t: mean and 1 / std of x[b, group g's channels, t] into stats[program] =
    (mean, rstd). x's strides: s_b, s_c, s_t and s_hw for a step along the flattened H x W (both layouts keep a row of
    W next to the next row). The loads follow memory order: a channel's plane at a time (contiguous), or the group's
    channels of one position after another (channels-last). Each lane keeps a running count, mean and sum of squared
    deviations (Welford: no cross-lane work inside the loop, stable for any offset); the lanes are joined at the end
    (Chan et al.)."""
    program = tl.program_id(0)
    t = (program % T).to(tl.int64)
    bg = program // T
    base = x_ptr + (bg // groups).to(tl.int64) * s_b + ((bg % groups) * group_size).to(tl.int64) * s_c + t * s_t
    offsets = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), tl.float32)
    mean = tl.zeros((BLOCK,), tl.float32)
    m2 = tl.zeros((BLOCK,), tl.float32)
    if CHANNELS_LAST:
        for start in range(0, group_size * HW, BLOCK):
            j = start + offsets
            ok = j < group_size * HW
            v = tl.load(base + (j % group_size) * s_c + (j // group_size).to(tl.int64) * s_hw, mask=ok, other=0.0)
            count, mean, m2 = _welford(v.to(tl.float32), ok, count, mean, m2)
    else:
        plane = base
        for _ in range(0, group_size):
            for start in range(0, HW, BLOCK):
                ok = start + offsets < HW
                v = tl.load(plane + (start + offsets) * s_hw, mask=ok, other=0.0)
                count, mean, m2 = _welford(v.to(tl.float32), ok, count, mean, m2)
            plane += s_c  # the next channel (a 64-bit pointer: no int32 product to overflow)
    n = tl.sum(count, axis=0)
    total_mean = tl.sum(count * mean, axis=0) / n
    spread = mean - total_mean
    variance = tl.sum(m2 + count * spread * spread, axis=0) / n
    tl.store(stats_ptr + 2 * program, total_mean)
    tl.store(stats_ptr + 2 * program + 1, 1.0 / tl.sqrt(variance + eps))


@triton.jit
def _norm_swish(v, stats, weight_ptr, bias_ptr, beta_ptr, c):
    """swish(group_norm(v)) in float32 for values v of channels c, stats pointing at their (mean, rstd)."""
    scale = tl.load(stats + 1) * tl.load(weight_ptr + c).to(tl.float32)
    # (v - mean) * scale, not v * scale - mean * scale: the latter cancels when the mean is large
    y = (v - tl.load(stats)) * scale + tl.load(bias_ptr + c).to(tl.float32)
    return y * tl.sigmoid(tl.load(beta_ptr + c).to(tl.float32) * y)


@triton.jit
def _norm_swish_pad_kernel(x_ptr, stats_ptr, weight_ptr, bias_ptr, beta_ptr, out_ptr, C, T, H, W, T_out, H_out, W_out,
                           groups, group_size, s_b, s_c, s_t, s_h, s_w, PAD_T, PAD_H, PAD_W,
                           CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """out = swish(group_norm(x)) padded by PAD_T frames in front and PAD_H / PAD_W pixels on each side, replicating
    the edges: out[b, c, t', h', w'] = result[b, c, t' - PAD_T, h' - PAD_H, w' - PAD_W], the indices clamped into x.
    x has strides s_*; out (T_out x H_out x W_out) is dense in its layout, and the programs follow its memory:
    contiguous, program (plane, block) with plane = (b * C + c) * T_out + t' covers a block of that plane;
    channels-last, program (row, block) with row = (b * T_out + t') * H_out + h' covers a block of (w', c) pairs."""
    lane = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    outer = tl.program_id(0).to(tl.int64)
    if CHANNELS_LAST:
        h = tl.minimum(tl.maximum(outer % H_out - PAD_H, 0), H - 1)
        t = tl.maximum((outer // H_out) % T_out - PAD_T, 0)
        b = outer // (H_out * T_out)
        inside = lane < W_out * C
        c = lane % C
        w = tl.minimum(tl.maximum(lane // C - PAD_W, 0), W - 1)
        end = W_out * C
    else:
        t = tl.maximum(outer % T_out - PAD_T, 0)
        c = (outer // T_out) % C
        b = outer // (T_out * C)
        inside = lane < H_out * W_out
        h = tl.minimum(tl.maximum(lane // W_out - PAD_H, 0), H - 1)
        w = tl.minimum(tl.maximum(lane % W_out - PAD_W, 0), W - 1)
        end = H_out * W_out
    stats = stats_ptr + 2 * (((b * groups + c // group_size) * T) + t)
    # every index is clamped into x (lanes past the end too), so the loads need no mask
    v = tl.load(x_ptr + b * s_b + c * s_c + t * s_t + h * s_h + w * s_w).to(tl.float32)
    out = _norm_swish(v, stats, weight_ptr, bias_ptr, beta_ptr, c)
    tl.store(out_ptr + outer * end + lane, out.to(out_ptr.dtype.element_ty), mask=inside)


def _channels_last(x: torch.Tensor) -> bool:
    """Whether x is laid out channels-last (and not also contiguous, as a tensor of one channel is)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)


@torch.compiler.disable  # a compiled tokenizer runs the kernels as they are (the interpreter cannot be traced)
def group_norm_swish(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     beta: torch.Tensor, padding: tuple = (0, 0, 0, 0, 0, 0)) -> torch.Tensor:
    """swish(group_norm(x)) of a video (B, C, T, H, W), the norm over each frame's groups of channels (as
    `FrameGroupNorm`), swish(y) = y * sigmoid(beta * y) with beta one per channel, then padded as `F.pad(...,
    padding, mode="replicate")` with `padding` = (W left, W right, H top, H bottom, T front, T back): the conv
    padding of `CausalConv3d`, symmetric in space and at the front in time. Returns a new tensor in x's dtype and
    memory layout (channels-last stays channels-last; any other layout gives a contiguous result)."""
    left, right, top, bottom, front, back = padding
    if left != right or top != bottom or back != 0:
        raise ValueError(f"padding must be symmetric in space and at the front in time (CausalConv3d's); got {padding}")
    channels_last = _channels_last(x)
    x = x if channels_last else x.contiguous()
    B, C, T, H, W = x.shape
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    out = torch.empty((B, C, T + front, H + 2 * top, W + 2 * left), dtype=x.dtype, device=x.device,
                      memory_format=layout)
    stats = torch.empty((B * num_groups * T, 2), dtype=torch.float32, device=x.device)
    group_size = C // num_groups
    s_b, s_c, s_t, s_h, s_w = x.stride()
    # the kernel steps through H x W as one axis; with W == 1 the step is H's (a size-1 dim's stride is arbitrary)
    _group_stats_kernel[(B * num_groups * T,)](x, stats, T, H * W, num_groups, group_size, s_b, s_c, s_t,
                                               s_h if W == 1 else s_w, eps,
                                               CHANNELS_LAST=channels_last, BLOCK=STATS_BLOCK,
                                               num_warps=STATS_WARPS)
    T_out, H_out, W_out = out.shape[2:]
    if channels_last:
        grid = (B * T_out * H_out, triton.cdiv(W_out * C, BLOCK))
    else:
        grid = (B * C * T_out, triton.cdiv(H_out * W_out, BLOCK))
    _norm_swish_pad_kernel[grid](x, stats, weight, bias, beta.reshape(-1), out, C, T, H, W, T_out, H_out, W_out,
                                 num_groups, group_size, s_b, s_c, s_t, s_h, s_w, front, top, left,
                                 CHANNELS_LAST=channels_last, BLOCK=BLOCK, num_warps=4)
    return out
