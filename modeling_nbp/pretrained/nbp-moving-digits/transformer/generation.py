"""Block-wise generation for NBP: a KV cache fed one block per step, top-k/top-p sampling, batched CFG."""

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, StaticCache


def _noise(shape, generator, device):
    """Exp(1) noise; a list of generators gives row b its own stream (so a batch equals single runs)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([torch.empty(shape[1:], device=device).exponential_(generator=g) for g in generator])
    return torch.empty(shape, device=device).exponential_(generator=generator)


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                  generator=None) -> torch.Tensor:
    """Sample one id per position from logits (..., V): temperature 0 is greedy; top-k then top-p (nucleus: keep
    the smallest set of tokens whose probability reaches top_p) as in the official sampler. Runs on the
    logits' device without host synchronisation (sampling by the exponential race argmax(p / E), E ~ Exp(1))."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    V = logits.shape[-1]
    index = None
    if top_k and top_k < V:
        logits, index = logits.topk(top_k, dim=-1)  # sorted, largest first
    elif top_p < 1.0:
        logits, index = logits.sort(dim=-1, descending=True)
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        # drop a token when the tokens ranked above it already reach top_p
        drop = probs.cumsum(dim=-1) - probs > top_p
        probs = probs.masked_fill(drop, 0.0)
    choice = (probs / _noise(probs.shape, generator, probs.device)).argmax(dim=-1)
    return choice if index is None else index.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


def check_sampling_args(temperature, top_k, top_p, guidance_scale):
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int (0 or None = no top-k filtering), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {top_p}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance), got {guidance_scale}")


@dataclass
class GenerationStep:
    """What one decoding step produced: video tokens [start, end) in block order. `video_tokens` is the live
    (B, N) tensor of video ids in block order (-1 = not generated yet; copy it to keep it): a consumer may
    overwrite [start, end) before asking for the next step, and generation continues from the new tokens."""

    step: int
    num_steps: int
    start: int
    end: int
    video_tokens: torch.Tensor


class NBPGenerationMixin:
    """Generation methods of `NBPForVideoGeneration` (the model supplies `layout`, `config`, `forward`)."""

    def check_video_ids(self, video_ids: torch.Tensor):
        if video_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"video token ids must be an integer tensor, got {video_ids.dtype}")
        V = self.config.video_vocab_size
        if video_ids.numel() and (video_ids.min() < 0 or video_ids.max() >= V):
            raise ValueError(
                f"video token ids must lie in [0, {V}) (video vocabulary ids, without the offset "
                f"{self.config.video_token_offset}); got values in [{int(video_ids.min())}, {int(video_ids.max())}]"
            )

    def condition_prefix(self, class_labels=None, batch_size: int = 1, device=None, condition_ids=None):
        """The (B, P) condition prefix: each class's condition ids, or given `condition_ids` (e.g. free text)."""
        cfg = self.config
        if condition_ids is not None:
            condition_ids = torch.as_tensor(condition_ids, device=device).long()
            if condition_ids.ndim != 2 or condition_ids.shape[1] != cfg.num_condition_tokens:
                raise ValueError(f"condition_ids must have shape (batch, {cfg.num_condition_tokens})")
            return condition_ids
        if cfg.condition_mode != "class":
            if class_labels is not None:
                raise ValueError(f"this model is not class-conditional (condition_mode={cfg.condition_mode!r}); "
                                 "do not pass class_labels")
            return torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        if class_labels is None:
            raise ValueError(f"this model is class-conditional: pass class_labels (ints in [0, {cfg.num_classes}))")
        labels = torch.as_tensor(class_labels, device=device).long().view(-1)
        if labels.numel() and (labels.min() < 0 or labels.max() >= cfg.num_classes):
            raise ValueError(f"class_labels must lie in [0, {cfg.num_classes}); got {labels.tolist()}")
        table = torch.tensor(cfg.class_condition_ids, dtype=torch.long, device=device)
        return table[labels]

    @torch.no_grad()
    def iter_generation(self, class_labels=None, context_ids=None, batch_size=None, temperature=1.0, top_k=None,
                        top_p=1.0, guidance_scale=1.0, generator=None, use_cache=True, condition_ids=None,
                        cache_implementation="dynamic"):
        """Generate block by block, yielding a `GenerationStep` after every step (for streaming).

        class_labels: (B,) ints for class-conditional models. context_ids: (B, c, H', W') video ids of the
        first c latent frames (frame prediction). guidance_scale g != 1 runs classifier-free guidance in one
        doubled batch: logits = uncond + g (cond - uncond), the unconditional half using `uncond_embedding`
        as its prefix. use_cache=False recomputes the whole sequence every step (the reference path).
        cache_implementation="static" preallocates the cache for the whole sequence (transformers' StaticCache):
        every decode step then has fixed shapes and no host synchronisation (CUDA graphs / torch.compile)."""
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
        check_sampling_args(temperature, top_k, top_p, guidance_scale)
        layout, cfg, device = self.layout, self.config, self.device
        sizes = {len(x) for x in (class_labels, context_ids, condition_ids) if x is not None}
        if batch_size is not None:
            sizes.add(batch_size)
        if len(sizes) > 1:
            raise ValueError(f"class_labels, context_ids, condition_ids and batch_size disagree on the batch size: {sizes}")
        B = sizes.pop() if sizes else 1
        prefix = self.condition_prefix(class_labels, B, device, condition_ids)

        video = torch.full((B, layout.num_video_tokens), -1, dtype=torch.long, device=device)
        c = 0
        if context_ids is not None:
            context_ids = torch.as_tensor(context_ids, device=device)
            self.check_video_ids(context_ids)
            c = layout.context_tokens(context_ids.shape[1]) if context_ids.ndim == 4 else -1
            if context_ids.ndim != 4 or tuple(context_ids.shape[2:]) != layout.latent_shape[1:]:
                raise ValueError(f"context_ids must have shape (batch, frames, {layout.latent_shape[1]}, "
                                 f"{layout.latent_shape[2]}); got {tuple(context_ids.shape)}")
            video[:, :c] = layout.grid_to_sequence(context_ids.long())
        schedule = layout.decode_schedule(c)

        guided = guidance_scale != 1.0
        drop = None
        if guided:
            if layout.prefix_length == 0:
                raise ValueError("guidance_scale != 1 needs a condition prefix and its unconditional embedding; "
                                 "this model has none (condition_mode=%r)" % cfg.condition_mode)
            prefix = torch.cat([prefix, prefix])
            drop = torch.arange(2 * B, device=device) >= B
        seq = layout.build_sequence(prefix, video[:, :c].repeat(2 if guided else 1, 1))
        cache = None
        if use_cache and cache_implementation == "static":
            cache = StaticCache(config=cfg, max_cache_len=layout.sequence_length)
        elif use_cache:
            cache = DynamicCache(config=cfg)
        fed = 0
        # index tensors of every step, moved to the device once (the loop then only launches device work)
        plan = [(a, b, int(layout.step_positions(a, b).max()) + 1, layout.step_positions(a, b).to(device))
                for a, b in schedule]
        video_positions = layout.video_positions.to(device)
        off = cfg.video_token_offset
        for step, (a, b, upto, positions) in enumerate(plan):
            start = fed if use_cache else 0
            out = self(input_ids=seq[:, start:upto], cache=cache, use_cache=use_cache, drop_condition=drop,
                       logits_to_keep=positions - start)
            fed = upto
            logits = out.logits[..., off : off + cfg.video_vocab_size].float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance_scale * (cond - uncond)
            tokens = sample_tokens(logits, temperature, top_k, top_p, generator)
            video[:, a:b] = tokens
            yield GenerationStep(step, len(plan), a, b, video)
            # read back after the yield: a consumer may have replaced this step's tokens
            seq[:, video_positions[a:b]] = (video[:, a:b] + off).repeat(2 if guided else 1, 1)

    @torch.no_grad()
    def generate_video_tokens(self, class_labels=None, context_ids=None, batch_size=None, temperature=1.0,
                              top_k=None, top_p=1.0, guidance_scale=1.0, generator=None, use_cache=True,
                              condition_ids=None, callback=None, cache_implementation="dynamic"):
        """Generate video token grids (B, T', H', W') block by block (see `iter_generation` for arguments).
        Steps = (video tokens - context tokens) / block size, plus block_size - 1 for the hybrid start
        (48 for the K600 setting with 1x1x16 blocks, 95 for UCF's hybrid start). `callback(step_info)` is
        called after every step."""
        last = None
        for last in self.iter_generation(class_labels, context_ids, batch_size, temperature, top_k, top_p,
                                         guidance_scale, generator, use_cache, condition_ids,
                                         cache_implementation):
            if callback is not None:
                callback(last)
        return self.layout.sequence_to_grid(last.video_tokens.clone())
