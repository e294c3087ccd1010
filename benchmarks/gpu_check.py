"""One prepared run that checks and times generation (and a training step) on a GPU; prints a table last.

    python benchmarks/gpu_check.py                      # on the device machine: 700M, official tokenizer
    python benchmarks/gpu_check.py --size small --tokenizer small --ntp_repeats 1   # a CPU smoke run

Checks first (CUDA only where noted): the optimized path (bf16 weights, static cache, torch.compile
"reduce-overhead" = CUDA graphs) gives the tokens of the eager dynamic-cache path for the same seed (fp32
weights); flex attention (CUDA) gives the SDPA logits of the block-causal training forward. Then times, with
CUDA events after warm-up (median of repeats), the K600 setting (2 context latent frames, 48 steps of 16 tokens)
with the paper's sampling (top-k 16000, top-p 0.9): NBP and NTP, eager and optimized, batch 1 and a large batch,
classifier-free guidance (UCF-like model, one batched forward), the full pipeline (encode 5 frames, generate,
decode 17 frames at 128x128), and a bf16 training step with flex attention (tokens/s, MFU). Random weights.
"""

import argparse
import json
import os
import statistics
import time

import torch

from modeling_nbp import NBPConfig, NBPForVideoGeneration, NBPVideoPipeline, NBPVideoTokenizer
from modeling_nbp.bench import SIZES

SAMPLING = dict(top_k=16000, top_p=0.9, temperature=1.0)
GENERATED_FRAMES = 12  # pixel frames generated per video in the K600 setting


def timed(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def build(size, block, device, dtype, task="k600", attn="sdpa"):
    cfg = NBPConfig.from_preset(f"{task}-tiny", block_shape=list(block), hidden_dropout=0.0, **SIZES[size])
    torch.manual_seed(0)
    model = NBPForVideoGeneration(cfg).eval().to(device=device, dtype=dtype)
    model.set_attn_implementation(attn)
    return model


def optimize(model, device):
    """bf16 + static cache (+ CUDA graphs through torch.compile on CUDA)."""
    if device.type == "cuda":
        model.forward = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    return dict(cache_implementation="static")


def peak_memory(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="700m")
    p.add_argument("--tokenizer", choices=["official", "small"], default="official")
    p.add_argument("--large_batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ntp_repeats", type=int, default=3)
    p.add_argument("--output", default=os.environ.get("OUT", "."), help="folder for results.json")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 matmuls are slow: smoke runs use fp32
    rows, checks = [], {}

    def row(name, fn, batch, steps, repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed(fn, device, repeats)
        rows.append(dict(name=name, batch=batch, steps=steps, ms_per_video=1000 * seconds / batch,
                         fps=GENERATED_FRAMES * batch / seconds, peak_gib=peak_memory(device)))
        print(rows[-1], flush=True)

    # ---- correctness of the fast path --------------------------------------------------------------------------
    ref = build(args.size, (1, 1, 16), device, torch.float32)
    T, H, W = ref.config.latent_shape
    ctx = torch.randint(0, ref.config.video_vocab_size, (2, 2, H, W), device=device)
    gen = lambda s: torch.Generator(device).manual_seed(s)  # noqa: E731
    eager = ref.generate_video_tokens(context_ids=ctx, generator=gen(0), **SAMPLING)
    static = ref.generate_video_tokens(context_ids=ctx, generator=gen(0), cache_implementation="static", **SAMPLING)
    checks["static_cache_tokens_equal_fp32"] = bool(torch.equal(eager, static))
    if device.type == "cuda":
        inputs, labels = ref.prepare_training_inputs(torch.randint(0, 64000, (2, T, H, W), device=device))
        sdpa_logits = ref(input_ids=inputs).logits
        ref.set_attn_implementation("flex_attention")
        flex_logits = ref(input_ids=inputs).logits
        checks["flex_vs_sdpa_rel_err"] = float((flex_logits - sdpa_logits).norm() / sdpa_logits.norm())
        ref.set_attn_implementation("sdpa")
    del ref

    # ---- generation timings --------------------------------------------------------------------------------------
    for name, block in (("NBP", (1, 1, 16)), ("NTP", (1, 1, 1))):
        repeats = args.repeats if name == "NBP" else args.ntp_repeats
        model = build(args.size, block, device, bf16)
        steps = len(model.layout.decode_schedule(model.layout.context_tokens(2)))
        for batch in (1, args.large_batch) if name == "NBP" else (1,):
            c = torch.randint(0, 64000, (batch, 2, H, W), device=device)
            row(f"{name} eager bf16", lambda: model.generate_video_tokens(context_ids=c, generator=gen(1), **SAMPLING),
                batch, steps, repeats)
        fast = optimize(model, device)
        for batch in (1, args.large_batch) if name == "NBP" else (1,):
            c = torch.randint(0, 64000, (batch, 2, H, W), device=device)
            row(f"{name} optimized", lambda: model.generate_video_tokens(context_ids=c, generator=gen(1), **fast,
                                                                          **SAMPLING), batch, steps, repeats)
        if name == "NBP":
            a = model.generate_video_tokens(context_ids=c[:1], generator=gen(3), **fast, **SAMPLING)
            b = model.generate_video_tokens(context_ids=c[:1], generator=gen(3), **fast, **SAMPLING)
            checks["optimized_deterministic"] = bool(torch.equal(a, b))
        del model

    # ---- classifier-free guidance: one doubled batch per step ---------------------------------------------------
    ucf = build(args.size, (1, 1, 16), device, bf16, task="ucf")
    fast = optimize(ucf, device)
    for g in (1.0, 3.0):
        row(f"UCF 95 steps cfg={g}", lambda: ucf.generate_video_tokens(class_labels=[0], guidance_scale=g,
                                                                        generator=gen(2), **fast, **SAMPLING),
            1, 95, args.repeats)
    del ucf

    # ---- end to end through the pipeline -------------------------------------------------------------------------
    if args.tokenizer == "official":
        tok = NBPVideoTokenizer()
    else:
        tok = NBPVideoTokenizer(block_out_channels=(32, 64, 64, 128), layers_per_block=(1, 1, 1, 1), norm_num_groups=8)
    tok = tok.eval().to(device=device, dtype=bf16)
    model = build(args.size, (1, 1, 16), device, bf16)
    fast = optimize(model, device)
    pipe = NBPVideoPipeline(transformer=model, video_tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    s = tok.spatial_compression
    video = torch.rand(1, 5, 3, H * s, W * s, device=device)
    with torch.autocast(device.type, dtype=bf16, enabled=device.type == "cuda"):
        row("pipeline end-to-end", lambda: pipe(video=video, output_type="pt", generator=gen(4), **SAMPLING), 1, 48,
            args.repeats)
    del pipe, model, tok

    # ---- training step: bf16, flex attention on CUDA --------------------------------------------------------------
    attn = "flex_attention" if device.type == "cuda" else "sdpa"
    model = build(args.size, (1, 1, 16), device, torch.float32, attn=attn).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = 8 if device.type == "cuda" else 2
    grids = torch.randint(0, 64000, (batch, T, H, W), device=device)

    def train_step():
        with torch.autocast(device.type, dtype=bf16, enabled=device.type == "cuda"):
            loss = model(video_ids=grids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = timed(train_step, device, max(3, args.repeats // 2), warmup=2)
    tokens = batch * (model.layout.input_length)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    cfg = model.config
    flops = 6 * n_params * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * model.layout.input_length * tokens
    peak = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12}.get(
        next((k for k in ("NVIDIA H100", "NVIDIA H200") if device.type == "cuda" and k in torch.cuda.get_device_name()),
             None), float("nan"))
    train = dict(tokens_per_s=tokens / seconds, mfu=flops / seconds / peak, batch=batch, attn=attn)

    # ---- report ---------------------------------------------------------------------------------------------------
    by = {(r["name"], r["batch"]): r for r in rows}
    ratios = {
        "NBP/NTP eager (batch 1)": by[("NTP eager bf16", 1)]["ms_per_video"] / by[("NBP eager bf16", 1)]["ms_per_video"],
        "NBP/NTP optimized (batch 1)": by[("NTP optimized", 1)]["ms_per_video"] / by[("NBP optimized", 1)]["ms_per_video"],
        "optimized speed-up over eager (NBP batch 1)":
            by[("NBP eager bf16", 1)]["ms_per_video"] / by[("NBP optimized", 1)]["ms_per_video"],
        "CFG cost (cfg 3 / cfg 1)": by[("UCF 95 steps cfg=3.0", 1)]["ms_per_video"] / by[("UCF 95 steps cfg=1.0", 1)]["ms_per_video"],
    }
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               size=args.size, tokenizer=args.tokenizer, date=time.strftime("%Y-%m-%d"))
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(dict(env=env, checks=checks, rows=rows, ratios=ratios, train=train), f, indent=2)
    print("\n" + " ".join(f"{k}={v}" for k, v in env.items()))
    print("checks:", checks)
    print(f"{'run':<24} {'batch':>5} {'steps':>5} {'ms/video':>10} {'FPS':>9} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['name']:<24} {r['batch']:>5} {r['steps']:>5} {r['ms_per_video']:>10.1f} {r['fps']:>9.1f} "
              f"{r['peak_gib']:>9.2f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(f"training step ({attn}, bf16, batch {batch}): {train['tokens_per_s']:.0f} tokens/s, MFU {train['mfu']:.1%}")


if __name__ == "__main__":
    main()
