"""Compile this project's Triton kernels for a GPU architecture without a GPU, with the specialisations that the 700M
model launches (the decode step at batch 1, `modeling_nbp/decode_kernels.py`: bf16, every candidate tiling; the
training loss, `modeling_nbp/loss_kernels.py`: bf16 logits of 64000 codes) and the official tokenizer's norm kernels
(`modeling_nbp/norm_kernels.py`), and print each kernel's registers, spilled bytes and shared memory (cuobjdump), and,
for the kernels whose programs join their parts (split products and attention), whether the compiled join is ordered
(`join_order`). Catches what Triton's interpreter cannot: compile errors, spills, tilings that do not fit, a join that
could read parts before they are written. Needs the triton package (its bundled ptxas and cuobjdump); not
TRITON_INTERPRET.

    python benchmarks/compile_kernels.py                 # sm_90 (H100/H200)
    python benchmarks/compile_kernels.py --arch 80       # A100
    python benchmarks/compile_kernels.py --dtype float32 # the decode step in float32 (gpu_check's fp32 checks)
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: the interpreter has nothing to compile")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modeling_nbp import decode_kernels as dk  # noqa: E402
from modeling_nbp import loss_kernels, norm_kernels  # noqa: E402

POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
           torch.int32: "*i32", torch.int64: "*i64"}


def compile_kernel(kernel, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int = 3):
    """`args`: name -> a torch dtype (a pointer, 16-byte aligned), an int or a float, as a launch would pass them;
    ints are specialised as the JIT does (1 -> constant, multiples of 16 -> divisible) unless not specialised."""
    jit = kernel
    skip = {jit.arg_names[i] if isinstance(i, int) else i for i in getattr(jit, "do_not_specialize", ())}
    signature, attrs, constants = {}, {}, dict(constexprs)
    for name in jit.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value, index = args[name], (jit.arg_names.index(name),)
        if isinstance(value, torch.dtype):
            signature[name] = POINTER[value]
            attrs[index] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and name not in skip:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if value % 16 == 0 and name not in skip:
                attrs[index] = [["tt.divisibility", 16]]
    source = ASTSource(fn=jit, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled, resource_usage(compiled.asm["cubin"])


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local (spilled) bytes of a compiled kernel, read by cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        log = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    number = lambda field: int(m.group(1)) if (m := re.search(rf"\b{field}:(\d+)", log)) else 0  # noqa: E731
    return dict(registers=number("REG"), spill_bytes=number("LOCAL"))


def join_order(ptx: str) -> str:
    """How the PTX orders the join of a split kernel: "ok", "-" (no atomic), or what is missing. The programs of a
    tile write their parts with every thread, then one thread counts the program in with an atomic add, and the last
    program reads all parts. That is sound only when a CTA barrier (bar.sync) lies between the part's stores and the
    atomic (so the one thread's release covers the other threads' stores), the atomic is acq_rel at GPU scope, and
    the parts are read past the L1 cache (ld.global.cg)."""
    lines = [line.strip() for line in ptx.splitlines()]
    atoms = [i for i, line in enumerate(lines) if "atom.global" in line]
    if not atoms:
        return "-"
    for i in atoms:
        if ".acq_rel" not in lines[i] or ".gpu" not in lines[i]:
            return f"atomic not acq_rel at GPU scope: {lines[i]}"
        before = lines[:i]
        last_store = max((j for j, line in enumerate(before) if "st.global" in line), default=-1)
        if not any("bar.sync" in line for line in before[last_store + 1:]):
            return "no bar.sync between the parts' stores and the atomic"
    if not any("ld.global.cg" in line for line in lines[atoms[-1]:]):
        return "the parts are not read with ld.global.cg"
    return "ok"


def step_kernels(dtype=torch.bfloat16, hidden=1536, heads=16, vocab=64000, rows=16, length=1280, top_k=16000):
    """(name, kernel, args, constexprs, num_warps, num_stages) of every kernel a batch-1 step of the 700M model
    launches, for each candidate tiling of the products, and the attention kernel as the PyTorch step calls it
    (compile_decode="triton-attention")."""
    head_dim, ffn = hidden // heads, 4 * hidden
    common = dict(x_ptr=dtype, w_ptr=dtype, b_ptr=dtype, r_ptr=dtype, y_ptr=dtype, kv_ptr=dtype, M=rows,
                  stride_r=hidden, tokens=rows, start=400, D=hidden, head_dim=head_dim, kv_s0=heads * length * head_dim,
                  kv_s1=heads * length * head_dim, kv_s2=length * head_dim, kv_s3=head_dim, ln_w_ptr=dtype,
                  ln_b_ptr=dtype, stats_in_ptr=torch.float32, slices_in=48, eps=1e-5, stats_out_ptr=torch.float32,
                  flag_ptr=torch.uint8, part_ptr=torch.float32, counter_ptr=torch.int32)
    flags = dict(BIAS=False, GELU=False, RESIDUAL=False, QKV=False, NORM=False, STATS=False, FLAG=False, SLICES=64,
                 PRECISION=dk._precision(dtype), BLOCK_M=16)
    products = {"q/k/v (+ layer norm, cache write)": (3 * hidden, hidden, dict(BIAS=True, QKV=True, NORM=True)),
                "attention projection (+ residual, statistics)": (hidden, hidden, dict(BIAS=True, RESIDUAL=True,
                                                                                       STATS=True)),
                "fc1 (+ layer norm, GELU)": (ffn, hidden, dict(BIAS=True, GELU=True, NORM=True)),
                "fc2 (+ residual, statistics)": (hidden, ffn, dict(BIAS=True, RESIDUAL=True, STATS=True)),
                "head (+ finiteness flag)": (vocab, hidden, dict(FLAG=True))}
    for name, (N, K, on) in products.items():
        for block_n, block_k, warps, stages, split_k in dk._TILINGS:
            args = dict(common, N=N, K=K, stride_x=K, stride_w=K, stride_y=N)
            constexprs = dict(flags, **on, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k)
            yield (f"{name}, tiling {block_n}x{block_k}{f' split {split_k}' * (split_k > 1)}", dk._linear_kernel,
                   args, constexprs, warps, stages)
    block_q, head = max(16, triton.next_power_of_2(rows)), max(16, triton.next_power_of_2(head_dim))
    attention = dict(q_ptr=dtype, kv_ptr=dtype, acc_ptr=torch.float32, stats_ptr=torch.float32,
                     counter_ptr=torch.int32, out_ptr=dtype, tokens=rows, heads=heads, end=length, head_dim=head_dim,
                     scale=head_dim**-0.5, stride_q=hidden, kv_s0=heads * length * head_dim,
                     kv_s1=heads * length * head_dim, kv_s2=length * head_dim, kv_s3=head_dim, CHUNK=dk.ATTENTION_CHUNK,
                     splits=10)
    # the Triton step's attention, and that of compile_decode="triton-attention" (new keys read from the q/k/v rows;
    # one program per head at batch 64, split at small batches)
    for split, new_kv in ((True, False), (False, False), (False, True), (True, True)):
        args = dict(attention, stride_q=3 * hidden) if new_kv else attention
        yield (f"attention{' (split over the keys)' * split}{', new keys from the q/k/v rows' * new_kv}",
               dk._attention_kernel, args, dict(BLOCK_Q=block_q, BLOCK_KEYS=dk.ATTENTION_BLOCK_KEYS, HEAD=head,
                                                PRECISION=dk._precision(dtype), SPLIT=split, NEW_KV=new_kv), 4, 3)
    yield ("embedding (+ row statistics)", dk._embed_kernel,
           dict(ids_ptr=torch.int64, token_ptr=dtype, position_ptr=dtype, x_ptr=dtype, stats_ptr=torch.float32,
                tokens=rows, start=400, M=rows, D=hidden, stride_ids_b=1280, stride_ids_t=1, stride_token=hidden,
                stride_position=hidden), dict(BLOCK=triton.next_power_of_2(hidden)), 4, 3)
    yield ("sampler after the top-k", dk._sample_ranked_kernel,
           dict(values_ptr=dtype, index_ptr=torch.int64, noise_ptr=torch.float32, out_ptr=torch.int64, k=top_k,
                inverse_temperature_ptr=torch.float32, top_p_ptr=torch.float32, stride_v=top_k, stride_i=top_k),
           dict(TEMPERATURE=False, TOP_P=True, BLOCK=triton.next_power_of_2(top_k)), 16, 3)


def loss_kernel(dtype=torch.bfloat16, vocab=64000):
    """The training loss's kernel for the 700M head, with and without the gradient."""
    args = dict(x_ptr=dtype, stride_x=vocab, labels_ptr=torch.int64, loss_ptr=torch.float32, grad_ptr=dtype,
                stride_g=vocab, scale_ptr=torch.float32, V=vocab)
    for grad in (True, False):
        yield (f"training loss{' (+ gradient)' * grad}", loss_kernels._cross_entropy_kernel, args,
               dict(GRAD=grad, BLOCK=loss_kernels.BLOCK), 8, 3)


def tokenizer_kernels(dtype=torch.bfloat16, channels=128, frames=17, size=128, groups=32):
    """The tokenizer's norm kernels at the official decoder's widest level (128 channels, 17 frames of 128x128,
    padded for a 3x3x3 causal conv), in both memory layouts."""
    for channels_last in (False, True):
        s_c, s_hw = (1, channels) if channels_last else (frames * size * size, 1)
        strides = dict(s_b=channels * frames * size * size, s_c=s_c,
                       s_t=size * size * (channels if channels_last else 1))
        name = ", channels-last" if channels_last else ""
        yield (f"tokenizer group statistics{name}", norm_kernels._group_stats_kernel,
               dict(x_ptr=dtype, stats_ptr=torch.float32, T=frames, HW=size * size, groups=groups,
                    group_size=channels // groups, **strides, s_hw=s_hw, eps=1e-6),
               dict(CHANNELS_LAST=channels_last, BLOCK=norm_kernels.STATS_BLOCK), norm_kernels.STATS_WARPS, 3)
        yield (f"tokenizer norm + Swish + padding{name}", norm_kernels._norm_swish_pad_kernel,
               dict(x_ptr=dtype, stats_ptr=torch.float32, weight_ptr=dtype, bias_ptr=dtype, beta_ptr=dtype,
                    out_ptr=dtype, C=channels, T=frames, H=size, W=size, T_out=frames + 2, H_out=size + 2,
                    W_out=size + 2, groups=groups, group_size=channels // groups, **strides, s_h=size * s_hw,
                    s_w=s_hw, PAD_T=2, PAD_H=1, PAD_W=1),
               dict(CHANNELS_LAST=channels_last, BLOCK=norm_kernels.BLOCK), 4, 3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the decode step's dtype (float32: the fp32 checks of gpu_check's Triton section)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    failures = 0
    print(f"{'kernel':<70} {'warps':>5} {'stages':>6} {'regs':>5} {'spill B':>7} {'smem B':>7} join_order")
    for name, kernel, kernel_args, constexprs, warps, stages in (*step_kernels(dtype), *loss_kernel(),
                                                                 *tokenizer_kernels()):
        try:
            compiled, report = compile_kernel(kernel, kernel_args, constexprs, args.arch, warps, stages)
        except Exception as error:  # noqa: BLE001 - report every kernel
            failures += 1
            print(f"{name:<70} FAILED: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
            continue
        order = join_order(compiled.asm["ptx"])
        failures += order not in ("ok", "-")
        print(f"{name:<70} {warps:>5} {stages:>6} {report['registers']:>5} {report['spill_bytes']:>7} "
              f"{compiled.metadata.shared:>7} {order}")
    if failures:
        sys.exit(f"{failures} kernel(s) failed to compile for sm_{args.arch} or have an unordered join")


if __name__ == "__main__":
    main()
