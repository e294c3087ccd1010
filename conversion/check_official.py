"""Parity check of `nbp convert` against the OFFICIAL NBP code, on official checkpoints.

    nbp check-conversion --official_repo /path/to/NBP \
        --generator ucf_base_nbp16_hybrid.ckpt --tokenizer magvit2_ucf.pt [--converted FOLDER] [--device cuda]

The official modules are imported unchanged from a checkout of github.com/RenShuhuai-Andy/NBP (its
`nbp/__init__.py`, which imports the data loaders, is not run) and get the checkpoints' tensors; our models are
converted from the same files (or loaded from --converted). Both are fed the same inputs:

- generator logits for a full training sequence in the official layout (`process_b_c_z_a`, `get_attn_mask`:
  condition prefix, BOV and hybrid start, shifted video ids), whether our `prepare_training_inputs` builds exactly
  that sequence, and the training loss (`forward` + `shared_step`'s cross-entropy);
- greedy generation (the official samplers with `sample_logits=False`, as transformer_eval.py calls them) against
  `generate_video_tokens(temperature=0)`: class-conditional models from class conditions, unconditional (K600)
  models from the first 2 latent frames of a random token grid, as the official evaluation;
- with both files: the pipeline end to end (transformer_eval.py's steps against `NBPVideoPipeline`, greedy);
- tokenizer: official `encode(video, quantize=True)` ids against ours for a random clip in [0, 1], and
  `decode_from_code_indices` against our decoder for the same ids, before the clamp to [0, 1].

Everything runs in float32 (TF32 off). A difference passes when max|ours - official| <= rtol * max|official|
(default 1e-4); token ids must agree exactly, tokenizer encode ids up to --max_id_flips places
(FSQ rounds, so values on a rounding boundary may flip). Exit status 0: all pass, 1: some check failed, 2: bad
arguments or missing files/packages.

Not executed from the official code (and why): the Lightning checkpoint loading (`load_from_checkpoint`,
`init_from_ckpt`, `load_magvit2` call `torch.load` on pickles; here the files go through `safe_torch_load` and
the tensors are loaded as those functions load them). Computation-free stand-ins replace official dependencies
that cannot be imported (printed when used), and the transformers 5 LLaMA tokenizer gets the two things the
official code reads from the transformers 4 slow tokenizer (right padding, `total_vocab_size`).
"""

import argparse
import contextlib
import copy
import glob
import importlib
import importlib.machinery
import inspect
import io
import os
import sys
import types

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from ..modeling_nbp import NBPForVideoGeneration
from ..pipelines import NBPVideoPipeline
from ..ucf101 import load_ucf101_table
from ..video_tokenizer import NBPVideoTokenizer
from .convert_nbp import (MAGVIT2_VOCAB_SIZE, config_from_checkpoint, generator_from_checkpoint,
                          split_checkpoint_state_dict, training_arguments)
from .convert_tokenizer import tokenizer_from_state_dict, tokenizer_state_dict_from_checkpoint
from .safe_load import require_checkpoint_file, safe_torch_load, strip_prefix

OFFICIAL_PACKAGE = "official_nbp"  # the name the official `nbp/` folder is imported under
OFFICIAL_FILES = ("nbp/modules/gpt.py", "nbp/modules/encoders.py", "nbp/lm_transformer.py", "nbp/utils.py",
                  "nbp/magvit2.py", "nbp/quantizers/__init__.py", "nbp/quantizers/fsq.py")
REQUIRED_PACKAGES = ("einops", "beartype")  # used by the official tokenizer's computation: no stand-ins
# imported by the official files, but unused by what is compared (training, logging, perceptual loss)
STAND_IN_PACKAGES = {
    "pytorch_lightning": "LightningModule base class (an nn.Module whose save_hyperparameters does nothing)",
    "timm": "timm.scheduler.cosine_lr.CosineLRScheduler (only used by configure_optimizers)",
    "torchvision": "torchvision.models.VGG16_Weights (only used by the tokenizer's perceptual loss)",
    "imageio": "imageio (only used to save videos)",
}
DEFAULT_RTOL = 1e-4
OFFICIAL_CONTEXT_FRAMES = 2  # transformer_eval.py frame_prediction: the first 2 latent frames (5 pixel frames)
DEFAULT_MAX_ID_FLIPS = 1


# ---- importing the official code ----------------------------------------------------------------------------------
def _stand_in(name: str) -> types.ModuleType:
    """A module object named `name` (with a spec, so find_spec-based availability checks do not crash)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


class _StandInLightningModule(nn.Module):
    def save_hyperparameters(self, *args, **kwargs):
        pass


class _Unused:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("a stand-in for an official dependency that the parity check does not use was called")


def _stand_in_modules(name: str) -> dict:
    """sys.modules entries for a missing STAND_IN_PACKAGES dependency."""
    if name == "pytorch_lightning":
        pl = _stand_in(name)
        pl.LightningModule = _StandInLightningModule
        return {name: pl}
    if name == "timm":
        timm, scheduler, cosine = _stand_in("timm"), _stand_in("timm.scheduler"), _stand_in("timm.scheduler.cosine_lr")
        cosine.CosineLRScheduler = _Unused
        timm.scheduler, scheduler.cosine_lr = scheduler, cosine
        return {"timm": timm, "timm.scheduler": scheduler, "timm.scheduler.cosine_lr": cosine}
    if name == "torchvision":
        tv, models = _stand_in("torchvision"), _stand_in("torchvision.models")
        models.VGG16_Weights, tv.models = _Unused, models
        return {"torchvision": tv, "torchvision.models": models}
    return {name: _stand_in(name)}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # a broken install (e.g. a torchvision built for another torch) counts as missing
        return False


def check_official_repo(repo: str) -> None:
    """Raise FileNotFoundError naming what the --official_repo checkout lacks."""
    if not os.path.isdir(repo):
        raise FileNotFoundError(f"--official_repo: {repo} is not a folder (expected a checkout of "
                                "github.com/RenShuhuai-Andy/NBP)")
    missing = [f for f in OFFICIAL_FILES if not os.path.isfile(os.path.join(repo, f))]
    if missing:
        raise FileNotFoundError(f"--official_repo {repo} lacks {', '.join(missing)}: is it a checkout of "
                                "github.com/RenShuhuai-Andy/NBP?")


def import_official(repo: str) -> tuple[types.SimpleNamespace, list[str]]:
    """Import the official `nbp/` modules from `repo` as package OFFICIAL_PACKAGE without running its
    `__init__.py`. Returns the modules and a line per stand-in used."""
    check_official_repo(repo)
    missing = [p for p in REQUIRED_PACKAGES if not _importable(p)]
    if missing:
        raise ModuleNotFoundError(
            f"the official NBP code needs {', '.join(missing)}, which cannot be imported here; install them "
            f"outside this environment, e.g. `pip install --target /tmp/official-deps {' '.join(missing)}` and "
            "run with PYTHONPATH=/tmp/official-deps")
    stand_ins, notes = {}, []
    for name, what in STAND_IN_PACKAGES.items():
        if not _importable(name):
            stand_ins.update(_stand_in_modules(name))
            notes.append(f"{name} is not importable: stand-in for {what}")
    package = _stand_in(OFFICIAL_PACKAGE)
    package.__path__ = [os.path.join(os.path.abspath(repo), "nbp")]
    added = {OFFICIAL_PACKAGE: package, **{k: v for k, v in stand_ins.items() if k not in sys.modules}}
    sys.modules.update(added)
    try:
        names = ("modules.gpt", "modules.encoders", "lm_transformer", "magvit2")
        modules = {n.split(".")[-1]: importlib.import_module(f"{OFFICIAL_PACKAGE}.{n}") for n in names}
    finally:  # the stand-ins stay bound inside the official modules only
        for name in stand_ins:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]
    return types.SimpleNamespace(**modules), notes


# ---- the official models, loaded as the official loaders load them --------------------------------------------------
def right_padding_llama_tokenizer():
    """transformers' LLaMA tokenizer with what the official code reads from the transformers 4 slow tokenizer:
    right padding (transformers 5 pads LLaMA on the left) and `total_vocab_size`."""
    from transformers import LlamaTokenizer

    class SlowLlamaTokenizerStandIn(LlamaTokenizer):
        padding_side = "right"

        @property
        def total_vocab_size(self):
            return len(self)

    return SlowLlamaTokenizerStandIn


def official_tokenizer(official, state_dict: dict, resolution: int):
    """`VideoTokenizer` built and strictly loaded as nbp/download.py `load_magvit2` does."""
    tokenizer = official.magvit2.VideoTokenizer(
        num_codebooks=1, image_size=resolution, embed_dim=6, codebook_size=MAGVIT2_VOCAB_SIZE,
        fsq_levels=[8, 8, 8, 5, 5, 5], use_fsq=True, flash_attn=True)
    tokenizer.load_state_dict(state_dict)
    return tokenizer.eval()


def official_class(official, args):
    """The official Lightning module class of training `args`, as transformer_train.py picks it."""
    lm = official.lm_transformer
    return lm.HybridNet2NetTransformer if getattr(args, "hybrid", False) else lm.Net2NetTransformer


def build_official_generator(official, init_kwargs: dict, first_stage: nn.Module):
    """The official Lightning module built by its own `__init__` from `init_kwargs`, with `first_stage` as the
    tokenizer that `load_magvit2` would load (the real loader imports requests and torch.loads pickles)."""
    lm = official.lm_transformer
    download = _stand_in(f"{OFFICIAL_PACKAGE}.download")
    download.load_magvit2 = lambda *a, **k: first_stage
    sys.modules[download.__name__] = download
    lm.LlamaTokenizer = right_padding_llama_tokenizer()
    with contextlib.redirect_stdout(io.StringIO()):  # the official __init__ prints its arguments
        return official_class(official, init_kwargs["args"])(**init_kwargs)


def official_generator(official, checkpoint: dict, first_stage: nn.Module, llama_tokenizer: str):
    """The official module of a Lightning checkpoint, built from its hyper-parameters as `load_from_checkpoint`
    builds it, with the `transformer.*` tensors loaded as `init_from_ckpt` loads them (`module.` stripped, "mask"
    keys dropped), but strictly. The embedded tokenizer copy is not loaded: decoding uses the tokenizer file."""
    hyper_parameters = checkpoint["hyper_parameters"]
    if isinstance(hyper_parameters, argparse.Namespace):
        hyper_parameters = vars(hyper_parameters)
    hyper_parameters = dict(hyper_parameters)
    if "args" not in hyper_parameters:
        raise ValueError("its hyper_parameters hold no 'args' (the training script's arguments): not an official "
                         f"NBP generator checkpoint? keys: {sorted(hyper_parameters)[:10]}")
    args = hyper_parameters["args"]  # the official module reads attributes: a saved dict becomes a Namespace again
    args = copy.deepcopy(args if isinstance(args, argparse.Namespace) else argparse.Namespace(**args))
    llama_files = ("tokenizer.model", "tokenizer.json")
    if training_arguments(hyper_parameters).get("cond_stage_key") == "text" and not any(
            os.path.isfile(os.path.join(llama_tokenizer, f)) for f in llama_files):
        raise FileNotFoundError(f"text-conditioned checkpoint, but the official LLaMA tokenizer "
                                f"({' or '.join(llama_files)} in {llama_tokenizer}) is missing from --official_repo")
    accepted = inspect.signature(official_class(official, args).__init__).parameters
    kwargs = {k: v for k, v in hyper_parameters.items() if k in accepted}
    kwargs.update(args=args, ckpt_path=None, tokenizer_path=None, llama_tokenizer=llama_tokenizer)
    module = build_official_generator(official, kwargs, first_stage)
    tensors = {k: v for k, v in strip_prefix(checkpoint["state_dict"], "module.").items()
               if k.startswith("transformer.") and "mask" not in k}
    missing, unused = module.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k.startswith("transformer.")]
    if missing or unused:
        raise ValueError(f"the official GPT does not match the checkpoint: missing {missing[:10]}, "
                         f"unused {unused[:10]}")
    return module.eval()


def stored_dtype(folder: str) -> torch.dtype:
    """The dtype of the floating-point tensors in a folder's safetensors files (read from their headers)."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                kind = f.get_slice(key).get_dtype()
                if kind in names:
                    return names[kind]
    return torch.float32


# the fields that make a converted folder the conversion of a checkpoint, not of another setting or size
PAIRED_FIELDS = ("condition_mode", "first_block", "num_condition_tokens", "condition_vocab_size", "vocab_size",
                 "latent_shape", "block_shape", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings")


def check_paired(model, generator_checkpoint, folder: str) -> None:
    """Raise ValueError when the converted generator in `folder` is not of the checkpoint's setting and size (another
    checkpoint's conversion would otherwise crash inside the comparisons or fail every row on shapes)."""
    expected = config_from_checkpoint(generator_checkpoint["hyper_parameters"],
                                      split_checkpoint_state_dict(generator_checkpoint["state_dict"])[0])
    differ = [f"{k} {getattr(model.config, k)} (checkpoint: {getattr(expected, k)})" for k in PAIRED_FIELDS
              if getattr(model.config, k) != getattr(expected, k)]
    if differ:
        raise ValueError(f"--converted {folder} is not a conversion of this checkpoint: its transformer/ has "
                         f"{', '.join(differ)}")


def our_models(args, generator_checkpoint, tokenizer_state_dict):
    """Our generator and tokenizer (in float32): converted in memory from the checkpoints, or loaded from
    --converted; -> (generator, tokenizer, the dtype each was stored in)."""
    generator = tokenizer = None
    if args.converted:
        if generator_checkpoint is not None:
            generator = NBPForVideoGeneration.from_pretrained(os.path.join(args.converted, "transformer"))
            check_paired(generator, generator_checkpoint, args.converted)
        if tokenizer_state_dict is not None:
            tokenizer = NBPVideoTokenizer.from_pretrained(os.path.join(args.converted, "video_tokenizer"))
    else:
        if generator_checkpoint is not None:
            generator = generator_from_checkpoint(generator_checkpoint)[0]
        if tokenizer_state_dict is not None:
            tokenizer = tokenizer_from_state_dict(tokenizer_state_dict)
    dtypes = [None if m is None else m.dtype for m in (generator, tokenizer)]
    if args.converted and tokenizer is not None:  # diffusers loads float32 whatever the files hold
        dtypes[1] = stored_dtype(os.path.join(args.converted, "video_tokenizer"))
    return [m if m is None else m.float().to(args.device).eval() for m in (generator, tokenizer)] + [dtypes]


# ---- comparisons ----------------------------------------------------------------------------------------------------
def shape_mismatch(ours: torch.Tensor, official: torch.Tensor) -> str:
    return f"shapes differ: ours {tuple(ours.shape)}, official {tuple(official.shape)}"


def value_row(name: str, ours: torch.Tensor, official: torch.Tensor, rtol: float) -> dict:
    """max |ours - official| and that relative to max |official|; passes when the latter is <= rtol."""
    row = dict(name=name, tolerance=f"rel <= {rtol:g}")
    if ours.shape != official.shape:
        return dict(row, ok=False, detail=shape_mismatch(ours, official))
    diff = (ours.double() - official.double()).abs().max().item()
    rel = diff / max(official.double().abs().max().item(), 1e-30)
    return dict(row, max_abs=diff, max_rel=rel, ok=rel <= rtol)


def id_row(name: str, ours: torch.Tensor, official: torch.Tensor, max_flips: int = 0) -> dict:
    """Share of equal ids (and the first differing flat position); passes when at most `max_flips` differ."""
    row = dict(name=name, tolerance="equal" if max_flips == 0 else f"<= {max_flips} differ")
    if ours.shape != official.shape:
        return dict(row, ok=False, detail=shape_mismatch(ours, official))
    same = ours.cpu().long() == official.cpu().long()
    differ = int((~same).sum())
    detail = "" if not differ else f"{differ} differ, the first at flat index {int((~same.flatten()).nonzero()[0])}"
    return dict(row, agreement=same.double().mean().item(), detail=detail, ok=differ <= max_flips)


def setting_name(module) -> str:
    if module.be_unconditional:
        return "unconditional (K600-like)"
    start = ("hybrid" if module.args.hybrid else "") + ("+BOV" if module.args.starts_with_bov else "")
    return f"{module.cond_stage_key}+{start}"


def random_inputs(module, model, generator: torch.Generator, batch_size: int = 2):
    """A random video id grid (B, T, H, W) of the model's latent shape, official conditions and our class labels:
    text (UCF-like): the class texts; label: class ids; unconditional: the grid itself (as transformer_eval.py)."""
    grid = torch.randint(0, MAGVIT2_VOCAB_SIZE, (batch_size, *model.config.latent_shape), generator=generator)
    if module.be_unconditional:
        return grid, grid, None
    labels = torch.randint(0, model.config.num_classes, (batch_size,), generator=generator)
    if module.cond_stage_key == "text":
        table = load_ucf101_table()
        return grid, [table[y]["text"] for y in labels.tolist()], labels
    return grid, labels, labels


def official_condition(module, condition, device) -> torch.Tensor:
    _, c_indices = module.encode_to_c(condition)
    return c_indices.long().to(device)


def official_training_logits(module, condition, grid):
    """`Net2NetTransformer.forward` without its random condition dropout: the official sequence (condition,
    BOV/placeholders, shifted video ids; the last block trimmed), its mask and the GPT's logits."""
    S = module.token_number_per_step
    c_indices = official_condition(module, condition, grid.device)
    bov, c_indices, _, a_indices = module.process_b_c_z_a(c_indices, grid.reshape(grid.shape[0], -1))
    sequence = torch.cat((c_indices, bov, a_indices), dim=1)
    mask = module.get_attn_mask(c_indices, sequence.shape[1] - S)
    logits, _ = module.transformer(sequence[:, :-S], mask)
    return sequence[:, :-S], logits


class _GivenTokens(nn.Module):
    """Stands in for the tokenizer inside the official `forward`: 'encodes' its input to a given token grid."""

    def __init__(self, grid: torch.Tensor):
        super().__init__()
        self.grid = grid

    def encode(self, video, quantize=True):
        return None, self.grid


def official_training_loss(module, condition, grid) -> torch.Tensor:
    """The official training objective (`shared_step`: cross-entropy of `forward`'s logits and targets) on a token
    grid, without the random condition dropout (whose branch fails as released: its mask leaves out the prefix that
    `uncond_embedding` fills); the tokenizer is bypassed (the grid stands for the encoded clip)."""
    saved = module.first_stage_model, module.p_drop_cond
    module.first_stage_model, module.p_drop_cond = _GivenTokens(grid), None
    try:
        logits, target = module(grid, condition)
    finally:
        module.first_stage_model, module.p_drop_cond = saved
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def official_greedy(official, module, condition, grid, num_context_frames: int):
    """Greedy video ids (B, T*H*W) from the official samplers, set up as transformer_eval.py sets them up
    (`class_condition_generation` / `frame_prediction`) with sample_logits=False."""
    S, (B, T, H, W) = module.token_number_per_step, grid.shape
    c_indices = official_condition(module, condition, grid.device)
    sampler_args = dict(sample_logits=False, temperature=1.0, top_k=None, top_p=None, pred_token_num_per_step=S)
    gpt = official.gpt
    if module.be_unconditional:
        prefix = grid[:, :num_context_frames].reshape(B, -1)
        x = torch.cat([c_indices, prefix], dim=-1)
        mask = module.get_attn_mask(c_indices, x.shape[1])
        steps = (T - num_context_frames) * (H * W // S)
        sample = gpt.sample_with_past(x, mask, module.transformer, steps=steps, **sampler_args)
        return torch.cat([prefix, sample.clamp(0, MAGVIT2_VOCAB_SIZE - 1)], dim=1)
    _, bov = module.bov_provider.encode(c_indices)
    c_indices = c_indices + S  # shift past BOV and the placeholders
    x = torch.cat((c_indices, bov), dim=1)
    mask = module.get_attn_mask(c_indices, x.shape[1])
    sample = gpt.hybrid_sample_with_past(x, mask, module.transformer, steps=T * H * W // S + S - 1, **sampler_args)
    return (sample - (module.cond_stage_vocab_size + S)).clamp(0, MAGVIT2_VOCAB_SIZE - 1)


def generator_rows(official, module, model, generator, rtol) -> list[dict]:
    name = setting_name(module)
    grid, condition, labels = random_inputs(module, model, generator)
    grid = grid.to(model.device)
    sequence, logits = official_training_logits(module, condition, grid)
    input_ids, _ = model.prepare_training_inputs(grid, labels)
    ours = model(input_ids=sequence).logits
    rows = [id_row(f"generator input ids, {name}", input_ids, sequence),
            value_row(f"generator logits, {name}", ours, logits, rtol),
            value_row(f"training loss, {name}", model(video_ids=grid, class_labels=labels).loss,
                      official_training_loss(module, condition, grid), rtol)]
    if module.cond_stage_key == "text":
        rows.append(ucf_table_row(module, model))
    context = OFFICIAL_CONTEXT_FRAMES if module.be_unconditional else 0
    if module.be_unconditional:  # what a pipeline call continues by default
        rows.append(id_row(f"context latent frames (official evaluation: {context})",
                           torch.tensor([model.config.num_context_frames]), torch.tensor([context])))
    official_ids = official_greedy(official, module, condition, grid, context)
    ours = model.generate_video_tokens(class_labels=labels, context_ids=grid[:, :context] if context else None,
                                       temperature=0.0)
    given = context * grid.shape[2] * grid.shape[3]  # the context's ids are copied on both sides: not compared
    rows.append(id_row(f"greedy generation, {name}", ours.reshape(grid.shape[0], -1)[:, given:],
                       official_ids[:, given:]))
    return rows


def ucf_table_row(module, model) -> dict:
    """The condition ids our model uses for the 101 UCF classes vs the official text encoding of their names."""
    texts = [entry["text"] for entry in load_ucf101_table()]
    official_ids = official_condition(module, texts, "cpu") + module.token_number_per_step
    return id_row("UCF-101 class condition ids (101 classes)", torch.tensor(model.config.class_condition_ids),
                  official_ids)


def pipeline_row(official, official_tok, module, model, tokenizer, generator, rtol) -> dict:
    """End to end, greedy: the pixels of transformer_eval.py's steps (frame prediction: encode the whole clip, keep
    its first latent frames, sample, decode context and generated ids; class-conditional: sample, decode) against
    `NBPVideoPipeline` given the context frames or the classes."""
    grid, condition, labels = random_inputs(module, model, generator)
    B, T, H, W = grid.shape
    pipe = NBPVideoPipeline(transformer=model, video_tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    if module.be_unconditional:
        context = OFFICIAL_CONTEXT_FRAMES
        size = (B, 3, tokenizer.num_frames_for_latent(T), H * tokenizer.spatial_compression,
                W * tokenizer.spatial_compression)
        clip = torch.rand(size, generator=generator).to(model.device)
        grid = official_tok.encode(clip, quantize=True)[1].long()
        official_ids = official_greedy(official, module, grid, grid, context)
        frames = clip[:, :, :tokenizer.num_frames_for_latent(context)].transpose(1, 2)  # (B, T, 3, H, W)
        ours = pipe(video=frames, temperature=0.0, output_type="pt").frames
    else:
        official_ids = official_greedy(official, module, condition, grid.to(model.device), 0)
        ours = pipe(class_labels=labels.tolist(), temperature=0.0, output_type="pt").frames
    official_video = official_tok.decode_from_code_indices(official_ids.reshape(B, T, H, W)).clamp(0, 1)
    return value_row(f"pipeline end to end (greedy), {setting_name(module)}", ours.transpose(1, 2), official_video,
                     rtol)


def tokenizer_rows(official_tok, ours, clip, rtol, max_flips) -> list[dict]:
    _, official_ids = official_tok.encode(clip, quantize=True)
    rows = [id_row(f"tokenizer encode ids, clip {tuple(clip.shape)}", ours.encode(clip), official_ids,
                   max_flips)]
    official_ids = official_ids.long()
    # before the [0, 1] clamp of decoding, which would hide the pixels outside it (about half with random weights)
    official_video = official_tok.decode_from_code_indices(official_ids)
    ours_video = ours._decode_codes(ours.indices_to_codes(official_ids))
    rows.append(value_row("tokenizer decode (same ids, unclamped)", ours_video, official_video, rtol))
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    width = max([len("check")] + [len(row["name"]) for row in rows])
    header = f"{'check':<{width}} {'max abs':>9} {'max rel':>9} {'agree':>8}  {'tolerance':<14} result"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['name']:<{width}} {cell(row, 'max_abs', '.2e'):>9} {cell(row, 'max_rel', '.2e'):>9} "
                     f"{cell(row, 'agreement', '.2%'):>8}  {row['tolerance']:<14} {'ok' if row['ok'] else 'FAIL'}"
                     + (f"  ({row['detail']})" if row.get("detail") else ""))
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    summary, _, details = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="nbp check-conversion", description=summary,
                                     epilog=details, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_repo", required=True, help="checkout of github.com/RenShuhuai-Andy/NBP")
    parser.add_argument("--generator", help="official generator checkpoint (*.ckpt)")
    parser.add_argument("--tokenizer", help="official tokenizer file (magvit2_*.pt)")
    parser.add_argument("--converted", help="compare this `nbp convert` output folder instead of converting here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--frames", type=int, default=9, help="frames of the tokenizer's random clip, 1 + 4k "
                        "(default 9)")
    parser.add_argument("--resolution", type=int, default=None, help="height and width of the tokenizer's clip "
                        "(default: the generator's resolution, else 128)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help="allowed max|ours - official| / "
                        f"max|official| for logits and decoded video (default {DEFAULT_RTOL:g})")
    parser.add_argument("--max_id_flips", type=int, default=DEFAULT_MAX_ID_FLIPS,
                        help="tokenizer encode ids allowed to differ (an FSQ value on a rounding boundary may flip; "
                             f"default {DEFAULT_MAX_ID_FLIPS})")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit status 2) naming the first bad argument."""
    if args.generator is None and args.tokenizer is None:
        parser.error("give --generator, --tokenizer or both")
    for name, path in (("generator", args.generator), ("tokenizer", args.tokenizer)):
        try:
            if path is not None:
                require_checkpoint_file(path)
        except (FileNotFoundError, ValueError) as error:
            parser.error(f"--{name}: {error}")
    if args.converted is not None:
        for name, sub in (("generator", "transformer"), ("tokenizer", "video_tokenizer")):
            if getattr(args, name) is not None and not os.path.isdir(os.path.join(args.converted, sub)):
                parser.error(f"--converted: {args.converted} has no {sub}/ folder to compare with --{name}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device!r} is not available here (cpu{', cuda' * torch.cuda.is_available()})")
    if args.frames < 1 or (args.frames - 1) % 4:
        parser.error(f"--frames must be 1 + 4k (1, 5, 9, 17, ...), got {args.frames}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if not args.rtol > 0:
        parser.error(f"--rtol must be positive, got {args.rtol}")
    if args.max_id_flips < 0:
        parser.error(f"--max_id_flips must be >= 0, got {args.max_id_flips}")


def round_like(official_module: nn.Module, dtype: torch.dtype, part: str, notes: list[str]) -> None:
    """A --converted part stored in another dtype than float32: give the official module the same rounded weights
    (both then compute in float32), so the rows compare the code, not the rounding."""
    if dtype in (None, torch.float32):
        return
    for p in official_module.parameters():
        p.data = p.data.to(dtype).float()
    notes.append(f"the converted {part} is stored in {str(dtype).removeprefix('torch.')}: the official {part}'s "
                 "weights were rounded to it too")


def load_named(argument: str, load):
    """`load()`, its errors prefixed with the argument whose file it reads."""
    try:
        return load()
    except (ValueError, KeyError, FileNotFoundError) as error:
        raise ValueError(f"{argument}: {error}") from error


def run_checks(args, official, notes: list[str]) -> list[dict]:
    generator_checkpoint = (load_named(f"--generator {args.generator}", lambda: safe_torch_load(args.generator))
                            if args.generator else None)
    tokenizer_state_dict = (load_named(f"--tokenizer {args.tokenizer}", lambda: tokenizer_state_dict_from_checkpoint(
        safe_torch_load(args.tokenizer))) if args.tokenizer else None)
    model, our_tokenizer, stored = load_named(f"--generator {args.generator} / --tokenizer {args.tokenizer}",
                                      lambda: our_models(args, generator_checkpoint, tokenizer_state_dict))
    resolution = args.resolution or 128
    if generator_checkpoint is not None and args.resolution is None:
        resolution = int(training_arguments(generator_checkpoint["hyper_parameters"]).get("resolution", 128))
    official_tok = (official_tokenizer(official, tokenizer_state_dict, resolution).to(args.device)
                    if tokenizer_state_dict is not None else None)
    if official_tok is not None:
        round_like(official_tok, stored[1], "tokenizer", notes)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    if generator_checkpoint is not None:
        first_stage = official_tok if official_tok is not None else nn.Module()
        module = load_named(f"--generator {args.generator}", lambda: official_generator(
            official, generator_checkpoint, first_stage, os.path.join(args.official_repo, "llama_tokenizer")))
        module = module.to(args.device)
        round_like(module.transformer, stored[0], "generator", notes)
        rows += generator_rows(official, module, model, generator, args.rtol)
        if official_tok is not None:
            rows.append(pipeline_row(official, official_tok, module, model, our_tokenizer, generator, args.rtol))
        if module.cond_stage_key == "text":
            notes.append("the official code's transformers 4 slow LlamaTokenizer is stood in for by transformers' "
                         "LlamaTokenizer on llama_tokenizer/ with right padding and total_vocab_size")
        del module
    if official_tok is not None:
        clip = torch.rand(1, 3, args.frames, resolution, resolution, generator=generator).to(args.device)
        rows += tokenizer_rows(official_tok, our_tokenizer, clip, args.rtol, args.max_id_flips)
    return rows


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        official, notes = import_official(args.official_repo)
    except (FileNotFoundError, ModuleNotFoundError) as error:
        parser.exit(2, f"check_official: error: {error}\n")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            rows = run_checks(args, official, notes)
    except (ValueError, FileNotFoundError) as error:  # checkpoints that cannot be read or converted
        parser.exit(2, f"check_official: error: {error}\n")
    except Exception as error:  # noqa: BLE001 - the official code failed: not a failed comparison (status 1)
        parser.exit(2, f"check_official: error while running the official code or ours: "
                       f"{type(error).__name__}: {error}\n")
    for note in notes:
        print(f"note: {note}")
    print(format_table(rows))
    failed = [row["name"] for row in rows if not row["ok"]]
    print(f"FAILED: {', '.join(failed)}" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
