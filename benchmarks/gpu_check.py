"""One prepared run that checks and times generation and training on a GPU; prints a table last.

    python benchmarks/gpu_check.py                      # on the device machine: 700M, official tokenizer
    python benchmarks/gpu_check.py --size tiny --tokenizer small --repeats 1 --ntp_repeats 1 --large_batch 2 \
        --train_batch 1                                 # a CPU smoke run of the same code

Sections, most important first (each one runs even if an earlier one failed; results.json is rewritten after each;
a section that would start after --time_budget seconds is skipped, so the run ends in time and still prints its table):
1. ceilings: device-to-device copy bandwidth and a bf16 matrix product, measured here.
2. checks: optimized tokens (static cache + CUDA graphs, three calls: every graph, the prefill's too, is replayed in
   the third) against the eager dynamic-cache tokens (fp32, sampled and greedy); graphs against the same static step
   without graphs and against eager (bf16); flex attention against SDPA logits of the block-causal training forward.
   triton checks: the Triton decode step (compile_decode="triton") and the Triton attention alone
   ("triton-attention"): fp32 tokens against eager (greedy, sampled); bf16: every step's logits against the fp32
   step's, all paths fed the same tokens, beside the PyTorch step's error (a rounding may move a sampled token).
3. generation (modeling_nbp.bench): NBP in each of --variants, batch 1 and a large batch; NTP optimized and
   Triton (when in --variants), batch 1 only; the K600 setting with the paper's sampling; peak memory per row.
4. pipeline end to end: encode 5 frames with the tokenizer, 48 steps, decode 17 frames at 128x128; the
   tokenizer's encode and decode timed alone too (with PyTorch's norms and with the Triton ones, checked against
   each other, also channels-last and with `conv_implementation="frames2d"`; with --tokenizer_compile also through
   torch.compile); the Triton decode step, the Triton norms, both (and with frames2d), and overlapped decoding.
5. training step (modeling_nbp.bench.training_rows): 700M bf16 autocast, flex attention, fused AdamW, at each
   --train_batch: tokens/s and MFU (datasheet and measured matrix rate), and the kernel time by kind of one step at
   the first batch size; with the chunked loss and the Triton one (after a check of the Triton loss against the
   chunked one on bf16 logits), each also compiled with --train_compile (a run that would start after
   --time_budget is skipped).
6. official: the official generator code (`nbp/modules/gpt.py` of a checkout of github.com/RenShuhuai-Andy/NBP,
   --official_repo; default .official/NBP when present), timed in the same run: `sample_with_past` with the paper's
   sampling, batch 1, fp32 and bf16 weights; its greedy tokens against ours (static path, fp32, its weights
   converted by `nbp convert`'s mapping).
7. profile: GPU kernel time of one optimized generation without graphs (the floor the graphs can reach), at
   batch 1 and the large batch (and the Triton step at batch 1, the Triton attention at the large batch), by kind of
   kernel and the top kernels; the sampler alone per video (48 steps).
8. cfg: UCF-like model (95 steps, hybrid start), guidance 1 vs 3, optimized and Triton, batch 1.
Random weights throughout. Timing: CUDA events after warm-up, medians.
"""

import argparse
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import time
import traceback

import torch
from torch.nn import functional as F

from modeling_nbp import NBPConfig, NBPVideoPipeline, NBPVideoTokenizer
from modeling_nbp.conversion.convert_nbp import GENERATOR_PREFIX, convert_generator_state_dict
from modeling_nbp.generation import sample_tokens
from modeling_nbp.modeling_nbp import next_block_loss
from modeling_nbp.video_tokenizer import FrameConv3d
from modeling_nbp.bench import (GENERATED_FRAMES, PAPER_SAMPLING, SIZES, VARIANTS, build, forced_step_logits,
                                format_table, generation_ratios, generation_rows, peak_memory_gib, reset_peak_memory,
                                timed, training_rows)


# kernel-name fragments (lower case) of each kind of GPU work in a generation, first match wins
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention", "sdpa", "flex")),
                ("matrix products", ("nvjet", "gemm", "cutlass", "xmma", "splitkreduce", "triton_tem", "cublas",
                                     "_linear_kernel")),
                ("top-k, sort, softmax, scan (sampling, loss)", ("topk", "sort", "radix", "bitonic", "scan", "cumsum",
                                                                 "softmax", "argmax", "distribution",
                                                                 "_sample_ranked", "_cross_entropy_kernel")),
                ("layer norm", ("layer_norm",)),
                ("optimizer", ("adam", "multi_tensor")),
                ("copies", ("copy", "index", "cat", "memcpy", "memset")))
# the same for the video tokenizer (convolutions, group norms with their Swish, replicate padding)
TOKENIZER_KERNEL_KINDS = (("layout transposes", ("nchwtonhwc", "nhwctonchw", "transpose")),
                          ("replicate padding", ("replication",)),  # before copies: "replication" has "cat"
                          ("copies", ("copy", "cat", "memcpy", "memset", "index")),
                          ("convolutions", ("convolve", "fprop", "xmma", "implicit", "cudnn", "nvjet", "gemm",
                                            "cutlass", "conv2d", "conv3d")),
                          ("group norm (Triton: + Swish, padding)", ("moments", "fusedparams", "group_norm",
                                                                     "groupnorm", "_group_stats", "_norm_swish")))


def kernel_kind(name: str, kinds=KERNEL_KINDS) -> str:
    name = name.lower()
    return next((kind for kind, parts in kinds if any(p in name for p in parts)), "other elementwise")


def kernel_profile(fn, top: int = 20, kinds=KERNEL_KINDS) -> dict:
    """GPU kernel time of one `fn()` (run once before, as a warm-up): total, launches, by kind, the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    by_kind = {}
    for e in events:
        kind = kernel_kind(e.key, kinds)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time_total / 1000  # us -> ms
    return {"kernel ms": sum(e.device_time_total for e in events) / 1000,
            "kernel launches": sum(e.count for e in events if e.device_time_total > 0),  # not the runtime API calls
            "ms by kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [(e.key[:60], round(e.device_time_total / 1000, 2), e.count)
                    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]]}


def official_gpt_with_our_weights(repo: str, model, dtype):
    """The official GPT (`nbp/modules/gpt.py` of the official repository, which imports only torch) of `model`'s
    architecture with its own random init (and random position embeddings: its init leaves them at zero, which would
    hide a position error), and `model` given the same weights through the converter's mapping.
    -> (the official module `gpt`, the GPT in `dtype`)."""
    spec = importlib.util.spec_from_file_location("official_gpt", os.path.join(repo, "nbp", "modules", "gpt.py"))
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    cfg = model.config
    torch.manual_seed(0)
    with torch.device(model.device):
        gpt = official.GPT(None, cfg.vocab_size, cfg.max_position_embeddings, cfg.num_hidden_layers,
                           cfg.num_attention_heads, cfg.hidden_size, semi_ar=True,
                           token_number_per_step=cfg.block_size, cond_token_num=cfg.num_condition_tokens)
        gpt.pos_emb.data.normal_(0.0, 0.5)
    state = {GENERATOR_PREFIX + k: v for k, v in gpt.state_dict().items()}
    model.load_state_dict(convert_generator_state_dict(state, cfg), strict=True)
    return official, gpt.eval().to(dtype)


def official_block_mask(length: int, block: int, device) -> torch.Tensor:
    """The official `get_attn_mask` of an unconditional model: position i sees every position of its own and earlier
    blocks of `block` tokens. (1, 1, length, length), 1 = attend."""
    blocks = torch.arange(length, device=device) // block
    return (blocks[None, :] <= blocks[:, None]).float()[None, None]


def loss_agreement(device, rows: int = 4096) -> dict:
    """The Triton training loss against the chunked one on bf16 logits of the K600 head (rows x vocabulary)."""
    vocab = NBPConfig.from_preset("k600-tiny").vocab_size
    gen = torch.Generator(device).manual_seed(3)
    logits = (4 * torch.randn(rows, vocab, device=device, generator=gen)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    labels[: rows // 8] = -100
    got = {}
    for implementation in ("chunked", "triton"):
        x = logits.clone().requires_grad_()
        loss = next_block_loss(x, labels, implementation=implementation)
        loss.backward()
        got[implementation] = (loss.detach().float(), x.grad.float())
    (a, ga), (b, gb) = got["chunked"], got["triton"]
    return {"loss, relative difference": float((a - b).abs() / a.abs()),
            "gradient, max abs difference / max abs": float((ga - gb).abs().max() / ga.abs().max()),
            "gradient, equal fraction": float((ga == gb).float().mean())}


def section(results, name, path, deadline):
    """Decorator: run a section `fn(out)` (unless the clock is past `deadline`), which fills `results[name]` (= out)
    as it measures, so what it measured before an error (stored beside it) or a stop is kept; rewrite results.json."""
    def wrap(fn):
        start = time.perf_counter()
        if start > deadline:
            results[name] = {"skipped": "time budget spent"}
            print(f"[{name}] skipped: time budget spent", flush=True)
            return fn
        out = results[name] = {}
        try:
            out.update(fn(out) or {})
        except Exception:  # noqa: BLE001 - a failed section must not stop the others
            out["error"] = traceback.format_exc()
            print(out["error"], flush=True)
        print(f"[{name}] {time.perf_counter() - start:.1f} s: {results[name]}", flush=True)
        write_results(results, path)
        gc.collect()  # free the section's models and caches before the next one counts its peak memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return fn
    return wrap


def attempt(fn):
    """fn(), or its error's last line (a new path's failure must not cost the rest of its section)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        return f"error: {type(error).__name__}: {error}"


def write_results(results: dict, path: str) -> None:
    """Temp name, then rename: the SIGTERM handler may write while a section's write is under way."""
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def report(results: dict, large_batch: int) -> None:
    """The run's printout: every section's results, the generation table, the ratios and the goals."""
    print("\n" + " ".join(f"{k}={v}" for k, v in results["env"].items()))
    for name in ("ceilings", "checks", "triton checks", "profile", "pipeline", "official", "training", "cfg",
                 "stopped"):
        if name in results:
            print(f"{name}: {results[name]}")
    gen_result = results.get("generation", {})
    rows = gen_result.get("rows") or gen_result.get("rows so far")
    if rows:
        print(format_table(rows))
        for k, v in generation_ratios(rows).items():
            print(f"{k}: {v:.2f}x")
    for summary in (lambda: against_goals(results, large_batch), lambda: decode_decisions(results),
                    lambda: pipeline_rankings(results)):
        lines = attempt(summary)  # a summary's bug must not cost the others (results.json holds everything)
        print(lines if isinstance(lines, str) else "\n".join(lines))


def against_goals(results: dict, large_batch: int) -> list[str]:
    """The issue's goals against this run's figures (the faster NBP decode variant at each batch size), one line each;
    a goal whose section did not run is left out."""
    rows = results.get("generation", {}).get("rows") or results.get("generation", {}).get("rows so far", [])
    nbp = {}
    for r in rows:
        if r["method"] == "NBP" and r["variant"] != "eager":
            nbp.setdefault(r["batch"], []).append(r)
    lines = []

    def line(goal, value, met):
        lines.append(f"{'met    ' if met else 'NOT met'} {goal}: {value}")

    for batch, goal in ((1, 55.0), (large_batch, None)):
        if batch not in nbp:
            continue
        best = min(nbp[batch], key=lambda r: r["ms_per_video"])
        others = ", ".join(f"{r['variant']} {r['ms_per_video']:.2f} ms (first call {r['first_call_ms']:.0f} ms)"
                           for r in nbp[batch])
        if goal is not None:
            line(f"generator batch 1 <= {goal:.0f} ms/video", f"{best['ms_per_video']:.1f} ({others})",
                 best["ms_per_video"] <= goal)
        else:
            line(f"batch {batch} >= 1500 generated FPS", f"{best['fps']:.0f} ({others})", best["fps"] >= 1500)
    equal = results.get("official", {}).get("greedy tokens equal to the official code's, fp32")
    if equal is not None:
        line("greedy tokens equal to the official code's (fp32, 700M, CUDA static path)", f"{equal:.2%}", equal == 1.0)
    official = results.get("official", {}).get("official ms per video, batch 1, bf16")
    if official and nbp.get(1):
        ratio = official / min(r["ms_per_video"] for r in nbp[1])
        line("generator batch 1: 20x the official code (its bf16 time, same run)", f"{ratio:.1f}x ({official:.0f} ms)",
             ratio >= 20)
    by = {(r["method"], r["variant"], r["batch"]): r["ms_per_video"] for r in rows}
    ntp = [by[k] / min(r["ms_per_video"] for r in nbp.get(1, [])) for k in by if k[0] == "NTP" and k[2] == 1
           and k[1] != "eager"] if nbp.get(1) else []
    if ntp:
        line("NBP over NTP >= 11x (fastest NTP, fastest NBP, batch 1)", f"{min(ntp):.1f}x", min(ntp) >= 11)
    pipeline = results.get("pipeline", {})
    fps = [v for k, v in pipeline.items() if k.startswith("end-to-end ms per video") and isinstance(v, float)]
    if fps:
        best = min(fps)
        line("pipeline >= 100 generated FPS (fastest variant)", f"{1000 * GENERATED_FRAMES / best:.1f} FPS "
             f"({best:.1f} ms)", 1000 * GENERATED_FRAMES / best >= 100)
    for key, cost in results.get("cfg", {}).items():
        if key.startswith("cost"):
            line(f"classifier-free guidance <= 1.3x{key.removeprefix('cost (guidance 3 / guidance 1)')}",
                 f"{cost:.2f}x", cost <= 1.3)
    mfu = [(name, r["mfu"]) for name, r in results.get("training", {}).items()
           if isinstance(r, dict) and isinstance(r.get("mfu"), float) and math.isfinite(r["mfu"])]
    if mfu:
        best = max(mfu, key=lambda kv: kv[1])
        line("training >= 40% MFU (datasheet rate)", f"{100 * best[1]:.1f}% ({best[0]})", best[1] >= 0.4)
    return lines


def decode_decisions(results: dict) -> list[str]:
    """The decision rule of docs/performance.md applied to this run, one line per batch size: which decode variants
    beat the default ("optimized") beyond the run's spread (their slowest run faster than its fastest), and whether
    their checks passed (fp32 greedy tokens equal to eager; bf16 step logits no further from fp32 than 1.25x the
    PyTorch step's). The defaults are changed by hand, from these lines."""
    rows = results.get("generation", {}).get("rows") or results.get("generation", {}).get("rows so far", [])
    checks = results.get("triton checks", {})

    def checked(variant):
        if variant not in ("triton", "triton-attention"):
            return "no token check"
        greedy = checks.get(f"fp32 {variant} vs eager, greedy (equal tokens)")
        error = checks.get(f"bf16 {variant} step logits vs fp32, max error (bf16 eps)")
        static = checks.get("bf16 static step logits vs fp32, max error (bf16 eps)")
        if not all(isinstance(x, float) for x in (greedy, error, static)):
            return "checks missing"
        ok = greedy == 1.0 and error <= 1.25 * static
        return f"checks {'passed' if ok else 'FAILED'} (greedy {greedy:.0%}, bf16 error {error:.2f} vs {static:.2f} eps)"

    lines = []
    for batch in sorted({r["batch"] for r in rows if r["method"] == "NBP"}):
        nbp = {r["variant"]: r for r in rows if r["method"] == "NBP" and r["batch"] == batch}
        base = nbp.get("optimized")
        if base is None:
            continue
        better = [f"{v} {r['ms_per_video']:.2f} ms ({base['ms_per_video'] / r['ms_per_video']:.2f}x; {checked(v)})"
                  for v, r in nbp.items() if v not in ("eager", "optimized") and r["ms_range"][1] < base["ms_range"][0]]
        lines.append(f"decision, NBP batch {batch}: beyond the spread of optimized ({base['ms_range'][0]:.2f}-"
                     f"{base['ms_range'][1]:.2f} ms): " + ("; ".join(better) or "none"))
    return lines


def pipeline_rankings(results: dict) -> list[str]:
    """The pipeline section's variants of encode, decode and the whole pipeline, fastest first, one line each (the
    tokenizer's defaults are chosen from these, by the same rule as the decode step's)."""
    pipeline = results.get("pipeline", {})
    lines = []
    for what, label in (("encode 5 frames ms", "encode 5 frames"), ("decode 17 frames ms", "decode 17 frames"),
                        ("end-to-end ms per video", "end to end")):
        times = {k.removeprefix(what).lstrip(", ") or "default": v for k, v in pipeline.items()
                 if k.startswith(what) and isinstance(v, float)}
        if times:
            ranked = sorted(times.items(), key=lambda kv: kv[1])
            lines.append(f"ranking, {label}: " + "; ".join(f"{k} {v:.1f} ms" for k, v in ranked))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="700m")
    p.add_argument("--tokenizer", choices=["official", "small"], default="official")
    p.add_argument("--large_batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ntp_repeats", type=int, default=1)
    p.add_argument("--train_batch", type=int, nargs="+", default=[16, 32])
    p.add_argument("--train_compile", action="store_true", help="also time a torch.compile'd training step")
    p.add_argument("--tokenizer_compile", action="store_true",
                   help="also time torch.compile'd tokenizer encode and decode (pipeline section; a minute or so of "
                        "compilation)")
    p.add_argument("--variants", nargs="+", choices=[v for v in VARIANTS if v != "autotuned"],
                   default=["eager", "optimized", "compiled", "triton", "triton-attention"],
                   help="decode variants of the generation table")
    p.add_argument("--autotune", action="store_true",
                   help="also time NBP with compile_decode='max-autotune-no-cudagraphs' (minutes of compilation)")
    p.add_argument("--official_repo", default=".official/NBP" if os.path.isdir(".official/NBP") else None,
                   help="checkout of github.com/RenShuhuai-Andy/NBP (only nbp/modules/gpt.py is read): times the "
                        "official generator beside ours (default: .official/NBP when present)")
    p.add_argument("--skip", nargs="*", default=[], help="section names to skip")
    p.add_argument("--time_budget", type=float, default=400,
                   help="seconds (from device_check.sh's start, installs included) after which no further section "
                        "starts; the device call's limit should leave room for the last section (about 100 s)")
    p.add_argument("--output", default=os.environ.get("OUT", "."), help="folder for results.json")
    args = p.parse_args(argv)
    started = float(os.environ.get("NBP_CHECK_STARTED", time.time()))  # device_check.sh's start: installs come first
    deadline = time.perf_counter() + args.time_budget - (time.time() - started)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = torch.bfloat16 if cuda else torch.float32  # CPU bf16 matmuls are slow: smoke runs use fp32
    # the Triton kernels run on CUDA, or on CPU under Triton's interpreter (a smoke run with TRITON_INTERPRET=1)
    triton = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    torch.backends.cudnn.benchmark = True
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "results.json")
    import diffusers
    import transformers
    results = dict(env=dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                            transformers=transformers.__version__, diffusers=diffusers.__version__,
                            size=args.size, tokenizer=args.tokenizer, date=time.strftime("%Y-%m-%d %H:%M")))
    print(results["env"], flush=True)

    def stopped(signum, frame):  # the device call's time limit (timeout sends SIGTERM): keep what was measured
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once (device_check.sh forwards the signal too)
        results["stopped"] = f"signal {signum} after {time.time() - started:.0f} s"
        write_results(results, path)
        report(results, args.large_batch)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stopped)
    run = lambda name: section(results, name, path, deadline) if name not in args.skip else (lambda fn: fn)  # noqa: E731
    gen = lambda s: torch.Generator(device).manual_seed(s)  # noqa: E731

    @run("ceilings")
    def _(out):
        if not cuda:
            return {}
        x = torch.empty(2**30, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        copy = timed(lambda: y.copy_(x), device, 20, warmup=3)
        a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
        mm = timed(lambda: a @ b, device, 20, warmup=3)
        return dict(copy_tb_per_s=2 * 2**30 / copy / 1e12, bf16_matmul_tflops=2 * 8192**3 / mm / 1e12)

    @run("checks")
    def _(out):
        model = build(args.size, (1, 1, 16), device, torch.float32)
        H, W = model.config.latent_shape[1:]
        ctx = torch.randint(0, model.config.video_vocab_size, (2, 2, H, W), device=device)
        def agreement(a, b):  # fraction of equal tokens, and the first differing token (block order)
            diff = (a != b).flatten(1).int().argmax(dim=1).tolist() if not torch.equal(a, b) else None
            return dict(equal=float((a == b).float().mean()), first_difference=diff)

        for name, sampling in (("sampled", PAPER_SAMPLING), ("greedy", dict(temperature=0.0))):
            eager = model.generate_video_tokens(context_ids=ctx, generator=gen(0), cache_implementation="dynamic",
                                                **sampling)
            # the first call captures and replays every step after the first of its shape; the second captures those
            # warm-ups (the prefill among them); the third replays every step
            for call in (1, 2, 3):
                fast = model.generate_video_tokens(context_ids=ctx, generator=gen(0), cache_implementation="static",
                                                   **sampling)
                out[f"fp32 optimized vs eager, {name}, call {call}"] = agreement(fast, eager)
        model = model.to(bf16)
        reference = model.generate_video_tokens(context_ids=ctx, generator=gen(1), cache_implementation="dynamic",
                                                **PAPER_SAMPLING)
        graphs = model.generate_video_tokens(context_ids=ctx, generator=gen(1), cache_implementation="static",
                                             **PAPER_SAMPLING)
        plain = model.generate_video_tokens(context_ids=ctx, generator=gen(1), cache_implementation="static",
                                            use_cuda_graphs=False, **PAPER_SAMPLING)
        out["bf16 graphs vs the same static step without graphs"] = agreement(graphs, plain)
        cpu_seeded = [model.generate_video_tokens(context_ids=ctx, generator=torch.Generator().manual_seed(3),
                                                  **PAPER_SAMPLING) for _ in range(2)]
        out["a CPU generator for the CUDA model, two calls"] = agreement(*cpu_seeded)
        out["bf16 optimized vs eager (kernels differ: rounding)"] = agreement(graphs, reference)
        model.clear_decode_cache()
        if cuda:
            model = model.float()
            inputs, _ = model.prepare_training_inputs(torch.randint(0, 64000, (2, 5, H, W), device=device))
            with torch.no_grad():
                sdpa = model(input_ids=inputs).logits
                model.set_attn_implementation("flex_attention")
                flex = model(input_ids=inputs).logits
            out["flex vs sdpa training logits, relative error (fp32)"] = float((flex - sdpa).norm() / sdpa.norm())
        del model
        # converted checkpoints sample over the whole vocabulary (UCF: text ids too), fed back raw: graphs vs eager
        model = build(args.size, (1, 1, 16), device, torch.float32, task="ucf")
        model.config.sample_whole_vocabulary = True
        tokens = [model.generate_video_tokens(class_labels=[0, 5], generator=gen(2), temperature=0.0, **path)
                  for path in (dict(cache_implementation="dynamic"), dict(cache_implementation="static"))]
        out["fp32 whole-vocabulary greedy (UCF-like): optimized vs eager"] = agreement(*tokens)
        model.clear_decode_cache()
        return out

    @run("triton checks")
    def _(out):
        if not triton:
            return {"skipped": "no CUDA (or TRITON_INTERPRET=1 on CPU)"}
        model = build(args.size, (1, 1, 16), device, torch.float32)
        H, W = model.config.latent_shape[1:]
        ctx = torch.randint(0, model.config.video_vocab_size, (2, 2, H, W), device=device)
        modes = ("triton", "triton-attention")
        for name, sampling in (("greedy", dict(temperature=0.0)), ("sampled", PAPER_SAMPLING)):
            eager = model.generate_video_tokens(context_ids=ctx, generator=gen(0), cache_implementation="dynamic",
                                                **sampling)
            for mode in modes:
                fast = model.generate_video_tokens(context_ids=ctx, generator=gen(0), cache_implementation="static",
                                                   compile_decode=mode, **sampling)
                out[f"fp32 {mode} vs eager, {name} (equal tokens)"] = float((fast == eager).float().mean())
        # bf16: a rounding may move a sampled token, so the check is each step's logits against the float32 step's,
        # every path fed the same tokens (the fp32 eager ones): the Triton steps should be no further off than the
        # PyTorch step (in units of bf16's precision, 2^-7, relative to the largest logit)
        forced = model.layout.grid_to_sequence(eager)
        reference = forced_step_logits(model, forced, context_ids=ctx)
        model = model.to(bf16)
        eps = torch.finfo(bf16).eps
        for mode in (None,) + modes:
            steps = forced_step_logits(model, forced, context_ids=ctx, compile_decode=mode)
            out[f"bf16 {mode or 'static'} step logits vs fp32, max error (bf16 eps)"] = max(
                float((a - b).abs().max() / b.abs().max()) for a, b in zip(steps, reference, strict=True)) / eps
        static = model.generate_video_tokens(context_ids=ctx, generator=gen(1), cache_implementation="static",
                                             **PAPER_SAMPLING)
        for mode in modes:
            fused = model.generate_video_tokens(context_ids=ctx, generator=gen(1), cache_implementation="static",
                                                compile_decode=mode, **PAPER_SAMPLING)
            out[f"bf16 {mode} vs the static step, sampled (tokens equal; a rounding moves a sample)"] = float(
                (fused == static).float().mean())
        return out

    @run("generation")
    def _(out):
        log = lambda row: (out.setdefault("rows so far", []).append(row), print(row, flush=True))  # noqa: E731
        # NTP at batch 1 only, the ratio the issue asks for (its 768 graphs per batch cost time), on the fast paths
        # (its eager row, a minute, is not part of the ratio); the Triton rows last, apart, so that a failure there
        # keeps the others
        kernels = [v for v in args.variants if v.startswith("triton")]
        rows = generation_rows(args.size, device, bf16, (1, args.large_batch), args.repeats, args.ntp_repeats,
                               variants=tuple(v for v in args.variants if v not in kernels)
                               + ("autotuned",) * args.autotune, ntp_batches=(1,),
                               ntp_variants=[v for v in args.variants if v == "optimized"], log=log)
        if triton and kernels:
            try:  # NTP with the whole Triton step only (the attention kernel alone is for large batches)
                rows += generation_rows(args.size, device, bf16, (1, args.large_batch), args.repeats,
                                        args.ntp_repeats, variants=tuple(kernels), ntp_batches=(1,),
                                        ntp_variants=[v for v in kernels if v == "triton"], log=log)
            except Exception:  # noqa: BLE001
                out["triton error"] = traceback.format_exc()
                print(out["triton error"], flush=True)
                rows = out.get("rows so far", [])  # none when only Triton variants were asked for
        out.pop("rows so far", None)
        return dict(rows=rows, ratios=generation_ratios(rows))

    @run("pipeline")
    def _(out):
        with torch.device(device):
            if args.tokenizer == "official":
                tok = NBPVideoTokenizer()
            else:
                tok = NBPVideoTokenizer(block_out_channels=(32, 64, 64, 128), layers_per_block=(1, 1, 1, 1),
                                        norm_num_groups=8)
        tok = tok.eval().to(dtype=bf16)
        model = build(args.size, (1, 1, 16), device, bf16)
        pipe = NBPVideoPipeline(transformer=model, video_tokenizer=tok)
        pipe.set_progress_bar_config(disable=True)
        H, W = model.config.latent_shape[1:]
        s = tok.spatial_compression
        video = torch.rand(1, 5, 3, H * s, W * s, device=device)
        frames = video.to(bf16).transpose(1, 2)  # what the tokenizer encodes: (1, 3, 5, H, W)
        ids = torch.randint(0, model.config.video_vocab_size, (1, 5, H, W), device=device)
        with torch.no_grad():
            out["encode 5 frames ms"] = 1000 * timed(lambda: tok.encode(frames), device, args.repeats)
            out["decode 17 frames ms"] = 1000 * timed(lambda: tok.decode(ids), device, args.repeats)
            if args.tokenizer_compile:  # inductor's fusion of the norms, activations and paddings around the convs
                def compiled_tokenizer():
                    encode, decode = (torch.compile(f, dynamic=False) for f in (tok.encode, tok.decode))
                    start = time.perf_counter()
                    # called as the pipeline calls them, so that its run below compiles nothing more
                    pixels, context_ids = decode(ids, decode_batch_size=None), encode(frames)
                    out["torch.compile: first encode + decode call s"] = time.perf_counter() - start
                    out["torch.compile: decode max abs difference, encode ids equal"] = [
                        float((pixels - tok.decode(ids)).abs().max()),
                        float((context_ids == tok.encode(frames)).float().mean())]
                    out["encode 5 frames ms, torch.compile"] = 1000 * timed(lambda: encode(frames), device,
                                                                             args.repeats)
                    out["decode 17 frames ms, torch.compile"] = 1000 * timed(
                        lambda: decode(ids, decode_batch_size=None), device, args.repeats)
                    tok.encode, tok.decode = encode, decode  # what the pipeline calls, as a user would set them
                    try:
                        out["end-to-end ms per video, tokenizer torch.compile"] = 1000 * timed(
                            lambda: pipe(video=video, output_type="pt", generator=gen(4), **PAPER_SAMPLING), device,
                            args.repeats)
                    finally:
                        del tok.encode, tok.decode

                attempt(compiled_tokenizer)
            if cuda:
                out["decode 17 frames, kernel profile"] = attempt(lambda: kernel_profile(
                    lambda: tok.decode(ids), top=10, kinds=TOKENIZER_KERNEL_KINDS))
                # the widest level's 3x3x3 conv alone (padded input of 17 frames), in the layout the tokenizer uses
                # and channels-last: TFLOP/s of each, to see what the convolutions could gain from the layout
                def widest_conv():  # its tensors (a few hundred MiB) go before the peak below
                    width, size = tok.config.block_out_channels[0], H * s
                    conv = FrameConv3d(width, width, 3, device=device, dtype=bf16)
                    x = torch.randn(1, width, 19, size + 2, size + 2, device=device, dtype=bf16)
                    flop = 2 * width * width * 27 * 17 * size * size
                    for name, layout in (("contiguous", torch.contiguous_format), ("channels_last_3d",
                                                                                    torch.channels_last_3d)):
                        c, xs = conv.to(memory_format=layout), x.to(memory_format=layout)
                        out[f"widest 3x3x3 conv TFLOP/s, {name}"] = attempt(
                            lambda: flop / timed(lambda: c(xs), device, args.repeats) / 1e12)
                    # the same conv as a 2D one over the 3 frames each output sees, stacked as channels (frames as
                    # the batch, channels-last: cuDNN's most tuned path; `conv_implementation="frames2d"`), without
                    # and with the stacking copy (and the weight reordered, as the tokenizer runs it): whether the
                    # tokenizer would gain from running its convolutions as 2D ones
                    conv.to(memory_format=torch.contiguous_format).as_frames = True
                    stacked = conv.stacked_frames(x)
                    weight2d = conv.stacked_weight().contiguous(memory_format=torch.channels_last)
                    out["widest 3x3x3 conv as stacked-frame 2D conv TFLOP/s, conv only"] = attempt(
                        lambda: flop / timed(lambda: F.conv2d(stacked, weight2d, conv.bias), device, args.repeats)
                        / 1e12)
                    for name, layout in (("contiguous", torch.contiguous_format), ("channels_last_3d",
                                                                                    torch.channels_last_3d)):
                        xs = x.to(memory_format=layout)
                        key = f"widest 3x3x3 conv as stacked-frame 2D conv TFLOP/s, with the stacking copy from {name}"
                        out[key] = attempt(lambda: flop / timed(lambda: conv(xs), device, args.repeats) / 1e12)

                attempt(widest_conv)  # a failure here must not cost the end-to-end rows
                # every figure here uses cuDNN's autotuning of the convolutions (set by this script); without it:
                torch.backends.cudnn.benchmark = False
                try:
                    out["decode 17 frames ms, cudnn.benchmark off"] = attempt(
                        lambda: 1000 * timed(lambda: tok.decode(ids), device, args.repeats))
                finally:
                    torch.backends.cudnn.benchmark = True
        reset_peak_memory(device)
        seconds = timed(lambda: pipe(video=video, output_type="pt", generator=gen(4), **PAPER_SAMPLING), device,
                        args.repeats)
        out.update({"end-to-end ms per video": 1000 * seconds, "generated FPS": GENERATED_FRAMES / seconds,
                    "peak_gib": peak_memory_gib(device)})
        if triton:  # the Triton decode step, the tokenizer's Triton norms (checked against PyTorch's), and both
            def tokenizer_with_triton_norms():
                with torch.no_grad():
                    pixels, context_ids = tok.decode(ids), tok.encode(frames)
                    tok.norm_implementation = "triton"
                    out["triton norms: decode max abs difference, encode ids equal"] = [
                        float((tok.decode(ids) - pixels).abs().max()),
                        float((tok.encode(frames) == context_ids).float().mean())]
                    out["encode 5 frames ms, triton norms"] = 1000 * timed(lambda: tok.encode(frames), device,
                                                                            args.repeats)
                    out["decode 17 frames ms, triton norms"] = 1000 * timed(lambda: tok.decode(ids), device,
                                                                            args.repeats)
                    if cuda:
                        out["decode 17 frames, kernel profile, triton norms"] = attempt(lambda: kernel_profile(
                            lambda: tok.decode(ids), top=10, kinds=TOKENIZER_KERNEL_KINDS))
                        # channels-last weights: the convolutions' activations stay channels-last, norms included
                        tok.to(memory_format=torch.channels_last_3d)
                        try:
                            out["triton norms + channels_last_3d: decode max abs difference"] = float(
                                (tok.decode(ids) - pixels).abs().max())
                            for name, fn in (("encode 5 frames", lambda: tok.encode(frames)),
                                             ("decode 17 frames", lambda: tok.decode(ids))):
                                out[f"{name} ms, triton norms + channels_last_3d"] = 1000 * timed(fn, device,
                                                                                                args.repeats)
                            out["decode 17 frames, kernel profile, triton norms + channels_last_3d"] = attempt(
                                lambda: kernel_profile(lambda: tok.decode(ids), top=10, kinds=TOKENIZER_KERNEL_KINDS))
                        finally:
                            tok.to(memory_format=torch.contiguous_format)
                        # the convolutions as 2D ones over stacked frames (channels-last activations)
                        tok.conv_implementation = "frames2d"
                        try:
                            out["triton norms + frames2d: decode max abs difference"] = float(
                                (tok.decode(ids) - pixels).abs().max())
                            for name, fn in (("encode 5 frames", lambda: tok.encode(frames)),
                                             ("decode 17 frames", lambda: tok.decode(ids))):
                                out[f"{name} ms, triton norms + frames2d"] = 1000 * timed(fn, device, args.repeats)
                            out["decode 17 frames, kernel profile, triton norms + frames2d"] = attempt(
                                lambda: kernel_profile(lambda: tok.decode(ids), top=10, kinds=TOKENIZER_KERNEL_KINDS))
                        finally:
                            tok.conv_implementation = "conv3d"

            def end_to_end(conv_implementation="conv3d", **options):
                tok.conv_implementation = conv_implementation
                try:
                    return attempt(lambda: 1000 * timed(lambda: pipe(video=video, output_type="pt", generator=gen(4),
                                                                     **options, **PAPER_SAMPLING), device,
                                                        args.repeats))
                finally:
                    tok.conv_implementation = "conv3d"

            triton_step = dict(compile_decode="triton", cache_implementation="static")
            out["end-to-end ms per video, compile_decode=triton"] = end_to_end(**triton_step)
            failed = attempt(tokenizer_with_triton_norms)
            if failed is None:
                out["end-to-end ms per video, triton norms"] = end_to_end()
                out["end-to-end ms per video, compile_decode=triton + triton norms"] = end_to_end(**triton_step)
                if cuda:
                    out["end-to-end ms per video, compile_decode=triton + triton norms + frames2d"] = end_to_end(
                        "frames2d", **triton_step)
            else:
                out["triton norms"] = failed
            tok.norm_implementation = "torch"
        if cuda:  # decoding beside generation (channels-last 3D and a compiled step were slower in run 3: not rerun)
            seconds = timed(lambda: pipe(video=video, output_type="pt", generator=gen(4), overlap_decode=True,
                                         **PAPER_SAMPLING), device, args.repeats)
            out["end-to-end ms per video, overlap_decode"] = 1000 * seconds
            a = pipe(video=video, output_type="pt", generator=gen(7), **PAPER_SAMPLING).frames
            b = pipe(video=video, output_type="pt", generator=gen(7), overlap_decode=True, **PAPER_SAMPLING).frames
            out["overlap_decode vs full decode, max abs difference"] = float((a - b).abs().max())
        return out

    @run("training")
    def _(out):
        measured = results.get("ceilings", {}).get("bf16_matmul_tflops")
        attn = "flex_attention" if cuda else "sdpa"
        losses = ("chunked",) + ("triton",) * cuda  # (timing the interpreter tells nothing)
        if triton:
            out["triton loss vs chunked"] = attempt(lambda: loss_agreement(device, rows=4096 if cuda else 64))
        for compiled, loss in [(False, x) for x in losses] + [(True, x) for x in losses] * args.train_compile:
            name = f"{attn}{' compiled' if compiled else ''}{', triton loss' if loss == 'triton' else ''}"
            if time.perf_counter() > deadline:  # each run costs a model (and with compiled, its compilation)
                out[name] = "skipped: time budget spent"
                continue

            def inspect(batch, step):  # where a step's time goes, at the first batch size
                if cuda and batch == args.train_batch[0]:
                    out[f"{name}, batch {batch}, kernel profile"] = kernel_profile(step, top=12)

            def record(row, name=name):  # each row as it is measured
                if measured and not row.get("out_of_memory"):
                    row["mfu_measured_matmul"] = row["tflops"] / measured
                out[f"{name}, batch {row['batch']}"] = row
                print(row, flush=True)

            # a variant that fails (a new path on the GPU) keeps the rows measured so far and the other variants
            failed = attempt(lambda: training_rows(args.size, device, args.train_batch, attn, compiled, repeats=5,
                                                   log=record, inspect=inspect, loss=loss))
            if isinstance(failed, str):
                out[name] = failed
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        return out

    @run("official")
    def _(out):
        if not args.official_repo:
            return {"skipped": "no --official_repo (a checkout of github.com/RenShuhuai-Andy/NBP)"}
        model = build(args.size, (1, 1, 16), device, torch.float32)
        official, gpt = official_gpt_with_our_weights(args.official_repo, model, torch.float32)
        cfg, (H, W) = model.config, model.config.latent_shape[1:]
        ctx = torch.randint(0, cfg.video_vocab_size, (1, 2, H, W), device=device)
        x = ctx.reshape(1, -1)
        steps = (model.config.latent_shape[0] - 2) * (H * W // cfg.block_size)  # as transformer_eval.py counts
        mask = official_block_mask(cfg.max_position_embeddings, cfg.block_size, device)

        def official_sample(**sampling):
            return official.sample_with_past(x, mask, gpt, steps=steps, pred_token_num_per_step=cfg.block_size,
                                             **sampling)

        theirs = official_sample(sample_logits=False)
        ours = model.generate_video_tokens(context_ids=ctx, temperature=0.0, cache_implementation="static")
        ours = ours.reshape(1, -1)[:, x.shape[1]:]
        if ours.shape != theirs.shape:
            raise RuntimeError(f"greedy ids: ours {tuple(ours.shape)}, official {tuple(theirs.shape)}")
        out["greedy tokens equal to the official code's, fp32"] = float((ours == theirs).float().mean())
        out["distinct greedy tokens (official)"] = int(theirs.unique().numel())
        del model
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            gpt = gpt.to(dtype)
            seconds = timed(lambda: official_sample(top_k=PAPER_SAMPLING["top_k"], top_p=PAPER_SAMPLING["top_p"]),
                            device, min(args.repeats, 3))
            out[f"official ms per video, batch 1, {name}"] = 1000 * seconds
        return out

    @run("profile")
    def _(out):
        if not cuda:
            return {}
        model = build(args.size, (1, 1, 16), device, bf16)
        H, W = model.config.latent_shape[1:]
        for batch in (1, args.large_batch):  # kernel time of one optimized generation, without graphs
            ctx = torch.randint(0, 64000, (batch, 2, H, W), device=device)
            out[f"batch {batch}"] = kernel_profile(lambda: model.generate_video_tokens(
                context_ids=ctx, generator=gen(5), cache_implementation="static", use_cuda_graphs=False,
                **PAPER_SAMPLING))
            mode = "triton" if batch == 1 else "triton-attention"  # each Triton path at the batch it is for
            out[f"batch {batch}, {mode}"] = attempt(lambda: kernel_profile(lambda: model.generate_video_tokens(
                context_ids=ctx, generator=gen(5), cache_implementation="static", use_cuda_graphs=False,
                compile_decode=mode, **PAPER_SAMPLING)))
            # the sampler alone on one step's logits (16 positions per video), times 48 steps: its share of a video
            logits = torch.randn(batch, 16, model.config.video_vocab_size, device=device, generator=gen(6)).to(bf16)
            noise = torch.rand(batch, 16, device=device, generator=gen(7))
            seconds = timed(lambda: sample_tokens(logits, noise=noise, **PAPER_SAMPLING), device, 50, warmup=5)
            out[f"batch {batch}"]["sampler ms per video (48 steps, eager)"] = 48 * 1000 * seconds / batch
            out[f"batch {batch}"]["fused sampler ms per video (48 steps, eager)"] = attempt(lambda: 48 * 1000 * timed(
                lambda: sample_tokens(logits, noise=noise, fused=True, **PAPER_SAMPLING), device, 50, warmup=5) / batch)
        return out

    @run("cfg")
    def _(out):
        model = build(args.size, (1, 1, 16), device, bf16, task="ucf")
        for variant in ("optimized",) + ("triton",) * triton:
            suffix = "" if variant == "optimized" else f", {variant}"
            for g in (1.0, 3.0):
                model.clear_decode_cache()  # the previous row's decoder (cache and graphs) is not this row's peak
                reset_peak_memory(device)
                s = timed(lambda: model.generate_video_tokens(class_labels=[0], guidance_scale=g, generator=gen(2),
                                                              **VARIANTS[variant], **PAPER_SAMPLING),
                          device, args.repeats)
                out[f"guidance {g}{suffix}"] = dict(ms_per_video=1000 * s, peak_gib=peak_memory_gib(device))
            out[f"cost (guidance 3 / guidance 1){suffix}"] = (out[f"guidance 3.0{suffix}"]["ms_per_video"]
                                                             / out[f"guidance 1.0{suffix}"]["ms_per_video"])
        return out

    # ---- report ---------------------------------------------------------------------------------------------------
    report(results, args.large_batch)

if __name__ == "__main__":
    main()
