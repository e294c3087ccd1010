"""`nbp`: the command line of nbp-video. `nbp <command> --help` explains each command."""

import argparse
import os
import sys

COMMANDS = {
    "generate": "generate videos with a pipeline folder or Hub repo and write MP4/GIF files and a contact sheet",
    "demo": "generate every class of the bundled moving-digits model, and a frame-prediction example (no download)",
    "train": "train an NBP generator with Accelerate (see examples/train_nbp.py)",
    "train-tokenizer": "train a video tokenizer with Accelerate (see examples/train_tokenizer.py)",
    "pretokenize": "run a video tokenizer over a video dataset once and store the token grids",
    "make-digits": "write the procedural moving-digits dataset as video files (folder layout)",
    "convert": "convert the official NBP checkpoints into a pipeline folder",
    "evaluate": "FVD (and PSNR/SSIM for reconstructions) between two sets of videos",
    "bench": "time NBP against NTP generation side by side",
}


def _generate_parser(parser):
    from .training.common import positive_int

    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--class_labels", nargs="*", default=None,
                        help="class ids or names (default: every class of a class-conditional model)")
    parser.add_argument("--context", default=None,
                        help="video file whose first frames are continued (frame prediction models)")
    parser.add_argument("--context_frames", type=int, default=None,
                        help="how many frames of --context to give (default: the model's num_context_frames)")
    parser.add_argument("--num_videos_per_class", type=positive_int, default=1)
    parser.add_argument("--num_frames", type=positive_int, default=None,
                        help="frames per video (default: the model's window; more are made by windows that each "
                             "continue the last frames, see NBPVideoPipeline.__call__)")
    parser.add_argument("--window_context_frames", type=positive_int, default=None,
                        help="with --num_frames beyond the window: the frames each further window continues "
                             "(default: the model's context latent frames, at least 2)")
    parser.add_argument("--seed", type=int, default=0)
    sampling = parser.add_argument_group(
        "sampling", "defaults: the model's generation_config, else the paper's (top-k 16000, top-p 0.9, temperature 1, "
        "no guidance)")
    sampling.add_argument("--guidance_scale", type=float, help="classifier-free guidance (1 = off)")
    sampling.add_argument("--top_k", type=int, help="0 = off")
    sampling.add_argument("--top_p", type=float, help="1 = off")
    sampling.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--formats", nargs="+", default=["mp4", "gif"], choices=["mp4", "gif"])
    parser.add_argument("--output_dir", default="outputs/generate")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weights dtype (auto: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="generate at most this many videos at once (default: all; the videos do not change)")


def _cuda():
    import torch

    return torch.cuda.is_available()


def run_generate(args):
    import torch

    from . import NBPVideoPipeline
    from .video_io import export_to_gif, export_to_mp4, make_contact_sheet, read_video

    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device.startswith("cuda") else "float32")
    pipe = NBPVideoPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, dtype)).to(args.device)
    cfg = pipe.transformer.config
    kwargs = dict(guidance_scale=args.guidance_scale, top_k=args.top_k, top_p=args.top_p,
                  temperature=args.temperature, num_frames=args.num_frames,
                  context_frames=args.window_context_frames, output_type="np")
    if args.context:
        frames, _ = read_video(args.context)
        n = args.context_frames or pipe.video_tokenizer.num_frames_for_latent(max(cfg.num_context_frames, 1))
        if len(frames) < n:
            raise SystemExit(f"--context has {len(frames)} frames; {n} are needed")
        kwargs["video"] = frames[:n]
        if cfg.condition_mode == "class":  # a class-conditional model continues the frames as one given class
            if not args.class_labels or len(args.class_labels) != 1:
                raise SystemExit("--context with a class-conditional model needs one --class_labels: the class the "
                                 f"continuation is conditioned on (got {args.class_labels})")
            kwargs["class_labels"] = pipe._class_ids(args.class_labels)
        names = [f"continuation_{i}" for i in range(args.num_videos_per_class)]
    elif cfg.condition_mode == "class":
        labels = args.class_labels or list(range(cfg.num_classes))
        ids = pipe._class_ids(labels)
        names = [f"{pipe.class_names[i] if pipe.class_names else i}_{k}" for i in ids
                 for k in range(args.num_videos_per_class)]
        kwargs.update(class_labels=ids, num_videos_per_prompt=args.num_videos_per_class)
    else:
        names = [f"video_{k}" for k in range(args.num_videos_per_class)]
        kwargs["batch_size"] = args.num_videos_per_class
    n_videos = len(names)
    generators = [torch.Generator(args.device).manual_seed(args.seed + i) for i in range(n_videos)]
    videos = []
    step = args.batch_size or n_videos  # each video has its own generator: batching does not change it
    for start in range(0, n_videos, step):
        part = dict(kwargs, generator=generators[start:start + step])
        if "video" in part:  # continuations of the one context video (with its one class, if any)
            part.update(num_videos_per_prompt=len(part["generator"]))
        elif "class_labels" in part:  # videos are ordered class by class, num_videos_per_class each
            videos_here = range(start, min(start + step, n_videos))
            part.update(class_labels=[kwargs["class_labels"][i // args.num_videos_per_class] for i in videos_here],
                        num_videos_per_prompt=1)
        else:
            part.update(batch_size=len(part["generator"]))
        videos.extend(pipe(**part).frames)
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    for name, video in zip(names, videos):
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(name))
        for fmt in args.formats:
            path = os.path.join(args.output_dir, f"{safe}.{fmt}")
            (export_to_mp4 if fmt == "mp4" else export_to_gif)(video, path, fps=args.fps)
            written.append(path)
    sheet = os.path.join(args.output_dir, "contact_sheet.png")
    make_contact_sheet(list(videos), sheet, labels=[str(n) for n in names])
    written.append(sheet)
    for path in written:
        print(path)
    return written


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="nbp", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=name == "generate")
        if name == "generate":
            _generate_parser(p)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose one of {list(COMMANDS)}")
    if command == "generate":
        run_generate(parser.parse_args(argv))
        return 0
    # the other commands own their argument parsers
    if command == "demo":
        from .demo import main as run
    elif command == "train":
        from .training.train_nbp import main as run
    elif command == "train-tokenizer":
        from .training.train_tokenizer import main as run
    elif command == "pretokenize":
        from .data.pretokenize import main as run
    elif command == "make-digits":
        from .data.moving_digits import main as run
    elif command == "convert":
        from .conversion.cli import main as run
    elif command == "evaluate":
        from .evaluation.fvd import main as run
    else:
        from .bench import main as run
    run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
