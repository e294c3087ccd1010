"""`nbp demo` / `make demo`: videos of every class from the bundled moving-digits model, with no download.

Writes, under --output_dir: `<class>.gif` and `<class>.mp4` for every class, `contact_sheet.png` (one row per video,
one column per frame, every class), and the frame-prediction example `frame_prediction.png` / `.gif` (held-out clips:
the true clip above the model's continuation of its first 5 frames), `long_video.gif` (53 frames, three classes side by
side: windows of 17 frames that each continue the last 5), then prints the paths.
"""

import argparse
import os
import time

import numpy as np
import torch

from .hub_folders import DEMO_MODEL
from .video_io import safe_file_name

# the dataset the demo models were trained on (the training commands in the README use the same values)
DEMO_DATA = dict(num_frames=17, size=32, digit_size=16, speed_range=(1.0, 2.0), styles_per_class=2)
HELD_OUT_SEED = 12345  # the held-out clips (examples/train_demo.sh; training clips use seed 0)
# sampling of the demo model, stored as its generation_config (so the pipeline's default), and used for another
# --model that saved no sampling: classifier-free guidance (trained with class dropout), a cool temperature
DEMO_SAMPLING = dict(guidance_scale=3.0, temperature=0.8, top_k=100, top_p=0.95)
LONG_VIDEO_FRAMES = 53  # the model's 17 frames and three further windows of 12


def class_file_names(names) -> list[str]:
    """Names for the classes' video files (class names come from the model's config, so any text): each name made
    file-name safe; "<id>_<safe name>" for every class when two would collide, or one is empty or another file's."""
    files = [safe_file_name(str(name)).encode()[:100].decode(errors="ignore") for name in names]  # 100 bytes at most
    if len(set(files)) < len(files) or {"", "frame_prediction", "long_video"} & set(files):
        files = [f"{c}_{name}" for c, name in enumerate(files)]
    return files


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="nbp demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from .training.common import positive_int

    parser.add_argument("--model", default=DEMO_MODEL,
                        help="pipeline folder of a class-conditional moving-digits model (17 frames of 32x32; default: "
                             "the bundled model); `nbp generate` takes any model")
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--videos_per_class", type=positive_int, default=2, help="rows per class in the contact sheet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=positive_int, default=8)
    args = parser.parse_args(argv)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):  # found before, not after, generating
        parser.error(f"--output_dir {args.output_dir} is a file, not a folder")

    from . import NBPVideoPipeline
    from .data import MovingDigits
    from .video_io import export_to_gif, export_to_mp4, make_contact_sheet

    start = time.perf_counter()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pipe = NBPVideoPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    shape = (pipe.transformer.config.condition_mode, pipe.num_frames, pipe.resolution)
    if shape != ("class", DEMO_DATA["num_frames"], (DEMO_DATA["size"], DEMO_DATA["size"])):
        raise SystemExit(f"nbp demo shows class-conditional moving-digits models (17 frames of 32x32, the held-out "
                         f"clips it continues); {args.model} is a {shape[0]!r} model of {shape[1]} frames of "
                         f"{shape[2][0]}x{shape[2][1]}: use `nbp generate --model {args.model}`")
    pipe.set_progress_bar_config(desc="generating", leave=False)
    names = pipe.class_names or [str(i) for i in range(pipe.transformer.config.num_classes)]
    # a model's own sampling wins; one that saved none gets the demo's (guidance only if class dropout trained it)
    saved, cfg = pipe.transformer.generation_config, pipe.transformer.config
    sampling = {}
    if saved.do_sample is None and all(getattr(saved, k, None) is None for k in DEMO_SAMPLING):
        sampling = {k: v for k, v in DEMO_SAMPLING.items() if k != "guidance_scale" or cfg.class_dropout_prob > 0}
    n = args.videos_per_class
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(len(names) * n)]
    videos = pipe(class_labels=list(range(len(names))), num_videos_per_prompt=n, generator=generators,
                  output_type="np", **sampling).frames  # (classes * n, T, H, W, 3)

    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    for c, name in enumerate(class_file_names(names)):
        video = videos[c * n]
        written.append(export_to_gif(video, os.path.join(args.output_dir, f"{name}.gif"), fps=args.fps))
        written.append(export_to_mp4(video, os.path.join(args.output_dir, f"{name}.mp4"), fps=args.fps))
    labels = [names[i // n] for i in range(len(videos))]
    sheet = os.path.join(args.output_dir, "contact_sheet.png")
    make_contact_sheet(list(videos), sheet, labels=labels)
    written.append(sheet)

    # frame prediction on held-out clips: give 5 frames (2 latent frames), generate the other 12
    data = MovingDigits(len(names), seed=HELD_OUT_SEED, **DEMO_DATA)
    clips = torch.stack([data[i]["video"] for i in range(len(names))])  # (B, 3, T, H, W)
    given = pipe.video_tokenizer.num_frames_for_latent(2)
    context = clips[:, :, :given].permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W), the pipeline's "pt" layout
    cont = pipe(class_labels=[data[i]["label"] for i in range(len(names))], video=context,
                generator=[torch.Generator().manual_seed(args.seed + 100 + i) for i in range(len(names))],
                output_type="np", **sampling).frames
    truth = clips.permute(0, 2, 3, 4, 1).numpy()
    rows, row_labels = [], []
    for i in range(len(names)):
        rows += [truth[i], cont[i]]
        row_labels += [f"{names[data[i]['label']]} true", f"{names[data[i]['label']]} pred"]
    fp_sheet = os.path.join(args.output_dir, "frame_prediction.png")
    make_contact_sheet(rows, fp_sheet, labels=row_labels)
    side_by_side = np.concatenate([np.concatenate(list(truth), axis=1), np.concatenate(list(cont), axis=1)], axis=2)
    written += [fp_sheet, export_to_gif(side_by_side, os.path.join(args.output_dir, "frame_prediction.gif"),
                                        fps=args.fps)]

    # longer than the model's 17 frames: further windows each continue the last 5 frames (three classes side by side)
    classes = list(range(min(3, len(names))))
    long = pipe(class_labels=classes, num_frames=LONG_VIDEO_FRAMES, output_type="np", **sampling,
                generator=[torch.Generator().manual_seed(args.seed + 200 + i) for i in classes]).frames
    written.append(export_to_gif(np.concatenate(list(long), axis=2), os.path.join(args.output_dir, "long_video.gif"),
                                 fps=args.fps))
    print(f"nbp demo: {len(names)} classes, {len(videos)} generated + {len(cont)} continued + {len(long)} "
          f"{LONG_VIDEO_FRAMES}-frame videos in {time.perf_counter() - start:.1f} s; given frames 0-{given - 1} in "
          "frame_prediction.*")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
