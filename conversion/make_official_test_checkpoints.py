"""Tiny official-format NBP checkpoints made by the official classes (random weights), then the parity check.

    python -m modeling_nbp.conversion.make_official_test_checkpoints --official_repo /path/to/NBP --out DIR

A self-test of `check_official` and of the official code's environment without the multi-GB released files: the
official Lightning modules (UCF-like text + hybrid + BOV, label + hybrid + BOV, K600-like unconditional) and the
official VideoTokenizer (its fixed architecture, at 32x32) are built by their own constructors, given random
weights and saved in the official file formats; then `check_official` runs on each generator with the tokenizer
(the pipeline row needs both). The generator files hold no embedded tokenizer copy (`first_stage_model.*`).
"""

import argparse
import math
import os
import subprocess
import sys

import torch

from .check_official import build_official_generator, import_official

# transformer_train.py's arguments that the official module reads, at a tiny size (blocks of 4 = one latent row)
TRAINING_ARGS = dict(tokenizer="magvit2", vtokens=False, vtokens_pos=False, unconditional=False, hybrid=False,
                     starts_with_bov=False, cond_stage_key="label", class_cond_dim=None, cond_token_num=0,
                     semi_ar=True, token_number_per_step=4, n_layer=3, n_head=4, n_embd=64, block_size=64,
                     n_unmasked=0, transformer_dropout=0.1, p_drop_cond=None, resolution=32, sequence_length=9,
                     vocab_size=64000, first_stage_key="video", grad_accumulates=1, grad_clip_val=1.0,
                     base_lr=6e-4, tokenizer_path=None, llama_tokenizer=None)
SETTINGS = {  # the scripts/lm_train settings, scaled down
    "ucf": dict(cond_stage_key="text", cond_token_num=8, hybrid=True, starts_with_bov=True, p_drop_cond=0.1),
    "label": dict(cond_stage_key="label", class_cond_dim=5, cond_token_num=1, hybrid=True, starts_with_bov=True),
    "k600": dict(unconditional=True, sequence_length=13),
}


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights that make every part matter: norms, biases and Swish betas around their defaults; GPT
    matrices scaled by fan-in, token and position embeddings large enough for attention to depend on position
    (the official init leaves pos_emb at zero). Tokenizer convolutions keep their default init."""
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.ndim == 1 or name.endswith("beta"):
            p.data = p.data + 0.1 * noise
        elif name.endswith(("tok_emb.weight", "pos_emb")):
            p.data = 0.5 * noise
        elif name.startswith(("blocks", "head")):
            p.data = noise / math.sqrt(p.shape[1])


def write_generator(official, repo: str, setting: str, path: str, seed: int) -> None:
    args = argparse.Namespace(**dict(TRAINING_ARGS, **SETTINGS[setting],
                                     llama_tokenizer=os.path.join(repo, "llama_tokenizer")))
    kwargs = dict(args=args, ckpt_path=None, first_stage_key="video", cond_stage_key=args.cond_stage_key)
    module = build_official_generator(official, kwargs, torch.nn.Module())  # no embedded tokenizer copy
    randomize_(module.transformer, torch.Generator().manual_seed(seed))
    hyper_parameters = dict(getattr(module, "hparams", None) or dict(kwargs, pkeep=1.0, bov_token=0))
    torch.save({"epoch": 0, "global_step": 0, "state_dict": module.state_dict(),
                "hyper_parameters": hyper_parameters}, path)


def write_tokenizer(official, path: str, resolution: int, seed: int) -> None:
    """The official VideoTokenizer (its fixed architecture) at a small resolution, saved as the DataParallel-
    wrapped official files are (`module.` keys)."""
    tokenizer = official.magvit2.VideoTokenizer(num_codebooks=1, image_size=resolution, embed_dim=6,
                                                codebook_size=64000, fsq_levels=[8, 8, 8, 5, 5, 5], use_fsq=True)
    randomize_(tokenizer.encoder_layers, torch.Generator().manual_seed(seed))
    randomize_(tokenizer.decoder_layers, torch.Generator().manual_seed(seed + 1))
    torch.save({"model_state_dict": {"module." + k: v for k, v in tokenizer.state_dict().items()},
                "version": official.magvit2.__version__, "config": tokenizer._configs}, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--official_repo", required=True, help="checkout of github.com/RenShuhuai-Andy/NBP")
    parser.add_argument("--out", required=True, help="folder for the checkpoints")
    args = parser.parse_args()
    try:
        official, _ = import_official(args.official_repo)
    except (FileNotFoundError, ModuleNotFoundError) as error:
        parser.exit(2, f"make_official_test_checkpoints: error: {error}\n")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)  # the official constructors' default init draws from the global generator
    tokenizer = os.path.join(args.out, "magvit2_tiny.pt")
    write_tokenizer(official, tokenizer, TRAINING_ARGS["resolution"], seed=0)
    status = 0
    for seed, setting in enumerate(SETTINGS, start=1):
        generator = os.path.join(args.out, f"{setting}_tiny.ckpt")
        write_generator(official, args.official_repo, setting, generator, seed)
        command = [sys.executable, "-m", "modeling_nbp.conversion.check_official", "--official_repo",
                   args.official_repo, "--generator", generator, "--tokenizer", tokenizer]
        print("$", " ".join(command), flush=True)
        status |= subprocess.call(command)
    return status


if __name__ == "__main__":
    sys.exit(main())
