"""Configuration of the NBP generator (a minGPT-style decoder trained with next-block prediction)."""

import math
import os

from transformers import PreTrainedConfig

CONDITION_MODES = ("class", "frames", "none")
FIRST_BLOCK_SCHEMES = ("none", "bov", "hybrid")

# name -> (layers, width, heads); the paper's XL / XXL / 3B models (NBP_REFERENCE.md section 2)
SIZE_PRESETS = {
    "700m": (24, 1536, 16),
    "1.2b": (24, 2048, 32),
    "3b": (32, 3072, 32),
    "tiny": (2, 64, 4),
}

# the official task settings; combine with a size: NBPConfig.from_preset("ucf-700m")
TASK_PRESETS = {
    # UCF-101: 8 LLaMA-2 text ids (+16) per class, BOV + 15 placeholders, hybrid start, 95 steps
    "ucf": dict(
        latent_shape=[5, 16, 16], block_shape=[1, 1, 16], video_vocab_size=64000, condition_mode="class",
        num_condition_tokens=8, condition_vocab_size=32000, first_block="hybrid", fps=8,
    ),
    # Kinetics-600 frame prediction: 2 context latent frames, 48 steps, no special tokens
    "k600": dict(
        latent_shape=[5, 16, 16], block_shape=[1, 1, 16], video_vocab_size=64000, condition_mode="frames",
        num_condition_tokens=0, condition_vocab_size=0, first_block="none", num_context_frames=2, fps=16,
    ),
}


# the vocabulary layout's counts (ints >= 0) and ids (ints); those of DERIVED_FIELDS may be None (derived)
COUNT_FIELDS = ("num_classes", "num_condition_tokens", "condition_vocab_size", "num_context_frames", "video_vocab_size")
ID_FIELDS = ("bov_token_id", "condition_token_offset", "video_token_offset", "vocab_size")
DERIVED_FIELDS = ("num_classes", "condition_vocab_size", "condition_token_offset", "video_token_offset", "vocab_size")


def check_int_fields(config):
    for name in COUNT_FIELDS + ID_FIELDS:
        value = getattr(config, name)
        if value is None and name in DERIVED_FIELDS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or (name in COUNT_FIELDS and value < 0):
            kind = "an int >= 0" if name in COUNT_FIELDS else "an int"
            raise ValueError(f"{name} must be {kind}{' (or None: derived)' if name in DERIVED_FIELDS else ''}, "
                             f"got {value!r}")


def special_token_count(first_block: str, block_size: int) -> int:
    return {"none": 0, "bov": 1, "hybrid": block_size}[first_block]


class NBPConfig(PreTrainedConfig):
    r"""
    Configuration of [`NBPForVideoGeneration`].

    The sequence the model reads is `[condition prefix][start tokens][video tokens]`:
    - the video token grid `latent_shape` = (T', H', W') is cut into blocks of `block_shape` = (t, h, w);
      video tokens are laid out block after block (raster order inside a block and over blocks), so with
      1x1xW' rows or 1xH'xW' frames this is plain raster order;
    - the condition prefix is `num_condition_tokens` ids per class (`class_condition_ids`), or nothing;
    - `first_block` says how the first block is produced: "none" (it is given as context: frame
      prediction), "bov" (a start block of `block_size` BOV tokens predicts it in parallel) or "hybrid"
      (the paper's start: BOV and the first block's tokens predict it token by token, then the block of
      its last token and `block_size - 1` placeholder ids predicts the second block).

    Token ids: `[0, num_special_tokens)` BOV then placeholders, `[condition_token_offset,
    + condition_vocab_size)` condition ids, `[video_token_offset, + video_vocab_size)` video ids.
    Offsets left as None are derived in that order.

    `sample_whole_vocabulary` (set for converted official checkpoints) samples as the official code does: top-k/top-p
    and sampling over every id of the vocabulary, the sampled id fed back as it is, and a non-video id read as the
    nearest video id (clamped). Otherwise only video ids are sampled (the same for models that give the other ids no
    probability at video positions; the head then also skips their rows).
    """

    model_type = "nbp"
    keys_to_ignore_at_inference = ["cache"]

    # video grid and blocks
    latent_shape: list[int] | None = None
    block_shape: list[int] | None = None
    video_vocab_size: int = 64000
    # conditioning
    condition_mode: str = "class"
    num_classes: int | None = None
    num_condition_tokens: int = 1
    condition_vocab_size: int | None = None
    class_condition_ids: list[list[int]] | None = None
    num_context_frames: int = 0
    class_dropout_prob: float = 0.0
    first_block: str = "hybrid"
    # vocabulary layout
    bov_token_id: int = 0
    condition_token_offset: int | None = None
    video_token_offset: int | None = None
    vocab_size: int | None = None
    # transformer
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int | None = None
    max_position_embeddings: int = 5120
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    # generation
    sample_whole_vocabulary: bool = False
    fps: float | None = None  # frame rate of the training clips (None: not recorded); `nbp generate` works at it

    def __post_init__(self, **kwargs):
        check_int_fields(self)
        if self.condition_mode not in CONDITION_MODES:
            raise ValueError(f"condition_mode must be one of {CONDITION_MODES}, got {self.condition_mode!r}")
        if self.first_block not in FIRST_BLOCK_SCHEMES:
            raise ValueError(f"first_block must be one of {FIRST_BLOCK_SCHEMES}, got {self.first_block!r}")
        self.latent_shape = list(self.latent_shape or [5, 16, 16])
        self.block_shape = list(self.block_shape or [1, 1, self.latent_shape[-1]])
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.condition_token_offset is None:
            self.condition_token_offset = self.num_special_tokens
        if self.condition_mode == "class":
            if self.class_condition_ids is not None:
                self.class_condition_ids = [list(map(int, ids)) for ids in self.class_condition_ids]
                width = len(self.class_condition_ids[0]) if self.class_condition_ids else 0
                if self.num_classes is not None and self.num_classes != len(self.class_condition_ids):
                    raise ValueError(f"num_classes ({self.num_classes}) disagrees with class_condition_ids "
                                     f"({len(self.class_condition_ids)} classes); give one of them")
                if self.num_condition_tokens not in (1, width):  # 1: the default, for a class id each
                    raise ValueError(f"num_condition_tokens ({self.num_condition_tokens}) disagrees with "
                                     f"class_condition_ids ({width} ids per class)")
                self.num_classes, self.num_condition_tokens = len(self.class_condition_ids), width
            if self.condition_vocab_size is None:  # the span of the given ids, else one id per class
                ids = [i for c in self.class_condition_ids or () for i in c]
                self.condition_vocab_size = max(ids) + 1 - self.condition_token_offset if ids else self.num_classes or 0
        else:
            if self.num_classes or self.class_condition_ids:  # a class model's fields: a mistaken condition_mode?
                raise ValueError(f"num_classes / class_condition_ids are for condition_mode='class'; got "
                                 f"condition_mode={self.condition_mode!r} with num_classes={self.num_classes!r}")
            self.num_classes, self.class_condition_ids = 0, None
            self.num_condition_tokens = 0
            self.condition_vocab_size = self.condition_vocab_size or 0
        if self.video_token_offset is None:
            self.video_token_offset = self.condition_token_offset + self.condition_vocab_size
        if self.vocab_size is None:
            self.vocab_size = self.video_token_offset + self.video_vocab_size
        if self.condition_mode == "class" and self.class_condition_ids is None and self.num_classes:
            if self.num_condition_tokens != 1:
                raise ValueError(
                    "class_condition_ids must be given when num_condition_tokens != 1 "
                    f"(got num_condition_tokens={self.num_condition_tokens})"
                )
            # one condition id per class
            self.class_condition_ids = [[self.condition_token_offset + c] for c in range(self.num_classes)]
        super().__post_init__(**kwargs)
        self.validate_architecture()

    def validate_architecture(self):
        """Checked on every instantiation and again when a model is built (`from_pretrained(path, **overrides)`
        and attribute changes bypass the instantiation)."""
        check_int_fields(self)

        def positive_ints(values):
            return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)

        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            return value

        if len(self.latent_shape) != 3 or len(self.block_shape) != 3 or not positive_ints(
                [*self.latent_shape, *self.block_shape]):
            raise ValueError(
                f"latent_shape and block_shape must be (T', H', W') and (t, h, w) of positive ints; got "
                f"{self.latent_shape}, {self.block_shape}"
            )
        sizes = dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                     num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                     video_vocab_size=self.video_vocab_size, max_position_embeddings=self.max_position_embeddings)
        if not positive_ints(sizes.values()):
            raise ValueError(f"the transformer sizes must be positive ints; got {sizes}")
        if self.fps is not None and not (number("fps") > 0 and math.isfinite(self.fps)):
            raise ValueError(f"fps (the training clips' frame rate) must be a number > 0 or None, got {self.fps!r}")
        if not number("layer_norm_eps") > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        for name in ("class_dropout_prob", "hidden_dropout", "attention_dropout"):
            if not 0.0 <= number(name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.tie_word_embeddings:
            raise ValueError("tie_word_embeddings must be False: NBP's output head is separate from its embeddings "
                             "(as in the official models)")
        if any(b < 1 or g % b for g, b in zip(self.latent_shape, self.block_shape)):
            raise ValueError(
                f"block_shape {tuple(self.block_shape)} does not tile latent_shape {tuple(self.latent_shape)}: "
                "each block dimension must divide the matching grid dimension"
            )
        if self.first_block == "none" and self.condition_mode != "frames":
            raise ValueError(
                "first_block='none' means the first block is always given as context, which needs "
                "condition_mode='frames'; use first_block='bov' or 'hybrid' for class-conditional or "
                "unconditional models"
            )
        if self.condition_mode != "class" and (self.num_condition_tokens or self.class_condition_ids):
            # (a class model's config with condition_mode overridden at loading keeps its prefix and class ids)
            class_ids = "set" if self.class_condition_ids else "empty"
            raise ValueError(
                f"condition_mode={self.condition_mode!r} takes no condition prefix, but num_condition_tokens is "
                f"{self.num_condition_tokens} and class_condition_ids is {class_ids}: build a new NBPConfig for "
                "another condition_mode"
            )
        if self.condition_mode == "class" and not self.num_classes:
            raise ValueError("condition_mode='class' needs num_classes > 0 or class_condition_ids")
        if self.condition_mode == "class":
            if len(self.class_condition_ids) != self.num_classes:
                raise ValueError(f"num_classes ({self.num_classes}) must equal the number of class_condition_ids "
                                 f"({len(self.class_condition_ids)}): to add classes, give each its condition ids")
            bad = [ids for ids in self.class_condition_ids if len(ids) != self.num_condition_tokens]
            if bad:
                raise ValueError("every entry of class_condition_ids must have num_condition_tokens ids")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.sequence_length > self.max_position_embeddings:
            raise ValueError(
                f"the sequence ({self.sequence_length} positions) is longer than max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        self._check_id_ranges()
        if self.condition_mode == "frames" and (self.num_context_frames % self.block_shape[0]
                                                 or not 0 <= self.num_context_frames < self.latent_shape[0]):
            raise ValueError(
                f"num_context_frames ({self.num_context_frames}) must be a multiple of the block's time extent "
                f"({self.block_shape[0]}) in [0, {self.latent_shape[0]}) (fewer than the latent frames)"
            )

    def _check_id_ranges(self):
        """BOV and placeholders, condition ids and video ids occupy separate ranges inside the vocabulary, and
        every class's condition ids lie in the condition range."""
        ranges = {"BOV/placeholder ids": (self.bov_token_id, self.bov_token_id + self.num_special_tokens),
                  "condition ids": (self.condition_token_offset, self.condition_token_offset + self.condition_vocab_size),
                  "video ids": (self.video_token_offset, self.video_token_offset + self.video_vocab_size)}
        for name, (start, stop) in ranges.items():
            if start < 0:
                raise ValueError(f"the {name} [{start}, {stop}) must not start below 0")
            if stop > self.vocab_size:  # a saved config keeps its vocab_size when video_vocab_size is overridden
                raise ValueError(f"the {name} [{start}, {stop}) do not fit in vocab_size {self.vocab_size}: give "
                                 f"vocab_size >= {max(r[1] for r in ranges.values())}")
        named = [(n, r) for n, r in ranges.items() if r[1] > r[0]]
        for i, (a, (a0, a1)) in enumerate(named):
            for b, (b0, b1) in named[i + 1 :]:
                if a0 < b1 and b0 < a1:
                    raise ValueError(f"the {a} [{a0}, {a1}) overlap the {b} [{b0}, {b1}): set bov_token_id, "
                                     "condition_token_offset and video_token_offset apart")
        if self.condition_mode == "class":
            start, stop = ranges["condition ids"]
            outside = sorted({i for ids in self.class_condition_ids for i in ids if not start <= i < stop})
            if outside:
                raise ValueError(f"class_condition_ids must lie in the condition range [{start}, {stop}) "
                                 f"(condition_token_offset + condition_vocab_size); got {outside[:8]}")

    @property
    def block_size(self) -> int:
        return math.prod(self.block_shape)

    @property
    def num_video_tokens(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def num_special_tokens(self) -> int:
        """BOV (for 'bov' and 'hybrid') and the hybrid start's block_size - 1 placeholders."""
        return special_token_count(self.first_block, self.block_size)

    @property
    def sequence_length(self) -> int:
        """Length of the full sequence: prefix, start tokens and every video token."""
        start = {"none": 0, "bov": self.block_size, "hybrid": self.block_size}[self.first_block]
        return self.num_condition_tokens + start + self.num_video_tokens

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """transformers' reading of config.json, which gives an empty dict for a folder or repo without one (then a
        config of defaults): refused, as is another model's config, naming the subfolder of a pipeline's generator."""
        subfolder = kwargs.get("subfolder") or ""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        other = config_dict.get("_class_name") or config_dict.get("model_type", cls.model_type)
        if not config_dict or other != cls.model_type:
            where = os.path.join(str(pretrained_model_name_or_path), subfolder).rstrip("/")
            holds = (f"holds the config of {other}, not of an NBP generator" if config_dict
                     else "has no config.json, so it holds no NBP generator")
            raise OSError(f"{where} {holds}; in a pipeline (a folder or repo with model_index.json) the generator is "
                          "subfolder='transformer'")
        return config_dict, kwargs

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "NBPConfig":
        """`"ucf-700m"`, `"k600-3b"`, `"ucf-tiny"`, ...: a task setting of the paper with a model size."""
        task, _, size = name.partition("-")
        if task not in TASK_PRESETS or size not in SIZE_PRESETS:
            names = [f"{t}-{s}" for t in TASK_PRESETS for s in SIZE_PRESETS]
            raise ValueError(f"unknown preset {name!r}; choose one of {names}")
        layers, width, heads = SIZE_PRESETS[size]
        kwargs = dict(TASK_PRESETS[task], num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads)
        kwargs.update(overrides)
        if task == "ucf" and "class_condition_ids" not in overrides:
            from .ucf101 import ucf101_class_condition_ids, ucf101_id2label

            # the text ids follow the special tokens, whose count depends on the (possibly overridden) blocks
            offset = kwargs.get("condition_token_offset")
            if offset is None:
                offset = special_token_count(kwargs["first_block"], math.prod(kwargs["block_shape"]))
            kwargs.update(class_condition_ids=ucf101_class_condition_ids(offset), id2label=ucf101_id2label())
        return cls(**kwargs)


__all__ = ["NBPConfig"]
