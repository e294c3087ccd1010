"""Generation benchmark: NBP (row blocks) vs NTP (1x1x1) with the same weights, side by side in one run.

`nbp bench` / `python benchmarks/bench_generate.py`. The K600 setting: 2 context latent frames (5 pixel frames),
3 generated latent frames (12 pixel frames) on a 5x16x16 grid; NBP takes 48 steps, NTP 768.
"""

import argparse
import statistics
import time

import torch

from .configuration_nbp import NBPConfig
from .modeling_nbp import NBPForVideoGeneration

SIZES = {"small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=8),
         "700m": dict(num_hidden_layers=24, hidden_size=1536, num_attention_heads=16)}


def build(size: str, block_shape, device, dtype):
    cfg = NBPConfig.from_preset("k600-tiny", block_shape=list(block_shape), **SIZES[size])
    torch.manual_seed(0)  # same weights for every block shape: the layout has no parameters
    return NBPForVideoGeneration(cfg).eval().to(device=device, dtype=dtype)


def time_generation(model, batch_size, repeats, sampling, device):
    T, H, W = model.config.latent_shape
    context = torch.randint(0, model.config.video_vocab_size, (batch_size, 2, H, W), device=device)
    times = []
    for i in range(repeats + 1):  # the first run warms up
        gen = torch.Generator(device=device).manual_seed(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate_video_tokens(context_ids=context, generator=gen, **sampling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steps = len(model.layout.decode_schedule(model.layout.context_tokens(2)))
    return statistics.median(times[1:]), steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default: small)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sampling = dict(top_k=16000, top_p=0.9, temperature=1.0)  # the paper's sampling
    frames = 12  # generated pixel frames per video
    rows = {}
    for name, block in (("NBP 1x1x16", (1, 1, 16)), ("NTP 1x1x1", (1, 1, 1))):
        model = build(args.size, block, device, dtype)
        seconds, steps = time_generation(model, args.batch_size, args.repeats, sampling, device)
        rows[name] = (seconds, steps)
        del model
    print(f"device={device} dtype={args.dtype} size={args.size} batch={args.batch_size} torch={torch.__version__}")
    print(f"{'method':<12} {'steps':>6} {'ms/video':>10} {'frames/s':>9}")
    for name, (seconds, steps) in rows.items():
        ms = 1000 * seconds / args.batch_size
        print(f"{name:<12} {steps:>6} {ms:>10.1f} {frames * args.batch_size / seconds:>9.1f}")
    ratio = rows["NTP 1x1x1"][0] / rows["NBP 1x1x16"][0]
    print(f"NBP speed-up over NTP: {ratio:.2f}x")
    return rows


if __name__ == "__main__":
    main()
