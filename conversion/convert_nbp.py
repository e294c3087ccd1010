"""Official NBP generator checkpoints (PyTorch Lightning `*.ckpt`) -> `NBPForVideoGeneration`.

What the official code does and how it maps here (github.com/RenShuhuai-Andy/NBP, read for facts only):
- `nbp/lm_transformer.py` `Net2NetTransformer` / `HybridNet2NetTransformer` save their `__init__` arguments as
  Lightning `hyper_parameters`: the training script's `argparse.Namespace` under "args", plus `cond_stage_key`,
  `bov_token`, ... at the top level. The GPT's vocabulary is 64000 video ids + the condition vocabulary (LLaMA-2's
  32000 for `cond_stage_key="text"`, the class count for "label", 0 when `unconditional`) + special tokens
  (`token_number_per_step` for the hybrid start, 1 for a BOV, 0 when unconditional). Video ids come last.
- `nbp/modules/gpt.py` `GPT`: `tok_emb`, `pos_emb` (1, block_size, D), `uncond_embedding` (cond_token_num, D, a
  buffer), `blocks.{i}.{ln1, attn.{query,key,value,proj}, ln2, mlp.0, mlp.2}`, `ln_f`, `head` (no bias).
  LayerNorm eps 1e-5, exact GELU, no dropout in attention.
- The released models: UCF-101 (`scripts/lm_train/train_ucf.sh`: `--cond_stage_key text --cond_token_num 8
  --starts_with_bov --hybrid --token_number_per_step 16`) and Kinetics-600 (`train_k600.sh`: `--unconditional
  --token_number_per_step 16`, frame prediction from 2 latent frames at evaluation), both `--resolution 128
  --sequence_length 17 --block_size 5120`.

Sampling used for every result in the paper (stored as the converted model's generation_config): top-k 16000,
top-p 0.9, temperature 1.0; UCF-101: 95 steps from the class prompt; K600: 2 context latent frames (5 pixel frames),
48 steps. The official samplers (`hybrid_sample_with_past`, `sample_with_past`) filter and sample over every id of
the vocabulary, feed the sampled id back as it is, and clamp `id - video offset` into the video range when decoding
(`transformer_eval.py`); converted models keep that (`config.sample_whole_vocabulary`).
"""

import argparse
import numbers

import torch
from accelerate import init_empty_weights

from ..configuration_nbp import NBPConfig
from ..generation import PAPER_SAMPLING
from ..modeling_nbp import NBPForVideoGeneration
from ..ucf101 import load_ucf101_table, ucf101_id2label
from .safe_load import check_tensor_dict, load_exact_state_dict, strip_prefix, zero_to_fp32_advice

MAGVIT2_VOCAB_SIZE = 64000  # official first_stage_vocab_size for tokenizer "magvit2"
EMBEDDED_TOKENIZER_PREFIX = "first_stage_model."
GENERATOR_PREFIX = "transformer."

# official name under `transformer.` -> our name; "{i}" is the layer index
_GLOBAL_KEYS = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "pos_emb": "model.embed_positions.weight",  # (1, L, D) there, (L, D) here
    "uncond_embedding": "model.uncond_embedding",
    "ln_f.weight": "model.norm.weight",
    "ln_f.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}
_LAYER_MODULES = {
    "ln1": "input_layernorm",
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.proj": "self_attn.o_proj",
    "ln2": "post_attention_layernorm",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
}


def official_key_map(num_layers: int) -> dict[str, str]:
    """Every official generator key (with its `transformer.` prefix) -> our key, for `num_layers` blocks."""
    names = {GENERATOR_PREFIX + k: v for k, v in _GLOBAL_KEYS.items()}
    for i in range(num_layers):
        for theirs, ours in _LAYER_MODULES.items():
            for p in ("weight", "bias"):
                names[f"{GENERATOR_PREFIX}blocks.{i}.{theirs}.{p}"] = f"model.layers.{i}.{ours}.{p}"
    return names


def split_checkpoint_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """Lightning `state_dict` -> (generator tensors, embedded tokenizer tensors without their prefix).

    Strips `module.` (DeepSpeed/DDP), drops every key containing "mask" (as the official loader does) and fails
    on keys that belong to neither part."""
    state_dict = check_tensor_dict(state_dict, "the checkpoint's 'state_dict'")
    state_dict = {k: v for k, v in strip_prefix(state_dict, "module.").items() if "mask" not in k}
    generator = {k: v for k, v in state_dict.items() if k.startswith(GENERATOR_PREFIX)}
    tokenizer = {k[len(EMBEDDED_TOKENIZER_PREFIX):]: v for k, v in state_dict.items()
                 if k.startswith(EMBEDDED_TOKENIZER_PREFIX)}
    other = sorted(k for k in state_dict if k not in generator and not k.startswith(EMBEDDED_TOKENIZER_PREFIX))
    if other:
        raise ValueError(f"unused tensors in the checkpoint (neither {GENERATOR_PREFIX}* nor "
                         f"{EMBEDDED_TOKENIZER_PREFIX}*): {other[:20]}")
    return generator, tokenizer


def training_arguments(hyper_parameters) -> dict:
    """Merge Lightning's `hyper_parameters` (the module's __init__ arguments) with the script's `args` namespace;
    the __init__ arguments win (they are what the official module used, e.g. `cond_stage_key`)."""
    if isinstance(hyper_parameters, argparse.Namespace):
        hyper_parameters = vars(hyper_parameters)
    if not isinstance(hyper_parameters, dict):
        raise ValueError(f"checkpoint 'hyper_parameters' must be a dict or Namespace, got "
                         f"{type(hyper_parameters).__name__}")
    hp = dict(hyper_parameters)
    args = hp.pop("args", {})
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(args, dict):
        raise ValueError(f"checkpoint hyper_parameters 'args' must be a dict or Namespace, got {type(args).__name__}")
    args = dict(args)
    args.update(hp)
    return args


def _number(args: dict, key: str, default=None, kind=int):
    """The hyper-parameter `key` (`default` when absent or None) as `kind` (int or float); a value of another type,
    or a fraction for an int, raises ValueError naming it (a damaged or foreign checkpoint)."""
    value = args.get(key)
    value = default if value is None else value
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or kind is int and not (isinstance(value, numbers.Integral) or float(value).is_integer())):
        wanted = "an integer" if kind is int else "a number"
        raise ValueError(f"checkpoint hyper_parameters {key}={value!r} is not {wanted}")
    return kind(value)


def _block_shape(tokens_per_step: int, latent_shape) -> list[int]:
    """The official blocks are runs of `token_number_per_step` tokens in raster order: part of a row, whole rows
    or whole frames."""
    T, H, W = latent_shape
    S = tokens_per_step
    if W % S == 0:
        return [1, 1, S]
    if S % W == 0 and H % (S // W) == 0:
        return [1, S // W, W]
    if S % (H * W) == 0 and T % (S // (H * W)) == 0:
        return [S // (H * W), H, W]
    raise ValueError(f"token_number_per_step={S} does not cut the {T}x{H}x{W} token grid into raster-order blocks")


def config_from_checkpoint(hyper_parameters, generator_state_dict: dict,
                           num_context_frames: int | None = None) -> NBPConfig:
    """Build the `NBPConfig` of an official checkpoint from its hyper-parameters (checked against its tensors).

    `num_context_frames` is the number of latent frames given as context to an unconditional (frame prediction)
    model, an evaluation choice (None: the official K600 evaluation's 2 latent frames = 5 pixel frames); giving it
    for a class-conditional model is an error."""
    args = training_arguments(hyper_parameters)
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size") if k not in args]
    if missing:
        raise ValueError(f"checkpoint hyper_parameters lack {missing}; is this an official NBP generator checkpoint?")
    if args.get("tokenizer", "magvit2") != "magvit2" or args.get("vtokens") or args.get("vtokens_pos"):
        raise ValueError("only generators trained on MAGVIT-v2 tokens are supported (hyper_parameters: tokenizer="
                         f"{args.get('tokenizer')!r}, vtokens={args.get('vtokens')}, "
                         f"vtokens_pos={args.get('vtokens_pos')})")
    if args.get("bov_token", 0) != 0:
        raise ValueError(f"bov_token must be 0 (official), got {args['bov_token']}")

    S = _number(args, "token_number_per_step", 1) or 1
    hybrid, starts_with_bov = bool(args.get("hybrid")), bool(args.get("starts_with_bov"))
    unconditional = bool(args.get("unconditional"))
    cond_key = args.get("cond_stage_key", "label")
    if num_context_frames is not None and not unconditional:
        raise ValueError(f"num_context_frames={num_context_frames} (--num_context_frames) is only for unconditional "
                         f"(frame prediction) checkpoints; this one is conditioned on cond_stage_key={cond_key!r}: "
                         "leave num_context_frames out")
    frames = _number(args, "sequence_length", 17)
    resolution = _number(args, "resolution", 128)
    latent_shape = [(frames - 1) // 4 + 1, resolution // 8, resolution // 8]  # official eval: 4x time, 8x space
    if GENERATOR_PREFIX + "tok_emb.weight" not in generator_state_dict:
        raise ValueError(f"the checkpoint has no {GENERATOR_PREFIX}tok_emb.weight")
    vocab_size = generator_state_dict[GENERATOR_PREFIX + "tok_emb.weight"].shape[0]

    task = dict(latent_shape=latent_shape, block_shape=_block_shape(S, latent_shape),
                video_vocab_size=MAGVIT2_VOCAB_SIZE)
    if unconditional:
        if hybrid or starts_with_bov:
            raise ValueError("unconditional official models never use hybrid or starts_with_bov")
        task.update(condition_mode="frames", first_block="none", condition_vocab_size=0,
                    num_context_frames=2 if num_context_frames is None else num_context_frames)
    elif not hybrid:
        raise ValueError(
            f"conditional checkpoints without the hybrid start (cond_stage_key={cond_key!r}, hybrid={hybrid}, "
            f"starts_with_bov={starts_with_bov}) are not supported: without BOV nothing predicts the first block, "
            "and the official BOV-without-hybrid path does not run (its logits and targets differ in length)"
        )
    elif cond_key == "text":
        condition_vocab = vocab_size - MAGVIT2_VOCAB_SIZE - S  # the LLaMA-2 vocabulary (32000)
        classes = load_ucf101_table()
        if _number(args, "cond_token_num", 0) != len(classes[0]["llama2_ids"]):
            raise ValueError(f"text-conditioned checkpoints are the UCF-101 models, whose class names are "
                             f"{len(classes[0]['llama2_ids'])} LLaMA-2 ids; got "
                             f"cond_token_num={args.get('cond_token_num')}")
        if max(max(c["llama2_ids"]) for c in classes) >= condition_vocab:
            raise ValueError(f"the text vocabulary of this checkpoint ({condition_vocab} ids) is smaller than "
                             "LLaMA-2's")
        # official: text ids are shifted past BOV and the placeholders (token_number_per_step ids; 16 for UCF)
        task.update(condition_mode="class", first_block="hybrid", condition_vocab_size=condition_vocab,
                    class_condition_ids=[[i + S for i in c["llama2_ids"]] for c in classes],
                    id2label=ucf101_id2label())
    elif cond_key == "label":
        if not args.get("class_cond_dim"):
            raise ValueError("label-conditioned checkpoint without class_cond_dim in its hyper_parameters")
        classes = _number(args, "class_cond_dim")
        task.update(condition_mode="class", first_block="hybrid", num_classes=classes, num_condition_tokens=1,
                    condition_vocab_size=classes)
    else:
        raise ValueError(f"unsupported cond_stage_key {cond_key!r}; supported: 'text' (UCF-101), 'label', "
                         "unconditional")

    fps = args.get("fps")  # the training clips' rate (official data flag; -1 or None: the videos' own)
    config = NBPConfig(
        **task, fps=float(fps) if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0 else None,
        hidden_size=_number(args, "n_embd"), num_hidden_layers=_number(args, "n_layer"),
        num_attention_heads=_number(args, "n_head"), max_position_embeddings=_number(args, "block_size"),
        hidden_dropout=_number(args, "transformer_dropout", 0.0, float), attention_dropout=0.0,
        class_dropout_prob=_number(args, "p_drop_cond", 0.0, float), layer_norm_eps=1e-5,
        sample_whole_vocabulary=True,  # the official samplers: every id, fed back as sampled, clamped when decoded
    )
    if config.vocab_size != vocab_size:
        raise ValueError(f"hyper_parameters imply a vocabulary of {config.vocab_size} ids (special tokens, condition "
                         f"ids, {MAGVIT2_VOCAB_SIZE} video ids) but {GENERATOR_PREFIX}tok_emb has {vocab_size} rows")
    return config


def convert_generator_state_dict(generator_state_dict: dict, config: NBPConfig) -> dict:
    """Official `transformer.*` tensors -> our state dict; fails on any key the mapping does not cover."""
    names = official_key_map(config.num_hidden_layers)
    unused = sorted(k for k in generator_state_dict if k not in names)
    if unused:
        raise ValueError(f"unused tensors in the generator checkpoint (not in a {config.num_hidden_layers}-layer "
                         f"official GPT): {unused[:20]}")
    converted = {names[k]: v for k, v in generator_state_dict.items()}
    pos = converted.get("model.embed_positions.weight")
    if pos is not None:
        if pos.ndim != 3 or pos.shape[0] != 1:
            raise ValueError(f"{GENERATOR_PREFIX}pos_emb must have shape (1, block_size, n_embd), "
                             f"got {tuple(pos.shape)}")
        converted["model.embed_positions.weight"] = pos[0]
    return converted


def generator_from_checkpoint(checkpoint: dict, dtype: torch.dtype = torch.float32,
                              num_context_frames: int | None = None):
    """A loaded official Lightning checkpoint -> (`NBPForVideoGeneration` in eval mode, embedded tokenizer tensors
    (official key names without prefix; empty when the checkpoint holds none))."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        found = sorted(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        hint = ""
        if isinstance(checkpoint, dict) and "param_shapes" in checkpoint:
            hint = (" It is a DeepSpeed model-states file (of a checkpoint folder's global_step*/ or checkpoint/). "
                    + zero_to_fp32_advice("FOLDER"))
        elif isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
            hint = (" It holds tensors only, without Lightning's hyper_parameters (the settings), as DeepSpeed's own "
                    "zero_to_fp32.py writes. " + zero_to_fp32_advice("FOLDER"))
        raise ValueError(f"not a Lightning generator checkpoint: expected 'state_dict' and 'hyper_parameters', "
                         f"got {found}.{hint}")
    generator, tokenizer = split_checkpoint_state_dict(checkpoint["state_dict"])
    config = config_from_checkpoint(checkpoint["hyper_parameters"], generator, num_context_frames)
    # sizes larger than the tensors hold are refused before the model is built (a damaged file could ask for
    # millions of layers, or embeddings of terabytes); smaller ones fail below, naming the tensors left over
    blocks, pos = GENERATOR_PREFIX + "blocks.", generator.get(GENERATOR_PREFIX + "pos_emb")
    held = {"n_layer": (config.num_hidden_layers, f"{blocks}*", "layers",
                        len({k[len(blocks):].split(".")[0] for k in generator if k.startswith(blocks)})),
            "n_embd": (config.hidden_size, f"{GENERATOR_PREFIX}tok_emb.weight", "columns",
                       generator[GENERATOR_PREFIX + "tok_emb.weight"].shape[-1]),
            "block_size": (config.max_position_embeddings, f"{GENERATOR_PREFIX}pos_emb", "positions",
                           pos.shape[-2] if pos is not None and pos.ndim >= 2 else 0)}
    larger = [f"{key}={size}, but {name} holds {n} {what}" for key, (size, name, what, n) in held.items() if size > n]
    if larger:
        raise ValueError(f"checkpoint hyper_parameters larger than its tensors: {'; '.join(larger)}")
    with init_empty_weights(include_buffers=False):
        model = NBPForVideoGeneration(config)
    ours_to_official = {v: k for k, v in official_key_map(config.num_hidden_layers).items()}
    load_exact_state_dict(model, convert_generator_state_dict(generator, config), "generator checkpoint",
                          ours_to_official, dtype)
    model.generation_config.update(do_sample=True, **PAPER_SAMPLING)  # saved with the model: its default sampling
    return model.eval(), tokenizer
