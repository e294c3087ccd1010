"""What the tests add to Triton's interpreter, the CPU stand-in for a GPU in these tests.

It keeps bfloat16 values as their raw 16 bits: its dot product multiplies those bits as integers (a silently wrong
result), and its float32 -> bfloat16 cast truncates where a GPU rounds to nearest even. `interpret_bfloat16_as_a_gpu`
makes both what a GPU computes, so the kernels' bfloat16 paths (the 700M model's dtype) are tested on CPU too.

It reads and writes past a tensor without complaint, as a GPU does: `guarded` surrounds a kernel's input with NaN,
so that such a read shows in the result, and `guard_intact` tells whether a kernel wrote there."""
import numpy as np
import torch


def _widen(handle, interpreter, tl):
    """A bfloat16 operand as float32 (exact: bfloat16 is float32's upper half)."""
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def interpret_bfloat16_as_a_gpu():
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, cast = builder.create_dot, builder.cast_impl

    def create_dot(self, a, b, d, *args):
        return dot(self, _widen(a, interpreter, tl), _widen(b, interpreter, tl), d, *args)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    builder.create_dot, builder.cast_impl = create_dot, cast_impl


GUARD = 1024  # elements of NaN (or -1) on each side of a `guarded` tensor


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of `t` in the middle of a buffer filled with NaN (-1 for integers). A kernel that reads past
    either end of it (the interpreter, like a GPU, reads the neighbouring memory without complaint) gets NaN into its
    result instead of a neighbour's plausible value; `guard_intact` tells whether a kernel wrote past it."""
    fill = -1 if not t.is_floating_point() else float("nan")
    buffer = torch.full((t.numel() + 2 * GUARD,), fill, dtype=t.dtype, device=t.device)
    inner = buffer[GUARD : GUARD + t.numel()].view(t.shape)
    inner.copy_(t)
    return inner


def guard_intact(t: torch.Tensor) -> bool:
    """The guard zones of a `guarded` tensor still hold only their fill."""
    buffer = torch.as_strided(t, (t.numel() + 2 * GUARD,), (1,), t.storage_offset() - GUARD)
    zones = torch.cat([buffer[:GUARD], buffer[-GUARD:]])
    return bool(zones.isnan().all()) if t.is_floating_point() else bool((zones == -1).all())
