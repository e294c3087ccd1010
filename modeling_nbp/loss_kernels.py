"""A Triton kernel for the training loss: cross-entropy and its gradient in one launch (`loss_implementation="triton"`).

The 700M generator's head has 64000 codes, so at batch 16 the logits are 20224 x 64000 (2.6 GB in bf16). The
PyTorch loss (`modeling_nbp._chunked_cross_entropy`) makes about six float32 passes over them (cast, log-softmax,
exp, scale, cast back); here one program per row reads its logits twice, once for the log-sum-exp and once to
write the gradient, with nothing in between. Runs on CUDA, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how the tests check it."""

import torch
try:  # the remote-code loaders check the imports outside try blocks: a saved folder carries this file and loads
    import triton  # without triton; the kernels need it when they run
    import triton.language as tl
except ImportError as error:
    raise ImportError("this project's Triton kernels need the triton package (pip install triton; CUDA builds of "
                      "torch bring it)") from error

BLOCK = 4096  # logits per load (a 64000-code row: 16 loads per pass)


@triton.jit
def _cross_entropy_kernel(x_ptr, stride_x, labels_ptr, loss_ptr, grad_ptr, stride_g, scale_ptr, V,
                          GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Row r: loss[r] = logsumexp(x[r]) - x[r, label] (0 when label is -100); GRAD: grad[r] = (softmax(x[r]) -
    onehot(label)) * scale, zero for an ignored row."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)
    # a running maximum and sum of exponentials per lane, joined at the end
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(x_row + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(lane_max, x)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with no finite logit yet stays 0
        lane_sum = lane_sum * tl.exp(lane_max - shift) + tl.exp(x - shift)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    label = tl.load(labels_ptr + row)
    counted = label != -100
    target = tl.load(x_row + tl.where(counted, label, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(counted, lse - target, 0.0))
    if GRAD:
        scale = tl.where(counted, tl.load(scale_ptr), 0.0)
        g_row = grad_ptr + row * stride_g
        for start in range(0, V, BLOCK):
            ok = start + cols < V
            x = tl.load(x_row + start + cols, mask=ok, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)
            tl.store(g_row + start + cols, (p * scale).to(grad_ptr.dtype.element_ty), mask=ok)


@torch.compiler.disable  # a compiled model runs the kernel as it is (the interpreter cannot be traced)
def cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None):
    """Per-row losses (N,) in float32 of `logits` (N, V) against `labels` (N,) (-100: no target, loss 0), and,
    when `scale` (a 0-d float32 tensor) is given, the gradient of sum(loss) * scale with respect to the logits, in
    their dtype (None otherwise). The labels must already be checked (in [0, V) or -100)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()  # read densely (a reshaped slice of a label table may be a strided view)
    n, vocab = logits.shape
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits) if scale is not None else None
    if n:
        _cross_entropy_kernel[(n,)](logits, logits.stride(0), labels, losses, grad if grad is not None else losses,
                                    grad.stride(0) if grad is not None else 0,
                                    scale if scale is not None else losses, vocab,
                                    GRAD=grad is not None, BLOCK=BLOCK, num_warps=8)
    return losses, grad
