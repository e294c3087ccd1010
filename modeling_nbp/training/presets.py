"""Training presets from the NBP paper and its released scripts (NBP_REFERENCE.md sections 2 and 3).

A preset fills in the defaults of the training scripts; any flag given on the command line still wins.
Generator presets name an `NBPConfig.from_preset` task + size; the latent grid, vocabulary and classes are
checked against the pre-tokenized data at start-up.
"""

# Generator (paper Table 6 and scripts/lm_train/*.sh of the official code). Global batch 256 (UCF) / 64 (K600),
# AdamW(0.9, 0.95), weight decay 0.01, dropout 0.1, cosine with linear warmup from 0 to lr_min 0, bf16.
# UCF: 100k steps. K600: the paper reports ~100k steps, while the released script sets max_steps 4M, so its cosine
# runs over 4M steps and the learning rate stays near its peak for the first 100k; `lr_schedule_steps` keeps that.
# Where these runs still differ from the official ones: its K600 script leaves --bf16 and DeepSpeed commented out (fp32
# for the 700M), while --mixed_precision defaults to bf16 on CUDA; and its loader cuts a new random 17-frame window of
# each training video whenever it reads one, while `pretokenize` stores one window (the centre) per video by default,
# so every epoch sees the same clips (`nbp pretokenize --windows_per_video N` stores N evenly spread windows, of which
# each epoch draws one per video: the official random start among N fixed ones).
_UCF = dict(global_batch_size=256, learning_rate=6e-4, warmup_steps=5000, max_steps=100_000,
            weight_decay=0.01, dropout=0.1, optimizer_recipe="official", lr_min=0.0, warmup_lr_init=0.0)
_K600 = dict(global_batch_size=64, warmup_steps=10_000, max_steps=100_000, lr_schedule_steps=4_000_000,
             weight_decay=0.01, dropout=0.1, optimizer_recipe="official", lr_min=0.0, warmup_lr_init=0.0)

GENERATOR_PRESETS = {
    "ucf-700m": dict(_UCF, model_preset="ucf-700m"),
    "ucf-1.2b": dict(_UCF, model_preset="ucf-1.2b"),
    "ucf-3b": dict(_UCF, model_preset="ucf-3b"),
    "k600-700m": dict(_K600, model_preset="k600-700m", learning_rate=1e-3),
    "k600-1.2b": dict(_K600, model_preset="k600-1.2b", learning_rate=5e-4),
    "k600-3b": dict(_K600, model_preset="k600-3b", learning_rate=2e-4),
}

# Tokenizer (paper Table 5): Adam, batch 256, linear schedule with 1% warmup, perceptual and adversarial weights
# 0.1, PatchGAN discriminator; 17 frames of 128x128 at 8 fps (UCF) / 16 fps (K600). The model is the official
# size (NBPVideoTokenizer's defaults).
# The 1% warmup is the training script's default (--warmup_steps).
_TOKENIZER = dict(global_batch_size=256, lr_schedule="linear", perceptual_weight=0.1, adversarial_weight=0.1,
                  num_frames=17, resolution=128)

TOKENIZER_PRESETS = {
    "ucf": dict(_TOKENIZER, learning_rate=5e-5, fps=8),
    "k600": dict(_TOKENIZER, learning_rate=1e-4, fps=16),
}


def get_preset(table: dict, name: str, what: str) -> dict:
    if name not in table:
        raise ValueError(f"unknown {what} preset {name!r}; choose one of {sorted(table)}")
    return dict(table[name])


def parse_with_preset(parser, argv, table: dict, what: str):
    """Parse `argv`; a `--preset` name from `table` sets the defaults that the other flags may override."""
    known, _ = parser.parse_known_args(argv)
    if known.preset:
        parser.set_defaults(**get_preset(table, known.preset, what))
    return parser.parse_args(argv)


__all__ = ["GENERATOR_PRESETS", "TOKENIZER_PRESETS", "get_preset", "parse_with_preset"]
