"""Train an NBP generator on pre-tokenized video (the output folder of `pretokenize` / `nbp pretokenize`).

    accelerate launch -m modeling_nbp.training.train_nbp --train_data tokens/ucf_train --output_dir runs/ucf \\
        --preset ucf-700m --tokenizer pretrained/tokenizer --resume_from_checkpoint latest

(`examples/train_nbp.py` in a checkout of the repository, or `nbp train ...` in one process.)
Each item is one video's token grid: its one pre-tokenized window, or, for data pre-tokenized with
`--windows_per_video`, one of its windows drawn anew every epoch (the official loader cuts a new random window of each
video whenever it reads one).

Outputs in --output_dir: checkpoint-<step>/ (complete training state; resume with --resume_from_checkpoint),
train_log.jsonl (one line per logged step and per validation), logs/ (TensorBoard), samples/ (MP4 + contact sheets, with
--tokenizer) and final/ (a pipeline folder with --tokenizer, else the generator's folder).
"""

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DistributedType
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from ..configuration_nbp import FIRST_BLOCK_SCHEMES, CONDITION_MODES, NBPConfig
from ..data import load_token_dataset
from ..data.pretokenize import TRAINING_CLIPS_FILE, tokenizer_folder, weights_digest
from ..hub_folders import component_folder
from ..generation import resolve_sampling
from ..modeling_nbp import LOSS_IMPLEMENTATIONS, NBPForVideoGeneration
from ..pipelines import NBPVideoPipeline
from ..pipelines.pipeline_nbp_video import upload_to_hub
from ..triton_support import require_triton
from ..video_io import atomic_output_path, decoding_workers
from . import common, flops
from .optim import OPTIMIZER_RECIPES, SCHEDULES, build_lr_scheduler, build_optimizer, follow_schedule
from .presets import GENERATOR_PRESETS, parse_with_preset

logger = logging.getLogger(__name__)

DEFAULTS = dict(train_batch_size=8, learning_rate=3e-4, max_steps=1000, dropout=0.1, num_layers=4, hidden_size=256,
                num_heads=8)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--train_data", required=True, help="pre-tokenized dataset folder (output of pretokenize)")
    g.add_argument("--validation_data", help="pre-tokenized validation folder: its loss is reported")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--tokenizer", help="NBPVideoTokenizer folder (or a pipeline folder, a Hub repo id of either, or "
                   "demo): enables sample videos and makes final/ a full NBPVideoPipeline")
    g.add_argument("--tokenizer_revision", help="with a Hub repo id: its branch, tag or commit (default: main)")
    g.add_argument("--dataloader_num_workers", type=common.non_negative_int, default=2,
                   help="at most as many as this process may use CPUs")
    g = p.add_argument_group("model (one of --preset, --model_config, --init_from or the size flags; the latent grid, "
                             "video vocabulary and classes come from the data)")
    g.add_argument("--preset", choices=sorted(GENERATOR_PRESETS),
                   help="paper setting: model size and task plus batch, lr, warmup and steps (training flags override "
                        "these; the model size comes only from the preset)")
    g.add_argument("--model_config", help="NBPConfig JSON file or model folder")
    g.add_argument("--init_from", help="pretrained generator to fine-tune: a generator folder, a pipeline folder (its "
                   "transformer/), a Hub repo id of either, or demo (the bundled moving-digits model); it defines the "
                   "model (size, grid, blocks, vocabulary, classes: the data must fit them) and its weights start the "
                   "run (a resumed run takes its checkpoint's)")
    g.add_argument("--init_from_revision", help="with a Hub repo id: its branch, tag or commit (default: main)")
    g.add_argument("--num_layers", type=common.positive_int, help=f"default {DEFAULTS['num_layers']}")
    g.add_argument("--hidden_size", type=common.positive_int, help=f"default {DEFAULTS['hidden_size']}")
    g.add_argument("--num_heads", type=common.positive_int, help=f"default {DEFAULTS['num_heads']}")
    g.add_argument("--block_shape", type=common.int_list, help="t,h,w of a block (default: one row of the grid, 1,1,W')")
    g.add_argument("--first_block", choices=FIRST_BLOCK_SCHEMES,
                   help="default hybrid ('none' for --condition_mode frames)")
    g.add_argument("--condition_mode", choices=CONDITION_MODES,
                   help="default: class if every item has a label >= 0, else none")
    g.add_argument("--num_context_frames", type=int,
                   help="frames mode: latent frames given as context when sampling (training predicts all; default 1, "
                        "or the model's with --preset, --model_config or --init_from)")
    g.add_argument("--num_classes", type=common.positive_int,
                   help="default: the data's class names, else its largest label + 1")
    g.add_argument("--video_vocab_size", type=common.positive_int,
                   help="default: the tokenizer's codebook, the preset's, or the largest id in the data + 1")
    g.add_argument("--dropout", type=float, help="embedding/residual dropout (default: the --init_from model's, else "
                   f"{DEFAULTS['dropout']})")
    g.add_argument("--class_dropout_prob", type=float,
                   help="probability, per clip, of replacing the class prefix by the unconditional embedding (for CFG; "
                        "default: the --init_from model's, else 0)")
    g.add_argument("--attn_implementation", choices=["auto", "sdpa", "eager", "flex_attention"], default="auto",
                   help="auto: flex_attention on CUDA, sdpa on CPU")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--loss_implementation", choices=LOSS_IMPLEMENTATIONS, default="chunked",
                   help="chunked: PyTorch, a chunk of rows at a time; triton: one fused kernel (CUDA)")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer_recipe", choices=sorted(OPTIMIZER_RECIPES), default="official",
                   help="official: AdamW(0.9, 0.95) + cosine; paper: Adam(W)(0.9, 0.98) + linear decay")
    g.add_argument("--lr_schedule", choices=SCHEDULES, help="override the recipe's schedule")
    g.add_argument("--learning_rate", type=float, help=f"peak learning rate (default {DEFAULTS['learning_rate']})")
    g.add_argument("--weight_decay", type=float, default=0.01, help="on Linear weights only")
    g.add_argument("--warmup_steps", type=int,
                   help="linear warmup steps (default 5%% of --max_steps; on a resume, the checkpoint's)")
    g.add_argument("--warmup_lr_init", type=float, default=0.0, help="the warmup's first rate (>= 0)")
    g.add_argument("--lr_min", type=float, default=0.0, help="where the decay ends (0 to --learning_rate)")
    g.add_argument("--lr_schedule_steps", type=common.positive_int,
                   help="length of the decay (default --max_steps; raising --max_steps on a resume stretches the "
                        "schedule from there, so give the first run's length here to keep it)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    g.add_argument("--ema_decay", type=float, default=0.0,
                   help="EMA of the weights (0 = off); final/ gets the EMA, so validation and samples use it too")
    g.add_argument("--max_steps", type=int, help=f"optimizer steps (default {DEFAULTS['max_steps']})")
    common.add_batch_arguments(g, DEFAULTS["train_batch_size"])
    g = p.add_argument_group("checkpoints, logging, hub")
    common.add_checkpoint_arguments(g)
    g.add_argument("--validation_steps", type=common.non_negative_int, default=0, help="0: validate at the end only")
    g.add_argument("--sample_steps", type=common.non_negative_int, default=0,
                   help="sample videos every N steps (needs --tokenizer; 0: at the end only)")
    g.add_argument("--num_samples", type=int, default=4)
    g = p.add_argument_group("sampling", "for the sample videos, and saved as the final model's generation_config (its "
                             "default sampling in the pipeline); unset values: the paper's top-k 16000, top-p 0.9, "
                             "temperature 1, no guidance")
    g.add_argument("--guidance_scale", type=float, help="classifier-free guidance (needs --class_dropout_prob > 0)")
    g.add_argument("--top_k", type=int, help="0 = off")
    g.add_argument("--top_p", type=float, help="1 = off")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--peak_tflops", type=float, help="peak bf16 TFLOP/s of one device, for MFU (known GPUs: auto)")
    common.add_tracking_arguments(g, "nbp")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = parse_with_preset(build_parser(), argv, GENERATOR_PRESETS, "generator")
    for flag, source in (("tokenizer_revision", "tokenizer"), ("init_from_revision", "init_from")):
        if getattr(args, flag) is not None and not getattr(args, source):
            raise ValueError(f"--{flag} is a version of --{source}'s Hub repo; give --{source}")
    # which flags define the model, first: a preset also fills in the values checked below
    sources = [f"--{k}" for k in ("preset", "model_config", "init_from") if getattr(args, k)]
    if len(sources) > 1:
        raise ValueError(f"give one of {', '.join(sources)}: each defines the model (with --init_from, give the "
                         "training flags rather than a --preset)")
    if sources:  # these flags only shape a model built from the size flags
        ignored = ["num_layers", "hidden_size", "num_heads", "first_block", "condition_mode", "num_classes"]
        ignored += [] if args.preset else ["block_shape", "video_vocab_size"]
        given = [f"--{k}" for k in ignored if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with {sources[0]}, which defines the model")
    for key in ("learning_rate", "max_steps"):
        if getattr(args, key) is None:
            setattr(args, key, DEFAULTS[key])
    if not args.init_from:  # a pretrained model goes on with the dropout it was trained with (`build_config`)
        args.dropout = DEFAULTS["dropout"] if args.dropout is None else args.dropout
        args.class_dropout_prob = args.class_dropout_prob or 0.0
    args._from_max_steps = ["warmup_steps"] if args.warmup_steps is None else []  # a resume keeps the checkpoint's
    if args.warmup_steps is None:
        args.warmup_steps = args.max_steps // 20  # the UCF recipe's share: 5k of 100k steps
    for key in ("max_steps", "num_samples"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.max_grad_norm < 0:
        raise ValueError(f"--max_grad_norm must be >= 0 (0: no clipping), got {args.max_grad_norm}")
    if args.warmup_lr_init < 0:
        raise ValueError(f"--warmup_lr_init must be >= 0, got {args.warmup_lr_init}")
    if not 0 <= args.lr_min <= args.learning_rate:
        raise ValueError(f"--lr_min must lie in [0, --learning_rate {args.learning_rate}], got {args.lr_min}")
    schedule = args.lr_schedule_steps or args.max_steps
    if not 0 <= args.warmup_steps <= schedule:
        source = f" (with --preset {args.preset})" if args.preset else ""
        raise ValueError(f"--warmup_steps {args.warmup_steps}{source} must lie in [0, {schedule}], the length of the "
                         "learning-rate schedule (--lr_schedule_steps, else --max_steps)")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")
    return args


def describe_tokens(path: str, flag: str) -> dict:
    """Grid shape, label range and dataset of a pre-tokenized folder (the value of `flag`, which errors name)."""
    try:
        data = load_token_dataset(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{flag}: {err}") from err
    if len(data) == 0:
        raise ValueError(f"{flag} {path} holds no items")
    shapes = np.unique(np.asarray(data.tokens["latent_shape"][:]), axis=0)
    if len(shapes) != 1:
        raise ValueError(f"{path} mixes latent grids {shapes.tolist()}; training needs one grid size")
    labels = np.asarray(data.tokens["label"][:])
    label_feature = data.tokens.features["label"]
    return dict(data=data, latent_shape=[int(v) for v in shapes[0]], min_label=int(labels.min()),
                max_label=int(labels.max()), class_names=getattr(label_feature, "names", None))


def max_token_id(data) -> int:
    return max(int(batch["tokens"].max()) for batch in data.tokens.iter(batch_size=4096))


def build_config(args, info: dict, tokenizer, init_folder: str | None = None) -> NBPConfig:
    """The model's config: from --model_config or `init_folder` (--init_from's folder, `generator_folder`), else
    built from the preset or the size flags and the data."""
    latent = info["latent_shape"]
    training = {k: v for k, v in dict(hidden_dropout=args.dropout, class_dropout_prob=args.class_dropout_prob).items()
                if v is not None}  # unset with --init_from: the model's own
    # a sampling setting, which may change a given model's
    context = {} if args.num_context_frames is None else dict(num_context_frames=args.num_context_frames)
    if args.model_config or init_folder:
        flag = "--model_config" if args.model_config else "--init_from"
        config = NBPConfig.from_pretrained(args.model_config or init_folder, **training, **context)
        config.validate_architecture()  # from_pretrained leaves the overrides unchecked
        if list(config.latent_shape) != latent:
            raise ValueError(f"{flag} has latent_shape {config.latent_shape}, the data {latent}: pre-tokenize the "
                             "videos with the model's tokenizer and clip size")
        largest = max_token_id(info["data"])
        if largest >= config.video_vocab_size:
            raise ValueError(f"--train_data holds token id {largest}, the {flag} model's video vocabulary "
                             f"{config.video_vocab_size} ids")
    elif args.preset:
        vocab = args.video_vocab_size or (tokenizer.codebook_size if tokenizer is not None else None)
        block = args.block_shape or [1, 1, latent[2]]
        preset_vocab = NBPConfig.from_preset(args.model_preset).video_vocab_size
        config = NBPConfig.from_preset(args.model_preset, latent_shape=latent, block_shape=block,
                                       video_vocab_size=vocab or preset_vocab, **training, **context)
    else:
        mode = args.condition_mode or ("class" if info["min_label"] >= 0 else "none")
        if mode == "class" and info["min_label"] < 0:
            raise ValueError(f"--condition_mode class needs a label for every clip; --train_data {args.train_data} "
                             "holds unlabelled clips (label -1): pre-tokenize videos in class folders, or use "
                             "--condition_mode none")
        if args.num_classes and mode != "class":
            raise ValueError(f"--num_classes is for --condition_mode class (got {mode}: the model takes no class)")
        names = info["class_names"]
        first = args.first_block or ("none" if mode == "frames" else "hybrid")
        vocab = args.video_vocab_size or (tokenizer.codebook_size if tokenizer is not None else None)
        config = NBPConfig(
            latent_shape=latent, block_shape=args.block_shape or [1, 1, latent[2]],
            video_vocab_size=vocab or max_token_id(info["data"]) + 1,
            condition_mode=mode, first_block=first,
            num_classes=(args.num_classes or (len(names) if names else info["max_label"] + 1)) if mode == "class"
            else None,
            id2label=dict(enumerate(names)) if mode == "class" and names else None,
            num_condition_tokens=1, num_context_frames=context.get("num_context_frames", 1) if mode == "frames" else 0,
            num_hidden_layers=args.num_layers or DEFAULTS["num_layers"],
            hidden_size=args.hidden_size or DEFAULTS["hidden_size"],
            num_attention_heads=args.num_heads or DEFAULTS["num_heads"], **training)
    if context and config.condition_mode != "frames":
        raise ValueError(f"--num_context_frames is for frame prediction (condition_mode frames); the model's "
                         f"condition_mode is {config.condition_mode!r}")
    if config.condition_mode == "class" and not 0 <= info["min_label"] <= info["max_label"] < config.num_classes:
        raise ValueError(f"the data has labels in [{info['min_label']}, {info['max_label']}], the model "
                         f"{config.num_classes} classes")
    if tokenizer is not None and tokenizer.codebook_size != config.video_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.codebook_size} codes, the model {config.video_vocab_size}")
    return config


def model_class_names(config: NBPConfig) -> list[str] | None:
    """The class names of a class-conditional config (`id2label`); None when it names none (transformers' LABEL_i
    placeholders)."""
    id2label = config.id2label or {}
    if (config.condition_mode != "class" or len(id2label) != config.num_classes
            or all(str(name) == f"LABEL_{i}" for i, name in id2label.items())):
        return None
    return [str(id2label[i]) for i in sorted(id2label)]


def data_label_map(info: dict, config: NBPConfig, warn: bool = True) -> torch.Tensor | None:
    """The model's label of each label of the training data, where a model read from a file (--init_from,
    --model_config) names other classes than the data in another order, matched by name; else None (labels are
    the model's). Data whose classes the model names none of trains its class slots by position: `config.id2label`
    then takes the data's names (logged if `warn`)."""
    names, model_names = info["class_names"], model_class_names(config)
    if not names or not model_names or names == model_names:
        return None
    unknown = [name for name in names if name not in model_names]
    if not unknown:
        return torch.tensor([model_names.index(name) for name in names])
    if len(unknown) < len(names):
        known = [name for name in names if name not in unknown]
        raise ValueError(f"--train_data has classes the model names ({known[:5]}) and classes it does not "
                         f"({unknown[:5]}): name the class folders as the model's classes (e.g. "
                         f"{model_names[:3]}), or use only new classes, which then train the model's classes by "
                         "position")
    if warn:
        logger.warning("the model names none of the data's classes (%s...): class i of the data trains the model's "
                       "class i, which takes its name", ", ".join(names[:3]))
    config.id2label = {i: names[i] if i < len(names) else name for i, name in enumerate(model_names)}
    config.label2id = {name: i for i, name in config.id2label.items()}
    return None


def check_validation_data(val_info: dict, info: dict, config: NBPConfig) -> torch.Tensor | None:
    """The validation items must fit the model the training data shaped (checked before training: a mismatch
    found at the final validation would lose the run's last steps and final/). -> the training label of each
    validation label where its class list differs from the model's (else from the training data's: labels are
    positions in each list; a validation folder may hold some of the classes only), else None."""
    if val_info["latent_shape"] != info["latent_shape"]:
        raise ValueError(f"--validation_data has latent grids {val_info['latent_shape']}, --train_data "
                         f"{info['latent_shape']}: pre-tokenize both with the same tokenizer and clip settings")
    label_map = None
    if config.condition_mode == "class":
        names, val_names = model_class_names(config) or info["class_names"], val_info["class_names"]
        low, high = val_info["min_label"], val_info["max_label"]
        if names and val_names and names != val_names:
            unknown = sorted(set(val_names) - set(names))
            if unknown:
                source = "--train_data" if names == info["class_names"] else "the model"
                raise ValueError(f"--validation_data has classes that {source} lacks ({unknown[:5]}), which the "
                                 "model has no label for")
            label_map = torch.tensor([names.index(name) for name in val_names])
            if low >= 0:
                low, high = int(label_map[low:high + 1].min()), int(label_map[low:high + 1].max())
        if not 0 <= low <= high < config.num_classes:
            mapped = " (as training labels)" if label_map is not None else ""
            raise ValueError(f"--validation_data has labels in [{low}, {high}]{mapped}, the model "
                             f"{config.num_classes} classes")
    largest = max_token_id(val_info["data"])
    if largest >= config.video_vocab_size:
        raise ValueError(f"--validation_data holds token id {largest}, the model's video vocabulary "
                         f"{config.video_vocab_size} ids")
    return label_map


def pretokenize_record(token_data: str) -> tuple[str | None, dict]:
    """(path, contents) of the pretokenize.json of a token folder (the output_dir or its tokens folder); (None, {})
    for token folders made otherwise."""
    for folder in (token_data, os.path.dirname(os.path.normpath(token_data))):
        path = os.path.join(folder, "pretokenize.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return path, json.load(f)
    return None, {}


def check_tokenizer_made_tokens(train_data: str, tokenizer) -> None:
    """Refuse a --tokenizer that is not the one that made --train_data (its pretokenize.json keeps a digest of the
    weights): sample videos and final/ would decode the tokens with another tokenizer."""
    path, record = pretokenize_record(train_data)
    recorded = record.get("tokenizer_weights")
    digest = weights_digest(tokenizer) if recorded else None  # hashes every weight: once
    if recorded and recorded != digest:
        raise ValueError(f"--tokenizer is not the tokenizer that made --train_data: its weights digest is {digest}, "
                         f"{path} records {recorded}; the samples and final/ would decode the tokens into other "
                         "videos. Pass the tokenizer that made the tokens, or pre-tokenize the videos again with this "
                         "one")


# pretokenize.json entries that must agree between --train_data and --validation_data (compared where both have them)
TOKENIZER_RECORDS = ("tokenizer", "tokenizer_config", "tokenizer_weights")
CLIP_RECORDS = ("num_frames", "resolution", "size", "fps", "resize")


def record_differences(first: dict, second: dict, keys, prefix: str = "") -> list[str]:
    """'key first vs second' for each of `keys` (nested: each sub-key) that both records hold with other values."""
    lines = []
    for key in keys:
        if key in first and key in second and first[key] != second[key]:
            if isinstance(first[key], dict) and isinstance(second[key], dict):
                lines += record_differences(first[key], second[key], sorted(first[key]), f"{prefix}{key}.")
            else:
                lines.append(f"{prefix}{key} {first[key]!r} vs {second[key]!r}")
    return lines


def check_same_pretokenization(validation_data: str, train_data: str) -> None:
    """Refuse --validation_data tokenized by another tokenizer or from clips made otherwise than --train_data, as
    far as their pretokenize.json files tell (folders without one are not checked)."""
    val, train = pretokenize_record(validation_data)[1], pretokenize_record(train_data)[1]
    folders = f"--validation_data {validation_data} and --train_data {train_data}"
    tokenizer = record_differences(val, train, TOKENIZER_RECORDS)
    if tokenizer:
        raise ValueError(f"{folders} were pre-tokenized by different tokenizers (validation vs training: "
                         f"{'; '.join(tokenizer)}), so a token id means another code in each: pre-tokenize both with "
                         "the same tokenizer")
    # clips recorded before --resize existed were cropped (as `pretokenize` reads such records)
    val_clip, train_clip = ({"resize": "crop", **r["clip"]} if "resolution" in r.get("clip", {}) else r.get("clip", {})
                            for r in (val, train))
    clip = record_differences(val_clip, train_clip, CLIP_RECORDS)
    if clip:
        raise ValueError(f"{folders} hold clips made with different settings (validation vs training: "
                         f"{'; '.join(clip)}): pre-tokenize both with the same clip settings")


def generator_folder(source: str, revision: str | None = None) -> str:
    """The local folder of the generator --init_from names: a generator folder, a pipeline folder (its transformer/)
    or a Hub repo id of either (only the generator's files are downloaded; `revision` as in `component_folder`)."""
    return component_folder(source, "transformer", ["config.json", "generation_config.json", "model*.safetensors",
                                                    "model.safetensors.index.json"], "--init_from", revision)


def load_initial_weights(folder: str, config: NBPConfig) -> NBPForVideoGeneration:
    """The generator in `folder` in float32 (training's mixed precision casts it where it computes), with `config`
    (its own, with this run's dropout); every weight must be in the folder and fit."""
    model, loading = NBPForVideoGeneration.from_pretrained(folder, config=config, dtype=torch.float32,
                                                            output_loading_info=True)
    problems = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"--init_from {folder} does not hold this generator's weights: "
                         + "; ".join(f"{k} {sorted(v)[:5]}" for k, v in problems.items()))
    return model


def load_tokenizer(folder: str | None, device):
    """The tokenizer in `folder` (`tokenizer_folder`), or None."""
    if folder is None:
        return None
    from ..video_tokenizer import NBPVideoTokenizer

    return NBPVideoTokenizer.from_pretrained(folder).to(device).eval()


def collate_tokens(items: list[dict]) -> dict:
    return {"video_ids": torch.stack([it["input_ids"] for it in items]),
            "class_labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}


def model_inputs(batch: dict, config: NBPConfig, device, label_map: torch.Tensor | None = None) -> dict:
    """The model's inputs for a batch of `collate_tokens`; `label_map` gives the model's label of each of the data's
    (`data_label_map`, `check_validation_data`)."""
    inputs = {"video_ids": batch["video_ids"].to(device, non_blocking=True)}
    if config.condition_mode == "class":
        labels = batch["class_labels"].to(device, non_blocking=True)
        inputs["class_labels"] = labels if label_map is None else label_map.to(device)[labels]
    return inputs


@torch.no_grad()
def validation_loss(accelerator, model, data, batch_size: int, label_map: torch.Tensor | None = None) -> float:
    """Mean next-block loss over `data` (each item once, shared out over the processes); `label_map` gives the
    model's label of each label in `data` (`check_validation_data`)."""
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collate_tokens)
    loader = prepare_data_loader(loader, accelerator.device, accelerator.num_processes, accelerator.process_index,
                                 put_on_device=True)
    unwrapped = common.bare_model(accelerator, model)
    was_training = model.training
    model.eval()
    losses = []
    for batch in loader:
        inputs = model_inputs(batch, unwrapped.config, accelerator.device, label_map)
        input_ids, labels = unwrapped.prepare_training_inputs(inputs["video_ids"], inputs.get("class_labels"))
        logits = model(input_ids=input_ids).logits
        per_item = torch.stack([F.cross_entropy(lg.float(), lb) for lg, lb in zip(logits, labels)])
        losses.append(accelerator.gather_for_metrics(per_item))
    model.train(was_training)
    return torch.cat(losses).mean().item()


def ema_weights(accelerator, model, ema):
    """Context in which `model` holds the EMA weights (with --ema_decay: what final/ gets), else its own."""
    return ema.swapped_into(common.bare_model(accelerator, model)) if ema is not None else contextlib.nullcontext()


def set_sampling(model, args):
    """The sampling flags as the model's generation_config, checked before any step is trained."""
    sampling = {k: getattr(args, k) for k in ("guidance_scale", "top_k", "top_p", "temperature")
                if getattr(args, k) is not None}
    resolve_sampling(None, **sampling)  # a clear error now rather than at the first sample
    guided = sampling.get("guidance_scale", 1.0) != 1.0
    if guided and (model.layout.prefix_length == 0 or model.config.class_dropout_prob == 0):
        raise ValueError("--guidance_scale != 1 needs a condition prefix trained with --class_dropout_prob > 0 (the "
                         "unconditional half of guidance uses the embedding that dropout trains); got condition_mode "
                         f"{model.config.condition_mode!r}, class_dropout_prob {model.config.class_dropout_prob}")
    if sampling:
        model.generation_config.update(do_sample=True, **sampling)


@torch.no_grad()
def sample_videos(accelerator, model, tokenizer, context_data, num_samples: int, seed: int, step: int, output_dir: str,
                  classes: list[int] | None = None):
    """Generate `num_samples` videos with the model's sampling (`set_sampling`) and log them (main process); a
    class-conditional model's samples cycle through `classes` (default: all of its classes)."""
    unwrapped = common.bare_model(accelerator, model)
    config = unwrapped.config
    kwargs, labels = {}, None
    if config.condition_mode == "class":
        pool = classes or range(config.num_classes)
        kwargs["class_labels"] = [pool[i % len(pool)] for i in range(num_samples)]
        names = model_class_names(config)
        labels = [names[c] if names else str(c) for c in kwargs["class_labels"]]
    elif config.condition_mode == "frames":
        grids = torch.stack([context_data[i % len(context_data)]["input_ids"] for i in range(num_samples)])
        kwargs["context_ids"] = grids[:, : config.num_context_frames].to(accelerator.device)
    else:
        kwargs["batch_size"] = num_samples
    was_training, attention = unwrapped.training, config._attn_implementation
    unwrapped.eval()
    unwrapped.set_attn_implementation("sdpa")  # decoding with the KV cache needs no mask after the first step
    generator = torch.Generator(accelerator.device).manual_seed(seed)
    # the dynamic cache: no decoder state kept on the model between samplings, no graph capture beside training
    grid = unwrapped.generate_video_tokens(generator=generator, cache_implementation="dynamic", **kwargs)
    unwrapped.set_attn_implementation(attention)
    unwrapped.train(was_training)
    videos = tokenizer.decode(grid)
    common.log_videos(accelerator, "samples", videos, step, output_dir, fps=config.fps or 8, labels=labels)


def save_final(accelerator, model, config, tokenizer, ema, output_dir: str, repo_id: str | None, notes: str,
               tokenizer_dir: str | None = None) -> str:
    """Write output_dir/final: an NBPVideoPipeline folder with a tokenizer (its model card loads it from `repo_id`,
    else from the folder, and says `notes`; the tokenizer's training clips, the `TRAINING_CLIPS_FILE` in
    `tokenizer_dir` (`tokenizer_folder`), go with it, for `nbp pretokenize --tokenizer final`), else the generator
    folder."""
    final_dir = os.path.join(output_dir, "final")
    state_dict = accelerator.get_state_dict(model)  # gathers sharded (FSDP / ZeRO-3) weights; every process
    consume_prefix_in_state_dict_if_present(state_dict, "_orig_mod.")  # the names under torch.compile's wrapper
    if accelerator.is_main_process:
        final = NBPForVideoGeneration(NBPConfig.from_dict(config.to_dict()))  # default attention, not the training one
        final.load_state_dict(state_dict)
        final.generation_config = common.bare_model(accelerator, model).generation_config  # the run's sampling
        if ema is not None:
            ema.copy_to(final)
        with atomic_output_path(final_dir) as tmp:
            if tokenizer is not None:
                NBPVideoPipeline(transformer=final, video_tokenizer=tokenizer).save_pretrained(
                    tmp, repo_id=repo_id or final_dir, model_card_notes=notes)
                if tokenizer_dir:
                    clips = os.path.join(tokenizer_dir, TRAINING_CLIPS_FILE)
                    if os.path.isfile(clips):
                        shutil.copyfile(clips, os.path.join(tmp, "video_tokenizer", TRAINING_CLIPS_FILE))
            else:
                final.save_pretrained(tmp)
    common.wait_for_everyone_at_exit(accelerator)
    return final_dir


def configure_deepspeed(ds_config: dict, per_device_batch: int, max_grad_norm: float) -> None:
    """Put the run's micro-batch and clipping into the DeepSpeed config. DeepSpeed clips inside its engine
    (`accelerator.clip_grad_norm_` does nothing there) at the config's `gradient_clipping`, which Accelerate would turn
    from "auto" into 1.0 whatever --max_grad_norm says: "auto" (or absent) takes --max_grad_norm, and a number in the
    config that differs from it is refused."""
    ds_config["train_micro_batch_size_per_gpu"] = per_device_batch
    clipping = ds_config.get("gradient_clipping", "auto")
    if clipping == "auto":
        ds_config["gradient_clipping"] = max_grad_norm
    elif float(clipping) != max_grad_norm:
        raise ValueError(f"--max_grad_norm {max_grad_norm} differs from the DeepSpeed config's gradient_clipping "
                         f"{clipping}, which DeepSpeed applies instead: pass --max_grad_norm {clipping}, or set "
                         "gradient_clipping to auto (or the same value) in the config")


def resume_settings(args, config: NBPConfig, data) -> dict:
    """What a resume takes from the checkpoint (the training data and its order, the model and the --init_from it
    started from, optimizer rates and decay, the schedule, EMA), kept in every checkpoint: a resume asking for other
    values is refused (`common.check_resume_settings`)."""
    weights = [k for k in NBPConfig.__annotations__ if k not in ("hidden_dropout", "attention_dropout", "fps")]
    recipe = OPTIMIZER_RECIPES[args.optimizer_recipe]
    init_from = os.path.abspath(args.init_from) if args.init_from and os.path.isdir(args.init_from) else args.init_from
    return {"seed": args.seed, "model": {k: getattr(config, k) for k in weights}, "init_from": init_from,
            # the token folder's contents (its datasets fingerprint survives a copy to another path), not its path
            "data": dict(fingerprint=data.tokens._fingerprint, num_items=len(data)),
            "optimization": dict(learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                                 optimizer_recipe=args.optimizer_recipe, ema_decay=args.ema_decay),
            # not its length: --lr_schedule_steps, else --max_steps, which a resume may raise (see their help)
            "schedule": dict(lr_schedule=args.lr_schedule or recipe["schedule"], warmup_steps=args.warmup_steps,
                             warmup_lr_init=args.warmup_lr_init, lr_min=args.lr_min)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    per_device_batch, accum = common.resolve_batch_layout(
        args.train_batch_size, args.gradient_accumulation_steps, args.global_batch_size,
        PartialState(cpu=common.use_cpu(args.cpu)).num_processes, DEFAULTS["train_batch_size"])
    accelerator = common.make_accelerator(args, accum)
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3)
    if args.ema_decay and sharded:
        raise ValueError("--ema_decay is not supported with FSDP or DeepSpeed ZeRO-3 (sharded weights)")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, per_device_batch, args.max_grad_norm)
    info = describe_tokens(args.train_data, "--train_data")
    with accelerator.main_process_first():  # a Hub id is downloaded by one process, then found in the cache
        tokenizer_dir = tokenizer_folder(args.tokenizer, args.tokenizer_revision) if args.tokenizer else None
        init_dir = generator_folder(args.init_from, args.init_from_revision) if args.init_from else None
    tokenizer = load_tokenizer(tokenizer_dir, accelerator.device)
    config = build_config(args, info, tokenizer, init_dir)
    train_labels = None
    if config.condition_mode == "class":
        train_labels = data_label_map(info, config, warn=accelerator.is_main_process)
        if train_labels is not None:
            train_labels = train_labels.to(accelerator.device)  # once, not at every batch (`model_inputs`)
    sample_classes = None  # the classes the samples show: the data's (a fine-tuned model may have others), else all
    if train_labels is not None:
        sample_classes = train_labels.tolist()
    elif config.condition_mode == "class" and info["class_names"]:  # the model's labels are the data's
        sample_classes = list(range(len(info["class_names"])))
    fps = pretokenize_record(args.train_data)[1].get("clip", {}).get("fps")
    if fps:  # the clips' rate: `nbp generate` reads contexts and writes videos at it
        config.fps = float(fps)
    val_data = val_labels = None
    if args.validation_data:
        check_same_pretokenization(args.validation_data, args.train_data)
        val_info = describe_tokens(args.validation_data, "--validation_data")
        val_labels = check_validation_data(val_info, info, config)
        val_labels = None if val_labels is None else val_labels.to(accelerator.device)
        val_data = val_info["data"]
        if val_data.num_windows > len(val_data) and accelerator.is_main_process:
            logger.warning("--validation_data holds several windows per video, of which the validation loss reads one "
                           "(the middle one): pre-tokenize validation videos with one window (their centre)")
    if tokenizer is not None:  # on every process: a refusal stops them all
        check_tokenizer_made_tokens(args.train_data, tokenizer)
    # after the data and tokenizer checks: a refused run leaves no output folder or Hub repository behind
    hub_repo = common.prepare_output_dir(accelerator, args)
    resume = common.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    common.keep_resumed_defaults(args, resume, {"warmup_steps": "schedule"})
    torch.manual_seed(args.seed)  # same initial weights on every process
    attn = args.attn_implementation
    if attn == "flex_attention" and accelerator.device.type != "cuda":
        raise ValueError("--attn_implementation flex_attention trains on CUDA only (on CPU torch's flex attention has "
                         "no backward, and its compiled kernel is wrong for some lengths); use auto or sdpa")
    if init_dir and not resume:  # a resume takes the weights from its checkpoint
        model = load_initial_weights(init_dir, config)
    else:
        model = NBPForVideoGeneration(config)
    model.set_attn_implementation(("flex_attention" if accelerator.device.type == "cuda" else "sdpa")
                                  if attn == "auto" else attn)
    if args.gradient_checkpointing:
        common.enable_activation_checkpointing(model)
    if args.loss_implementation == "triton":
        require_triton(accelerator.device, "--loss_implementation triton")
    model.loss_implementation = args.loss_implementation
    if config.class_dropout_prob == 0 or model.layout.prefix_length == 0:
        # never used in a forward pass of this run: freezing it keeps DDP from waiting for its gradient
        model.model.uncond_embedding.requires_grad_(False)
    set_sampling(model, args)
    recipe = OPTIMIZER_RECIPES[args.optimizer_recipe]
    optimizer = build_optimizer(model, args.learning_rate, args.weight_decay, recipe["betas"],
                                fused=accelerator.device.type == "cuda" or None)
    scheduler = build_lr_scheduler(optimizer, args.lr_schedule_steps or args.max_steps, args.warmup_steps,
                                   args.lr_schedule or recipe["schedule"], args.lr_min, args.warmup_lr_init)
    # counted before `prepare`, which may shard the parameters (FSDP, ZeRO-3)
    num_parameters, matmul_parameters = sum(p.numel() for p in model.parameters()), flops.matmul_parameters(model)
    input_length = model.layout.input_length
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = common.EMA(common.bare_model(accelerator, model), args.ema_decay) if args.ema_decay else None

    log = common.JsonlLog(os.path.join(args.output_dir, "train_log.jsonl"), accelerator.is_main_process)
    global_step, settings = 0, resume_settings(args, config, info["data"])
    common.check_run_start(args.output_dir, resume, args.overwrite_output_dir, accelerator.is_main_process)
    if resume:
        state = common.load_checkpoint(accelerator, resume, settings)
        follow_schedule(scheduler)
        global_step = state["global_step"]
        common.warn_if_global_batch_changed(state, per_device_batch * accum * accelerator.num_processes)
        if ema is not None:
            ema.load_state_dict(common.load_checkpoint_tensors(resume, "ema"))
        # a run that has no step left validates its last one again (it may have been killed while validating it)
        redone = ("val_loss",) if global_step >= args.max_steps and val_data is not None else ()
        log.truncate(global_step, redone=redone)
        accelerator.print(f"resumed from {resume} at step {global_step}")
    elif accelerator.is_main_process and os.path.isfile(log.path):
        os.remove(log.path)  # a fresh run starts a fresh log
    common.init_trackers(accelerator, args, global_step)

    sampler = common.StepBatchSampler(len(info["data"]), per_device_batch, accelerator.num_processes,
                                      accelerator.process_index, args.seed, start_step=global_step * accum,
                                      accumulation_steps=accum, item_seeds=True)  # seeds: each epoch's windows
    loader = torch.utils.data.DataLoader(info["data"], batch_sampler=sampler, collate_fn=collate_tokens,
                                         num_workers=decoding_workers(args.dataloader_num_workers),
                                         worker_init_fn=common.dataloader_worker_init,
                                         pin_memory=accelerator.device.type == "cuda")
    global_batch = per_device_batch * accum * accelerator.num_processes
    tokens_per_step = global_batch * input_length
    flops_per_token = flops.training_flops_per_token(matmul_parameters, config.num_hidden_layers, config.hidden_size,
                                                      input_length)
    peak = flops.peak_flops(accelerator.device, args.peak_tflops)
    accelerator.print(f"{num_parameters / 1e6:.2f}M parameters, grid "
                      f"{config.latent_shape}, blocks {config.block_shape}, {accelerator.num_processes} process(es) x "
                      f"{per_device_batch} x {accum} accumulation = {global_batch} clips per step")
    data = info["data"]
    if data.num_windows > len(data):
        accelerator.print(f"{len(data)} videos in {data.num_windows} pre-tokenized windows: each epoch draws one "
                          "window of every video")
    can_sample = tokenizer is not None and not sharded
    meter = common.ThroughputMeter()
    # a resumed run with no step left reports the last logged loss
    start_time, loss_value, val_loss = time.perf_counter(), log.last("loss", float("nan")), None
    model.train()
    batches = iter(loader)
    progress = common.training_progress(accelerator, global_step, args.max_steps)
    while global_step < args.max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        step_lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        for micro in range(accum):
            batch = next(batches)
            common.seed_step(args.seed, global_step * accum + micro, accelerator.process_index)
            with accelerator.accumulate(model):
                loss = model(**model_inputs(batch, config, accelerator.device, train_labels)).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / accum
        scheduler.step()
        global_step += 1
        progress.update()
        if ema is not None:
            ema.update(common.bare_model(accelerator, model))
        meter.step(tokens_per_step)
        done = global_step == args.max_steps
        if global_step % args.logging_steps == 0 or done:
            loss_value = accelerator.reduce(step_loss, "mean").item()
            record = {"step": global_step, "loss": loss_value, "lr": step_lr,
                      "epoch": global_step / sampler.steps_per_epoch, "tokens_per_s": meter.rate,
                      "mfu": flops.estimate_mfu(meter.rate, flops_per_token, accelerator.num_processes, peak)}
            log.append(record)
            accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=global_step)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{step_lr:.2e}", refresh=False)
        meter.pause()
        if val_data is not None and args.validation_steps and global_step % args.validation_steps == 0 and not done:
            with ema_weights(accelerator, model, ema):
                val = validation_loss(accelerator, model, val_data, per_device_batch, val_labels)
            accelerator.log({"val/loss": val}, step=global_step)
            log.append({"step": global_step, "val_loss": val})
        if (can_sample and args.sample_steps and global_step % args.sample_steps == 0 and not done
                and accelerator.is_main_process):  # the last step's samples are made after the loop
            with ema_weights(accelerator, model, ema):
                sample_videos(accelerator, model, tokenizer, val_data or info["data"], args.num_samples, args.seed,
                              global_step, args.output_dir, sample_classes)
        if global_step % args.checkpointing_steps == 0 or done:
            common.save_checkpoint(accelerator, args.output_dir, global_step,
                                   dict(settings, global_batch_size=global_batch),
                                   {"ema": ema.state_dict()} if ema is not None else None,
                                   args.checkpoints_total_limit)
        meter.resume()
    progress.close()

    if val_data is not None:
        with ema_weights(accelerator, model, ema):
            val_loss = validation_loss(accelerator, model, val_data, per_device_batch, val_labels)
        accelerator.log({"val/loss": val_loss}, step=global_step)
        log.append({"step": global_step, "val_loss": val_loss})
    if can_sample and accelerator.is_main_process:
        with ema_weights(accelerator, model, ema):
            sample_videos(accelerator, model, tokenizer, val_data or info["data"], args.num_samples, args.seed,
                          global_step, args.output_dir, sample_classes)
    notes = (f"Trained with nbp-video's `nbp train` for {global_step} steps of {global_batch} clips on "
             f"`{os.path.basename(os.path.normpath(args.train_data))}`"
             + (f", starting from {'the bundled moving-digits model' if args.init_from == 'demo' else args.init_from}"
                if args.init_from else "")
             + ("" if math.isnan(loss_value) else f"; last training loss {loss_value:.4f}")
             + ("" if val_loss is None else f", validation loss {val_loss:.4f}") + ".")
    final_dir = save_final(accelerator, model, config, tokenizer, ema, args.output_dir, hub_repo, notes,
                           tokenizer_dir)
    if args.push_to_hub and accelerator.is_main_process:
        upload_to_hub(final_dir, hub_repo, commit_message=f"NBP generator after {global_step} steps")
        accelerator.print(f"pushed {final_dir} to {hub_repo}")
    wall = time.perf_counter() - start_time
    mfu = flops.estimate_mfu(meter.rate, flops_per_token, accelerator.num_processes, peak)
    summary = {"steps": global_step, "train_loss": loss_value, "val_loss": val_loss, "tokens_per_s": meter.rate,
               "mfu": mfu, "wall_time_s": wall, "final_dir": final_dir}
    accelerator.print(
        f"done: {global_step} steps, train loss {'n/a' if math.isnan(loss_value) else f'{loss_value:.4f}'}, val loss "
        f"{'n/a' if val_loss is None else f'{val_loss:.4f}'}, {meter.describe('tokens/s')}"
        f"{'' if math.isnan(mfu) else f' (MFU {100 * mfu:.1f}%)'}, wall time {wall:.1f} s, saved {final_dir}")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
