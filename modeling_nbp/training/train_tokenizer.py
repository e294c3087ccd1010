"""Train an NBP video tokenizer (causal 3D CNN + FSQ) on pixels.

    accelerate launch -m modeling_nbp.training.train_tokenizer --train_data /data/UCF-101 --preset ucf \\
        --output_dir runs/tok
    accelerate launch -m modeling_nbp.training.train_tokenizer --dataset moving_digits --num_clips 2000 \\
        --resolution 64 --base_channels 32 --channel_multipliers 1,2,2 --layers_per_block 1 --time_strides 2,2 \\
        --space_strides 2,2 --fsq_levels 8,5,5,5 --patch_size 2 --output_dir runs/tok_digits

(`examples/train_tokenizer.py` in a checkout of the repository, or `nbp train-tokenizer ...` in one process.)

Loss: L1 + L2 reconstruction, + perceptual (--perceptual_model: no perceptual weights ship with nbp-video and
none are downloaded, so it is off unless you give a network), + PatchGAN adversarial loss from
--disc_start_step on. Adam with linear warmup (1% of the steps by default) and linear decay, as in the paper's
Table 5. PSNR / SSIM on held-out clips are printed every --eval_steps and at the end.

From the paper (Table 5, set by --preset): Adam, batch 256, the learning rate, the linear schedule with 1% warmup,
perceptual and adversarial weights 0.1, a PatchGAN discriminator. The official code releases no tokenizer trainer,
so the rest is this script's own choice: L1 + L2 (weights 1) on [0, 1] pixels, the perceptual distance over every
frame, the hinge loss, a 3D PatchGAN with GroupNorm, a fixed adversarial weight (no adaptive weight, gradient
penalty or LeCam term), the GAN from 20% of the steps, the discriminator at the tokenizer's learning rate and
schedule, Adam betas (0.9, 0.99), gradient clipping at 1.0, no EMA. FSQ has no commitment or entropy loss (the
official model has none either).

Outputs in --output_dir: checkpoint-<step>/ (resume with --resume_from_checkpoint), train_log.jsonl, logs/
(TensorBoard), samples/ (held-out clips above their reconstructions) and final/ (the tokenizer folder, loadable
with NBPVideoTokenizer.from_pretrained, and training_clips.json: the clip settings it was trained on, which
`nbp pretokenize` takes as its defaults).

--init_from fine-tunes a pretrained tokenizer (a tokenizer or pipeline folder, or a Hub repo id of either) instead
of training a new one; the discriminator still starts fresh. Each clip flag (--num_frames, --resolution, --fps,
--resize) takes, in this order: its value on the command line, else --preset's, else the --init_from tokenizer's
training clips (its training_clips.json), else the default shown; a value that differs from those training clips is
warned about.
"""

import argparse
import hashlib
import logging
import math
import os
import time

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, gather_object

from ..data import MovingDigits, VideoClipDataset, collate_videos, load_video_dataset, SkipSummary
from ..data.pretokenize import CLIP_FLAG_DEFAULTS, TRAINING_CLIPS_FILE, tokenizer_folder
from ..data.pretokenize import training_clips as recorded_training_clips
from ..evaluation.reconstruction import SSIM_WINDOW_SIZE, psnr, ssim
from ..pipelines.pipeline_nbp_video import upload_to_hub
from ..run_files import write_json
from ..video_io import atomic_output_path, decoding_workers
from ..video_tokenizer import NBPVideoTokenizer
from . import common
from .optim import SCHEDULES, follow_schedule, lr_at_step
from .presets import TOKENIZER_PRESETS, parse_with_preset
from .tokenizer_losses import (DISCRIMINATOR_KINDS, GAN_LOSSES, PatchDiscriminator, adversarial_active,
                               discriminator_loss, generator_adversarial_loss, load_perceptual_model,
                               reconstruction_loss)

logger = logging.getLogger(__name__)


DEFAULT_BATCH_SIZE = 8  # clips per process and micro-step


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--train_data", help="video dataset root (folder of class folders, UCF-101 or Kinetics layout)")
    g.add_argument("--dataset", choices=["folder", "moving_digits"], default="folder",
                   help="moving_digits: the built-in procedural dataset (no files needed)")
    g.add_argument("--layout", default="auto", help="--train_data layout: auto, folder, ucf101, k600")
    g.add_argument("--num_clips", type=int, default=1000, help="moving_digits: training clips")
    g.add_argument("--validation_data", help="held-out video root (all of it is held out); default: "
                   "--num_eval_clips training videos spread over the classes are held out (moving_digits: separate "
                   "clips)")
    g.add_argument("--validation_split", default="test", help="--validation_data's split")
    g.add_argument("--num_eval_clips", type=int, default=16, help="held-out clips, without --validation_data")
    # None: not given (see `fill_clip_flags`)
    clip_default = "default: --preset's, else the --init_from tokenizer's training clips, else"
    g.add_argument("--num_frames", type=int, help=f"{clip_default} {CLIP_FLAG_DEFAULTS['num_frames']}")
    g.add_argument("--resolution", type=int, help=f"{clip_default} {CLIP_FLAG_DEFAULTS['resolution']}")
    g.add_argument("--fps", type=float, help=f"{clip_default} {CLIP_FLAG_DEFAULTS['fps']}")
    g.add_argument("--resize", choices=["squash", "crop"],
                   help="squash: whole frames to the square (the official loader); crop: shorter side + centre crop; "
                        f"{clip_default} {CLIP_FLAG_DEFAULTS['resize']}")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--dataloader_num_workers", type=common.non_negative_int, default=4,
                   help="at most as many as this process may use CPUs")
    g = p.add_argument_group("tokenizer (--init_from, --tokenizer_config or the size flags; defaults: the official "
                             "370M tokenizer)")
    g.add_argument("--preset", choices=sorted(TOKENIZER_PRESETS), help="paper Table 5 setting (flags override its values)")
    g.add_argument("--init_from", metavar="SOURCE",
                   help="fine-tune this pretrained NBPVideoTokenizer: a tokenizer folder, a pipeline folder (its "
                        "video_tokenizer/), a Hub repo id of either (only the tokenizer's files are downloaded), or "
                        "demo (the bundled moving-digits model's). "
                        "The discriminator starts fresh (a tokenizer folder holds none). Clip flags that neither the "
                        "command line nor --preset sets default to the clips it was trained on. A resume takes the "
                        "weights from its checkpoint, and needs the same --init_from")
    g.add_argument("--init_from_revision", help="with a Hub repo id: its branch, tag or commit (default: main)")
    g.add_argument("--tokenizer_config", help="NBPVideoTokenizer config.json (or its folder)")
    # None: not given (`check_model_flags` then sets SIZE_DEFAULTS)
    g.add_argument("--base_channels", type=int, help="default 128")
    g.add_argument("--channel_multipliers", type=common.int_list, help="width of each level / base; default 1,2,2,4")
    g.add_argument("--layers_per_block", type=common.int_list, help="one value or one per level; default 4,4,4,8")
    g.add_argument("--time_strides", type=common.int_list, help="time factor (1 or 2) between levels; default 1,2,2")
    g.add_argument("--space_strides", type=common.int_list, help="space factor (1 or 2) between levels; default 2,2,2")
    g.add_argument("--fsq_levels", type=common.int_list, help="default 8,8,8,5,5,5")
    g.add_argument("--norm_num_groups", type=int, help="default 32")
    g.add_argument("--patch_size", type=int, help="default 1")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g = p.add_argument_group("losses")
    g.add_argument("--l1_weight", type=float, default=1.0)
    g.add_argument("--l2_weight", type=float, default=1.0)
    g.add_argument("--perceptual_model", default="none",
                   help="'none' (default: no perceptual weights ship with nbp-video or are downloaded), a "
                        "torch.export .pt2 file, a TorchScript file, or 'package.module:factory'; the network maps "
                        "two (N, 3, H, W) image batches in [-1, 1] to one distance per image (LPIPS convention)")
    g.add_argument("--perceptual_weight", type=float, default=0.1)
    g.add_argument("--adversarial_weight", type=float, default=0.1,
                   help="0: no GAN (no discriminator is built, trained or saved)")
    g.add_argument("--disc_start_step", type=int,
                   help="optimizer steps without the GAN (default 20%% of --max_steps; on a resume, the checkpoint's)")
    g.add_argument("--gan_loss", choices=GAN_LOSSES, default="hinge")
    g.add_argument("--discriminator", choices=DISCRIMINATOR_KINDS, default="3d")
    g.add_argument("--disc_base_channels", type=int, default=64)
    g.add_argument("--disc_num_layers", type=int, default=3)
    g = p.add_argument_group("optimization")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--disc_learning_rate", type=float, help="default --learning_rate")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.99)
    g.add_argument("--lr_schedule", choices=SCHEDULES, default="linear")
    g.add_argument("--warmup_steps", type=int,
                   help="default 1%% of --max_steps (paper Table 5; on a resume, the checkpoint's)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip each model's gradient norm (0: no clipping)")
    g.add_argument("--max_steps", type=int, default=10_000)
    common.add_batch_arguments(g, DEFAULT_BATCH_SIZE)
    g = p.add_argument_group("checkpoints, logging, hub")
    common.add_checkpoint_arguments(g)
    g.add_argument("--eval_steps", type=common.non_negative_int, default=0,
                   help="PSNR/SSIM every N steps (0: at the end only)")
    g.add_argument("--num_log_videos", type=common.non_negative_int, default=4,
                   help="held-out reconstructions saved at each eval")
    common.add_tracking_arguments(g, "nbp-tokenizer")
    return p


# the flags that shape the tokenizer when neither --init_from nor --tokenizer_config is given: the official 370M size
SIZE_DEFAULTS = dict(base_channels=128, channel_multipliers=[1, 2, 2, 4], layers_per_block=[4, 4, 4, 8],
                     time_strides=[1, 2, 2], space_strides=[2, 2, 2], fsq_levels=[8, 8, 8, 5, 5, 5], norm_num_groups=32,
                     patch_size=1)
SIZE_FLAGS = tuple(SIZE_DEFAULTS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_preset(parser, argv, TOKENIZER_PRESETS, "tokenizer")
    if (args.dataset == "folder") != (args.train_data is not None):
        raise ValueError("give --train_data (a video folder) or --dataset moving_digits, not both or neither")
    check_data_flags(parser, args)
    check_model_flags(args)
    if args.init_from_revision is not None and not args.init_from:
        raise ValueError("--init_from_revision is a version of --init_from's Hub repo; give --init_from")
    fill_clip_flags(parser, args)
    for key in ("max_steps", "num_eval_clips", "num_frames", "resolution"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(args, key)}")
    # defaults that are shares of --max_steps: a resume keeps the checkpoint's (`common.keep_resumed_defaults`)
    args._from_max_steps = [k for k in ("warmup_steps", "disc_start_step") if getattr(args, k) is None]
    if args.warmup_steps is None:
        args.warmup_steps = args.max_steps // 100
    if not 0 <= args.warmup_steps <= args.max_steps:
        source = f" (with --preset {args.preset})" if args.preset else ""
        raise ValueError(f"--warmup_steps {args.warmup_steps}{source} must lie in [0, --max_steps {args.max_steps}]")
    if args.resolution < SSIM_WINDOW_SIZE:
        raise ValueError(f"--resolution must be >= {SSIM_WINDOW_SIZE}: the held-out SSIM uses a "
                         f"{SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} window; got {args.resolution}")
    if args.disc_start_step is None:
        args.disc_start_step = args.max_steps // 5
    if args.disc_start_step < 0:
        raise ValueError(f"--disc_start_step must be >= 0, got {args.disc_start_step}")
    if args.max_grad_norm < 0:
        raise ValueError(f"--max_grad_norm must be >= 0 (0: no clipping), got {args.max_grad_norm}")
    if args.disc_learning_rate is None:
        args.disc_learning_rate = args.learning_rate
    if args.disc_learning_rate < 0:
        raise ValueError(f"--disc_learning_rate must be >= 0 (0: the discriminator stays as it is), got "
                         f"{args.disc_learning_rate}")
    for key in ("l1_weight", "l2_weight", "perceptual_weight", "adversarial_weight"):
        if not getattr(args, key) >= 0:  # negative: trains towards that loss's maximum (or turns off the GAN)
            raise ValueError(f"--{key} must be >= 0 (0: leave that loss out), got {getattr(args, key)}")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    return args


def check_data_flags(parser, args) -> None:
    """Refuse data flags given (set to other than their default) that the chosen data would ignore."""
    moving_digits, held_out_data = args.dataset == "moving_digits", args.validation_data is not None
    rules = [(moving_digits, ("validation_data", "validation_split", "fps", "layout", "resize"),
              "these flags are read for video folders (--train_data), not --dataset moving_digits"),
             (not moving_digits, ("num_clips",), "only --dataset moving_digits reads it"),
             (not moving_digits and not held_out_data, ("validation_split",), "only --validation_data reads it"),
             (held_out_data, ("num_eval_clips",), "--validation_data is held out whole")]
    for applies, flags, why in rules:
        given = [f"--{k}" for k in flags if applies and getattr(args, k) != parser.get_default(k)]
        if given:
            raise ValueError(f"{', '.join(given)} would be ignored: {why}")


def check_model_flags(args) -> None:
    """--init_from or --tokenizer_config defines the tokenizer: refuse the size flags given beside it, which would be
    ignored; the others take `SIZE_DEFAULTS`."""
    if args.init_from:
        source, flags, what = "init_from", ("tokenizer_config", *SIZE_FLAGS), "whose pretrained tokenizer is the model"
    elif args.tokenizer_config:
        source, flags, what = "tokenizer_config", SIZE_FLAGS, "which defines the tokenizer"
    else:
        source = None
    given = [f"--{k}" for k in flags if getattr(args, k) is not None] if source else []
    if given:
        raise ValueError(f"{', '.join(given)} cannot be combined with --{source}, {what}")
    for name, default in SIZE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def fill_clip_flags(parser, args) -> None:
    """Resolve --init_from (`args.init_folder`: its local tokenizer folder, or None) and set the clip flags that
    neither the command line nor --preset set: to the clips that tokenizer was trained on (`TRAINING_CLIPS_FILE`),
    else to `CLIP_FLAG_DEFAULTS`; a set one that differs from those training clips is warned about."""
    args.init_folder, recorded, warn = None, {}, False
    if args.init_from:
        if os.path.isdir(args.init_from):  # kept with the run's settings: the same folder from any directory
            args.init_from = os.path.abspath(args.init_from)
        state = PartialState(cpu=common.use_cpu(args.cpu))
        with state.main_process_first():  # a Hub id is downloaded by one process, then found in the cache
            try:
                args.init_folder = tokenizer_folder(args.init_from, args.init_from_revision)
            except OSError as error:  # no such folder, or a Hub repo that could not be downloaded
                raise type(error)(f"--init_from: {error}") from error
        recorded, warn = recorded_training_clips(args.init_folder), state.is_main_process
    # moving digits are made at the clip size: no frame rate or resizing
    read = ("num_frames", "resolution") if args.dataset == "moving_digits" else tuple(CLIP_FLAG_DEFAULTS)
    for key, default in CLIP_FLAG_DEFAULTS.items():
        value = getattr(args, key)
        if value is None:
            setattr(args, key, recorded.get(key, default) if key in read else default)
        elif warn and key in read and key in recorded and value != recorded[key]:
            source = f" (--preset {args.preset})" if args.preset and value == parser.get_default(key) else ""
            logger.warning("--%s %s%s differs from the clips the --init_from tokenizer was trained on (%s %s in %s)",
                           key, value, source, key, recorded[key], os.path.join(args.init_folder, TRAINING_CLIPS_FILE))


def build_tokenizer(args) -> NBPVideoTokenizer:
    if args.init_from:
        tokenizer = NBPVideoTokenizer.from_pretrained(args.init_folder, torch_dtype=torch.float32)
        # final/config.json names the source (diffusers' own record would be the resolved, possibly cached, folder)
        tokenizer.register_to_config(_name_or_path=args.init_from)
        return tokenizer
    if args.tokenizer_config:
        return NBPVideoTokenizer.from_config(NBPVideoTokenizer.load_config(args.tokenizer_config))
    levels = len(args.channel_multipliers)
    units = args.layers_per_block * levels if len(args.layers_per_block) == 1 else args.layers_per_block
    if len(args.time_strides) != levels - 1 or len(args.space_strides) != levels - 1:
        raise ValueError(f"--time_strides and --space_strides need {levels - 1} values (levels - 1) for "
                         f"--channel_multipliers {args.channel_multipliers}")
    return NBPVideoTokenizer(
        block_out_channels=tuple(args.base_channels * m for m in args.channel_multipliers),
        layers_per_block=tuple(units), downsample_strides=tuple(zip(args.time_strides, args.space_strides)),
        fsq_levels=tuple(args.fsq_levels), norm_num_groups=args.norm_num_groups, patch_size=args.patch_size)


def data_settings(args) -> dict:
    """What decides the training clips, kept in every checkpoint and checked when a run resumes (from a video folder,
    --num_eval_clips videos spread over its classes are held out unless there is --validation_data)."""
    settings = dict(dataset=args.dataset, num_frames=args.num_frames, resolution=args.resolution)
    if args.dataset == "moving_digits":
        return dict(settings, num_clips=args.num_clips)
    return dict(settings, train_data=os.path.abspath(args.train_data), layout=args.layout, fps=args.fps,
                resize=args.resize, num_eval_clips=args.num_eval_clips, held_out="spread",
                validation_data=args.validation_data and os.path.abspath(args.validation_data))


def training_clips(args) -> dict:
    """The clip settings saved beside the final weights, `nbp pretokenize`'s defaults for this tokenizer (moving digits
    have no frame rate or resizing)."""
    return {k: v for k, v in data_settings(args).items() if k in CLIP_FLAG_DEFAULTS}


def build_datasets(args):
    """(train, held-out) map-style datasets of {"video": (3, T, H, W) in [0, 1], "label"} items."""
    if args.dataset == "moving_digits":
        clip = dict(num_frames=args.num_frames, size=args.resolution, digit_size=max(1, args.resolution * 3 // 8))
        # held-out clips come from another seed, so they are different clips
        return (MovingDigits(args.num_clips, seed=args.seed, **clip),
                MovingDigits(args.num_eval_clips, seed=args.seed + 1, **clip))
    clip = dict(num_frames=args.num_frames, resolution=args.resolution, fps=args.fps, resize=args.resize)
    train = load_video_dataset(args.train_data, args.layout, split="train", **clip)
    if args.validation_data:
        return train, load_video_dataset(args.validation_data, args.layout, split=args.validation_split,
                                         sampling="center", **clip)
    if len(train) <= args.num_eval_clips:
        raise ValueError(f"{args.train_data} has {len(train)} videos, not more than --num_eval_clips "
                         f"{args.num_eval_clips}; pass --validation_data or hold out fewer clips")
    held = held_out_videos(len(train), args.num_eval_clips)
    kept = sorted(set(range(len(train))) - set(held))
    # the held-out clips read the same window at every evaluation (training reads random ones)
    return (VideoClipDataset(train.index.select(kept), sampling=train.sampling, **clip),
            VideoClipDataset(train.index.select(held), sampling="center", **clip))


def held_out_videos(num_videos: int, num_held: int) -> list[int]:
    """Indices of `num_held` videos spread evenly over the index (sorted by class, then path), so the held-out
    clips come from across the classes, not from the last ones."""
    return [(2 * i + 1) * num_videos // (2 * num_held) for i in range(num_held)]


def check_readable_data(train_data, eval_data, args) -> None:
    """Training needs a readable clip (unreadable ones are skipped: with none, every step would train on nothing),
    and the evaluation at the end of the run a readable held-out one: checked before training (decoding up to the
    first one that reads), not once every step is trained."""
    if args.dataset == "folder" and all(train_data[(i, 0)]["video"] is None for i in range(len(train_data))):
        raise ValueError(f"no training clip could be decoded: no video of --train_data {args.train_data} reads; pass "
                         "a folder with readable videos")
    if any(eval_data[i]["video"] is not None for i in range(len(eval_data))):
        return
    if args.validation_data:
        raise ValueError(f"no held-out clip could be decoded: no video of --validation_data {args.validation_data} "
                         f"(split {args.validation_split!r}) reads; pass one with readable videos")
    raise ValueError(f"no held-out clip could be decoded: none of the --num_eval_clips {args.num_eval_clips} "
                     f"videos held out of --train_data {args.train_data} reads; hold out more (--num_eval_clips) or pass "
                     "--validation_data")


def check_discriminator_input(args) -> None:
    """A training clip must pass the discriminator, whose strided convolutions need a minimum frame size: checked
    on the meta device before training (no compute), not when the GAN starts."""
    with torch.device("meta"):
        probe = PatchDiscriminator(3, args.disc_base_channels, args.disc_num_layers, args.discriminator)
        try:
            probe(torch.empty(1, 3, args.num_frames, args.resolution, args.resolution))
        except RuntimeError as error:
            raise ValueError(f"--resolution {args.resolution} is too small for the {args.discriminator} "
                             f"discriminator with --disc_num_layers {args.disc_num_layers}: raise the resolution or "
                             f"lower --disc_num_layers ({error})") from None


def videos_digest(data: VideoClipDataset, root: str) -> str:
    """A digest of the training videos of a folder (their paths under `root` and labels, in order): other videos in
    the same folder move the held-out ones and the data order."""
    index = data.index
    listing = "\n".join(f"{os.path.relpath(p, root).replace(os.sep, '/')}\t{label}"  # the same on every system
                        for p, label in zip(index["path"], index["label"]))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def resume_settings(args, tokenizer, videos: str | None = None) -> dict:
    """What a resume takes from the checkpoint (clips and the training videos (`videos_digest`), data order, model and
    the --init_from it started from, optimizers, the GAN's start), kept in every checkpoint: a resume asking for
    others is refused (`common.check_resume_settings`)."""
    adversarial = args.adversarial_weight > 0
    # without the GAN its settings are unused (the default start moves with --max_steps, which a resume may raise)
    gan = dict(disc_learning_rate=args.disc_learning_rate,
               disc_start_step=args.disc_start_step) if adversarial else {}
    data = dict(data_settings(args), **({"videos": videos} if videos else {}))
    return {"seed": args.seed, "data": data, "init_from": args.init_from,
            "tokenizer": {k: v for k, v in tokenizer.config.items() if not k.startswith("_")},
            "optimization": dict(learning_rate=args.learning_rate, adam_betas=[args.adam_beta1, args.adam_beta2],
                                 discriminator=adversarial, **gan),
            # its length is --max_steps, which a resume may raise (the schedule then stretches from the resumed step)
            "schedule": dict(lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps)}


def adam(params, lr: float, args) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2))


def lambda_schedule(optimizer, args, offset: int = 0):
    """Per-update lr factor; `offset` = the global step of the optimizer's first update."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_at_step(
        i + offset, 1.0, args.max_steps, args.warmup_steps, args.lr_schedule))


def step_optimizers(accelerator, pairs, max_grad_norm: float) -> None:
    """At the last micro-batch of a step, once every loss is backpropagated: clip each (model, optimizer) pair's
    gradients and step its optimizer. Under fp16 both share Accelerate's one GradScaler: each optimizer is unscaled
    by the scale its micro-batches were scaled by, and the scale updates once, after both steps
    (`AcceleratedOptimizer.step` updates it after each, so the other optimizer would meet the next scale)."""
    if not accelerator.sync_gradients:  # accumulating (an AcceleratedOptimizer neither steps nor zeroes then)
        return
    scaler = accelerator.scaler
    for model, optimizer in pairs:
        if scaler is not None:
            scaler.unscale_(optimizer.optimizer)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    for _, optimizer in pairs:
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer.optimizer)  # skipped when a gradient is not finite
        optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()


@torch.no_grad()
def evaluate(accelerator, tokenizer, eval_data, batch_size: int, step: int, output_dir: str,
             num_log_videos: int, num_workers: int = 0) -> dict:
    """PSNR / SSIM of reconstructions of the held-out clips; every process must call this. Each process scores a
    contiguous share of the clips and the sums are reduced, so a large held-out set takes 1 / processes of the time
    (the others do not wait on the main one); the main process saves the first reconstructions as videos (each clip
    above its reconstruction), the same clips whatever the number of processes."""
    tokenizer = common.bare_model(accelerator, tokenizer)
    share = torch.tensor_split(torch.arange(len(eval_data)), accelerator.num_processes)[accelerator.process_index]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(eval_data, share.tolist()), batch_size=batch_size,
                                         collate_fn=collate_videos, num_workers=num_workers,
                                         worker_init_fn=common.dataloader_worker_init)
    was_training = tokenizer.training
    tokenizer.eval()
    exact = torch.float32 if accelerator.device.type == "mps" else torch.float64  # (Apple GPUs have no float64)
    sums, shown = torch.zeros(3, dtype=exact, device=accelerator.device), []  # PSNR, SSIM, clips
    for batch in loader:
        if batch["video"] is None:
            continue
        video = batch["video"].to(accelerator.device)
        reconstruction = tokenizer(video).reconstruction.float().clamp(0, 1)
        sums += torch.stack([psnr(reconstruction, video).sum().to(exact), ssim(reconstruction, video).sum().to(exact),
                             torch.tensor(len(video), dtype=exact, device=sums.device)])
        shown += [torch.cat([v, r], dim=2).cpu() for v, r in zip(video, reconstruction)][: num_log_videos - len(shown)]
    tokenizer.train(was_training)
    psnr_sum, ssim_sum, count = accelerator.reduce(sums, "sum").tolist()
    if not count:
        raise ValueError("no held-out clip could be decoded")
    # the first readable clips of the held-out set: those of the shares before this one first
    before = accelerator.gather(torch.tensor([len(shown)], device=accelerator.device))[: accelerator.process_index]
    shown = gather_object(shown[: max(0, num_log_videos - int(before.sum()))])
    if shown:
        common.log_videos(accelerator, "reconstruction", torch.stack(shown), step, output_dir)
    return {"psnr": psnr_sum / count, "ssim": ssim_sum / count}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    per_device_batch, accum = common.resolve_batch_layout(
        args.train_batch_size, args.gradient_accumulation_steps, args.global_batch_size,
        PartialState(cpu=common.use_cpu(args.cpu)).num_processes, DEFAULT_BATCH_SIZE)
    accelerator = common.make_accelerator(args, accum)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError("tokenizer training runs on one device or with DDP (multi_gpu / multi_node configs); it "
                         "trains two models (tokenizer and discriminator), which this script does not shard")
    hub_repo = common.prepare_output_dir(accelerator, args)
    resume = common.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    common.keep_resumed_defaults(args, resume, {"warmup_steps": "schedule", "disc_start_step": "optimization"})

    train_data, eval_data = build_datasets(args)
    check_readable_data(train_data, eval_data, args)
    videos = videos_digest(train_data, args.train_data) if args.dataset == "folder" else None
    torch.manual_seed(args.seed)  # same initial weights on every process
    tokenizer = build_tokenizer(args)
    tokenizer.latent_shape(args.num_frames, args.resolution, args.resolution)  # clear error for sizes it can't take
    if args.gradient_checkpointing:
        tokenizer.enable_gradient_checkpointing()
    perceptual = load_perceptual_model(args.perceptual_model)
    if perceptual is not None:
        perceptual = perceptual.to(accelerator.device)
    elif args.preset and args.perceptual_weight and accelerator.is_main_process:
        logger.warning("--preset %s: no perceptual loss without --perceptual_model (e.g. an LPIPS network), so this "
                       "run leaves out the paper's perceptual term (weight %g)", args.preset, args.perceptual_weight)
    opt_g = adam(tokenizer.parameters(), args.learning_rate, args)
    sched_g = lambda_schedule(opt_g, args)
    size = sum(p.numel() for p in tokenizer.parameters()) / 1e6  # before sharding
    described = f"tokenizer {size:.2f}M parameters" + (f" from {args.init_from}" if args.init_from else "")
    adversarial = args.adversarial_weight > 0  # else no discriminator is built, trained or saved
    if adversarial:
        check_discriminator_input(args)
        discriminator = PatchDiscriminator(3, args.disc_base_channels, args.disc_num_layers, args.discriminator)
        opt_d = adam(discriminator.parameters(), args.disc_learning_rate, args)
        # the discriminator's first update is global step disc_start_step: its schedule starts there
        sched_d = lambda_schedule(opt_d, args, offset=args.disc_start_step)
        described += f", discriminator {sum(p.numel() for p in discriminator.parameters()) / 1e6:.2f}M"
        tokenizer, discriminator, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(
            tokenizer, discriminator, opt_g, opt_d, sched_g, sched_d)
        raw_discriminator = common.bare_model(accelerator, discriminator)
    else:
        tokenizer, opt_g, sched_g = accelerator.prepare(tokenizer, opt_g, sched_g)
    models = (tokenizer, discriminator) if adversarial else (tokenizer,)

    log = common.JsonlLog(os.path.join(args.output_dir, "train_log.jsonl"), accelerator.is_main_process)
    global_step = 0
    common.check_run_start(args.output_dir, resume, args.overwrite_output_dir, accelerator.is_main_process)
    if resume:
        # checkpoints from before clips could be squashed were cropped; the held-out flags were kept later
        settings = resume_settings(args, common.bare_model(accelerator, tokenizer), videos)
        later = {k: settings["data"].get(k) for k in ("num_eval_clips", "validation_data", "videos")}
        # and before the held-out videos were spread over the classes, they were the last ones of the index
        earlier = {"resize": "crop", **later, "held_out": "last"}
        state = common.load_checkpoint(accelerator, resume, settings, earlier_defaults={"data": earlier})
        for scheduler in (sched_g, sched_d) if adversarial else (sched_g,):
            follow_schedule(scheduler)
        common.warn_if_global_batch_changed(state, per_device_batch * accum * accelerator.num_processes)
        global_step = state["global_step"]
        # a run that has no step left evaluates its last one again (it may have been killed while evaluating it)
        log.truncate(global_step, redone=("eval_psnr",) if global_step >= args.max_steps else ())
        accelerator.print(f"resumed from {resume} at step {global_step}")
    elif accelerator.is_main_process and os.path.isfile(log.path):
        os.remove(log.path)
    common.init_trackers(accelerator, args, global_step)

    # a video clip's random window is seeded by its place in the data order (moving digits are fixed clips)
    sampler = common.StepBatchSampler(len(train_data), per_device_batch, accelerator.num_processes,
                                      accelerator.process_index, args.seed, start_step=global_step * accum,
                                      accumulation_steps=accum, item_seeds=args.dataset == "folder")
    loader = torch.utils.data.DataLoader(train_data, batch_sampler=sampler, collate_fn=collate_videos,
                                         num_workers=decoding_workers(args.dataloader_num_workers),
                                         worker_init_fn=common.dataloader_worker_init,
                                         pin_memory=accelerator.device.type == "cuda")
    clip_shape = (3, args.num_frames, args.resolution, args.resolution)
    global_batch = per_device_batch * accum * accelerator.num_processes
    accelerator.print(f"{described}; {accelerator.num_processes} process(es) x {per_device_batch} x {accum} "
                      "accumulation")
    skips, meter = SkipSummary(), common.ThroughputMeter()
    # a resumed run with no step left reports the last logged loss
    start_time, record = time.perf_counter(), {"total": log.last("total", math.nan)}

    def run_evaluation() -> dict:
        scores = evaluate(accelerator, tokenizer, eval_data, per_device_batch, global_step, args.output_dir,
                          args.num_log_videos, decoding_workers(args.dataloader_num_workers))
        accelerator.log({f"eval/{k}": v for k, v in scores.items()}, step=global_step)
        log.append({"step": global_step, **{f"eval_{k}": v for k, v in scores.items()}})
        accelerator.print(f"step {global_step}: PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f} "
                          f"({len(eval_data)} held-out clips)")
        return scores

    for model in models:
        model.train()
    batches = iter(loader)
    progress = common.training_progress(accelerator, global_step, args.max_steps)
    while global_step < args.max_steps:
        gan = adversarial and adversarial_active(global_step, args.disc_start_step)
        lr = sched_g.get_last_lr()[0]
        totals, read = {}, 0.0  # loss sums over the micro-batches that held a readable clip, and their count
        for micro in range(accum):
            batch = next(batches)
            skips.update(batch)
            video, weight = batch["video"], 1.0
            if video is None:  # every clip of this micro-batch was unreadable: keep the processes in step
                video, weight = torch.zeros(per_device_batch, *clip_shape), 0.0
            video = video.to(accelerator.device, non_blocking=True)
            common.seed_step(args.seed, global_step * accum + micro, accelerator.process_index)
            with accelerator.accumulate(*models):
                reconstruction = tokenizer(video).reconstruction
                rec, parts = reconstruction_loss(reconstruction, video, args.l1_weight, args.l2_weight)
                loss_g, terms = rec, dict(parts, reconstruction=rec.detach())
                if perceptual is not None and args.perceptual_weight:
                    terms["perceptual"] = perceptual(reconstruction, video)
                    loss_g = loss_g + args.perceptual_weight * terms["perceptual"]
                if gan:
                    raw_discriminator.requires_grad_(False)  # the generator's loss must not train the critic
                    fake = raw_discriminator(reconstruction)
                    terms["g_adversarial"] = generator_adversarial_loss(fake, args.gan_loss)
                    raw_discriminator.requires_grad_(True)
                    loss_g = loss_g + args.adversarial_weight * terms["g_adversarial"]
                accelerator.backward(weight * loss_g)
                if gan:
                    # one forward over real and fake clips (GroupNorm: no clip affects another's score)
                    real, fake = discriminator(torch.cat([video, reconstruction.detach().to(video.dtype)])).chunk(2)
                    terms["discriminator"] = discriminator_loss(real, fake, args.gan_loss)
                    accelerator.backward(weight * terms["discriminator"])
                step_optimizers(accelerator, [(tokenizer, opt_g)] + ([(discriminator, opt_d)] if gan else []),
                                args.max_grad_norm)
            read += weight
            for key, value in dict(terms, total=loss_g).items():
                totals[key] = totals.get(key, 0.0) + weight * value.detach()
        sched_g.step()
        if gan:
            sched_d.step()
        global_step += 1
        progress.update()
        meter.step(global_batch)
        done = global_step == args.max_steps
        if global_step % args.logging_steps == 0 or done:
            record = {"step": global_step, "lr": lr, "clips_per_s": meter.rate}
            all_read = accelerator.reduce(torch.tensor(read, device=accelerator.device), "sum").clamp(min=1)
            record.update({k: (accelerator.reduce(v, "sum") / all_read).item() for k, v in totals.items()})
            log.append(record)
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=global_step)
            progress.set_postfix(loss=f"{record['total']:.4f}", lr=f"{lr:.2e}", refresh=False)
        meter.pause()
        if global_step % args.checkpointing_steps == 0 or done:  # before evaluating: an error there loses no step
            common.save_checkpoint(accelerator, args.output_dir, global_step,
                                   dict(resume_settings(args, common.bare_model(accelerator, tokenizer), videos),
                                        global_batch_size=global_batch),
                                   total_limit=args.checkpoints_total_limit)
        if args.eval_steps and global_step % args.eval_steps == 0 and not done:
            run_evaluation()
        meter.resume()
    progress.close()
    scores = run_evaluation()  # after the loop: also when a resumed run has no step left
    # every process's skipped videos, not the main one's alone
    every_skip = SkipSummary()
    for total, paths in gather_object([(skips.total, skips.skipped_paths)]):
        every_skip.total += total
        every_skip.skipped_paths += paths

    final_dir = os.path.join(args.output_dir, "final")
    if accelerator.is_main_process:
        with atomic_output_path(final_dir) as tmp:
            common.bare_model(accelerator, tokenizer).save_pretrained(tmp)
            write_json(os.path.join(tmp, TRAINING_CLIPS_FILE), training_clips(args), indent=2)
    common.wait_for_everyone_at_exit(accelerator)
    wall = time.perf_counter() - start_time
    if every_skip.num_skipped:
        accelerator.print(str(every_skip))
    accelerator.print(f"done: {global_step} steps, loss {record.get('total', math.nan):.4f}, PSNR "
                      f"{scores['psnr']:.2f} dB, SSIM {scores['ssim']:.4f}, "
                      f"{meter.describe('clips/s', 1)}, wall time {wall:.1f} s, saved {final_dir}")
    if hub_repo:  # main process, after the last collective: the others do not wait on an upload (and time out)
        commit = f"NBP video tokenizer after {global_step} steps" + (f" of {args.init_from}" if args.init_from else "")
        upload_to_hub(final_dir, hub_repo, commit_message=commit)
        accelerator.print(f"pushed {final_dir} to {hub_repo}")
    accelerator.end_training()
    return {"steps": global_step, "loss": record.get("total"), "psnr": scores["psnr"],
            "ssim": scores["ssim"], "clips_per_s": meter.rate, "wall_time_s": wall, "final_dir": final_dir}


if __name__ == "__main__":
    main()
