"""Block-wise generation for NBP: a KV cache fed one block per step, top-k/top-p sampling, batched CFG."""

import copy
import inspect
import math
import numbers
import threading
import warnings
from dataclasses import dataclass
from functools import cache, partial

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache

from .triton_support import require_triton
from .value_checks import all_finite, check_in_range


def _noise(shape, generator, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform [0, 1) float32 noise (whatever the default dtype: bfloat16 noise has 8 bits), into `out` when given; a
    list of generators gives row b its own stream (so a batch equals single runs). A generator on another kind of
    device than the model (a CPU generator for a CUDA model, as diffusers allows) draws on its own device, and the
    noise is copied over."""
    out = torch.empty(shape, dtype=torch.float32, device=device) if out is None else out
    if isinstance(generator, (list, tuple)):
        check_generator(generator, shape[0])
        pairs = zip(out, generator)
    else:
        pairs = [(out, generator)]
    for target, g in pairs:
        if g is not None and g.device.type != target.device.type:
            target.copy_(torch.empty(target.shape, dtype=target.dtype, device=g.device).uniform_(generator=g))
        else:
            target.uniform_(generator=g)
    return out


def check_generator(generator, batch_size: int) -> None:
    """`generator` must be None, a torch.Generator, or a list of `batch_size` of those (one per video)."""
    many = isinstance(generator, (list, tuple))
    if not all(g is None or isinstance(g, torch.Generator) for g in (generator if many else [generator])):
        raise TypeError("generator must be a torch.Generator, a list of one per video (None: the global random "
                        f"generator) or None; got {generator!r}")
    if many and len(generator) != batch_size:
        raise ValueError(f"generator: got {len(generator)} generators for a batch of {batch_size} (one per video)")


def as_id_tensor(value, name: str, shape: str, device=None) -> torch.Tensor:
    """`value` (a tensor, an array, an int or nested lists of ints) as a tensor on `device`, or a clear error naming
    the argument `name` and its `shape` for what torch cannot read (None, strings, sets, meta tensors)."""
    if isinstance(value, torch.Tensor) and value.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values; give {shape} ints on a real device")
    try:
        return torch.as_tensor(value, device=device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be {shape} ints (a tensor, an array or nested lists); got "
                        f"{type(value).__name__} {value!r:.80} ({err})") from None


def one_label_per_video(labels: torch.Tensor) -> torch.Tensor:
    """Class labels (batch,) from an int, (batch,) or (batch, 1); a grid of labels (batch, 2), say, is refused."""
    if labels.ndim > 1 and math.prod(labels.shape[1:]) != 1:
        raise ValueError(f"class_labels must be one label per video, shape (batch,) or (batch, 1); got shape "
                         f"{tuple(labels.shape)}")
    return labels.reshape(-1)


def sample_tokens(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                  generator=None, noise: torch.Tensor | None = None, fused: bool = False) -> torch.Tensor:
    """Sample one id per position from logits (..., V): temperature 0 is greedy; top-k then top-p (nucleus: a
    token is kept while the tokens ranked above it hold at most top_p of the probability) as in the official
    sampler, except that top-k keeps exactly k tokens where the official filter also keeps those tied with the k-th
    (with bf16 logits about 40 more of 64000, under 0.1% of the probability for flat logits). Runs on the
    logits' device without host synchronisation, by inverse transform: with u ~ U[0, 1) per position, the token
    at which the cumulative probability of the kept tokens (largest first) passes u times their total.
    `noise` (the u, one per position: shape `logits.shape[:-1]`) may be drawn beforehand; else it is drawn here.
    `fused`: everything after the ranking in one Triton kernel (`decode_kernels.sample_ranked`; CUDA, or CPU under
    Triton's interpreter) when at most `decode_kernels.MAX_RANKED` tokens are ranked.
    `temperature` (not 0) and `top_p` may also be float32 scalars on the logits' device, read by the device
    kernels: a static decoder's captured steps then serve any value (`StaticDecoder`)."""
    if not torch.is_tensor(temperature) and temperature == 0:
        return logits.argmax(dim=-1)
    scaled, nucleus = applies(temperature, 1.0), applies(top_p, 1.0)
    # rank in the logits' own dtype (bf16 halves the bytes read), then compute in float32 on the kept ones;
    # dividing by a temperature does not change the ranking
    V = logits.shape[-1]
    index = None
    if top_k and top_k < V:
        logits, index = logits.topk(top_k, dim=-1)  # sorted, largest first
    elif nucleus:
        logits, index = logits.sort(dim=-1, descending=True)
    if noise is None:
        noise = _noise(logits.shape[:-1], generator, logits.device)
    inverse = inverse_temperature(temperature) if scaled else None
    if fused and index is not None:
        from .decode_kernels import MAX_RANKED, sample_ranked  # imports triton

        if logits.shape[-1] <= MAX_RANKED:
            return sample_ranked(logits, index, noise, inverse, top_p if nucleus else None)
    logits = logits.float()
    if scaled:  # shifted first: the largest becomes 0, so a tiny temperature cannot overflow to inf
        logits = (logits - logits.amax(dim=-1, keepdim=True)) * inverse
    probs = logits.softmax(dim=-1)
    cumulative = probs.cumsum(dim=-1)
    # the kept tokens are a prefix: drop a token when the tokens ranked above it hold more than top_p
    # (u * total < total, and a cumulative sum of non-negative numbers never decreases, so a kept token is
    # chosen; the clamps only keep NaN logits, reported after the run, from indexing out of range)
    last = (cumulative - probs <= top_p).sum(dim=-1, keepdim=True).clamp_(min=1) - 1 if nucleus else None
    total = cumulative[..., -1:] if last is None else cumulative.gather(-1, last)
    choice = torch.searchsorted(cumulative, noise.unsqueeze(-1) * total, right=True).clamp_(max=probs.shape[-1] - 1)
    return (choice if index is None else index.gather(-1, choice)).squeeze(-1)


def applies(value, neutral: float) -> bool:
    """Whether a sampling value (a number, or a device scalar that may hold any value) may differ from `neutral`."""
    return torch.is_tensor(value) or value != neutral


def inverse_temperature(temperature):
    """1 / temperature, rounded to float32 (a number, or a device scalar for one): the logits are multiplied by it,
    so a number and a device scalar of the same temperature give the same tokens. Below float32's smallest normal
    number a temperature counts as that number (the reciprocal of 0 is infinite: NaN probabilities), which is as
    greedy, but for ties."""
    inverse = torch.as_tensor(temperature, dtype=torch.float32).clamp(min=torch.finfo(torch.float32).tiny).reciprocal()
    return inverse if torch.is_tensor(temperature) else inverse.item()


def sample_guided(logits, noise, temperature=1.0, top_k=None, top_p=1.0, guidance_scale=1.0, nonfinite=None,
                  fused=False):
    """`sample_tokens` from video logits (2B, n, V) combined by classifier-free guidance, or (B, n, V) without.
    `nonfinite`, a bool device scalar, is set when a combined logit is NaN or infinite (checked once, after the run;
    a huge guidance_scale overflows float32); `fused` as in `sample_tokens`; guidance_scale may be a device scalar."""
    if applies(guidance_scale, 1.0):
        cond, uncond = logits.float().chunk(2)
        logits = uncond + guidance_scale * (cond - uncond)
    if nonfinite is not None:
        nonfinite.logical_or_(~all_finite(logits))
    return sample_tokens(logits, temperature, top_k, top_p, noise=noise, fused=fused)


# ways to compile the decode step: torch.compile modes without torch.compile's own CUDA graphs (the decoder captures
# whole steps itself; "max-autotune-no-cudagraphs" also tries Triton matrix-product kernels for the small batches),
# "triton", this project's hand-written Triton kernels (`decode_kernels`: a few fused kernels per layer, for small
# batches), and "triton-attention", the PyTorch step (cuBLAS products) with the Triton attention kernel (for large
# batches, where the products run near the matrix rate and attention over the cache dominates); both sample with the
# fused sampler (`decode_kernels.sample_ranked`)
DECODE_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "triton", "triton-attention")


def compile_mode(compile_decode, device: torch.device) -> str | None:
    """`compile_decode` as a mode of `DECODE_COMPILE_MODES` (None: not compiled), checked for `device`."""
    if compile_decode is True:
        return "default"
    if compile_decode is False or compile_decode is None:
        return None
    if compile_decode not in DECODE_COMPILE_MODES:
        raise ValueError(f"compile_decode must be True, False or one of {DECODE_COMPILE_MODES}, got {compile_decode!r}")
    if compile_decode in ("triton", "triton-attention"):
        require_triton(device, f"compile_decode={compile_decode!r}")
    return compile_decode


# the sampling of every result in the paper (no classifier-free guidance): what generation uses for any value that
# neither the call nor the model's `generation_config` sets
PAPER_SAMPLING = dict(top_k=16000, top_p=0.9, temperature=1.0)


# the GenerationConfig fields that generation reads; token ids may be set too (they describe the vocabulary)
GENERATION_CONFIG_FIELDS = ("temperature", "top_k", "top_p", "guidance_scale", "do_sample", "cache_implementation")


@cache
def _generation_config_defaults() -> dict:
    """Field -> the values that leave it unset: GenerationConfig's (None) and the one transformers' generate() then
    applies (num_beams 1, num_return_sequences 1, ...)."""
    applied = getattr(GenerationConfig, "_get_default_generation_params", dict)()
    return {name: (value, applied.get(name, value)) for name, value in vars(GenerationConfig()).items()}


def check_generation_config(generation_config) -> None:
    """Refuse a GenerationConfig that asks for what NBP generation does not do (beams, several sequences per input,
    lengths, other logits processors, returned scores): it would be ignored silently."""
    defaults = _generation_config_defaults()
    unsupported = sorted(
        name for name, value in vars(generation_config).items()
        if name not in GENERATION_CONFIG_FIELDS and name in defaults and not name.startswith("_")
        and name != "transformers_version" and not name.endswith("_token_id") and value not in defaults[name]
        and not (name.startswith(("output_", "return_dict")) and not value))
    if unsupported:
        fields = ", ".join(f"{n}={getattr(generation_config, n)!r}" for n in unsupported)
        raise ValueError(
            f"the generation_config (the model's own, with the fields set by one given to generate()) sets "
            f"{fields}, which NBP generation does not support: it reads only {', '.join(GENERATION_CONFIG_FIELDS)} "
            "and produces the whole video token grid, one video per class label, condition or context (repeat those "
            "for more samples); pass use_cache to the call"
        )


def resolve_sampling(generation_config, temperature=None, top_k=None, top_p=None, guidance_scale=None,
                     source: str = "the model's generation_config") -> tuple:
    """(temperature, top_k, top_p, guidance_scale), checked: each value given, else the `generation_config`'s
    (`do_sample=False` there means greedy, as in transformers), else `PAPER_SAMPLING` (guidance 1 = off). A
    generation_config that sets fields generation would ignore is refused (`check_generation_config`), unless every
    value is given: it is not read then (generate() passes the values of the config it was given). `source` names
    the generation_config in errors about its values."""
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
    if None not in given.values():
        generation_config = None
    if generation_config is not None:
        check_generation_config(generation_config)
    fallback = dict(PAPER_SAMPLING, guidance_scale=1.0)
    from_config = []
    for name, value in given.items():
        saved = getattr(generation_config, name, None)
        if value is None and saved is not None:
            from_config.append(name)
        given[name] = value if value is not None else saved if saved is not None else fallback[name]
    if generation_config is not None and generation_config.do_sample is False and temperature is top_k is top_p is None:
        given["temperature"] = 0.0  # a saved greedy config, unless the call asks for sampling
    try:
        return check_sampling_args(**given)
    except ValueError as err:
        name = str(err).split()[0]  # the messages start with the argument's name
        if name in from_config:
            raise ValueError(f"{err} ({name} was not passed to this call: it came from {source})") from None
        raise


def check_sampling_args(temperature, top_k, top_p, guidance_scale) -> tuple:
    """The sampling arguments, checked, as plain Python numbers (numpy scalars accepted; NaN and infinity refused)."""
    def number(value, kind=numbers.Real):
        return isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)

    if not number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not number(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int (0 = no top-k filtering), got {top_k!r}")
    if not number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be a number in (0, 1] (1 = no nucleus filtering), got {top_p!r}")
    if not number(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale!r}")
    return float(temperature), None if top_k is None else int(top_k), float(top_p), float(guidance_scale)


# guards what generations on one model share (the kept static decoder, the count of generations under way and the
# modes they restore): calls from several threads, as a web server makes, must not both claim one decoder's cache
_SHARED_STATE_LOCK = threading.Lock()

# devices whose generation uses the static path unless a call says otherwise (on CUDA with CUDA graphs; on CPU it is
# faster too, without them: `nbp bench`, README); elsewhere the dynamic cache, until measured
STATIC_BY_DEFAULT = ("cuda", "cpu")


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


def check_finite_logits(nonfinite: torch.Tensor, dtype: torch.dtype, guidance_scale: float = 1.0) -> None:
    """Raise if the flag that the sampling steps set on the device says some logits were NaN or infinite."""
    if bool(nonfinite):
        hint = "; float16 overflows easily: load the model in bfloat16 or float32" if dtype == torch.float16 else ""
        if guidance_scale != 1.0:
            hint += (f"; guidance_scale={guidance_scale:g} multiplies the difference of the conditional and "
                     "unconditional logits, and a huge one overflows float32")
        raise FloatingPointError(f"the generator produced NaN or infinite logits (weights in {dtype}{hint}); the "
                                 "sampled tokens are meaningless")


class NBPGenerationMixin:
    """Generation methods of `NBPForVideoGeneration` (the model supplies `layout`, `config`, `forward`)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' `from_pretrained`, then the folder's `generation_config.json` (default sampling), which
        transformers loads only for models built on its own GenerationMixin."""
        given = kwargs.get("generation_config")
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if kwargs.get("output_loading_info") else loaded  # (model, loading_info)
        if given is not None:
            model.generation_config = given
        elif pretrained_model_name_or_path is not None:
            where = {k: kwargs[k] for k in ("cache_dir", "force_download", "local_files_only", "token", "revision",
                                            "subfolder") if k in kwargs}
            try:
                model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **where)
            except OSError:  # no generation_config.json: the paper's sampling
                pass
        return loaded

    def default_sampling(self) -> dict:
        """What generation samples with when a call sets nothing (`resolve_sampling` of the generation_config)."""
        values = resolve_sampling(self.generation_config)
        return dict(zip(("temperature", "top_k", "top_p", "guidance_scale"), values))

    def check_video_ids(self, video_ids: torch.Tensor):
        if not isinstance(video_ids, torch.Tensor):
            raise TypeError(f"video token ids must be an integer torch.Tensor (batch, T', H', W'), got "
                            f"{type(video_ids).__name__}")
        if video_ids.is_floating_point() or video_ids.is_complex() or video_ids.dtype == torch.bool:
            raise TypeError(f"video token ids must be an integer tensor, got {video_ids.dtype}")
        V = self.config.video_vocab_size
        check_in_range(video_ids, 0, V, f"video token ids must lie in [0, {V}) (video vocabulary ids, without the "
                                        f"offset {self.config.video_token_offset})")

    def condition_prefix(self, class_labels=None, batch_size: int = 1, device=None, condition_ids=None):
        """The (B, P) condition prefix: each class's condition ids, or given `condition_ids` (e.g. free text)."""
        cfg = self.config
        if condition_ids is not None and class_labels is not None:
            raise ValueError("give class_labels or condition_ids (the prefix they stand for), not both")
        if condition_ids is not None:
            condition_ids = as_id_tensor(condition_ids, "condition_ids", f"(batch, {cfg.num_condition_tokens})",
                                         device)
            if condition_ids.is_floating_point() or condition_ids.is_complex() or condition_ids.dtype == torch.bool:
                raise ValueError(f"condition_ids must be ints; got {condition_ids.dtype} values")
            condition_ids = condition_ids.long()
            if condition_ids.ndim != 2 or condition_ids.shape[1] != cfg.num_condition_tokens:
                raise ValueError(f"condition_ids must have shape (batch, {cfg.num_condition_tokens})")
            low, high = cfg.condition_token_offset, cfg.condition_token_offset + cfg.condition_vocab_size
            check_in_range(condition_ids, low, high, f"condition_ids must lie in this model's condition range "
                                                     f"[{low}, {high}) (ids of the text tokenizer + "
                                                     f"condition_token_offset {low})")
            return condition_ids
        if cfg.condition_mode != "class":
            if class_labels is not None:
                raise ValueError(f"this model is not class-conditional (condition_mode={cfg.condition_mode!r}); "
                                 "do not pass class_labels")
            return torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        if class_labels is None:
            raise ValueError(f"this model is class-conditional: pass class_labels (ints in [0, {cfg.num_classes}))")
        labels = one_label_per_video(as_id_tensor(class_labels, "class_labels", "(batch,)", device))
        if labels.numel() and (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):
            raise ValueError(f"class_labels must be ints in [0, {cfg.num_classes}); got {labels.dtype} values")
        labels = labels.long()
        check_in_range(labels, 0, cfg.num_classes, f"class_labels must lie in [0, {cfg.num_classes})")
        table = torch.tensor(cfg.class_condition_ids, dtype=torch.long, device=device)
        return table[labels]

    @torch.no_grad()
    def iter_generation(self, class_labels=None, context_ids=None, batch_size=None, temperature=None, top_k=None,
                        top_p=None, guidance_scale=None, generator=None, use_cache=True, condition_ids=None,
                        cache_implementation=None, use_cuda_graphs=None, compile_decode: bool | str = False):
        """Generate block by block, yielding a `GenerationStep` after every step (for streaming).

        class_labels: (B,) ints for class-conditional models. context_ids: (B, c, H', W') video ids of the
        first c latent frames (frame prediction). temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
        guidance_scale: sampling; a value not given comes from `self.generation_config`, else from the paper's
        sampling (`PAPER_SAMPLING`: top-k 16000, top-p 0.9, temperature 1, no guidance). guidance_scale g != 1 runs
        classifier-free guidance in one doubled batch: logits = uncond + g (cond - uncond), the unconditional half
        using `uncond_embedding` as its prefix. use_cache=False recomputes the whole sequence every step (the
        reference path).
        cache_implementation: "dynamic" (transformers' DynamicCache, grown every step) or "static" (a cache
        preallocated for the whole sequence and kept on the model between calls: every decode step has fixed
        shapes and no host synchronisation); default the `generation_config`'s, else "static" on CUDA and CPU,
        "dynamic" elsewhere and for models whose modules the static step would skip (`static_decode_blockers`:
        adapters, hooks, several devices).
        use_cuda_graphs (default: on with a static cache on CUDA) replays each step (the prefill too) from a CUDA graph
        (`StaticDecoder`); compile_decode (True, or a mode of `DECODE_COMPILE_MODES`; static cache only) runs the
        dense parts of its layers through `torch.compile`, or ("triton") the whole step through this project's Triton
        kernels, or ("triton-attention") only its attention and sampling.
        The same seed gives the same tokens on every path, up to the float rounding of the device's kernels.
        The model runs in eval mode while generating (each module's mode is restored afterwards)."""
        if self.device.type == "meta":
            raise ValueError("the generator's weights are on the meta device (not loaded, or sequential CPU offloading, "
                             "which generation does not support: it reads weights outside the modules' forward); "
                             "load the weights, or use enable_model_cpu_offload() or .to(device)")
        configured = getattr(self.generation_config, "cache_implementation", None)
        source = " (from the model's generation_config)" if cache_implementation is None and configured else ""
        cache_implementation = cache_implementation or configured
        if cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}"
                             f"{source}")
        fast = self.device.type in STATIC_BY_DEFAULT
        wants_static = use_cache and (cache_implementation == "static" or (cache_implementation is None and fast))
        blockers = self.static_decode_blockers(triton=compile_decode == "triton") if wants_static else []
        if cache_implementation is None:
            cache_implementation = "static" if fast and not blockers else "dynamic"
            if fast and blockers:
                warnings.warn("generating with the dynamic cache (slower): the static decode step reads the weights "
                              f"of plain modules, and {blockers[0]} (merge adapters with merge_and_unload(), remove "
                              "hooks, or put the model on one device for the fast path)", stacklevel=3)
        elif cache_implementation == "static" and blockers:
            raise ValueError("cache_implementation='static' would skip what the modules' forward does: "
                             + "; ".join(blockers[:3]) + (f"; and {len(blockers) - 3} more" if len(blockers) > 3 else "")
                             + " (merge adapters with merge_and_unload(), remove hooks, put the "
                             "model on one device, or use cache_implementation='dynamic')")
        graphs_ok = cache_implementation == "static" and use_cache and cuda_graphs_supported(self.device)
        if use_cuda_graphs is None:
            use_cuda_graphs = graphs_ok
        if use_cuda_graphs and not graphs_ok:
            raise ValueError("use_cuda_graphs needs a model on a CUDA device, use_cache=True and "
                             f"cache_implementation='static' (got device {self.device}, use_cache={use_cache}, "
                             f"cache_implementation={cache_implementation!r})")
        guidance_given = guidance_scale is not None
        temperature, top_k, top_p, guidance_scale = resolve_sampling(self.generation_config, temperature, top_k, top_p,
                                                                     guidance_scale)
        layout, cfg, device = self.layout, self.config, self.device
        if class_labels is not None:
            if isinstance(class_labels, str) or (isinstance(class_labels, (list, tuple))
                                                 and any(isinstance(c, str) for c in class_labels)):
                raise ValueError("class_labels must be ints here (class names: NBPVideoPipeline takes them, or map them "
                                 f"with config.id2label); got {class_labels!r}")
            class_labels = one_label_per_video(as_id_tensor(class_labels, "class_labels", "(batch,)"))
        if condition_ids is not None:
            condition_ids = as_id_tensor(condition_ids, "condition_ids", f"(batch, {cfg.num_condition_tokens})")
        if context_ids is not None:
            context_ids = as_id_tensor(context_ids, "context_ids", f"(batch, frames, {layout.latent_shape[1]}, "
                                                                   f"{layout.latent_shape[2]})")
        sizes = {len(x) for x in (class_labels, context_ids, condition_ids) if x is not None and x.ndim}
        if batch_size is not None:
            if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
                raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
            sizes.add(batch_size)
        if len(sizes) > 1:
            raise ValueError(f"class_labels, context_ids, condition_ids and batch_size disagree on the batch size: {sizes}")
        B = sizes.pop() if sizes else 1
        if B == 0:
            raise ValueError("nothing to generate: class_labels, context_ids or condition_ids hold no videos")
        prefix = self.condition_prefix(class_labels, B, device, condition_ids)
        check_generator(generator, B)

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
        steps = layout.step_plan(c, use_cache)  # every step's inputs (the loop then only launches device work)

        guided = guidance_scale != 1.0
        drop = None
        if guided:
            if layout.prefix_length == 0:
                source = "" if guidance_given else " (it came from the model's generation_config: pass guidance_scale=1)"
                raise ValueError(f"guidance_scale != 1 needs a condition prefix and its unconditional embedding; this "
                                 f"model has none (condition_mode={cfg.condition_mode!r}){source}")
            prefix = torch.cat([prefix, prefix])
            drop = torch.arange(2 * B, device=device) >= B
        seq = layout.build_sequence(prefix, video[:, :c].repeat(2 if guided else 1, 1))
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)
        # the static step takes the kept positions as a slice, the dynamic one as indices on the device
        static = use_cache and cache_implementation == "static"
        plan = []
        for a, b, start, upto, keep, keep_slice in steps:
            if static and keep_slice is None:
                raise RuntimeError(f"static decoding needs contiguous logit positions; step {a}:{b} has {keep}")
            plan.append((a, b, start, upto, None if static else keep.to(device), keep_slice))
        compile_decode = compile_mode(compile_decode, device)
        if compile_decode and not static:
            raise ValueError("compile_decode needs use_cache=True and cache_implementation='static'")
        decoder = self.static_decoder(seq.shape[0], use_cuda_graphs, compile_decode, **sampling) if static else None
        cache = DynamicCache(config=cfg) if use_cache and decoder is None else None
        # set on the device by any step whose logits are not finite; read once, at the end or when the consumer stops
        nonfinite = decoder.nonfinite if decoder is not None else torch.zeros((), dtype=torch.bool, device=device)
        # no dropout, no class dropout: a model in training mode samples what it would in eval mode; each module's
        # mode comes back (a frozen part stays in eval) when the last of the generations under way on the model ends
        with _SHARED_STATE_LOCK:
            modes = [m.training for m in self.modules()]  # reading the flags costs a quarter of setting them
            if not getattr(self, "_generations_under_way", 0):
                self._modes_before_generation = modes if any(modes) else None
            self._generations_under_way = getattr(self, "_generations_under_way", 0) + 1
            if any(modes):
                self.eval()
        try:
            yield from self._decode_plan(plan, seq, video, B, guided, drop, decoder, cache, use_cache, generator,
                                         sampling, nonfinite)
            check_finite_logits(nonfinite, self.dtype, guidance_scale)
            # once, at the end: every id is written by then (the steps fed a consumer's ids clamped)
            if bool(((video < 0) | (video >= cfg.video_vocab_size)).any()):
                raise ValueError(f"a consumer of the generation steps wrote video_tokens outside [0, "
                                 f"{cfg.video_vocab_size}) (video vocabulary ids; -1 marks tokens not generated yet); "
                                 "the tokens generated after them are meaningless")
        except GeneratorExit:  # the consumer stopped early (`close()`): what it took must not hide non-finite logits
            check_finite_logits(nonfinite, self.dtype, guidance_scale)
            raise
        finally:
            with _SHARED_STATE_LOCK:
                self._generations_under_way -= 1
                if not self._generations_under_way and self._modes_before_generation is not None:
                    for module, mode in zip(self.modules(), self._modes_before_generation):
                        module.training = mode
                if decoder is not None:
                    decoder.in_use = False

    def _decode_plan(self, plan, seq, video, B, guided, drop, decoder, cache, use_cache, generator, sampling,
                     nonfinite):
        """The decoding loop of `iter_generation` over its precomputed plan."""
        cfg, layout, device = self.config, self.layout, self.device
        video_positions = layout.video_positions.to(device)
        off, whole = cfg.video_token_offset, cfg.sample_whole_vocabulary
        for step, (a, b, start, upto, keep, keep_slice) in enumerate(plan):
            ids = seq[:, start:upto]
            draw_noise = None  # (out=None) -> this step's sampling noise, drawn into `out` when given
            if sampling["temperature"] > 0:
                draw_noise = partial(_noise, (B, b - a), generator, device)
            if decoder is not None:  # it holds its own condition dropout (a graph keeps the tensor it captured)
                tokens = decoder(self, ids, start, keep_slice, draw_noise)
            else:
                noise = draw_noise() if draw_noise else None
                step_drop = drop if start < layout.prefix_length else None
                tokens = self.decode_step(ids, keep, noise, step_drop, cache, use_cache=use_cache,
                                          nonfinite=nonfinite, **sampling)
            sampled = tokens  # video ids, or ids of the whole vocabulary (sample_whole_vocabulary)
            if whole:
                tokens = (tokens - off).clamp_(0, cfg.video_vocab_size - 1)  # the official reading of other ids
            video[:, a:b] = tokens
            yield GenerationStep(step, len(plan), a, b, video)
            # read back after the yield: a consumer may have replaced this step's tokens
            fed = video[:, a:b].clamp(0, cfg.video_vocab_size - 1) + off  # a consumer's bad ids: reported at the end
            if whole:  # the official sampler feeds back what it sampled (unless a consumer changed it)
                fed = torch.where(video[:, a:b] == tokens, sampled, fed)
            seq[:, video_positions[a:b]] = fed.repeat(2 if guided else 1, 1)

    def decode_step(self, ids, keep, noise, drop, cache, use_cache=True, nonfinite=None, **sampling):
        """One forward over `ids` (the sequence positions that follow the cache) and the video ids (ids of the whole
        vocabulary with `config.sample_whole_vocabulary`) sampled from the logits at the positions `keep` (indices
        into `ids`), CFG applied: (B, len(keep))."""
        logits = self(input_ids=ids, cache=cache, use_cache=use_cache, drop_condition=drop,
                      logits_to_keep=keep).logits
        if not self.config.sample_whole_vocabulary:
            off, V = self.config.video_token_offset, self.config.video_vocab_size
            logits = logits[..., off : off + V]
        return sample_guided(logits, noise, nonfinite=nonfinite, **sampling)

    def static_step(self, ids, start: int, keep: slice, noise, cache, compiled=None, nonfinite=None, mask=None,
                    drop=None, **sampling):
        """`decode_step` on the static path (`decode_block_logits` over a `BlockKVCache`)."""
        # with guidance the combined logits are checked instead of the raw ones: a non-finite raw logit makes them
        # non-finite too, and a huge scale overflows float32 where they are combined
        guided = applies(sampling["guidance_scale"], 1.0)
        logits = self.decode_block_logits(cache, ids, start, keep, compiled, nonfinite=None if guided else nonfinite,
                                          mask=mask, drop=drop)
        return sample_guided(logits, noise, nonfinite=nonfinite if guided else None,
                             fused=compiled in ("triton", "triton-attention"), **sampling)

    def static_decoder(self, batch_size: int, use_cuda_graphs: bool, compile_decode: str | None = None,
                       **sampling) -> "StaticDecoder":
        """The model's `StaticDecoder` for this batch size and sampling, reset for a new sequence. One is kept
        (with its cache and graphs) between calls until `clear_decode_cache()`; another configuration, or
        parameters moved or replaced, give a new one. Of the sampling, only which filters apply is part of the
        configuration (`sampling_filters`): its temperature, top-p and guidance scale are set for each call."""
        autocast = (torch.is_autocast_enabled(self.device.type), torch.get_autocast_dtype(self.device.type))
        filters = sampling_filters(**sampling)
        key = (batch_size, self.device, self.dtype, use_cuda_graphs, compile_decode, self.config.sample_whole_vocabulary,
               autocast, filters, tuple(p.data_ptr() for p in self.parameters()))
        with _SHARED_STATE_LOCK:  # claimed in one go: another thread may be looking for a decoder too
            decoder = getattr(self, "_static_decoder", None)
            shared = decoder is None or not decoder.in_use
            if shared:
                if decoder is None or decoder.key != key:
                    self._static_decoder = decoder = None  # free the old cache and graphs before allocating anew
                    decoder = self._static_decoder = StaticDecoder(key, self, batch_size, compile_decode, filters,
                                                                   use_cuda_graphs)
                decoder.in_use = True
        if not shared:
            # another generation on this model is still under way (two streams consumed in turn, or another
            # thread's call): it keeps the shared decoder, this one gets a private cache and runs without graphs
            decoder = StaticDecoder(key, self, batch_size, compile_decode, filters, False)
        decoder.set_sampling(**sampling)
        decoder.cache.reset(self)
        decoder.nonfinite.zero_()
        return decoder

    def clear_decode_cache(self):
        """Free the static decoder kept between calls (its cache, fused weights and CUDA graphs)."""
        self._static_decoder = None

    def __getstate__(self):
        """A copy (`copy.deepcopy`, say for an EMA model) or pickle leaves out the kept static decoder, whose cache is
        sized for whole sequences of a batch and whose CUDA graphs belong to this model's tensors (the copy builds its
        own), and this model's generations under way."""
        state = super().__getstate__()
        state.pop("_static_decoder", None)
        state.pop("_generations_under_way", None)
        return state

    @torch.no_grad()
    def generate_video_tokens(self, class_labels=None, context_ids=None, batch_size=None, temperature=None,
                              top_k=None, top_p=None, guidance_scale=None, generator=None, use_cache=True,
                              condition_ids=None, callback=None, cache_implementation=None, use_cuda_graphs=None,
                              compile_decode: bool | str = False):
        """Generate video token grids (B, T', H', W') block by block (see `iter_generation` for arguments).
        Steps = (video tokens - context tokens) / block size, plus block_size - 1 for the hybrid start
        (48 for the K600 setting with 1x1x16 blocks, 95 for UCF's hybrid start). `callback(step_info)` is
        called after every step."""
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a function of the GenerationStep (or None), got {callback!r}")
        last = None
        for last in self.iter_generation(class_labels, context_ids, batch_size, temperature, top_k, top_p,
                                         guidance_scale, generator, use_cache, condition_ids,
                                         cache_implementation, use_cuda_graphs, compile_decode):
            if callback is not None:
                callback(last)
        return self.layout.sequence_to_grid(last.video_tokens.clone())

    def generate(self, input_ids=None, generation_config: GenerationConfig | None = None, **kwargs):
        """transformers' name for generation: `generate_video_tokens` with the same keyword arguments, and a
        `generation_config` over the model's own (as in transformers: the call's keyword arguments, then the given
        config, then the model's, field by field) for the sampling values the call does not set. A config that sets
        fields NBP cannot honour, such as num_beams or num_return_sequences, is refused (`check_generation_config`).
        `do_sample=False` in the call (or in the config given to it) means greedy decoding, whatever temperature,
        top_k or top_p the call also gives, as in transformers."""
        if input_ids is not None:
            raise ValueError("input_ids: an NBP video is generated from class_labels, condition_ids (text ids) or "
                             "context_ids (video ids of its first latent frames, (batch, frames, H', W')); pass "
                             "those to generate() instead")
        if generation_config is not None and not isinstance(generation_config, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers GenerationConfig (or None), got "
                            f"{type(generation_config).__name__}: pass sampling values as keyword arguments instead")
        # other GenerationConfig fields as keyword arguments (do_sample=False, say) update the config, as in
        # transformers
        own = inspect.signature(self.generate_video_tokens).parameters
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k not in own and k in _generation_config_defaults()}
        if fields.get("do_sample", getattr(generation_config, "do_sample", None)) is False:
            # this call asks for greedy decoding: as in transformers, its sampling values are ignored
            ignored = [f"{n}={kwargs[n]!r}" for n in ("temperature", "top_k", "top_p")
                       if kwargs.get(n) not in (None, 0)]
            if ignored:
                warnings.warn(f"do_sample=False: greedy decoding ignores {', '.join(ignored)}", stacklevel=2)
            kwargs["temperature"] = 0.0
        source = ("the model's generation_config" if generation_config is None
                  else "the generation_config given to generate() (or the model's, for the fields it leaves unset)")
        if generation_config is not None or fields:
            merged = copy.deepcopy(self.generation_config if generation_config is None else generation_config)
            if generation_config is not None:  # its unset fields come from the model's own, as in transformers
                merged.update(**self.generation_config.to_dict(), defaults_only=True)
            merged.update(**fields)
            generation_config = merged
        if generation_config is not None:
            if kwargs.get("cache_implementation") is None and generation_config.cache_implementation is not None:
                kwargs["cache_implementation"] = generation_config.cache_implementation
            names = ("temperature", "top_k", "top_p", "guidance_scale")
            kwargs.update(zip(names, resolve_sampling(generation_config, *(kwargs.pop(n, None) for n in names),
                                                      source=source)))
        return self.generate_video_tokens(**kwargs)


# ---- the fast decode path: a preallocated block KV cache, a lean decode step, and CUDA graphs of the steps.
#
# A decode step feeds one block (or one token of the hybrid start) that may see every earlier position and all of
# its own block, so attention needs no mask: it runs over exactly the filled part of the cache. Every step of a
# sequence therefore has its own fixed shapes, and on CUDA each one is captured once as a CUDA graph and replayed
# in later steps and calls. The prefill (the condition prefix and context) is one more step of its own shape, with
# the layout's block-causal mask.


class BlockKVCache:
    """Keys and values of every layer, preallocated for the whole sequence: `kv[i]` is (2, B, heads, max_len,
    head_dim), keys then values, so a step writes both with one copy. Also the fused q/k/v projection weights of
    the decode step (refreshed from the model at every `reset`, so they follow training updates)."""

    def __init__(self, model, batch_size: int):
        cfg, layers = model.config, model.model.layers
        heads, dim = cfg.num_attention_heads, cfg.hidden_size
        shape = (2, batch_size, heads, model.layout.sequence_length, dim // heads)
        kw = dict(dtype=model.dtype, device=model.device)
        with torch.inference_mode(False):  # kept between calls, which may run in or out of inference mode
            self.kv = [torch.zeros(shape, **kw) for _ in layers]
            self.qkv_weight = [torch.empty(3 * dim, dim, **kw) for _ in layers]
            self.qkv_bias = [torch.empty(3 * dim, **kw) for _ in layers]
            # the Triton attention's split counters (`decode_kernels.attention`), zero between launches
            self.split_counters = torch.zeros(batch_size * heads, dtype=torch.int32, device=model.device)

    @torch.no_grad()
    def reset(self, model):
        """Take the model's current q/k/v weights (a new sequence overwrites the keys and values)."""
        for layer, w, b in zip(model.model.layers, self.qkv_weight, self.qkv_bias):
            a = layer.self_attn
            torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], out=w)
            torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], out=b)


def sampling_filters(temperature, top_k, top_p, guidance_scale) -> tuple:
    """What of the sampling fixes a static decoder's steps: greedy or not, top-k, and whether a temperature, a
    nucleus (top-p) filter and guidance apply."""
    return temperature == 0, top_k, temperature not in (0.0, 1.0), top_p < 1.0, guidance_scale != 1.0


def cuda_graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def capture_cuda_graph(fn, pool):
    """Record `fn()` (device work only) into a CUDA graph drawing on memory `pool`, without running it:
    -> (graph, fn's output)."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread's generation (a server's) may allocate memory while this one captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


class StaticDecoder:
    """Decode steps over a `BlockKVCache` for one batch size and sampling configuration, kept on the model
    between calls (`NBPGenerationMixin.static_decoder`).

    With `use_cuda_graphs`, every step (the prefill too) is captured once as a CUDA graph and replayed in later
    calls; the first step of each feed length runs eagerly first, as the warm-up. Before a replay the
    step's ids are copied and its sampling noise drawn into the graph's static inputs, so a graph holds no host
    work, no allocation and no random draw: its tokens equal the eager step's. All graphs share one memory pool
    (they run one after another, and each output is copied out before the next replay). The temperature, top-p
    and guidance scale are read from a device tensor that `set_sampling` writes: the same graphs serve any values
    (`key` holds the `sampling_filters`)."""

    def __init__(self, key, model, batch_size: int, compiled: str | None, filters: tuple, use_cuda_graphs: bool):
        self.key, self.use_cuda_graphs = key, use_cuda_graphs
        self.cache = BlockKVCache(model, batch_size)
        greedy, top_k, scaled, nucleus, guided = filters
        with torch.inference_mode(False):
            self.nonfinite = torch.zeros((), dtype=torch.bool, device=model.device)  # see `sample_guided`
            self.sampling = torch.ones(3, dtype=torch.float32, device=model.device)  # temperature, top_p, guidance
            # classifier-free guidance doubles the batch: the second half is the unconditional one
            self.drop = torch.arange(batch_size, device=model.device) >= batch_size // 2 if guided else None
            temperature, top_p, guidance_scale = self.sampling.unbind()  # device scalars where the filter applies
        self.step_options = dict(compiled=compiled, top_k=top_k, top_p=top_p if nucleus else 1.0,
                                 temperature=temperature if scaled else float(not greedy),
                                 guidance_scale=guidance_scale if guided else 1.0)
        self.in_use = False
        self.graphs, self.inputs, self.warm, self.masks = {}, {}, set(), {}
        self.pool = torch.cuda.graph_pool_handle() if use_cuda_graphs else None

    def set_sampling(self, temperature, top_k, top_p, guidance_scale):
        """This call's sampling values (its `sampling_filters` are the decoder's): fills, not a copy from the host,
        which would wait for the device. A value beyond float32's range is stored as infinity, as the dynamic
        path's float32 arithmetic reads it (a huge temperature samples uniformly, a huge guidance scale overflows
        the logits: reported after the run); filling it in as it is raises."""
        for slot, value in zip(self.sampling, (temperature, top_p, guidance_scale)):
            slot.fill_(value if value <= torch.finfo(torch.float32).max else math.inf)

    def _prefill_options(self, model, start: int, end: int) -> dict:
        """The mask and condition dropout of a step feeding [start, end): none for a decode step."""
        options = {}
        if (start, end) not in self.masks:  # kept: a graph reads the tensor it was captured with
            with torch.inference_mode(False):
                self.masks[start, end] = (model.layout.allowed(start, end).to(model.device)
                                          if model.layout.needs_mask(start, end) else None)
        if self.masks[start, end] is not None:
            options["mask"] = self.masks[start, end]
        if self.drop is not None and start < model.layout.prefix_length:
            options["drop"] = self.drop
        return options

    def __call__(self, model, ids, start: int, keep: slice, draw_noise):
        """Tokens (B, len(keep)) sampled from the step that feeds `ids` at positions [start, start + n);
        `draw_noise(out=None)` draws the step's sampling noise (None for greedy decoding)."""
        step = partial(model.static_step, cache=self.cache, nonfinite=self.nonfinite, **self.step_options,
                       **self._prefill_options(model, start, start + ids.shape[1]))
        shape = (ids.shape[1], keep.start, keep.stop)
        if not self.use_cuda_graphs or ((start, shape) not in self.graphs and shape not in self.warm):
            if self.use_cuda_graphs:
                self.warm.add(shape)
            return step(ids, start, keep, draw_noise() if draw_noise else None)
        fresh = shape not in self.inputs
        if fresh:  # static inputs, shared by the graphs of every step of this shape; they hold this step's
            with torch.inference_mode(False):
                self.inputs[shape] = (ids.clone(), draw_noise() if draw_noise else None)
        g_ids, g_noise = self.inputs[shape]
        if (start, shape) not in self.graphs:
            if self.step_options.get("compiled"):
                # run once first: a compiled part that must recompile (another grad, inference or autocast mode
                # than the warm-up's) does so here, not inside the capture; it writes the same keys and values
                step(g_ids, start, keep, g_noise)
            self.graphs[start, shape] = capture_cuda_graph(lambda: step(g_ids, start, keep, g_noise), self.pool)
        if not fresh:
            g_ids.copy_(ids)
            if draw_noise:
                draw_noise(out=g_noise)  # straight into the graph's input: no copy
        graph, out = self.graphs[start, shape]
        graph.replay()
        return out
