"""`nbp`: the command line of nbp-video. `nbp <command> --help` explains each command."""

import argparse
import math
import os
import sys

COMMANDS = {
    "generate": "generate videos with a pipeline folder or Hub repo and write MP4/GIF files and a contact sheet",
    "demo": "generate every class of the bundled moving-digits model, and a frame-prediction example (no download)",
    "train": "train an NBP generator with Accelerate (several processes: accelerate launch -m "
             "modeling_nbp.training.train_nbp)",
    "train-tokenizer": "train a video tokenizer with Accelerate (several processes: accelerate launch -m "
                       "modeling_nbp.training.train_tokenizer)",
    "pretokenize": "run a video tokenizer over a video dataset once and store the token grids",
    "make-digits": "write the procedural moving-digits dataset as video files (folder layout)",
    "convert": "convert the official NBP checkpoints into a pipeline folder",
    "check-conversion": "compare a conversion with the official code itself (from a checkout of the official repo)",
    "evaluate": "FVD (and PSNR/SSIM for reconstructions) between two sets of videos",
    "bench": "time NBP against NTP generation side by side",
}


def _finite_number(allowed, wanted: str):
    """argparse type for a finite float for which `allowed(value)` holds; `wanted` words the rule."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and allowed(value)):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    return parse


def _generate_parser(parser):
    from .generation import DECODE_COMPILE_MODES
    from .training.common import non_negative_int, positive_float, positive_int
    from .video_tokenizer import CONV_IMPLEMENTATIONS, NORM_IMPLEMENTATIONS

    parser.add_argument("--model", required=True,
                        help="pipeline folder, Hub repo id (a private one reads the token of `hf auth login` or "
                             "HF_TOKEN; HF_HUB_OFFLINE=1 loads it from the cache), or demo (the bundled moving-digits "
                             "model)")
    parser.add_argument("--revision", default=None,
                        help="with a Hub repo id: the branch, tag or commit id to load (default: main); generate.json "
                             "records the commit loaded, so a resumed run refuses a repo that has changed")
    parser.add_argument("--class_labels", nargs="*", default=None,
                        help="class ids or names (default: every class of a class-conditional model; with --context "
                             "the one class the continuations are conditioned on)")
    parser.add_argument("--context", nargs="+", default=None,
                        help="video files or folders of them (searched recursively): each clip's first frames are "
                             "continued, --num_videos_per_class times (frame prediction)")
    parser.add_argument("--context_frames", type=positive_int, default=None,
                        help="frames of each context clip to give (default: the pixel frames of the model's "
                             "num_context_frames latent frames, else of one block of latent frames: 5 for 2; the "
                             "pipeline's `video`; its `context_frames` is --window_context_frames)")
    parser.add_argument("--resize", default="squash", choices=["squash", "crop"],
                        help="how context and --dataset clips become the model's square frames: squash (whole frames, "
                             "as the official loader and the official models' training data) or crop (shorter side + "
                             "centre crop)")
    parser.add_argument("--context_fps", type=positive_float, default=None,
                        help="resample the context clips to this frame rate first (default: the rate of the model's "
                             "training clips, config.fps: 16 for the K600 models; else their own)")
    parser.add_argument("--num_videos_per_class", type=positive_int, default=1,
                        help="videos per class (or per context clip or --dataset clip, or in all for an "
                             "unconditional model)")
    clips = parser.add_argument_group(
        "evaluation set", "--dataset pairs every video with a clip of a video dataset, as the official evaluation "
        "does: the clip's class (class-conditional models) or the continuation of its first frames; `nbp evaluate "
        "--real-dataset` with the same settings reads the clips as the real set (docs/evaluation.md)")
    clips.add_argument("--dataset", default=None, help="dataset root (class folders, UCF-101 or Kinetics-600 layout)")
    clips.add_argument("--dataset_split", default="train")
    clips.add_argument("--dataset_layout", default="auto", choices=["auto", "folder", "ucf101", "k600"])
    clips.add_argument("--num_clips", type=positive_int, default=None,
                       help="clips: the split's videos in a random order fixed by --clips_seed, repeated until this "
                            "many (default: one per video)")
    clips.add_argument("--clips_seed", type=int, default=0)
    clips.add_argument("--clip_fps", type=positive_float, default=8, help="frame rate of the clips (UCF-101: 8)")
    clips.add_argument("--clip_sampling", default="center", choices=["center", "start", "random"],
                       help="where each clip starts in its video (random: seeded per clip)")
    parser.set_defaults(clip_flags=[s for a in clips._group_actions for s in a.option_strings if s != "--dataset"])

    parser.add_argument("--num_frames", type=positive_int, default=None,
                        help="frames per video (default: the model's window; more are made by windows that each "
                             "continue the last frames, see NBPVideoPipeline.__call__)")
    parser.add_argument("--window_context_frames", type=positive_int, default=None,
                        help="with --num_frames beyond the window: the frames each further window continues "
                             "(default: the model's context latent frames, at least 2; the pipeline's "
                             "context_frames)")
    parser.add_argument("--seed", type=int, default=0,
                        help="each video's generator is seeded from this and the video's name "
                             "(modeling_nbp.generate_videos.name_seed(seed, name): how to make one video again)")
    sampling = parser.add_argument_group(
        "sampling", "defaults: the model's generation_config, else the paper's (top-k 16000, top-p 0.9, temperature 1, "
        "no guidance)")
    sampling.add_argument("--guidance_scale", type=_finite_number(lambda v: v >= 0, "a finite number >= 0"),
                          help="classifier-free guidance (1 = off)")
    sampling.add_argument("--top_k", type=non_negative_int, help="0 = off")
    sampling.add_argument("--top_p", type=_finite_number(lambda v: 0 < v <= 1, "a number in (0, 1]"), help="1 = off")
    sampling.add_argument("--temperature", type=_finite_number(lambda v: v >= 0, "a finite number >= 0"),
                          help="0 = greedy")
    out = parser.add_argument_group("output")
    out.add_argument("--output_dir", default="outputs/generate")
    out.add_argument("--formats", nargs="+", default=["mp4", "gif"], choices=["mp4", "gif", "npy"],
                     help="files per video: MP4 and GIF to watch, npy (uint8 frames, lossless) for an exact FVD "
                          "(nbp evaluate reads MP4 and npy, not GIF)")
    out.add_argument("--fps", type=positive_int, default=None,
                     help="frame rate of the files (default: the clips' rate, --context_fps or --clip_fps with "
                          "--dataset, else the model's config.fps, else 8)")
    out.add_argument("--contact_sheet", type=non_negative_int, default=64,
                     help="contact_sheet.png of the run's first this many videos (0: none; under accelerate launch, "
                          "of the main process's share)")
    out.add_argument("--overwrite", action="store_true",
                     help="remake videos whose files exist (by default a run skips them: rerunning a command resumes "
                          "it); when the folder's generate.json holds other settings, its videos are deleted first")
    parser.add_argument("--device", default=None,
                        help="default: this process's accelerator (cuda:<local rank> under accelerate launch), else "
                             "the CPU")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="weights dtype (auto: bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--batch_size", type=positive_int, default=16,
                        help="videos per pipeline call (the videos do not change with it)")
    speed = parser.add_argument_group(
        "speed", "fast paths (docs/performance.md): the same videos up to float rounding, which may move a sampled "
                 "token; recorded with the other settings")
    speed.add_argument("--compile_decode", default="off", choices=["off", *DECODE_COMPILE_MODES],
                       help="the generator's decode step: torch.compile ('default', 'max-autotune-no-cudagraphs'), "
                            "this project's Triton kernels ('triton', for small batches; CUDA) or its Triton "
                            "attention alone ('triton-attention', for large ones; CUDA)")
    speed.add_argument("--norm_implementation", default="torch", choices=list(NORM_IMPLEMENTATIONS),
                       help="the tokenizer's norms, Swish and padding: PyTorch's modules or two Triton kernels (CUDA)")
    speed.add_argument("--conv_implementation", default="conv3d", choices=list(CONV_IMPLEMENTATIONS),
                       help="the tokenizer's convolutions: 3D ones, or 2D ones over stacked frames (frames2d)")
    parser.add_argument("--num_workers", type=non_negative_int, default=4,
                        help="processes that read context clips ahead of the generation (0: read them in between)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="nbp", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=name == "generate", allow_abbrev=False)
        if name == "generate":
            _generate_parser(p)
            generate_parser = p
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        parser.error(f"unknown command {command!r}; choose one of {list(COMMANDS)}")
    if command == "generate":
        from .demo import DEMO_MODEL
        from .generate_videos import run_generate

        args = parser.parse_args(argv)
        needs = {**{flag: ("--dataset", args.dataset) for flag in args.clip_flags},  # flag -> what reads it
                 "--context_frames": ("--context or --dataset", args.context or args.dataset),
                 "--context_fps": ("--context", args.context or args.dataset)}  # with --dataset: refused later
        for flag, (reader, present) in needs.items():
            if not present and any(word == flag or word.startswith(flag + "=") for word in rest):
                generate_parser.error(f"{flag} would be ignored: only {reader} reads it")
        if args.model == "demo" and not os.path.isfile(os.path.join("demo", "model_index.json")):  # a pipeline
            # folder of that name comes first (not, say, the output folder of `nbp demo --output_dir demo`)
            args.model = DEMO_MODEL
        run_generate(args, usage_error=generate_parser.error)
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
    elif command == "check-conversion":
        from .conversion.check_official import main as run
    elif command == "evaluate":
        from .evaluation.fvd import main as run
    else:
        from .bench import main as run
    sys.argv[0] = f"nbp {command}"  # the usage line of parsers that take their name from it (train, train-tokenizer)
    status = run(rest)
    return status if isinstance(status, int) else 0  # an exit status (check-conversion: 1 when a check fails)


if __name__ == "__main__":
    sys.exit(main())
