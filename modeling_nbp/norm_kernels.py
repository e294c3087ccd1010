"""Triton kernels for the video tokenizer's norm and activation (`NBPVideoTokenizer.norm_implementation="triton"`).

Every convolution of the tokenizer but the first is preceded by the same three steps: a group norm of each frame, the
learnable Swish x * sigmoid(beta * x), and the causal convolution's replicate padding. In PyTorch they take about
seven passes over the activation (the frame-major copy of the group norm, its two reads and write, three
elementwise kernels for the Swish, the padded copy): at the official size, decoding 17 frames at 128x128 moves
about 19 GB, most of it in these steps. Here they take two kernels: one reads each (frame, group) once for its mean
and variance, the other reads the input once and writes the padded, normalised and activated result, computed in
float32 and rounded once. Inference only (no backward). Runs on CUDA, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the tests check it."""

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per load


@triton.jit
def _group_stats_kernel(x_ptr, stats_ptr, T, HW, group_size, eps, BLOCK: tl.constexpr):
    """Program (b * groups + g) * T + t: mean and 1 / std of x[b, group g's channels, t] (x: B, C, T, H, W), into
    stats[program] = (mean, rstd). Each lane keeps a running count, mean and sum of squared deviations (Welford:
    no cross-lane work inside the loop, stable for any offset); the lanes are joined at the end (Chan et al.)."""
    program = tl.program_id(0)
    t = program % T
    first_channel = (program // T).to(tl.int64) * group_size  # (b * groups + g) * group_size = b * C + g * group_size
    offsets = tl.arange(0, BLOCK)
    count = tl.zeros((BLOCK,), tl.float32)
    mean = tl.zeros((BLOCK,), tl.float32)
    m2 = tl.zeros((BLOCK,), tl.float32)
    for c in range(0, group_size):
        plane = x_ptr + ((first_channel + c) * T + t) * HW
        for start in range(0, HW, BLOCK):
            ok = start + offsets < HW
            v = tl.load(plane + start + offsets, mask=ok, other=0.0).to(tl.float32)
            count += ok.to(tl.float32)
            delta = tl.where(ok, v - mean, 0.0)
            mean += delta / tl.maximum(count, 1.0)
            m2 += delta * (v - mean)
    n = tl.sum(count, axis=0)
    total_mean = tl.sum(count * mean, axis=0) / n
    spread = mean - total_mean
    variance = tl.sum(m2 + count * spread * spread, axis=0) / n
    tl.store(stats_ptr + 2 * program, total_mean)
    tl.store(stats_ptr + 2 * program + 1, 1.0 / tl.sqrt(variance + eps))


@triton.jit
def _norm_swish_pad_kernel(x_ptr, stats_ptr, weight_ptr, bias_ptr, beta_ptr, out_ptr, C, T, H, W, T_out, H_out, W_out,
                           group_size, PAD_T, PAD_H, PAD_W, BLOCK: tl.constexpr):
    """Program (plane, block), plane = (b * C + c) * T_out + t_out: a block of out[b, c, t_out] (T_out x H_out x W_out,
    the input padded by PAD_T frames in front and PAD_H / PAD_W pixels on each side, replicating the edges) =
    swish(group_norm(x))[b, c, t_out - PAD_T, h - PAD_H, w - PAD_W] with the indices clamped into the input."""
    plane = tl.program_id(0).to(tl.int64)
    t_out = plane % T_out
    bc = plane // T_out
    c = bc % C
    t = tl.maximum(t_out - PAD_T, 0)
    group = (bc // C) * (C // group_size) + c // group_size
    mean = tl.load(stats_ptr + 2 * (group * T + t))
    rstd = tl.load(stats_ptr + 2 * (group * T + t) + 1)
    scale = rstd * tl.load(weight_ptr + c).to(tl.float32)
    bias = tl.load(bias_ptr + c).to(tl.float32)
    beta = tl.load(beta_ptr + c).to(tl.float32)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # clamped into the input, so every lane reads a real value (past the plane's end too: no mask needed)
    h = tl.minimum(tl.maximum(i // W_out - PAD_H, 0), H - 1)
    w = tl.minimum(tl.maximum(i % W_out - PAD_W, 0), W - 1)
    v = tl.load(x_ptr + (bc * T + t) * H * W + h * W + w).to(tl.float32)
    y = (v - mean) * scale + bias  # not v * scale + (bias - mean * scale): that cancels when the mean is large
    out = y * tl.sigmoid(beta * y)
    tl.store(out_ptr + plane * H_out * W_out + i, out.to(out_ptr.dtype.element_ty), mask=i < H_out * W_out)


def group_norm_swish(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     beta: torch.Tensor, padding: tuple = (0, 0, 0, 0, 0, 0)) -> torch.Tensor:
    """swish(group_norm(x)) of a video (B, C, T, H, W), the norm over each frame's groups of channels (as
    `FrameGroupNorm`), swish(y) = y * sigmoid(beta * y) with beta one per channel, then padded as `F.pad(...,
    padding, mode="replicate")` with `padding` = (W left, W right, H top, H bottom, T front, T back): the conv
    padding of `CausalConv3d`, symmetric in space and at the front in time. Returns a new tensor in x's dtype."""
    left, right, top, bottom, front, back = padding
    if left != right or top != bottom or back != 0:
        raise ValueError(f"padding must be symmetric in space and at the front in time (CausalConv3d's); got {padding}")
    B, C, T, H, W = x.shape
    x = x.contiguous()
    out = torch.empty((B, C, T + front, H + 2 * top, W + 2 * left), dtype=x.dtype, device=x.device)
    stats = torch.empty((B * num_groups * T, 2), dtype=torch.float32, device=x.device)
    group_size = C // num_groups
    _group_stats_kernel[(B * num_groups * T,)](x, stats, T, H * W, group_size, eps, BLOCK=BLOCK, num_warps=4)
    plane = out.shape[3] * out.shape[4]
    grid = (B * C * out.shape[2], triton.cdiv(plane, BLOCK))
    _norm_swish_pad_kernel[grid](x, stats, weight, bias, beta.reshape(-1), out, C, T, H, W, out.shape[2],
                                 out.shape[3], out.shape[4], group_size, front, top, left, BLOCK=BLOCK, num_warps=4)
    return out
