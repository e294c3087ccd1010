"""The NBP generator: a minGPT-style decoder (pre-LN, learned absolute positions, biased q/k/v/proj, exact GELU
MLP, untied bias-free head) with block-causal attention, as in the official Next-Block Prediction code."""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import blockwise_overlay, causal_mask_function, create_causal_mask, or_masks
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_nbp import NBPConfig
from .generation import NBPGenerationMixin
from .layout import BlockLayout
from .triton_support import require_triton
from .value_checks import all_finite, check_in_range, is_integer


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class NBPAttention(nn.Module):
    def __init__(self, config: NBPConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1
        # never let SDPA apply its own causal mask: the block-causal mask comes from the layout, and a decode
        # step (one block fed against the cache) needs none
        self.is_causal = False
        D = config.hidden_size
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.o_proj = nn.Linear(D, D)
        self.resid_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attention_mask=None, cache: Cache | None = None):
        B, L, _ = hidden_states.shape
        shape = (B, L, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, heads, L, head_dim)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention(
            self, q, k, v, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling, is_causal=False,
        )
        out = self.resid_dropout(self.o_proj(out.reshape(B, L, -1)))
        return out, weights


class NBPMLP(nn.Module):
    def __init__(self, config: NBPConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.gelu(self.fc1(x))))  # exact (erf) GELU, as the official nn.GELU()


# where attn_implementation="flex_attention" may run: torch 2.13's compiled CPU kernel is wrong for some lengths
FLEX_ATTENTION_DEVICES = ("cuda",)


def flex_block_causal_mask(block_ids: torch.Tensor) -> BlockMask:
    """The flex-attention mask that `create_causal_mask` builds for whole sequences (B, L) of `block_ids` (causal,
    and each group >= 0 sees all of itself), built the same way but without the `_compile=True` that transformers
    passes to `create_block_mask`: torch's deprecation warning for that flag breaks a compiled graph, while this
    call is traced into it. Used while torch.compile traces a training forward."""
    B, L = block_ids.shape
    mask_mod = or_masks(causal_mask_function, blockwise_overlay(block_ids))
    return create_block_mask(mask_mod, B, None, L, L, device=block_ids.device)


class NBPDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: NBPConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = NBPAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = NBPMLP(config)

    def forward(self, hidden_states, attention_mask=None, cache=None):
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), attention_mask, cache)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NBPPreTrainedModel(PreTrainedModel):
    config_class = NBPConfig
    config: NBPConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["NBPDecoderLayer"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_flash_attn = False  # flash kernels take no custom mask; block-causal training needs one
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, NBPModel):
            # N(0, 0.02) as transformers' embeddings; the official `pos_emb` starts at zeros (training from scratch)
            nn.init.normal_(module.embed_positions.weight, std=self.config.initializer_range)
            nn.init.normal_(module.uncond_embedding, std=self.config.hidden_size**-0.5)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """transformers' resize, refused below the ids the vocabulary layout uses: the embeddings and head would lose
        video ids, which generation (reading only the head's video rows) would then never sample, silently."""
        cfg = self.config
        used = max(cfg.bov_token_id + cfg.num_special_tokens, cfg.condition_token_offset + cfg.condition_vocab_size,
                   cfg.video_token_offset + cfg.video_vocab_size)
        size = new_num_tokens
        if size is not None and isinstance(pad_to_multiple_of, int) and pad_to_multiple_of > 0:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of  # rounded up, as transformers does
        if size is not None and size < used:
            raise ValueError(f"new_num_tokens ({new_num_tokens}) must be at least {used}: the BOV/placeholder, "
                             f"condition and video ids (video_token_offset {cfg.video_token_offset} + video_vocab_size "
                             f"{cfg.video_vocab_size}) all lie below that")
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)


@dataclass
class NBPModelOutput(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    # with output_hidden_states: the layers' input embeddings, then every layer's output (the last after the final
    # norm, so it equals last_hidden_state), as in transformers' decoders
    hidden_states: tuple[torch.FloatTensor, ...] | None = None

    @property
    def past_key_values(self) -> Cache | None:
        """transformers' name for `cache` (the forward takes either)."""
        return self.cache


class NBPModel(NBPPreTrainedModel):
    """The decoder without its output head."""

    def __init__(self, config: NBPConfig):
        super().__init__(config)
        config.validate_architecture()  # again: overrides given to from_pretrained skip the config's own check
        self.layout = BlockLayout.from_config(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # replaces the condition prefix for classifier-free guidance (official: `uncond_embedding`, P x D); the
        # official code registers it as a buffer, so its optimizer never updates it; here training with class dropout
        # learns it (converted weights load either way)
        self.uncond_embedding = nn.Parameter(torch.zeros(config.num_condition_tokens, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(NBPDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache: Cache | None = None,
                use_cache: bool | None = None, drop_condition: torch.Tensor | None = None,
                output_hidden_states: bool = False):
        """`input_ids` (B, q) are the sequence positions [past, past + q) where past = tokens in `cache`.
        `drop_condition` (B,) bool replaces the condition prefix of those rows by `uncond_embedding`.
        `attention_mask`: None (the block-causal mask of the layout), a 2-D mask of ones (the same: sequences have
        no padding), or a full 4-D mask (B, 1, q, past + q) used instead of the layout's."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        given = input_ids if input_ids is not None else inputs_embeds
        if not isinstance(given, torch.Tensor):
            raise TypeError(f"input_ids / inputs_embeds must be a torch.Tensor, got {type(given).__name__}")
        if input_ids is not None and (input_ids.is_floating_point() or input_ids.is_complex()
                                      or input_ids.dtype == torch.bool):
            raise TypeError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}")
        if inputs_embeds is not None and not inputs_embeds.is_floating_point():
            raise TypeError(f"inputs_embeds must be a floating-point tensor, got {inputs_embeds.dtype}")
        if given.ndim != (2 if input_ids is not None else 3) or 0 in given.shape[:2]:
            raise ValueError(f"input_ids must be (batch, positions) / inputs_embeds (batch, positions, hidden) with "
                             f"batch and positions >= 1; got shape {tuple(given.shape)}")
        if inputs_embeds is not None and inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(f"inputs_embeds must be (batch, positions, hidden_size={self.config.hidden_size}); got "
                             f"shape {tuple(inputs_embeds.shape)}")
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"cache / past_key_values must be a transformers Cache (a DynamicCache), got "
                            f"{type(cache).__name__}")
        if attention_mask is not None and attention_mask.ndim == 2:
            if not bool(attention_mask.all()):
                raise ValueError("attention_mask: NBP sequences have a fixed layout without padding, so a 2-D mask must "
                                 "be all ones (or None); give a 4-D (batch, 1, query, key) mask to replace the layout's")
            attention_mask = None
        elif attention_mask is not None and attention_mask.ndim != 4:
            raise ValueError(f"attention_mask must be None, 2-D (all ones) or 4-D; got shape {tuple(attention_mask.shape)}")
        elif attention_mask is not None and not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()):
            raise ValueError("a 4-D attention_mask must be boolean (True = may attend) or floating point (added to the "
                             f"scores: 0 or -inf); got {attention_mask.dtype}")
        if self.config._attn_implementation == "flex_attention" and given.device.type not in FLEX_ATTENTION_DEVICES:
            raise ValueError(f"attn_implementation='flex_attention' runs on {FLEX_ATTENTION_DEVICES} devices, got "
                             f"{given.device.type}: torch's compiled flex attention on CPU gives wrong results for "
                             "some sequence lengths (keys 8 mod 16 in torch 2.13); use 'sdpa' there, the same function")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError("the forward takes a DynamicCache (or none); for a preallocated cache and CUDA graphs use "
                             "generate_video_tokens / iter_generation with cache_implementation='static'")
        if inputs_embeds is None:
            check_in_range(input_ids, 0, self.config.vocab_size, f"input_ids must lie in [0, {self.config.vocab_size})")
            inputs_embeds = self.embed_tokens(input_ids if input_ids.dtype == torch.int32 else input_ids.long())
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        q_len = inputs_embeds.shape[1]
        if past + q_len > self.layout.sequence_length:
            raise ValueError(
                f"sequence of {past + q_len} positions is longer than this model's layout "
                f"({self.layout.sequence_length}: prefix {self.layout.prefix_length}, "
                f"latent_shape {self.layout.latent_shape}, first_block {self.layout.first_block!r})"
            )

        if attention_mask is not None and (attention_mask.shape[-2:] != (q_len, past + q_len)
                                           or attention_mask.shape[0] not in (1, inputs_embeds.shape[0])
                                           or attention_mask.shape[1] not in (1, self.config.num_attention_heads)):
            raise ValueError(f"a 4-D attention_mask must have shape (batch or 1, 1 or heads, query, key) = "
                             f"({inputs_embeds.shape[0]}, 1, {q_len}, {past + q_len}); got {tuple(attention_mask.shape)}")
        positions = past + torch.arange(q_len, device=inputs_embeds.device)
        P = self.layout.prefix_length
        if drop_condition is not None:
            drop_condition = torch.as_tensor(drop_condition)
            if drop_condition.dtype != torch.bool or tuple(drop_condition.shape) != (inputs_embeds.shape[0],):
                raise ValueError(f"drop_condition must be a bool tensor of shape (batch,) = ({inputs_embeds.shape[0]},)"
                                 f"; got {drop_condition.dtype} of shape {tuple(drop_condition.shape)}")
        if drop_condition is not None and P:
            # rows with drop_condition see `uncond_embedding` at the prefix positions of this chunk
            uncond = self.uncond_embedding[positions.clamp(max=P - 1)].to(inputs_embeds.dtype)  # (q, D)
            replace = drop_condition.to(inputs_embeds.device).view(-1, 1, 1) & (positions < P).view(1, -1, 1)
            inputs_embeds = torch.where(replace, uncond, inputs_embeds)
        hidden = self.dropout(inputs_embeds + self.embed_positions(positions))

        if attention_mask is None and self.layout.needs_mask(past, past + q_len):
            block_ids = self.layout.block_ids[: past + q_len].to(hidden.device).expand(hidden.shape[0], -1)
            if self.config._attn_implementation == "flex_attention" and past == 0 and torch.compiler.is_compiling():
                attention_mask = flex_block_causal_mask(block_ids)
            else:
                attention_mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                                    cache=cache, block_sequence_ids=block_ids,
                                                    position_ids=positions.unsqueeze(0))
        states = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=attention_mask, cache=cache)
            if states is not None:
                states.append(hidden)
        hidden = self.norm(hidden)
        if states is not None:
            states[-1] = hidden
        return NBPModelOutput(last_hidden_state=hidden, cache=cache, hidden_states=states and tuple(states))


# how the training loss is computed (`NBPForVideoGeneration.loss_implementation`): "chunked", PyTorch operations a
# chunk of rows at a time; "triton", one kernel (`loss_kernels`; CUDA, or CPU under Triton's interpreter)
LOSS_IMPLEMENTATIONS = ("chunked", "triton")


def _chunked_cross_entropy(flat, targets, count, chunk_rows: int, with_grad: bool):
    """The summed loss of the counted rows of `flat` (N, V), and (with_grad) its gradient divided by `count`."""
    grad = torch.empty_like(flat) if with_grad else None
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk_rows):
        x, y = flat[start : start + chunk_rows].float(), targets[start : start + chunk_rows]
        valid = y != -100
        log_probs = x.log_softmax(dim=-1)
        y = torch.where(valid, y, 0)
        picked = log_probs.gather(1, y[:, None])[:, 0]
        total -= (picked * valid).sum()
        if grad is not None:  # d(loss)/d(logits) = (softmax - onehot) / count on the counted rows
            g = log_probs.exp_()
            g[torch.arange(len(y), device=y.device), y] -= 1
            grad[start : start + chunk_rows] = g * (valid[:, None] / count)
    return total, grad


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy summed over the positions whose label is not -100 and divided by `normalizer` (None: their
    count, i.e. the mean), in float32. The gradient with respect to the logits is formed in the forward, in the
    logits' dtype, so neither a float32 copy of the logits nor their softmax is kept for the backward (at batch 8
    and a 64000-code head: about 5 GB)."""

    @staticmethod
    def forward(ctx, logits, labels, implementation: str, chunk_rows: int, normalizer=None):
        flat, targets = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        count = (targets != -100).sum() if normalizer is None else torch.as_tensor(normalizer, device=logits.device)
        count = count.clamp(min=1)
        with_grad = ctx.needs_input_grad[0]
        if implementation == "triton":
            from .loss_kernels import cross_entropy_rows  # imports triton

            losses, grad = cross_entropy_rows(flat, targets, 1.0 / count.float() if with_grad else None)
            total = losses.sum()
        else:
            total, grad = _chunked_cross_entropy(flat, targets, count, chunk_rows, with_grad)
        if grad is not None:
            ctx.save_for_backward(grad)
            ctx.shape, ctx.spent = logits.shape, False
        return total / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        # scaled in place (at batch 16 of the 700M model the gradient is 2.6 GB): so it serves one backward only
        if ctx.spent:
            raise RuntimeError("the next-block loss supports one backward pass (retain_graph=True cannot reuse it): "
                               "compute the loss again for another")
        ctx.spent = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)).view(ctx.shape), None, None, None, None


def next_block_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 2048,
                    num_items_in_batch=None, implementation: str = "chunked",
                    video_ids: tuple[int, int] | None = None) -> torch.Tensor:
    """Mean cross-entropy of `logits` (..., V) against `labels` (...), -100 ignored (0 when every label is); with
    `num_items_in_batch` (the labelled positions of a whole accumulated batch, as transformers' Trainer passes it)
    the sum divided by that count instead. `implementation`: one of `LOSS_IMPLEMENTATIONS`. `video_ids` [low, high):
    the only ids a label may hold (else any id of the vocabulary)."""
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
            or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an integer tensor of target ids (-100 = no target), got {got}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have the logits' shape without the vocabulary, {tuple(logits.shape[:-1])} "
                         f"(-100 = no target); got {tuple(labels.shape)}")
    low, high = video_ids or (0, logits.shape[-1])
    outside = ((labels < low) | (labels >= high)) & (labels != -100)
    message = f"labels must lie in [{low}, {high}) or be -100 (no target)"
    if video_ids:  # labels=input_ids, the causal LM idiom, puts condition and start ids there
        message = (f"labels must be video ids, in [{low}, {high}), or -100 (no target), each at the position that "
                   "predicts it (not input_ids shifted inside the model as in causal LMs; layout.training_inputs or "
                   "video_ids= build them)")
    if labels.device.type == "cpu" and not torch.compiler.is_compiling():
        if outside.any():
            raise ValueError(f"{message}; got {labels[outside][0].item()}")
    else:  # no host sync (and no graph break): a bad label stops the process at a later kernel, with this message
        torch._assert_async(~outside.any(), message)
    if implementation == "triton":
        require_triton(logits.device, "loss_implementation='triton'")
    elif implementation != "chunked":
        raise ValueError(f"implementation must be one of {LOSS_IMPLEMENTATIONS}, got {implementation!r}")
    return _CrossEntropy.apply(logits, labels, implementation, chunk_rows, num_items_in_batch)


# the dense parts of the static decode step, as plain functions of tensors (the same ops as the modules' forward),
# so that one `torch.compile` of each serves every layer and step: a layer's input (layer norm, fused q/k/v), its
# output (attention projection, residual, layer norm, MLP, residual), and that output joined to the next layer's
# input (so a compiled step fuses the residual with the next layer norm)
def _attention_input(x, norm_weight, norm_bias, eps: float, qkv_weight, qkv_bias):
    return F.linear(F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps), qkv_weight, qkv_bias)


def _attention_output_and_mlp(x, attn, o_weight, o_bias, norm_weight, norm_bias, eps: float, fc1_weight, fc1_bias,
                              fc2_weight, fc2_bias):
    x = x + F.linear(attn, o_weight, o_bias)
    h = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
    return x + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def _layer_output_and_next_input(x, attn, *weights):
    x = _attention_output_and_mlp(x, attn, *weights[:9])
    return x, _attention_input(x, *weights[9:])


DECODE_PARTS = (_attention_input, _attention_output_and_mlp, _layer_output_and_next_input)


# compilations kept per compiled part: one per (batch size, feed length, dtype, grad/inference/autocast mode); past
# torch.compile's default of 8 a fullgraph compile would fail instead of falling back
DECODE_RECOMPILE_LIMIT = 64


@functools.cache
def compiled_decode_parts(mode: str = "default"):
    return tuple(torch.compile(f, fullgraph=True, dynamic=False, mode=mode) for f in DECODE_PARTS)


@functools.cache
def _static_step_modules(num_layers: int, triton: bool) -> tuple:
    """(name, class) of every module whose weights the static decode step reads instead of calling it."""
    expected = {"model": NBPModel, "model.embed_positions": nn.Embedding, "lm_head": nn.Linear}
    if triton:
        expected.update({"model.embed_tokens": nn.Embedding, "model.norm": nn.LayerNorm})
    for i in range(num_layers):
        p = f"model.layers.{i}."
        expected.update({p[:-1]: NBPDecoderLayer, p + "input_layernorm": nn.LayerNorm,
                         p + "post_attention_layernorm": nn.LayerNorm, p + "self_attn": NBPAttention,
                         p + "mlp": NBPMLP, p + "mlp.fc1": nn.Linear, p + "mlp.fc2": nn.Linear})
        expected.update({f"{p}self_attn.{x}_proj": nn.Linear for x in "qkvo"})
    return tuple(expected.items())


class NBPForVideoGeneration(NBPGenerationMixin, NBPPreTrainedModel):
    """NBP generator with its output head. Training: `model(video_ids=grid, class_labels=y)` or
    `model(input_ids=..., labels=...)` (labels aligned with input_ids: each position holds the id it predicts,
    -100 elsewhere; `layout.training_inputs` builds both). Generation: `generate_video_tokens(...)`."""

    _tied_weights_keys = {}
    accepts_loss_kwargs = True  # transformers' Trainer passes num_items_in_batch (correct gradient accumulation)

    def __init__(self, config: NBPConfig):
        super().__init__(config)
        self.model = NBPModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._loss_implementation = "chunked"
        self.post_init()

    @property
    def loss_implementation(self) -> str:
        """How `forward` computes the loss, one of `LOSS_IMPLEMENTATIONS`: "chunked" (the default) or "triton" (one
        kernel; CUDA). Not saved with the model."""
        return self._loss_implementation

    @loss_implementation.setter
    def loss_implementation(self, value: str):
        if value not in LOSS_IMPLEMENTATIONS:
            raise ValueError(f"loss_implementation must be one of {LOSS_IMPLEMENTATIONS}, got {value!r}")
        self._loss_implementation = value

    @property
    def layout(self) -> BlockLayout:
        return self.model.layout

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, labels=None, video_ids=None, class_labels=None, inputs_embeds=None,
                attention_mask=None, cache: Cache | None = None, use_cache: bool | None = None,
                drop_condition=None, logits_to_keep: int | torch.Tensor = 0, past_key_values: Cache | None = None,
                num_items_in_batch=None, return_dict: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None) -> NBPModelOutput | tuple:
        """`past_key_values` is another name for `cache`. `num_items_in_batch`: see `next_block_loss`.
        `output_hidden_states`: see `NBPModelOutput.hidden_states`; attention weights are not returned (the
        attention runs through SDPA or flex kernels: `output_attentions` must stay off)."""
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("give cache or past_key_values (the same argument), not both")
            cache = past_key_values
        if output_attentions:
            raise ValueError("output_attentions is not supported by NBPForVideoGeneration (its attention runs through "
                             "SDPA or flex kernels, which return no weights)")
        if video_ids is not None:
            if input_ids is not None or labels is not None:
                raise ValueError("give either video_ids (with class_labels) or input_ids/labels, not both")
            input_ids, labels = self.prepare_training_inputs(video_ids, class_labels)
        if drop_condition is None and self.training and self.config.class_dropout_prob > 0:
            n = (input_ids if input_ids is not None else inputs_embeds).shape[0]
            drop_condition = torch.rand(n, device=self.device) < self.config.class_dropout_prob
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         cache=cache, use_cache=use_cache, drop_condition=drop_condition,
                         output_hidden_states=bool(output_hidden_states))
        hidden = out.last_hidden_state
        positions = isinstance(logits_to_keep, torch.Tensor) and not (logits_to_keep.is_floating_point()
                                                                      or logits_to_keep.dtype == torch.bool)
        if not positions and not (is_integer(logits_to_keep) and logits_to_keep >= 0):
            raise ValueError(f"logits_to_keep must be an int >= 0 (the last positions; 0 = all) or an integer tensor "
                             f"of positions, got {logits_to_keep!r}")
        if positions:
            hidden = hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -int(logits_to_keep):]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            off = self.config.video_token_offset
            labels = labels.to(logits.device) if isinstance(labels, torch.Tensor) else labels
            loss = next_block_loss(logits, labels, num_items_in_batch=num_items_in_batch,
                                   implementation=self.loss_implementation,
                                   video_ids=(off, off + self.config.video_vocab_size))
        result = NBPModelOutput(loss=loss, logits=logits, last_hidden_state=out.last_hidden_state, cache=out.cache,
                                hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()

    def static_decode_blockers(self, triton: bool = False) -> list[str]:
        """What stops the static decode step (`decode_block_logits`) from computing what the forward computes: it
        calls `embed_tokens` and the final `norm` but only reads the weights of the other modules (plain
        `nn.Embedding` / `nn.LayerNorm` / `nn.Linear`), so a module of another class there (a PEFT adapter, a
        quantized layer), a forward hook on it (accelerate's `device_map` dispatch, a user's hook) or weights spread
        over several devices would be skipped silently. The Triton step (`triton`) reads those two modules' weights
        too.
        -> one line per cause; [] when the static path is exact."""
        called = set() if triton else {"model.embed_tokens", "model.norm"}
        modules = dict(self.named_modules())  # (checked at every generation: the module walks are kept to one)
        blockers = [f"{name} is a {type(modules.get(name)).__module__}.{type(modules.get(name)).__qualname__}, "
                    f"not a {cls.__module__}.{cls.__qualname__}"
                    for name, cls in _static_step_modules(len(self.model.layers), triton)
                    if type(modules.get(name)) is not cls]
        # accelerate's hooks replace `forward` and leave `_hf_hook` (an attribute: in the module's __dict__); the
        # model's own one (diffusers' model offloading) only moves it to its device before generation
        blockers += [f"{name or 'the model'} has a forward hook" for name, module in modules.items()
                     if name not in called and (module._forward_hooks or module._forward_pre_hooks
                                                or (module is not self and "_hf_hook" in vars(module)))]
        devices = {p.device for m in modules.values() for p in m._parameters.values() if p is not None}
        if len(devices) > 1:
            blockers.append(f"the parameters lie on several devices ({', '.join(sorted(map(str, devices)))})")
        return blockers

    def decode_block_logits(self, cache, ids: torch.Tensor, start: int, keep: slice, compiled: str | None = None,
                            nonfinite: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                            drop: torch.Tensor | None = None):
        """A step of the static path (`generation.StaticDecoder`): video-vocabulary logits (B, len(keep), V) (the
        whole vocabulary's with `config.sample_whole_vocabulary`) of `ids` (B, n) at positions [start, start + n);
        their keys and values are written into `cache` (a `generation.BlockKVCache`), attention reads exactly its
        filled part. Same function as `forward`, in fewer kernels (fused q/k/v, keys and values written together).
        A decode step feeds one block, which sees every earlier position and itself: no mask. The prefill (the
        condition prefix and the context) takes `mask` (n, start + n), bool: which positions each fed one may see
        (`layout.allowed`), and `drop` (B,), bool: the rows whose condition prefix is replaced by `uncond_embedding`
        (classifier-free guidance); it runs the plain PyTorch parts whatever `compiled` says.
        `compiled` (a mode of `generation.DECODE_COMPILE_MODES`) runs the dense parts between the attentions through
        `torch.compile` (their shapes do not depend on the step); "triton" runs the step through the kernels of
        `decode_kernels`, "triton-attention" only its attention (`decode_kernels.attention`, which also writes the
        block's keys and values into the cache). `nonfinite`, a bool device scalar, is set when a logit is NaN or
        infinite."""
        if mask is not None or drop is not None:
            logits = self._block_logits(cache, ids, start, keep, DECODE_PARTS, mask, drop)
        elif compiled == "triton":
            from .decode_kernels import block_logits  # imports triton

            return block_logits(self, cache, ids, start, keep, nonfinite)
        elif compiled == "triton-attention":
            from .decode_kernels import attention

            logits = self._block_logits(cache, ids, start, keep, DECODE_PARTS, attention=attention)
        elif compiled:
            # torch 2.6 has only the older name of the limit; later versions keep it as an alias
            limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            with torch._dynamo.config.patch(**{limit: DECODE_RECOMPILE_LIMIT}):
                logits = self._block_logits(cache, ids, start, keep, compiled_decode_parts(compiled))
        else:
            logits = self._block_logits(cache, ids, start, keep, DECODE_PARTS)
        if nonfinite is not None:
            nonfinite.logical_or_(~all_finite(logits))
        return logits

    def _block_logits(self, cache, ids, start: int, keep: slice, parts, mask=None, drop=None, attention=None):
        """`decode_block_logits` with the dense `parts` given; `attention` (`decode_kernels.attention`, decode steps
        only) in place of the cache write and SDPA."""
        m, cfg = self.model, self.config
        B, n = ids.shape
        end = start + n
        heads = cfg.num_attention_heads
        layer_input, layer_output, layer_output_and_next_input = parts

        def input_weights(i):
            norm = m.layers[i].input_layernorm
            return norm.weight, norm.bias, norm.eps, cache.qkv_weight[i], cache.qkv_bias[i]

        def output_weights(layer):
            o, mlp, norm = layer.self_attn.o_proj, layer.mlp, layer.post_attention_layernorm
            return o.weight, o.bias, norm.weight, norm.bias, norm.eps, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, \
                mlp.fc2.bias

        x = m.embed_tokens(ids)
        prefix = min(self.layout.prefix_length, end) - start  # prefix positions among those fed
        if drop is not None and prefix > 0:
            uncond = m.uncond_embedding[start : start + prefix].to(x.dtype)
            x = torch.cat([torch.where(drop.view(-1, 1, 1), uncond, x[:, :prefix]), x[:, prefix:]], dim=1)
        x = x + m.embed_positions.weight[start:end]
        qkv = layer_input(x, *input_weights(0))
        for i, layer in enumerate(m.layers):
            kv = cache.kv[i]
            if attention is not None:  # the kernel reads q, k, v in the product's rows and writes k, v into the cache
                o = attention(qkv.view(B * n, -1).to(kv.dtype), kv, n, end, layer.self_attn.scaling,
                              cache.split_counters, new_kv=True).view(B, n, -1)
            else:
                qkv = qkv.view(B, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, heads, n, head_dim)
                kv[:, :, :, start:end] = qkv[1:]  # keys and values in one copy
                o = F.scaled_dot_product_attention(qkv[0], kv[0, :, :, :end], kv[1, :, :, :end], attn_mask=mask,
                                                   scale=layer.self_attn.scaling)
                o = o.transpose(1, 2).reshape(B, n, -1)
            if i + 1 < len(m.layers):
                x, qkv = layer_output_and_next_input(x, o, *output_weights(layer), *input_weights(i + 1))
            else:
                x = layer_output(x, o, *output_weights(layer))
        head = self.lm_head.weight
        if not cfg.sample_whole_vocabulary:
            head = head[cfg.video_token_offset : cfg.video_token_offset + cfg.video_vocab_size]
        return F.linear(m.norm(x[:, keep]), head)

    def prepare_training_inputs(self, video_ids: torch.Tensor, class_labels=None):
        """Video token grids (B, T', H', W') (+ class labels) -> (input_ids, labels) for next-block training."""
        self.check_video_ids(video_ids)
        if video_ids.ndim == 0 or video_ids.shape[0] == 0:
            T, H, W = self.layout.latent_shape
            raise ValueError(f"video_ids must be token grids (batch >= 1, {T}, {H}, {W}); got shape "
                             f"{tuple(video_ids.shape)}")
        prefix = self.condition_prefix(class_labels, video_ids.shape[0], video_ids.device)
        return self.layout.training_inputs(prefix, video_ids.long())


__all__ = ["NBPConfig", "NBPModel", "NBPForVideoGeneration", "NBPPreTrainedModel"]
