"""The paper's NBP-vs-NTP study at laptop scale, on the bundled moving-digits data (a documented experiment).

Same data, seed and training budget for each variant: NTP (1x1x1 blocks), NBP with row blocks (1x1xW'), NBP with
whole-frame blocks (1xH'xW'); for class-conditional generation and for frame prediction (2 given latent frames).
For each: train with examples/train_nbp.py, generate videos with the pipeline (timed), score FVD against held-out
real clips (StyleGAN-V protocol, I3D, repeats on random subsets). Writes nbp_vs_ntp_table.md (the table that
docs/nbp_vs_ntp.md presents) and nbp_vs_ntp.png (a bar chart) under --output_dir; `--docs_dir docs` replaces the
published ones (docs/nbp_vs_ntp.md gives the published run's command).

    nbp make-digits --output_dir runs/study/digits_train --clips_per_class 500 --seed 0 --size 32 --digit_size 16 \\
        --speed_range 1 2 --styles_per_class 2
    nbp pretokenize --data runs/study/digits_train --tokenizer modeling_nbp/pretrained/nbp-moving-digits \\
        --output_dir runs/study/tokens --num_frames 17 --resolution 32
    nbp make-digits --output_dir runs/study/digits_val --clips_per_class 20 --seed 12345 --size 32 --digit_size 16 \\
        --speed_range 1 2 --styles_per_class 2
    nbp pretokenize --data runs/study/digits_val --tokenizer modeling_nbp/pretrained/nbp-moving-digits \\
        --output_dir runs/study/tokens_val --num_frames 17 --resolution 32
    python examples/nbp_vs_ntp_study.py --tokens runs/study/tokens/tokens --validation_tokens runs/study/tokens_val/tokens \\
        --max_steps 600
"""

import argparse
import json
import os
import time

import torch
from PIL import Image, ImageDraw

from modeling_nbp import NBPVideoPipeline
from modeling_nbp.data import MovingDigits
from modeling_nbp.demo import DEMO_DATA, DEMO_MODEL, HELD_OUT_SEED
from modeling_nbp.evaluation.fvd import FVDCalculator, check_sampling
from modeling_nbp.training.common import non_negative_int, positive_int
from modeling_nbp.training.train_nbp import main as train_nbp
from modeling_nbp.video_io import atomic_output_path

VARIANTS = {"NTP 1x1x1": "1,1,1", "NBP rows 1x1x8": "1,1,8", "NBP frames 1x8x8": "1,8,8"}
TASKS = {"class-conditional": ["--condition_mode", "class", "--first_block", "bov", "--class_dropout_prob", "0.1"],
         "frame prediction": ["--condition_mode", "frames", "--first_block", "none", "--num_context_frames", "2"]}


def generate(pipe, task, real, num_videos, seed):
    """Videos (N, 3, T, H, W) in [0, 1] and seconds per video, end to end through the pipeline (encode the context,
    generate, decode), timed after an untimed call with the same inputs: the first call of a process and of a
    pipeline pays one-time costs, which the first variant alone would carry."""
    # the dynamic cache: the path of the published times (then the CPU default; the static one gives the same videos)
    kw = dict(output_type="pt", top_k=100, top_p=0.95, temperature=1.0, cache_implementation="dynamic")

    def call():
        gens = [torch.Generator().manual_seed(seed + i) for i in range(num_videos)]
        if task == "class-conditional":
            return pipe(class_labels=[i % 10 for i in range(num_videos)], generator=gens, **kw).frames
        frames = pipe.video_tokenizer.num_frames_for_latent(pipe.transformer.config.num_context_frames)
        context = real[:num_videos, :, :frames].permute(0, 2, 1, 3, 4)  # the model's context (5 frames: demo)
        return pipe(video=context, generator=gens, **kw).frames

    call()
    start = time.perf_counter()
    out = call()
    return out.permute(0, 2, 1, 3, 4), (time.perf_counter() - start) / num_videos


def bar_chart(results, path):
    width, height, pad = 760, 340, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    top = max(r["fvd_mean"] + r["fvd_std"] for r in results) or 1.0
    bar = (width - 2 * pad) / len(results)
    for i, r in enumerate(results):
        x0 = pad + i * bar + 6
        h = (height - 2 * pad) * r["fvd_mean"] / top
        color = (70, 110, 200) if r["task"] == "class-conditional" else (220, 130, 50)
        draw.rectangle([x0, height - pad - h, x0 + bar - 12, height - pad], fill=color)
        draw.text((x0, height - pad + 4), r["variant"].split()[0] + " " + r["variant"].split()[-1], fill="black")
        draw.text((x0, height - pad - h - 14), f"{r['fvd_mean']:.0f}", fill="black")
    draw.text((pad, 8), "FVD (lower is better): blue class-conditional, orange frame prediction", fill="black")
    with atomic_output_path(path) as tmp:
        img.save(tmp)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", required=True, help="pre-tokenized moving-digits training set")
    p.add_argument("--validation_tokens", help="pre-tokenized held-out set (its loss is reported)")
    p.add_argument("--tokenizer", default=DEMO_MODEL, help="tokenizer (or pipeline) folder used for the tokens")
    p.add_argument("--output_dir", default="runs/study")
    p.add_argument("--docs_dir", help="where the chart and table go (default: --output_dir; the published ones: "
                   "--docs_dir docs)")
    p.add_argument("--max_steps", type=positive_int, default=600)
    p.add_argument("--batch_size", type=positive_int, default=16)
    p.add_argument("--num_layers", type=positive_int, default=4)
    p.add_argument("--hidden_size", type=positive_int, default=256)
    p.add_argument("--num_videos", type=positive_int, default=128)
    p.add_argument("--fvd_repeats", type=positive_int, default=4)
    p.add_argument("--fvd_samples", type=positive_int, default=96)
    p.add_argument("--seed", type=non_negative_int, default=0)
    args = p.parse_args(argv)
    try:  # before the first model trains: the generated and the real set both hold --num_videos videos
        check_sampling(args.num_videos, args.num_videos, args.fvd_repeats, args.fvd_samples, args.seed)
    except ValueError as error:
        p.error(str(error).replace("num_samples", "--fvd_samples").replace("num_repeats", "--fvd_repeats"))

    real_data = MovingDigits(args.num_videos, seed=HELD_OUT_SEED, **DEMO_DATA)
    real = torch.stack([real_data[i]["video"] for i in range(args.num_videos)])
    fvd = FVDCalculator(cache_dir=os.path.join(args.output_dir, "fvd_cache"), progress=False)
    results = []
    for task, task_flags in TASKS.items():
        for variant, block in VARIANTS.items():
            run_dir = os.path.join(args.output_dir, f"{task.split()[0]}_{block.replace(',', 'x')}")
            start = time.perf_counter()
            summary = train_nbp(["--train_data", args.tokens, "--output_dir", run_dir, "--tokenizer", args.tokenizer,
                                 "--block_shape", block, "--num_layers", str(args.num_layers), "--hidden_size",
                                 str(args.hidden_size), "--num_heads", "8", "--dropout", "0.0", "--max_steps",
                                 str(args.max_steps), "--train_batch_size", str(args.batch_size), "--learning_rate",
                                 "1e-3", "--warmup_steps", str(min(50, args.max_steps // 10)), "--lr_min", "1e-4", "--seed", str(args.seed),
                                 "--checkpointing_steps", str(args.max_steps), "--report_to", "none",
                                 "--mixed_precision", "no", "--resume_from_checkpoint", "latest", *task_flags,
                                 *(["--validation_data", args.validation_tokens] if args.validation_tokens else [])])
            train_s = time.perf_counter() - start
            pipe = NBPVideoPipeline.from_pretrained(os.path.join(run_dir, "final"))
            pipe.set_progress_bar_config(disable=True)
            videos, seconds = generate(pipe, task, real, args.num_videos, args.seed)
            # the real set's features are cached under a hash of its videos: a rerun with another --num_videos
            # into the same folder must not score against the last run's set
            score = fvd.fvd(videos.float(), real, num_repeats=args.fvd_repeats, num_samples=args.fvd_samples,
                            seed=args.seed)
            layout = pipe.transformer.layout
            context = pipe.transformer.config.num_context_frames
            given = 0 if task == "class-conditional" else layout.context_tokens(context)
            steps = len(layout.decode_schedule(given))
            results.append(dict(task=task, variant=variant, steps=steps, seconds_per_video=seconds,
                                train_minutes=train_s / 60, train_loss=summary.get("train_loss"),
                                val_loss=summary.get("val_loss"), fvd_mean=score["mean"], fvd_std=score["std"]))
            print(results[-1], flush=True)

    args.docs_dir = args.docs_dir or args.output_dir
    os.makedirs(args.docs_dir, exist_ok=True)
    with atomic_output_path(os.path.join(args.output_dir, "results.json")) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    bar_chart(results, os.path.join(args.docs_dir, "nbp_vs_ntp.png"))
    lines = ["| task | variant | steps/video | s/video (CPU) | train loss | held-out loss | FVD (mean +- std) |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    for r in results:
        lines.append(f"| {r['task']} | {r['variant']} | {r['steps']} | {r['seconds_per_video']:.3f} | "
                     f"{fmt(r['train_loss'])} | {fmt(r['val_loss'])} | {r['fvd_mean']:.1f} +- {r['fvd_std']:.1f} |")
    with atomic_output_path(os.path.join(args.docs_dir, "nbp_vs_ntp_table.md")) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
