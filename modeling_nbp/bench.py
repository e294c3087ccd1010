"""Benchmarks. `nbp bench` / `python benchmarks/bench_generate.py`: generation, NBP (1x1x16 row blocks) vs NTP (1x1x1)
with the same weights, eager and optimized, batch 1 and a large batch, side by side in one run. `nbp bench --train`:
training steps (tokens/s, model FLOPs utilisation, peak memory) at the given batch sizes.

The K600 setting: 2 context latent frames (5 pixel frames), 3 generated latent frames (12 pixel frames) on a
5x16x16 grid, the paper's sampling (top-k 16000, top-p 0.9); NBP takes 48 steps, NTP 768. "eager" is the
reference decoder (transformers' DynamicCache, one kernel launch per op); "optimized" is the default fast path
(a static cache; on CUDA every decode step replayed from a CUDA graph); "compiled" (--compile) adds
torch.compile of the decode step's dense parts, "autotuned" (--autotune) the same in torch.compile's
max-autotune mode (Triton matrix-product kernels tried against cuBLAS; minutes of compilation). Times are medians over repeats after a
warm-up, taken with CUDA events on a GPU; FPS counts generated frames. Random weights.

Training (--train): the same model with 1x1x16 blocks on the whole 5x16x16 grid (1264 positions), one step = forward
with the block-causal mask (flex attention on CUDA), the next-block loss (chunked, or --loss_implementation triton),
backward, AdamW (fused on CUDA);
bf16 autocast on CUDA, float32 on CPU; --compile runs the forward through torch.compile. FLOPs are counted as the
training script counts them (`training/flops.py`: 6 x matrix weights + the full attention matrix).
"""

import argparse
import statistics
import sys
import time

import torch

from .configuration_nbp import NBPConfig
from .generation import PAPER_SAMPLING
from .modeling_nbp import LOSS_IMPLEMENTATIONS, NBPForVideoGeneration
from .triton_support import require_triton

SIZES = {"tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4),  # smoke runs
         "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8),
         "700m": dict(num_hidden_layers=24, hidden_size=1536, num_attention_heads=16)}
GENERATED_FRAMES = 12  # pixel frames generated per video in the K600 setting
VARIANTS = {"eager": dict(cache_implementation="dynamic"), "optimized": dict(cache_implementation="static"),
            "compiled": dict(cache_implementation="static", compile_decode=True),
            "autotuned": dict(cache_implementation="static", compile_decode="max-autotune-no-cudagraphs"),
            "triton": dict(cache_implementation="static", compile_decode="triton"),
            "triton-attention": dict(cache_implementation="static", compile_decode="triton-attention")}
TORCH_COMPILED = ("compiled", "autotuned")  # NTP skips these (minutes of compilation for a row nobody asks for)


def build(size: str, block_shape, device, dtype, task="k600", attn="sdpa"):
    """A random-weight model of `size`; the same weights for every block shape (the layout has no parameters)."""
    cfg = NBPConfig.from_preset(f"{task}-tiny", block_shape=list(block_shape), hidden_dropout=0.0, **SIZES[size])
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: fast for the 700M model
        model = NBPForVideoGeneration(cfg)
    model = model.eval().to(dtype=dtype)
    model.set_attn_implementation(attn)
    return model


def timed(fn, device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` runs (CUDA events on a GPU)."""
    return statistics.median(timings(fn, device, repeats, warmup))


def timings(fn, device, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` runs of `fn()` after `warmup` runs (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            # on `device`'s stream (the current device's would time another GPU's queue for cuda:1)
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def reset_peak_memory(device):
    """Start `device`'s peak-memory count at what is allocated now (free what the previous row held first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def forced_step_logits(model, forced: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """Every step's logits (float32 copies) of a greedy generation whose steps are fed `forced` (B, N video ids in
    block order) instead of what they chose, so that paths whose roundings differ see the same inputs at every step.
    Static path without graphs (each step runs in Python, where it is recorded); `kwargs` go to `iter_generation`."""
    steps, step = [], model.decode_block_logits

    def recorded(*args, **kw):
        logits = step(*args, **kw)
        steps.append(logits.float().clone())
        return logits

    model.decode_block_logits = recorded
    try:
        for s in model.iter_generation(temperature=0.0, cache_implementation="static", use_cuda_graphs=False, **kwargs):
            s.video_tokens[:, s.start : s.end] = forced[:, s.start : s.end]
    finally:
        del model.decode_block_logits
    return steps


def generation_rows(size, device, dtype, batches, repeats, ntp_repeats, sampling=PAPER_SAMPLING, log=print,
                    variants=("eager", "optimized"), ntp_batches=None, ntp_variants=None):
    """Time NBP with each of `variants` (names in VARIANTS) at each batch size, and NTP with each of `ntp_variants`
    (default: `variants` but the torch.compile ones) at `ntp_batches` (default the same): a list of row dicts."""
    rows = []
    if ntp_variants is None:
        ntp_variants = [v for v in variants if v not in TORCH_COMPILED]
    for method, block in (("NBP", (1, 1, 16)), ("NTP", (1, 1, 1))):
        model = build(size, block, device, dtype)
        H, W = model.config.latent_shape[1:]
        steps = len(model.layout.decode_schedule(model.layout.context_tokens(2)))
        for variant in variants if method == "NBP" else ntp_variants:
            kwargs = VARIANTS[variant]
            for batch in batches if method == "NBP" or ntp_batches is None else ntp_batches:
                # drawn from its own seed: every row of a batch size gets the same context, whichever rows ran before
                context = torch.randint(0, model.config.video_vocab_size, (batch, 2, H, W),
                                        generator=torch.Generator().manual_seed(batch)).to(device)
                generator = torch.Generator(device).manual_seed(0)

                def run():
                    model.generate_video_tokens(context_ids=context, generator=generator, **kwargs, **sampling)

                # the previous row's static decoder (its KV cache: 11 GiB at batch 64 for the 700M model) would
                # count in this row's peak: the reset starts the count at what is allocated
                model.clear_decode_cache()
                reset_peak_memory(device)
                first = timed(run, device, 1, warmup=0)  # the first call: graph capture, compilation
                # the second call of a static path still captures the graphs of the steps the first ran as warm-ups
                times = timings(run, device, repeats if method == "NBP" else ntp_repeats,
                                warmup=0 if variant == "eager" else 1)
                seconds = statistics.median(times)
                rows.append(dict(method=method, variant=variant, batch=batch, steps=steps,
                                 ms_per_video=1000 * seconds / batch, fps=GENERATED_FRAMES * batch / seconds,
                                 peak_gib=peak_memory_gib(device), first_call_ms=1000 * first,
                                 ms_range=(1000 * min(times) / batch, 1000 * max(times) / batch)))
                log(rows[-1])
        model.clear_decode_cache()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def generation_ratios(rows) -> dict:
    by = {(r["method"], r["variant"], r["batch"]): r["ms_per_video"] for r in rows}
    out = {}
    for batch in sorted({r["batch"] for r in rows}):
        for variant in VARIANTS:
            if ("NTP", variant, batch) in by and ("NBP", variant, batch) in by:
                out[f"NBP speed-up over NTP ({variant}, batch {batch})"] = (by[("NTP", variant, batch)]
                                                                           / by[("NBP", variant, batch)])
        for method in ("NBP", "NTP"):
            for variant in [v for v in VARIANTS if v != "eager"]:
                if (method, "eager", batch) in by and (method, variant, batch) in by:
                    out[f"{method} {variant} over eager (batch {batch})"] = (by[(method, "eager", batch)]
                                                                             / by[(method, variant, batch)])
    return out


def training_rows(size, device, batches, attn: str = "sdpa", compiled: bool = False, repeats: int = 5,
                  gradient_checkpointing: bool = False, peak_tflops: float | None = None, log=print, inspect=None,
                  loss: str = "chunked"):
    """Time training steps at each batch size: a list of row dicts (tokens/s, achieved TFLOP/s, MFU against
    `peak_tflops` or the device's datasheet peak, peak memory; "out of memory" rows are marked). `loss`: the
    model's `loss_implementation`.
    `inspect(batch, step)`, when given, is called after each batch size's timing with its step function."""
    from .training import flops
    from .training.common import enable_activation_checkpointing

    cuda = device.type == "cuda"
    model = build(size, (1, 1, 16), device, torch.float32, attn=attn).train()
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.loss_implementation = loss
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    cfg, n = model.config, model.layout.input_length
    per_token = flops.training_flops_per_token(flops.matmul_parameters(model), cfg.num_hidden_layers,
                                               cfg.hidden_size, n)
    peak = flops.peak_flops(device, peak_tflops)
    rows = []
    for batch in batches:
        grids = torch.randint(0, cfg.video_vocab_size, (batch, *cfg.latent_shape), device=device)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = forward(video_ids=grids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        row = dict(batch=batch, tokens_per_step=batch * n)
        reset_peak_memory(device)
        try:
            seconds = timed(step, device, repeats, warmup=2)
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            rows.append(dict(row, out_of_memory=True))
            log(rows[-1])
            continue
        tokens_per_s = batch * n / seconds
        rows.append(dict(row, step_ms=1000 * seconds, tokens_per_s=tokens_per_s,
                         tflops=tokens_per_s * per_token / 1e12,
                         mfu=flops.estimate_mfu(tokens_per_s, per_token, 1, peak), peak_gib=peak_memory_gib(device)))
        log(rows[-1])
        if inspect is not None:
            inspect(batch, step)
    return rows


def format_training_table(rows) -> str:
    lines = [f"{'batch':>5} {'tokens':>7} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}"]
    for r in rows:
        if r.get("out_of_memory"):
            lines.append(f"{r['batch']:>5} {r['tokens_per_step']:>7} out of memory")
            continue
        mfu = "-" if r["mfu"] != r["mfu"] else f"{100 * r['mfu']:.1f}%"  # NaN: no known peak (CPU)
        peak = "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        lines.append(f"{r['batch']:>5} {r['tokens_per_step']:>7} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
                     f"{r['tflops']:>8.2f} {mfu:>6} {peak:>9}")
    return "\n".join(lines)


def format_table(rows) -> str:
    """The generation rows as a table: ms/video is the median, `range` the fastest and slowest run."""
    lines = [f"{'method':<6} {'variant':<16} {'batch':>5} {'steps':>5} {'ms/video':>10} {'range':>17} {'FPS':>9} "
             f"{'peak GiB':>9}"]
    for r in rows:
        peak = "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"  # NaN on CPU
        spread = "{:.1f}-{:.1f}".format(*r["ms_range"])
        lines.append(f"{r['method']:<6} {r['variant']:<16} {r['batch']:>5} {r['steps']:>5} {r['ms_per_video']:>10.1f} "
                     f"{spread:>17} {r['fps']:>9.1f} {peak:>9}")
    return "\n".join(lines)


def progress(row: dict) -> None:
    """One line on stderr per measured row, as it is measured (a CPU run takes minutes before the table)."""
    what = (f"training batch {row['batch']}" if "tokens_per_step" in row
            else f"{row['method']} {row['variant']} batch {row['batch']}")
    value = ("out of memory" if row.get("out_of_memory") else
             f"{row['step_ms']:.1f} ms/step" if "step_ms" in row else f"{row['ms_per_video']:.1f} ms/video")
    print(f"measured {what}: {value}", file=sys.stderr, flush=True)


def main(argv=None):
    from .training.common import positive_float, positive_int

    parser = argparse.ArgumentParser(allow_abbrev=False, prog="nbp bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # defaults (None here) follow --device: a CPU run on a GPU machine gets the CPU ones
    parser.add_argument("--size", choices=list(SIZES),
                        help="model size (default: 700m on a GPU, small on CPU; tiny for smoke runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:index] (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="generation weights (default: bfloat16 on CUDA, float32 on CPU, where bf16 matmuls are "
                             "slow)")
    parser.add_argument("--large_batch", type=positive_int,
                        help="the batch timed beside batch 1 (default: 64 on a GPU, 8 on CPU; 1: batch 1 only)")
    parser.add_argument("--repeats", type=positive_int,
                        help="timed NBP runs (training steps with --train) after a warm-up (default: 10 on a GPU, 3 "
                             "on CPU)")
    parser.add_argument("--ntp_repeats", type=positive_int,
                        help="timed NTP runs after a warm-up (default: 3 on a GPU, 1 on CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="generation: also time NBP with compile_decode=True (torch.compile of the decode step's "
                             "dense parts); --train: torch.compile the training forward")
    parser.add_argument("--autotune", action="store_true",
                        help="also time NBP with compile_decode='max-autotune-no-cudagraphs'")
    parser.add_argument("--triton", action="store_true",
                        help="also time NBP and NTP with compile_decode='triton' (this project's Triton decode "
                             "kernels, for small batches) and 'triton-attention' (its attention kernel alone, for "
                             "large batches); CUDA")
    train = parser.add_argument_group("training (--train)")
    train.add_argument("--train", action="store_true", help="time training steps instead of generation")
    train.add_argument("--train_batch", type=positive_int, nargs="+",
                       help="clips per step (default: 16 32 on a GPU, 2 on CPU)")
    train.add_argument("--attn_implementation", choices=["flex_attention", "sdpa", "eager"],
                       help="default: flex_attention on a GPU, sdpa on CPU")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--loss_implementation", choices=LOSS_IMPLEMENTATIONS,
                       help="the training loss: PyTorch in chunks of rows (chunked, the default), or one Triton kernel "
                            "(CUDA)")
    train.add_argument("--peak_tflops", type=positive_float,
                       help="peak bf16 TFLOP/s of the device, for MFU (known GPUs: auto)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # the timings synchronise with these only
        parser.error(f"--device: expected cpu or cuda[:index], got {args.device!r}")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        parser.error(f"--device {args.device}: no such CUDA device ({torch.cuda.device_count()} available)")
    if args.train and (args.triton or args.autotune):
        parser.error("--triton and --autotune time generation, not --train (its Triton option: --loss_implementation "
                     "triton)")
    ignored = (("dtype", "large_batch", "ntp_repeats") if args.train else
               ("train_batch", "attn_implementation", "gradient_checkpointing", "loss_implementation", "peak_tflops"))
    given = [f"--{name}" for name in ignored if getattr(args, name) not in (None, False)]
    if given:
        parser.error(f"{', '.join(given)}: " + ("for generation, not --train" if args.train else "for --train only"))
    gpu = device.type == "cuda"
    defaults = dict(size="700m" if gpu else "small", large_batch=64 if gpu else 8, repeats=10 if gpu else 3,
                    ntp_repeats=3 if gpu else 1, train_batch=[16, 32] if gpu else [2],
                    attn_implementation="flex_attention" if gpu else "sdpa", loss_implementation="chunked")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.train and args.attn_implementation == "flex_attention" and not gpu:
        parser.error("--attn_implementation flex_attention trains on CUDA only (no backward on CPU); use sdpa")
    try:  # now, not after minutes of timing the other rows
        if args.triton:
            require_triton(device, "--triton")
        if args.train and args.loss_implementation == "triton":
            require_triton(device, "--loss_implementation triton")
    except ValueError as error:
        parser.error(str(error))
    header = (f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} size={args.size} "
              f"torch={torch.__version__}")
    if args.train:
        rows = training_rows(args.size, device, args.train_batch, args.attn_implementation, args.compile, args.repeats,
                             args.gradient_checkpointing, args.peak_tflops, log=progress, loss=args.loss_implementation)
        precision = "bf16 autocast" if device.type == "cuda" else "float32"
        variant = (" compiled" * args.compile + " gradient checkpointing" * args.gradient_checkpointing
                   + f" loss={args.loss_implementation}")
        print(f"{header} attention={args.attn_implementation} {precision}{variant}")
        print(format_training_table(rows))
        return rows
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    variants = ("eager", "optimized") + ("compiled",) * args.compile + ("autotuned",) * args.autotune \
        + ("triton", "triton-attention") * args.triton
    rows = generation_rows(args.size, device, dtype, sorted({1, args.large_batch}), args.repeats, args.ntp_repeats,
                           log=progress, variants=variants)
    print(f"{header} dtype={str(dtype).removeprefix('torch.')} "
          f"sampling=top-k {PAPER_SAMPLING['top_k']}, top-p {PAPER_SAMPLING['top_p']}")
    print(format_table(rows))
    for name, ratio in generation_ratios(rows).items():
        print(f"{name}: {ratio:.2f}x")
    return rows


if __name__ == "__main__":
    main()
