"""Conversion of the official NBP checkpoints, checked against independent reference implementations.

The tests write tiny checkpoints IN THE OFFICIAL FORMATS (the Lightning generator `*.ckpt` and the tokenizer
`magvit2_*.pt`, with the official key names and layouts, random weights), convert them, and compare the converted
models with reference forwards written here from the published description of the official modules (minGPT
blocks with the official attention masks; the MAGVIT-v2-style causal CNN encoder/decoder with FSQ), which read the
official-format tensors directly.
"""

import argparse
import math
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from modeling_nbp import NBPConfig, NBPForVideoGeneration
from modeling_nbp.conversion import config_from_checkpoint, convert_checkpoints, generator_from_checkpoint, main
from modeling_nbp.conversion.safe_load import safe_torch_load
from modeling_nbp.pipelines import NBPVideoPipeline
from modeling_nbp.text_condition import check_ucf_table, class_name_to_text, text_to_condition_ids
from modeling_nbp.ucf101 import load_ucf101_table
from modeling_nbp.video_tokenizer import NBPVideoTokenizer

VIDEO_VOCAB, LLAMA_VOCAB = 64000, 32000


# ---- official-format generator checkpoints -------------------------------------------------------------------------
def training_args(**overrides):
    """The argparse namespace that the official transformer_train.py stores (the fields the model reads)."""
    args = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=64000, token_number_per_step=4,
                hybrid=False, starts_with_bov=False, cond_stage_key="label", cond_token_num=0, unconditional=False,
                class_cond_dim=None, transformer_dropout=0.1, resolution=32, sequence_length=5, semi_ar=True,
                tokenizer="magvit2", vtokens=False, vtokens_pos=False, p_drop_cond=None, n_unmasked=0,
                llama_tokenizer="/path/to/NBP/llama_tokenizer/", gpus=8, base_lr=6e-4)
    args.update(overrides)
    return argparse.Namespace(**args)


# UCF-like: LLaMA text prefix of 8 ids, BOV, hybrid start; K600-like: unconditional, plain next-block shift
SETTINGS = {
    "ucf": dict(cond_stage_key="text", cond_token_num=8, hybrid=True, starts_with_bov=True, sequence_length=5, fps=8),
    "k600": dict(unconditional=True, sequence_length=9, fps=16),
    "label": dict(cond_stage_key="label", class_cond_dim=5, cond_token_num=1, hybrid=True, starts_with_bov=True),
}


def condition_vocab(args):
    if args.unconditional:
        return 0
    return LLAMA_VOCAB if args.cond_stage_key == "text" else args.class_cond_dim


def special_tokens(args):
    return 0 if args.unconditional else (args.token_number_per_step if args.hybrid else 1)


def gpt_vocab(args):
    return VIDEO_VOCAB + condition_vocab(args) + special_tokens(args)


def official_gpt_tensors(args, seed=0):
    """Random `transformer.*` tensors with the official names and shapes (nbp/modules/gpt.py)."""
    g = torch.Generator().manual_seed(seed)
    D, V = args.n_embd, gpt_vocab(args)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.tok_emb.weight": rand(V, D, scale=0.5),
          "transformer.pos_emb": rand(1, args.block_size, D, scale=0.5),
          "transformer.uncond_embedding": rand(args.cond_token_num, D, scale=D ** -0.5)}
    for i in range(args.n_layer):
        b = f"transformer.blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = 1 + rand(D, scale=0.1), rand(D, scale=0.1)
        for name in ("query", "key", "value", "proj"):
            sd[b + f"attn.{name}.weight"], sd[b + f"attn.{name}.bias"] = rand(D, D, scale=D ** -0.5), rand(D, scale=0.1)
        sd[b + "mlp.0.weight"], sd[b + "mlp.0.bias"] = rand(4 * D, D, scale=D ** -0.5), rand(4 * D, scale=0.1)
        sd[b + "mlp.2.weight"], sd[b + "mlp.2.bias"] = rand(D, 4 * D, scale=(4 * D) ** -0.5), rand(D, scale=0.1)
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = 1 + rand(D, scale=0.1), rand(D, scale=0.1)
    sd["transformer.head.weight"] = rand(V, D, scale=D ** -0.5)
    return sd


def lightning_checkpoint(args, state_dict):
    """What PyTorch Lightning saves for the official Net2NetTransformer (its __init__ arguments as hyper_parameters)."""
    return {"epoch": 2559, "global_step": 100000, "pytorch-lightning_version": "1.5.10", "hparams_name": "kwargs",
            "state_dict": state_dict,
            "callbacks": {"ModelCheckpoint{'monitor': 'train/loss'}": {"best_model_score": torch.tensor(3.2)}},
            "hyper_parameters": {"args": args, "ckpt_path": None, "ignore_keys": ["mask"], "first_stage_key": "video",
                                 "cond_stage_key": args.cond_stage_key, "pkeep": 1.0, "bov_token": 0,
                                 "tokenizer_path": None, "llama_tokenizer": None}}


def write_generator(path, setting, extra=None, drop=(), seed=0, **overrides):
    args = training_args(**dict(SETTINGS[setting], **overrides))
    sd = official_gpt_tensors(args, seed)
    sd["transformer.blocks.0.attn.mask"] = torch.ones(1, 1, 8, 8)  # old minGPT buffer: the official loader drops "mask"
    sd["first_stage_model.encoder_layers.0.conv.weight"] = torch.zeros(8, 3, 3, 3, 3)  # the frozen tokenizer copy
    sd["first_stage_model.encoder_layers.0.conv.bias"] = torch.zeros(8)
    sd.update(extra or {})
    for key in drop:
        del sd[key]
    torch.save(lightning_checkpoint(args, sd), path)
    return args, sd


# ---- reference GPT forward (official minGPT, from the published description) -----------------------------------------
def official_mask(L, args):
    """nbp/lm_transformer.py get_attn_mask: prefix columns visible to all (the official pad check never matches, so
    pad columns are visible too); hybrid: causal, and blocks of S from prefix + S; otherwise blocks of S from the
    prefix on."""
    P, S = (0 if args.unconditional else args.cond_token_num), args.token_number_per_step
    mask = torch.tril(torch.ones(L, L)) if args.hybrid else torch.zeros(L, L)
    mask[:, :P] = 1
    start = P + S if args.hybrid else P
    for i in range(start, L, S):
        mask[i:i + S, start:i + S] = 1
    return mask.bool()


def reference_logits(sd, args, idx):
    t = lambda name: sd["transformer." + name]  # noqa: E731
    B, L = idx.shape
    D, H = args.n_embd, args.n_head
    mask = official_mask(L, args)
    x = F.embedding(idx, t("tok_emb.weight")) + t("pos_emb")[:, :L]
    for i in range(args.n_layer):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (D,), t(b + "ln1.weight"), t(b + "ln1.bias"), 1e-5)
        q, k, v = (F.linear(h, t(b + f"attn.{n}.weight"), t(b + f"attn.{n}.bias")).view(B, L, H, D // H).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1) / math.sqrt(D // H)).masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(B, L, D), t(b + "attn.proj.weight"), t(b + "attn.proj.bias"))
        h = F.layer_norm(x, (D,), t(b + "ln2.weight"), t(b + "ln2.bias"), 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, t(b + "mlp.0.weight"), t(b + "mlp.0.bias"))),
                         t(b + "mlp.2.weight"), t(b + "mlp.2.bias"))
    return F.linear(F.layer_norm(x, (D,), t("ln_f.weight"), t("ln_f.bias"), 1e-5), t("head.weight"))


def official_full_sequence(args, condition, z):
    """nbp/lm_transformer.py process_b_c_z_a: condition ids (text ids or labels) and raster video ids -> the full
    official sequence [cond + S][BOV][z_0..z_{S-1}][1..S-1][z_S..] (hybrid) or z (unconditional)."""
    if args.unconditional:
        return z
    S = args.token_number_per_step
    video = z + condition_vocab(args) + S
    placeholders = torch.arange(1, S).repeat(z.shape[0], 1)
    bov = torch.zeros(z.shape[0], 1, dtype=torch.long)
    return torch.cat([condition + S, bov, video[:, :S], placeholders, video[:, S:]], dim=1)


def reference_greedy(sd, args, condition, context, num_video_tokens):
    """Greedy decoding with the reference forward, recomputing the whole sequence each step (official
    hybrid_sample_with_past / sample_with_past): argmax over every id of the vocabulary, fed back as it is;
    video ids = clamp(id - offset, 0, V - 1), as transformer_eval.py reads them."""
    S = args.token_number_per_step
    offset = 0 if args.unconditional else condition_vocab(args) + S
    video = list(context[0].tolist()) if context is not None else []
    if args.unconditional:
        seq = context.clone()
    else:
        seq = torch.cat([condition + S, torch.zeros(1, 1, dtype=torch.long)], dim=1)
    while len(video) < num_video_tokens:
        n = 1 if (not args.unconditional and len(video) < S) else S
        new = reference_logits(sd, args, seq)[:, -n:].argmax(-1)
        video += (new - offset).clamp(0, VIDEO_VOCAB - 1)[0].tolist()
        seq = torch.cat([seq, new], dim=1)
        if not args.unconditional and len(video) == S:  # switch to blocks: append the placeholders 1..S-1
            seq = torch.cat([seq, torch.arange(1, S)[None]], dim=1)
    return torch.tensor([video])


def latent_shape(args):
    return ((args.sequence_length - 1) // 4 + 1, args.resolution // 8, args.resolution // 8)


def condition_for(args, labels):
    """(B, P) official condition ids (before the +S shift) for class labels, and the labels our model takes."""
    if args.unconditional:
        return torch.zeros(len(labels), 0, dtype=torch.long), None
    if args.cond_stage_key == "text":
        return torch.tensor([load_ucf101_table()[y]["llama2_ids"] for y in labels]), labels
    return torch.tensor(labels)[:, None], labels


# ---- generator parity ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["ucf", "k600", "label"])
def test_converted_generator_matches_reference_forward(tmp_path, setting):
    args, sd = write_generator(tmp_path / "gen.ckpt", setting)
    out = convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt")
    model = NBPForVideoGeneration.from_pretrained(os.path.join(out, "transformer")).eval()
    assert not os.path.exists(os.path.join(out, "video_tokenizer"))  # the first_stage_model keys are skipped
    assert model.config.fps == getattr(args, "fps", None)  # the training clips' rate, for nbp generate

    g = torch.Generator().manual_seed(1)
    T, Hl, Wl = latent_shape(args)
    grid = torch.randint(0, VIDEO_VOCAB, (2, T, Hl, Wl), generator=g)
    cond, labels = condition_for(args, [3, 4])
    S = args.token_number_per_step
    official_input = official_full_sequence(args, cond, grid.reshape(2, -1))[:, :-S]

    # our training inputs are the official ones, and the logits match the reference forward
    input_ids, labels_ours = model.prepare_training_inputs(grid, labels)
    assert torch.equal(input_ids, official_input)
    with torch.no_grad():
        ours = model(input_ids=input_ids, labels=labels_ours)
    ref = reference_logits(sd, args, official_input)
    assert (ours.logits - ref).abs().max() <= 1e-4

    # the training loss equals the official cross-entropy (logits cut after the condition, shifted targets)
    z = grid.reshape(2, -1)
    if args.unconditional:
        ref_loss = F.cross_entropy(ref.flatten(0, 1), z[:, S:].flatten())
    else:
        P = cond.shape[1]
        ref_loss = F.cross_entropy(ref[:, P:].flatten(0, 1), (z + condition_vocab(args) + S).flatten())
    assert abs(ours.loss.item() - ref_loss.item()) <= 1e-4

    # a cached decoding step (one block against the cache) gives the same logits
    a = official_input.shape[1] - S
    with torch.no_grad():
        first = model(input_ids=official_input[:, :a], use_cache=True)
        step = model(input_ids=official_input[:, a:], cache=first.cache, use_cache=True)
    assert (step.logits - ref[:, a:]).abs().max() <= 1e-4


@pytest.mark.parametrize("setting", ["ucf", "k600"])
def test_greedy_generation_matches_reference_decoding(tmp_path, setting):
    args, sd = write_generator(tmp_path / "gen.ckpt", setting, seed=3)
    model, _ = generator_from_checkpoint(safe_torch_load(tmp_path / "gen.ckpt"))
    T, Hl, Wl = latent_shape(args)
    N = T * Hl * Wl
    cond, labels = condition_for(args, [7])
    context = None
    if args.unconditional:  # K600: two latent frames of context
        context = torch.randint(0, VIDEO_VOCAB, (1, 2, Hl, Wl), generator=torch.Generator().manual_seed(5))
    ours = model.generate_video_tokens(class_labels=labels, context_ids=context, temperature=0.0)
    ref = reference_greedy(sd, args, cond, None if context is None else context.reshape(1, -1), N)
    assert torch.equal(ours.reshape(1, -1), ref)


def released_args(preset):
    """The hyper-parameters of the released models (scripts/lm_train/train_{ucf,k600}.sh) at a paper size."""
    layers, width, heads = {"700m": (24, 1536, 16), "3b": (32, 3072, 32)}[preset.split("-")[1]]
    task = dict(SETTINGS["ucf"] if preset.startswith("ucf") else SETTINGS["k600"], token_number_per_step=16,
                resolution=128, sequence_length=17, block_size=5120)
    return training_args(n_layer=layers, n_head=heads, n_embd=width, **task)


def test_config_from_hyperparameters_matches_the_official_settings():
    """Full-size official hyper-parameters give the paper's configurations (our presets)."""
    cases = [(preset, released_args(preset)) for preset in ("ucf-700m", "ucf-3b", "k600-700m", "k600-3b")]
    for preset, args in cases:
        shapes = {"transformer.tok_emb.weight": torch.empty(gpt_vocab(args), args.n_embd, device="meta")}
        config = config_from_checkpoint(lightning_checkpoint(args, {})["hyper_parameters"], shapes)
        expected = NBPConfig.from_preset(preset)
        for field in ("latent_shape", "block_shape", "condition_mode", "first_block", "num_condition_tokens",
                      "class_condition_ids", "condition_token_offset", "video_token_offset", "vocab_size",
                      "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
                      "num_context_frames", "id2label"):
            assert getattr(config, field) == getattr(expected, field), (preset, field)
        assert config.hidden_dropout == 0.1 and config.sequence_length == expected.sequence_length


@pytest.mark.parametrize("preset,non_embedding_millions", [("ucf-700m", 680), ("k600-3b", 3625)])
def test_full_size_official_key_layout_converts(preset, non_embedding_millions):
    """Official-shaped tensors of the released sizes (on the meta device: no memory) convert, and the
    non-embedding parameter count is the paper's (NBP_REFERENCE.md section 2)."""
    args = released_args(preset)
    with torch.device("meta"):
        sd = official_gpt_tensors(args)
    model, _ = generator_from_checkpoint(lightning_checkpoint(args, sd))
    embeddings = ("embed_tokens", "embed_positions", "uncond_embedding", "lm_head")
    count = sum(p.numel() for n, p in model.named_parameters() if not any(e in n for e in embeddings))
    assert abs(count / 1e6 - non_embedding_millions) / non_embedding_millions < 0.002


# ---- loud failures -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (dict(drop=["transformer.blocks.1.mlp.2.bias"]), "transformer.blocks.1.mlp.2.bias"),
    (dict(extra={"transformer.blocks.2.ln1.weight": torch.ones(32)}), "transformer.blocks.2.ln1.weight"),
    (dict(extra={"transformer.lm_extra.weight": torch.ones(3)}), "transformer.lm_extra.weight"),
    (dict(extra={"cond_stage_model.proj.weight": torch.ones(3)}), "cond_stage_model.proj.weight"),
    (dict(extra={"transformer.head.weight": torch.ones(10, 32)}), "transformer.head.weight"),
    (dict(extra={"transformer.uncond_embedding": torch.ones(8, 32)}), "transformer.uncond_embedding"),
])
def test_missing_unused_or_misshapen_tensors_fail_loudly(tmp_path, change, message):
    write_generator(tmp_path / "gen.ckpt", "k600", **change)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("overrides,message", [
    (dict(hybrid=False, starts_with_bov=True), "hybrid"),
    (dict(vtokens_pos=True), "MAGVIT-v2"),
    (dict(cond_token_num=4), "cond_token_num"),
])
def test_unsupported_training_settings_are_refused(tmp_path, overrides, message):
    write_generator(tmp_path / "gen.ckpt", "ucf", **overrides)
    with pytest.raises(ValueError, match=message):
        convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt")


@pytest.mark.parametrize("setting", ["ucf", "label"])
def test_num_context_frames_is_refused_for_class_conditional_checkpoints(tmp_path, capsys, setting):
    write_generator(tmp_path / "gen.ckpt", setting)
    with pytest.raises(SystemExit) as exit_info:  # even the default value, given explicitly
        main(["--generator", str(tmp_path / "gen.ckpt"), "--output", str(tmp_path / "out"),
              "--num_context_frames", "2"])
    assert exit_info.value.code == 2
    assert "(--num_context_frames) is only for unconditional" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_num_context_frames_is_kept_for_unconditional_checkpoints_only(tmp_path):
    args, sd = write_generator(tmp_path / "gen.ckpt", "k600")
    model, _ = generator_from_checkpoint(lightning_checkpoint(args, sd), num_context_frames=1)
    assert model.config.num_context_frames == 1
    write_tokenizer(tmp_path / "tok.pt")
    with pytest.raises(ValueError, match="num_context_frames .* needs a generator checkpoint"):
        convert_checkpoints(tmp_path / "out", tokenizer=tmp_path / "tok.pt", num_context_frames=2)


def test_a_deepspeed_checkpoint_folder_is_named_with_how_to_make_it_one_file(tmp_path):
    folder = tmp_path / "best_checkpoint.ckpt"  # what Lightning with DeepSpeed saves (official --use_deepspeed)
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "latest").write_text("checkpoint")
    with pytest.raises(ValueError, match=r"looks like a DeepSpeed checkpoint folder.*`python zero_to_fp32\.py "):
        convert_checkpoints(tmp_path / "out", generator=folder)
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="other is a folder, not a checkpoint file$"):  # a folder, not DeepSpeed's
        convert_checkpoints(tmp_path / "out", tokenizer=tmp_path / "other")


def test_files_taken_from_a_deepspeed_checkpoint_say_how_to_make_the_right_one(tmp_path):
    args, sd = write_generator(tmp_path / "gen.ckpt", "k600")
    model_states = {"module": {"module." + k: v for k, v in sd.items()}, "buffer_names": [], "ds_version": "0.14.0",
                    "param_shapes": [{"module." + k: v.shape for k, v in sd.items()}], "hyper_parameters": {}}
    for name, checkpoint, message in [("bare.ckpt", sd, "It holds tensors only"),
                                      ("mp_rank_00_model_states.pt", model_states, "a DeepSpeed model-states file")]:
        torch.save(checkpoint, tmp_path / name)
        with pytest.raises(ValueError, match=message + r".*`python zero_to_fp32\.py FOLDER OUTPUT\.ckpt`"):
            convert_checkpoints(tmp_path / "out", generator=tmp_path / name)


CALLS = []


def record_call(*args):  # what a malicious pickle would run
    CALLS.append(args)


class Payload:
    def __reduce__(self):
        return record_call, ("pickle code ran",)


class CustomHyperParameters:
    def __init__(self):
        self.n_layer = 2


@pytest.mark.parametrize("payload,name", [(Payload(), "record_call"),
                                          (CustomHyperParameters(), "CustomHyperParameters")])
def test_pickles_needing_other_globals_are_refused(tmp_path, payload, name):
    args, sd = write_generator(tmp_path / "gen.ckpt", "k600")
    checkpoint = lightning_checkpoint(args, sd)
    checkpoint["hyper_parameters"]["extra"] = payload
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=f"refusing to load .*{name}"):
        convert_checkpoints(tmp_path / "out", generator=tmp_path / "bad.ckpt")
    assert CALLS == []


def set_hyper_parameter(name, value):
    return lambda checkpoint: setattr(checkpoint["hyper_parameters"]["args"], name, value)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(state_dict=list(c["state_dict"].values())), "'state_dict' must be a dict of tensors, got list"),
    (lambda c: c["state_dict"].update({3: torch.ones(1)}), r"must map names to tensors; it holds \['3: Tensor"),
    (lambda c: c["state_dict"].update({"transformer.tok_emb.weight": 5}), "'transformer.tok_emb.weight': int"),
    (lambda c: c["hyper_parameters"].update(args=[1, 2]), "'args' must be a dict or Namespace, got list"),
    (set_hyper_parameter("n_embd", None), "n_embd=None is not an integer"),
    (set_hyper_parameter("p_drop_cond", [0.1]), r"p_drop_cond=\[0.1\] is not a number"),
    # sizes larger than the tensors: refused before the model is built (were minutes, or terabytes allocated)
    (set_hyper_parameter("n_layer", 3000), r"n_layer=3000, but transformer.blocks.\* holds 2 layers"),
    (set_hyper_parameter("n_embd", 10 ** 7), "n_embd=10000000, but transformer.tok_emb.weight holds 32 columns"),
    (set_hyper_parameter("block_size", 10 ** 9), "block_size=1000000000, but transformer.pos_emb holds 64 positions"),
])
def test_malformed_generator_checkpoints_are_refused_with_a_clear_message(tmp_path, change, message):
    args, sd = write_generator(tmp_path / "gen.ckpt", "k600")
    checkpoint = lightning_checkpoint(args, sd)
    change(checkpoint)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=message):
        convert_checkpoints(tmp_path / "out", generator=tmp_path / "bad.ckpt")


def test_malformed_tokenizer_files_are_refused_with_a_clear_message(tmp_path):
    named = r"map names to tensors; it holds \[\"'module.encoder_layers.0.conv.weight': str"
    for contents, message in (([torch.ones(1)], "be a dict of tensors, got list"),
                              ({"module.encoder_layers.0.conv.weight": "x"}, named)):
        torch.save({"model_state_dict": contents}, tmp_path / "tok.pt")
        with pytest.raises(ValueError, match=f"the tokenizer file's 'model_state_dict' must {message}"):
            convert_checkpoints(tmp_path / "out", tokenizer=tmp_path / "tok.pt")


def test_foreign_files_are_refused_with_a_clear_message(tmp_path):
    (tmp_path / "notes.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*notes.ckpt"):
        convert_checkpoints(tmp_path / "out", generator=tmp_path / "notes.ckpt")
    with pytest.raises(SystemExit) as exit_info:  # the CLI prints the message and exits with status 2
        main(["--generator", str(tmp_path / "notes.ckpt"), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="expected a dict with 'model_state_dict'"):
        convert_checkpoints(tmp_path / "out", tokenizer=tmp_path / "other.pt")


def test_namespace_is_read_from_legacy_format_files_too(tmp_path):
    args, sd = write_generator(tmp_path / "gen.ckpt", "k600")
    torch.save(lightning_checkpoint(args, sd), tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert safe_torch_load(tmp_path / "legacy.ckpt")["hyper_parameters"]["args"] == args


# ---- official-format tokenizer and its reference encoder/decoder -----------------------------------------------------
TINY_TOKENIZER = dict(block_out_channels=(8, 16), layers_per_block=(1, 2), downsample_strides=((2, 2),),
                      fsq_levels=(8, 5, 5, 5), norm_num_groups=4)
# the official layer lists (nbp/magvit2.py VideoTokenizer) scaled down to TINY_TOKENIZER
ENCODER = [("conv", 3, 8, (1, 1, 1)), ("res", 8, 8), ("conv", 8, 8, (2, 2, 2)), ("res", 8, 16), ("res", 16, 16),
           ("norm", 16), ("swish", 16), ("proj", 16, 4)]
DECODER = [("conv", 4, 16, (1, 1, 1)), ("res", 16, 16), ("res", 16, 16), ("conv", 16, 128, (1, 1, 1)),
           ("depth_to_space", (2, 2, 2)), ("res", 16, 8), ("norm", 8), ("swish", 8), ("conv", 8, 3, (1, 1, 1))]
GROUPS, LEVELS = 4, (8, 5, 5, 5)


def official_tokenizer_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    sd = {}

    def conv(key, c_in, c_out, k=3):
        sd[key + ".weight"] = rand(c_out, c_in, k, k, k, scale=(c_in * k ** 3) ** -0.5)
        sd[key + ".bias"] = rand(c_out, scale=0.1)

    def norm(key, c):
        sd[key + ".weight"], sd[key + ".bias"] = 1 + rand(c, scale=0.1), rand(c, scale=0.1)

    def beta(key, c):
        sd[key + ".beta"] = 1 + rand(1, c, 1, 1, 1, scale=0.2)

    for part, layers in (("encoder_layers", ENCODER), ("decoder_layers", DECODER)):
        for i, (kind, *spec) in enumerate(layers):
            key = f"module.{part}.{i}"
            if kind == "conv":
                conv(key + ".conv", spec[0], spec[1])
            elif kind == "proj":
                conv(key, spec[0], spec[1], k=1)
            elif kind == "norm":
                norm(key, spec[0])
            elif kind == "swish":
                beta(key, spec[0])
            elif kind == "res":
                c_in, c_out = spec
                norm(key + ".fn.0", c_in), beta(key + ".fn.1", c_in), conv(key + ".fn.2.conv", c_in, c_out)
                norm(key + ".fn.3", c_out), beta(key + ".fn.4", c_out), conv(key + ".fn.5.conv", c_out, c_out)
                if c_in != c_out:
                    conv(key + ".residual_fn.0.conv", c_in, c_out, k=1)
    return sd


def reference_run(sd, part, layers, x):
    """The official layers, functionally: causal conv (front replicate padding in time), GroupNorm per frame,
    Swish with beta, residual units, depth-to-space dropping the first t-1 frames, 1x1x1 output conv."""
    def causal_conv(key, x, stride=(1, 1, 1)):
        w = sd[key + ".weight"]
        p = w.shape[-1] // 2
        return F.conv3d(F.pad(x, (p, p, p, p, 2 * p, 0), mode="replicate"), w, sd[key + ".bias"], stride=stride)

    def norm(key, x):
        B, C, T, H, W = x.shape
        y = F.group_norm(x.transpose(1, 2).reshape(B * T, C, H, W), GROUPS, sd[key + ".weight"], sd[key + ".bias"])
        return y.reshape(B, T, C, H, W).transpose(1, 2)

    def swish(key, x):
        return x * torch.sigmoid(sd[key + ".beta"] * x)

    for i, (kind, *spec) in enumerate(layers):
        key = f"module.{part}.{i}"
        if kind == "conv":
            x = causal_conv(key + ".conv", x, spec[2])
        elif kind == "proj":
            x = F.conv3d(x, sd[key + ".weight"], sd[key + ".bias"])
        elif kind == "norm":
            x = norm(key, x)
        elif kind == "swish":
            x = swish(key, x)
        elif kind == "res":
            h = causal_conv(key + ".fn.2.conv", swish(key + ".fn.1", norm(key + ".fn.0", x)))
            h = causal_conv(key + ".fn.5.conv", swish(key + ".fn.4", norm(key + ".fn.3", h)))
            shortcut = causal_conv(key + ".residual_fn.0.conv", x) if spec[0] != spec[1] else x
            x = h + shortcut
        else:  # depth to space: channel (dt, dh, dw, c) -> offsets
            t, s, _ = spec[0]
            B, C, T, H, W = x.shape
            x = x.reshape(B, t, s, s, C // (t * s * s), T, H, W).permute(0, 4, 5, 1, 6, 2, 7, 3)
            x = x.reshape(B, C // (t * s * s), T * t, H * s, W * s)[:, :, t - 1:]
    return x


def reference_fsq_ids(z):
    """Official FSQ (nbp/quantizers/fsq.py): tanh bound with eps 1e-3 and a tan-shifted 0.5 offset for even levels,
    round, index = sum((code + half) * basis)."""
    levels = torch.tensor(LEVELS, dtype=torch.float32)
    half_l = (levels - 1) * (1 - 1e-3) / 2
    offset = torch.where(levels % 2 == 0, 0.5, 0.0)
    bounded = torch.tanh(z.movedim(1, -1) + torch.tan(offset / half_l)) * half_l - offset
    digits = bounded.round() + levels // 2
    basis = torch.tensor([1, 8, 40, 200], dtype=torch.float32)
    return (digits * basis).sum(-1).long()


def reference_codes(ids):
    levels, basis = torch.tensor(LEVELS), torch.tensor([1, 8, 40, 200])
    digits = (ids.unsqueeze(-1) // basis) % levels
    return ((digits - levels // 2) / (levels // 2)).float().movedim(-1, 1)


def write_tokenizer(path, sd=None):
    torch.save({"model_state_dict": sd or official_tokenizer_tensors(), "version": "0.1.0", "epoch": 3}, path)


def embedded_copy(sd):
    """A tokenizer file's tensors as a generator checkpoint embeds its frozen tokenizer (`first_stage_model.*`)."""
    return {"first_stage_model." + k[len("module."):]: v for k, v in sd.items()}


def test_converted_pipeline_tokenizer_matches_reference_encoder_and_decoder(tmp_path):
    sd = official_tokenizer_tensors()
    write_tokenizer(tmp_path / "tok.pt", sd)
    _, gpt = write_generator(tmp_path / "gen.ckpt", "k600", extra=embedded_copy(sd))
    out = convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt", tokenizer=tmp_path / "tok.pt",
                              tokenizer_config=TINY_TOKENIZER)
    pipe = NBPVideoPipeline.from_pretrained(out)
    assert torch.equal(pipe.transformer.lm_head.weight, gpt["transformer.head.weight"])
    tokenizer = pipe.video_tokenizer

    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = tokenizer.encode(video)
    with torch.no_grad():
        ref_ids = reference_fsq_ids(reference_run(sd, "encoder_layers", ENCODER, video))
        ref_video = reference_run(sd, "decoder_layers", DECODER, reference_codes(ref_ids)).clamp(0, 1)
    assert ids.shape == (2, 3, 8, 8) and ref_ids.unique().numel() > 20
    assert torch.equal(ids, ref_ids)
    assert (tokenizer.decode(ids) - ref_video).abs().max() <= 1e-4


def test_embedded_tokenizer_is_converted_on_request(tmp_path):
    sd = official_tokenizer_tensors(seed=1)
    write_generator(tmp_path / "gen.ckpt", "k600", extra=embedded_copy(sd))
    out = convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt", tokenizer_config=TINY_TOKENIZER,
                              tokenizer_from_generator=True)
    tokenizer = NBPVideoTokenizer.from_pretrained(os.path.join(out, "video_tokenizer"))
    weights = tokenizer.state_dict()
    assert all(torch.equal(weights[k[len("module."):]], v) for k, v in sd.items()) and len(weights) == len(sd)


def test_a_tokenizer_other_than_the_one_the_generator_was_trained_with_is_refused(tmp_path):
    trained_with = official_tokenizer_tensors(seed=1)
    write_generator(tmp_path / "gen.ckpt", "k600", extra=embedded_copy(trained_with))
    write_tokenizer(tmp_path / "other.pt")  # another tokenizer of the same architecture (UCF's for a K600 model)
    with pytest.raises(ValueError, match=r"other\.pt is not the tokenizer that .*gen\.ckpt was trained with"):
        convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt", tokenizer=tmp_path / "other.pt",
                            tokenizer_config=TINY_TOKENIZER)
    assert not os.path.exists(tmp_path / "out")
    convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt", tokenizer=tmp_path / "other.pt",
                        tokenizer_config=TINY_TOKENIZER, allow_other_tokenizer=True)  # paired on purpose
    # the matching file passes, also against a copy kept in bfloat16 (bf16 training stores its frozen copy so)
    bf16_copy = {k: v.bfloat16() for k, v in embedded_copy(trained_with).items()}
    write_generator(tmp_path / "bf16.ckpt", "k600", extra=bf16_copy)
    write_tokenizer(tmp_path / "tok.pt", trained_with)
    convert_checkpoints(tmp_path / "ok", generator=tmp_path / "bf16.ckpt", tokenizer=tmp_path / "tok.pt",
                        tokenizer_config=TINY_TOKENIZER)


@pytest.mark.parametrize("key", ["module.encoder_layers.1.fn.1.beta",
                                 "module.decoder_layers.5.residual_fn.0.conv.bias"])
def test_tokenizer_missing_tensor_fails_loudly(tmp_path, key):
    sd = official_tokenizer_tensors()
    del sd[key]
    write_tokenizer(tmp_path / "tok.pt", sd)
    with pytest.raises(ValueError, match=key[len("module."):].replace(".", r"\.")):
        convert_checkpoints(tmp_path / "out", tokenizer=tmp_path / "tok.pt", tokenizer_config=TINY_TOKENIZER)


def test_tokenizer_with_the_wrong_architecture_fails_loudly(tmp_path):
    write_tokenizer(tmp_path / "tok.pt")
    with pytest.raises(ValueError, match="does not match the model"):  # the official (default) architecture
        convert_checkpoints(tmp_path / "out", tokenizer=tmp_path / "tok.pt")


# ---- the output folder ---------------------------------------------------------------------------------------------
def test_cli_writes_a_sharded_bfloat16_pipeline_folder(tmp_path):
    args, sd = write_generator(tmp_path / "gen.ckpt", "k600")
    assert main(["--generator", str(tmp_path / "gen.ckpt"), "--output", str(tmp_path / "out"),
                 "--dtype", "bfloat16", "--max_shard_size", "2MB"]) == 0
    folder = tmp_path / "out" / "transformer"
    shards = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    weights = {}
    for shard in shards:
        weights.update(load_file(folder / shard))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert torch.equal(weights["lm_head.weight"], sd["transformer.head.weight"].bfloat16())
    assert torch.equal(weights["model.embed_positions.weight"], sd["transformer.pos_emb"][0].bfloat16())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temporary folder left behind
    # the paper's sampling travels with the converted model as its default
    loaded = NBPForVideoGeneration.from_pretrained(folder)
    assert (loaded.generation_config.top_k, loaded.generation_config.top_p) == (16000, 0.9)


@pytest.mark.parametrize("size", ["2G", "5GiB", "0", "", -1])
def test_a_bad_shard_size_is_named_before_converting(tmp_path, size):
    write_generator(tmp_path / "gen.ckpt", "k600")
    with pytest.raises(ValueError, match=r"max_shard_size \(--max_shard_size\) must be a size in KB, MB, GB or TB"):
        convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt", max_shard_size=size)
    assert sorted(os.listdir(tmp_path)) == ["gen.ckpt"]


def test_existing_output_is_replaced_only_with_overwrite(tmp_path):
    write_tokenizer(tmp_path / "tok.pt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(ValueError, match="overwrite"):
        convert_checkpoints(tmp_path / "out", tokenizer=tmp_path / "tok.pt", tokenizer_config=TINY_TOKENIZER)
    convert_checkpoints(tmp_path / "out", tokenizer=tmp_path / "tok.pt", tokenizer_config=TINY_TOKENIZER,
                        overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["video_tokenizer"]


@pytest.mark.parametrize("output,generator,message", [
    ("ckpts", "ckpts/gen.ckpt", "holds the input checkpoint"),
    (".", "ckpts/gen.ckpt", "holds the input checkpoint"),  # an ancestor
    ("link", "ckpts/gen.ckpt", "holds the input checkpoint"),  # a symlink to the folder
    ("ckpts", "link/gen.ckpt", "holds the input checkpoint"),  # the input through a symlink
    ("ckpts/gen.ckpt", "ckpts/gen.ckpt", "exists and is not a folder"),
])
def test_overwrite_never_deletes_the_inputs(tmp_path, output, generator, message):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "ckpts")
    write_generator(tmp_path / "ckpts" / "gen.ckpt", "k600")
    with pytest.raises(ValueError, match=message):
        convert_checkpoints(tmp_path / output, generator=tmp_path / generator, overwrite=True)
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["gen.ckpt"]


def test_an_output_that_cannot_be_written_is_refused_before_converting(tmp_path, monkeypatch):
    write_generator(tmp_path / "gen.ckpt", "k600")
    with pytest.raises(ValueError, match=r"gen\.ckpt is a file, not a folder \(--output\)"):
        convert_checkpoints(tmp_path / "gen.ckpt" / "sub" / "out", generator=tmp_path / "gen.ckpt")
    access = os.access  # a read-only folder (faked: root may write anywhere)
    monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != str(tmp_path) and access(p, mode))
    with pytest.raises(ValueError, match=r"is not writable \(--output\)"):
        convert_checkpoints(tmp_path / "new" / "out", generator=tmp_path / "gen.ckpt")
    assert sorted(os.listdir(tmp_path)) == ["gen.ckpt"]


def test_the_folder_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """Every file and folder written is fsynced before the rename onto the output, and the renames (the parent
    folder) before the old output is deleted."""
    write_generator(tmp_path / "gen.ckpt", "k600")
    (tmp_path / "gen").mkdir()  # the old output; its name is a prefix of the input's, which is not inside it
    events, fsync, replace, rmtree = [], os.fsync, os.replace, shutil.rmtree
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.fspath(b))), replace(a, b))[1])
    monkeypatch.setattr(shutil, "rmtree", lambda p, **k: (events.append(("rmtree", None)), rmtree(p, **k))[1])
    out = convert_checkpoints(tmp_path / "gen", generator=tmp_path / "gen.ckpt", overwrite=True)

    renamed = events.index(("replace", out))
    written = {os.stat(os.path.join(root, n)).st_ino for root, dirs, files in os.walk(out) for n in dirs + files}
    assert written and written | {os.stat(out).st_ino} <= {ino for kind, ino in events[:renamed] if kind == "fsync"}
    assert events.index(("fsync", os.stat(tmp_path).st_ino), renamed) < events.index(("rmtree", None), renamed)


def test_the_folder_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    write_generator(tmp_path / "gen.ckpt", "k600")
    umask = os.umask(0o027)
    try:
        out = convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750  # not mkdtemp's 0700


def test_push_to_hub_uploads_the_folder(tmp_path, local_hub):
    from huggingface_hub import HfApi

    write_generator(tmp_path / "gen.ckpt", "k600", extra=embedded_copy(official_tokenizer_tensors()))
    write_tokenizer(tmp_path / "tok.pt")
    convert_checkpoints(tmp_path / "out", generator=tmp_path / "gen.ckpt", tokenizer=tmp_path / "tok.pt",
                        tokenizer_config=TINY_TOKENIZER, push_to_hub="test-user/nbp-tiny")
    files = set(HfApi().list_repo_files("test-user/nbp-tiny"))
    assert {"model_index.json", "transformer/config.json", "transformer/model.safetensors", "README.md",
            "video_tokenizer/config.json", "video_tokenizer/diffusion_pytorch_model.safetensors"} <= files
    card = (tmp_path / "out" / "README.md").read_text()  # loads from the repo; says where the weights came from
    assert 'from_pretrained("test-user/nbp-tiny")' in card and "`gen.ckpt` and `tok.pt`" in card


# ---- free-text conditioning ----------------------------------------------------------------------------------------
WORDS = ["apply", "eye", "makeup", "yo", "a", "person", "riding", "horse", "on", "the", "beach"]


@pytest.fixture
def word_tokenizer(tmp_path):
    """A tiny word-level tokenizer with LLaMA's special ids (unk 0, BOS 1, EOS 2) that adds BOS, saved with LEFT
    padding (the transformers 5 LlamaTokenizer default) to show that the official right padding is applied."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", padding_side="left")
    tokenizer.save_pretrained(tmp_path / "tok")
    return str(tmp_path / "tok")


def test_text_to_condition_ids_follows_the_official_rules(word_tokenizer):
    ids = text_to_condition_ids(["apply eye makeup", "yo", "a person riding a horse on the beach"], word_tokenizer)
    # BOS, words, right-padded with EOS to 8 / truncated to 8 (BOS + 7 words), then + 16
    assert ids.tolist() == [[17, 19, 20, 21, 18, 18, 18, 18],
                            [17, 22, 18, 18, 18, 18, 18, 18],
                            [17, 23, 24, 25, 23, 26, 27, 28]]
    assert ids.dtype == torch.long
    assert text_to_condition_ids("yo", word_tokenizer, num_tokens=3, offset=0).tolist() == [[1, 6, 2]]


def test_a_folder_without_config_keeps_the_leading_spaces_of_the_official_tokenizer(tmp_path):
    """The official llama_tokenizer/ (tokenizer.json without tokenizer_config.json) normalizes as LLaMA-2's slow
    tokenizer: "▁" is prepended and spaces become "▁", so " a" is "▁" + "▁a" (the slow tokenizer gives
    [1, 29871, 364, ...] for " riding ..."); the transformers 5 LlamaTokenizer would drop that leading space."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "▁▁": 4, "a": 5, "▁a": 6, "b": 7, "▁b": 8}
    backend = Tokenizer(models.BPE(vocab, [("▁", "a"), ("▁", "b"), ("▁", "▁")], unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    (tmp_path / "llama_tokenizer").mkdir()
    backend.save(str(tmp_path / "llama_tokenizer" / "tokenizer.json"))
    ids = text_to_condition_ids([" a", "  b", "a b", ""], tmp_path / "llama_tokenizer", num_tokens=4, offset=0)
    assert ids.tolist() == [[1, 3, 6, 2], [1, 4, 8, 2], [1, 6, 8, 2], [1, 2, 2, 2]]


@pytest.mark.parametrize("kwargs,message", [
    (dict(texts="yo", tokenizer_path="meta-llama/Llama-2-7b-hf"), "local tokenizer folder"),
    (dict(texts=[], tokenizer_path="."), "non-empty list"),
    (dict(texts="yo", tokenizer_path=".", num_tokens=0), "num_tokens"),
])
def test_text_to_condition_ids_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        text_to_condition_ids(**kwargs)


def test_class_names_become_the_official_texts():
    assert class_name_to_text("ApplyEyeMakeup") == "apply eye makeup"
    assert class_name_to_text("YoYo") == "yo yo"
    assert class_name_to_text("Skijet") == "skijet"
    assert class_name_to_text("riding_or_walking_with_horse") == "riding or walking with horse"  # Kinetics folders
    assert all(class_name_to_text(c["name"]) == c["text"] for c in load_ucf101_table())


def test_check_ucf_table_reports_mismatches(word_tokenizer, monkeypatch):
    table = [{"name": "ApplyEyeMakeup", "label": 0, "text": "apply eye makeup", "llama2_ids": [1, 3, 4, 5, 2, 2, 2, 2]},
             {"name": "YoYo", "label": 1, "text": "yo", "llama2_ids": [1, 6, 2, 2, 2, 2, 2, 2]},
             {"name": "Archery", "label": 2, "text": "eye", "llama2_ids": [1, 4, 4, 2, 2, 2, 2, 2]}]
    monkeypatch.setattr("modeling_nbp.text_condition.load_ucf101_table", lambda: table)
    problems = check_ucf_table(word_tokenizer)
    assert len(problems) == 3
    assert problems[0].startswith("YoYo: text") and problems[1].startswith("Archery: text")
    assert problems[2] == "Archery: ids [1, 4, 4, 2, 2, 2, 2, 2] != tokenizer [1, 4, 2, 2, 2, 2, 2, 2]"
