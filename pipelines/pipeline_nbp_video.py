"""NBPVideoPipeline: class-conditional generation and frame prediction with a Next-Block Prediction model.

This file only needs torch, numpy, PIL and diffusers: saved pipelines carry a copy of it (with the components'
code) so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` works without nbp-video (a local
folder: diffusers' download of a Hub repo fetches only the first module of each component's code, so a repo is loaded
from `huggingface_hub.snapshot_download(repo_id)`).

Pixel convention: videos go in and come out in [0, 1] (PIL/uint8 inputs are scaled once, in `preprocess_video`);
that is also the video tokenizer's range.
"""

import importlib
import inspect
import json
import numbers
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def is_positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclass
class NBPVideoPipelineOutput(BaseOutput):
    """`frames`: "pil" a list (per video) of lists of PIL images; "np" (B, T, H, W, 3) float32 in [0, 1];
    "pt" (B, T, 3, H, W) float in [0, 1]; "latent" the token grids (B, T', H', W')."""

    frames: list | np.ndarray | torch.Tensor


@dataclass
class NBPVideoStreamChunk(BaseOutput):
    """Pixel frames [start_frame, start_frame + n) of every video, available once their latent frame is complete.
    `frames` has the pipeline's `output_type` layout; `done` is True for the last chunk (a stream interrupted
    through `pipe._interrupt` ends without one)."""

    frames: list | np.ndarray | torch.Tensor
    start_frame: int
    step: int
    done: bool


def preprocess_video(video) -> torch.Tensor:
    """The one place where user videos become the tokenizer's (B, 3, T, H, W) float in [0, 1].

    Accepts: a torch tensor (T, 3, H, W) or (B, T, 3, H, W), float in [0, 1] or uint8; a numpy array (T, H, W, 3) or
    (B, T, H, W, 3), float in [0, 1] or uint8; a list of PIL images (one video); a list of videos of one size (each
    in any of these forms, as diffusers' VideoProcessor takes them)."""
    if isinstance(video, list) and not video:
        raise ValueError("video is an empty list: give at least one frame")
    if isinstance(video, list) and not isinstance(video[0], PIL.Image.Image):  # a list of videos
        videos = [preprocess_video(v) for v in video]
        sizes = sorted({tuple(v.shape[2:]) for v in videos})
        if len(sizes) > 1:
            raise ValueError(f"the videos of a list must have the same number of frames and size; got (frames, "
                             f"height, width) {sizes}")
        return torch.cat(videos)
    if isinstance(video, list):
        if not all(isinstance(f, PIL.Image.Image) for f in video):
            raise TypeError("a list of PIL images must hold only PIL images (one video), or be a list of videos")
        if len({f.size for f in video}) > 1:
            raise ValueError(f"the frames of a video must have one size; got (width, height) "
                             f"{sorted({f.size for f in video})}")
        video = np.stack([np.asarray(f.convert("RGB")) for f in video])
    if not isinstance(video, (np.ndarray, torch.Tensor)):
        raise TypeError("video must be a torch tensor, a numpy array, a list of PIL images or a list of videos; got "
                        f"{type(video).__name__}")
    if isinstance(video, np.ndarray):
        if video.ndim not in (4, 5) or video.shape[-1] != 3:
            raise ValueError(f"a numpy video must be (T, H, W, 3) or (B, T, H, W, 3); got {video.shape}")
    elif video.ndim not in (4, 5) or video.shape[-3] != 3:
        raise ValueError(f"a video tensor must be (T, 3, H, W) or (B, T, 3, H, W); got {tuple(video.shape)}")
    if 0 in video.shape:
        raise ValueError(f"video holds no frames or pixels: got shape {tuple(video.shape)}")
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video)).permute(*range(video.ndim - 3), -1, -3, -2)
    if video.ndim == 4:
        video = video[None]
    if video.dtype == torch.uint8:
        video = video.float() / 255
    elif not video.is_floating_point():
        raise TypeError(f"video must be float in [0, 1] or uint8; got {video.dtype}")
    elif video.min() < -1e-3 or video.max() > 1 + 1e-3:
        raise ValueError(f"video values must lie in [0, 1]; got [{float(video.min()):.3f}, {float(video.max()):.3f}]"
                         " (scale [-1, 1] videos with (v + 1) / 2)")
    return video.permute(0, 2, 1, 3, 4).float()  # (B, 3, T, H, W)


def postprocess_video(video: torch.Tensor, output_type: str):
    """(B, 3, T, H, W) in [0, 1] -> the requested output type."""
    if not torch.isfinite(video).all():
        bad = int((~torch.isfinite(video)).sum())
        raise FloatingPointError(f"the video tokenizer decoded {bad} NaN or infinite values (weights in {video.dtype}); "
                                 "float16 overflows easily in its decoder: run it in bfloat16 or float32")
    video = video.float().clamp(0, 1).permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W)
    if output_type == "pt":
        return video
    array = video.permute(0, 1, 3, 4, 2).cpu().numpy()
    if output_type == "np":
        return array
    return [[PIL.Image.fromarray(f) for f in (v * 255).round().astype(np.uint8)] for v in array]


# the first line of a generated model card: a README.md without it is the user's and is kept
CARD_MARK = "<!-- written by nbp-video's save_pretrained at every save; delete this line to keep your edits -->"


def write_model_card(path: str, card: str) -> None:
    """Write `card` to `path` unless a README.md there is not a generated card (temp name, then rename)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if CARD_MARK not in f.read():
                return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(card)
    os.replace(path + ".tmp", path)


def create_hub_repo(repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Create the Hub repo if needed; -> its full id ("owner/name")."""
    from huggingface_hub import HfApi

    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def upload_to_hub(folder: str, repo_id: str, token: str | None = None, commit_message: str | None = None,
                  create_pr: bool = False):
    """Upload `folder` to the Hub repo `repo_id`; a README.md already there that is not a generated card is kept."""
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(token=token)
    keep_card = False
    if api.file_exists(repo_id, "README.md"):
        with open(hf_hub_download(repo_id, "README.md", token=token), encoding="utf-8") as f:
            keep_card = CARD_MARK not in f.read()
    return api.upload_folder(repo_id=repo_id, folder_path=folder, create_pr=create_pr,
                             commit_message=commit_message or "Upload NBPVideoPipeline",
                             ignore_patterns=["README.md"] if keep_card else None)


# each component's weight files: (safetensors, pickled) names before the variant and the extension
WEIGHT_NAMES = {"transformer": ("model", "pytorch_model"),
                "video_tokenizer": ("diffusion_pytorch_model", "diffusion_pytorch_model")}


def why_not_downloaded(error: Exception, revision: str | None = None) -> str:
    """What a failed Hub download means, in words (the client's first line of a 404 says only "404 Client Error")."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, RevisionNotFoundError):
        return f"the repo has no revision {revision or 'main'!r} (a branch, tag or commit id)"
    if isinstance(error, RepositoryNotFoundError):  # also a gated repo
        return ("no such repo, or a private or gated one that the token (token=, HF_TOKEN or `hf auth login`) does "
                "not open")
    text = str(error).splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def pipeline_files(components, variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The patterns of the files of a pipeline repo that loading `components` reads: model_index.json, each one's
    JSON files (configs, weight indices) and its weights of `variant` (pickled ones too unless `use_safetensors`);
    not the other variants' weights, the carried code or the model card."""
    tag = f".{variant}" if variant else ""
    patterns = ["model_index.json"]
    for name in components:
        safe, pickled = WEIGHT_NAMES[name]
        patterns += [f"{name}/*.json", f"{name}/{safe}{tag}.safetensors", f"{name}/{safe}{tag}-*.safetensors"]
        if not use_safetensors:
            patterns += [f"{name}/{pickled}{tag}.bin", f"{name}/{pickled}{tag}-*.bin"]
    return patterns


def hub_snapshot(source: str | os.PathLike, what: str, allow_patterns: list[str], **hub_kwargs) -> str | None:
    """None for a local folder `source` (a `revision` in `hub_kwargs` is refused there); else the snapshot of the Hub
    repo id `source` (its folder in the cache, named by its commit) holding the files of `allow_patterns`.
    `hub_kwargs` go to `snapshot_download` (revision, token, cache_dir, local_files_only, force_download,
    ignore_patterns); `what` names `source` in errors."""
    folder = os.fspath(source)
    if os.path.isdir(folder):
        if hub_kwargs.get("revision") is not None:
            raise ValueError(f"a revision selects a version of a Hub repo; {what} {folder!r} is a local folder")
        return None
    where = f"no folder at {os.path.abspath(os.path.expanduser(folder))}"
    if folder.startswith((".", "/", "~")) or folder.count("/") > 1 or os.path.exists(folder):
        raise FileNotFoundError(f"{what} {folder!r}: {where} (a Hub repo id has the form 'owner/name')")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(folder, allow_patterns=allow_patterns, **hub_kwargs)
    except Exception as err:  # not on the Hub, offline, or not a valid repo id
        raise OSError(f"{what} {folder!r} is neither a local folder ({where}) nor a Hub repo that could be "
                      f"downloaded: {why_not_downloaded(err, hub_kwargs.get('revision'))}") from err


def pipeline_folder(source: str | os.PathLike, components=("transformer", "video_tokenizer"),
                    variant: str | None = None, use_safetensors: bool | None = None, **hub_kwargs) -> str:
    """The local folder of the pipeline `source` names: itself, or the `hub_snapshot` of a Hub repo id holding
    `pipeline_files` of `components`."""
    folder = os.fspath(source)
    snapshot = hub_snapshot(folder, "pipeline", pipeline_files(components, variant, use_safetensors), **hub_kwargs)
    if snapshot is None:
        return folder
    missing = [f"{name}/config.json" for name in components
               if not os.path.isfile(os.path.join(snapshot, name, "config.json"))]
    if missing:  # a model repo, or a pipeline pushed without a component
        raise FileNotFoundError(f"the Hub repo {folder!r} is not an NBPVideoPipeline repo (no {', '.join(missing)}): "
                                "a generator or a tokenizer alone loads with NBPForVideoGeneration.from_pretrained or "
                                "NBPVideoTokenizer.from_pretrained")
    return snapshot


class NBPVideoPipeline(DiffusionPipeline):
    r"""Video generation with a Next-Block Prediction generator and a causal video tokenizer.

    Components: `transformer` (`NBPForVideoGeneration`) and `video_tokenizer` (`NBPVideoTokenizer`).

    ```py
    >>> pipe = NBPVideoPipeline.from_pretrained("path/or/repo")
    >>> video = pipe(class_labels=["ApplyEyeMakeup"], generator=torch.Generator().manual_seed(0)).frames[0]
    >>> for chunk in pipe.stream(class_labels=[3]):  # frames as soon as their latent frame is complete
    ...     show(chunk.frames)
    ```

    Calls from several threads at once (a web server's workers), like streams consumed in turn, give each caller its
    own videos: the generator's kept decode cache serves one generation at a time, the others get their own. What a
    call sets on the pipeline object is shared, though: `pipe._interrupt = True` stops every call under way on it,
    and `num_timesteps` is the last started call's. For requests that may be interrupted, give each its own pipeline
    object over the same components, `NBPVideoPipeline.from_pipe(pipe)` (no copy of the weights).
    """

    model_cpu_offload_seq = "transformer->video_tokenizer"
    _callback_tensor_inputs = ["video_tokens"]

    def __init__(self, transformer, video_tokenizer):
        super().__init__()
        if not (hasattr(getattr(transformer, "config", None), "video_vocab_size")
                and hasattr(video_tokenizer, "codebook_size")):
            raise TypeError(f"transformer must be an NBPForVideoGeneration and video_tokenizer an NBPVideoTokenizer; "
                            f"got {type(transformer).__name__} and {type(video_tokenizer).__name__}")
        self.register_modules(transformer=transformer, video_tokenizer=video_tokenizer)

    # ---- properties ---------------------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        """Pixel frames of a generated video (the tokenizer's frames for the generator's latent frames)."""
        return self.video_tokenizer.num_frames_for_latent(self.transformer.config.latent_shape[0])

    @property
    def resolution(self) -> tuple[int, int]:
        _, h, w = self.transformer.config.latent_shape
        s = self.video_tokenizer.spatial_compression
        return h * s, w * s

    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def num_timesteps(self) -> int | None:
        """Steps of the window being generated (diffusers' name, which callbacks read: `step == pipe.num_timesteps //
        2`); None before the first call."""
        return getattr(self, "_num_timesteps", None)

    @property
    def class_names(self) -> list[str]:
        """The class names of a class-conditional model (`config.id2label`), or [] when it names no classes
        (transformers fills id2label with two placeholder labels when none are given)."""
        cfg = self.transformer.config
        id2label = getattr(cfg, "id2label", None) or {}
        if cfg.condition_mode != "class" or len(id2label) != cfg.num_classes:
            return []
        return [id2label[i] for i in sorted(id2label)]

    # ---- inputs -------------------------------------------------------------------------------------------------
    def _class_ids(self, class_labels) -> list[int]:
        """Class ids or names (one, a list, an integer tensor or array) -> a non-empty list of ids."""
        cfg = self.transformer.config
        if cfg.condition_mode != "class":
            raise ValueError(f"this model is not class-conditional (condition_mode={cfg.condition_mode!r}); "
                             "do not pass class_labels")
        allowed = f"ints in [0, {cfg.num_classes}) or class names"
        if isinstance(class_labels, (torch.Tensor, np.ndarray, np.generic)):  # numpy scalars and 0-d tensors too
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, str) or not isinstance(class_labels, Iterable):
            class_labels = [class_labels]
        id2label = cfg.id2label if self.class_names else {}
        lookup = {str(name).lower(): int(i) for i, name in id2label.items()}
        ids = []
        for label in class_labels:
            if isinstance(label, (torch.Tensor, np.ndarray)) and label.ndim == 0:
                label = label.item()
            if isinstance(label, str) and label.lower() not in lookup and label.isdigit():
                label = int(label)  # "3" from a command line, when no class is named "3"
            if isinstance(label, str):
                if label.lower() not in lookup:
                    raise ValueError(f"unknown class name {label!r}; valid names: {self.class_names}")
                ids.append(lookup[label.lower()])
            elif isinstance(label, numbers.Integral) and not isinstance(label, bool):
                ids.append(int(label))
            else:
                raise ValueError(f"class_labels must be {allowed}; got {label!r} ({type(label).__name__})")
        if not ids:
            raise ValueError(f"class_labels is empty: give at least one label ({allowed})")
        bad = [i for i in ids if not 0 <= i < cfg.num_classes]
        if bad:
            raise ValueError(f"class_labels must be {allowed}; got {bad}")
        return ids

    def check_inputs(self, num_frames, output_type, callback_on_step_end_tensor_inputs, num_videos_per_prompt,
                     context_frames=None, batch_size=None, decode_batch_size=None, callback_on_step_end=None) -> int:
        """Checks the arguments; -> the number of frames to return."""
        vocab, codes = self.transformer.config.video_vocab_size, self.video_tokenizer.codebook_size
        if vocab != codes:  # else the frames decode from other codes, or decoding fails after the whole generation
            raise ValueError(f"the transformer's video_vocab_size ({vocab}) must equal the video_tokenizer's "
                             f"codebook_size ({codes}): the generator was made for another tokenizer")
        T = self.num_frames
        if num_frames is not None and not is_positive_int(num_frames):
            raise ValueError(f"num_frames must be a positive int (this model generates {T} frames per window), "
                             f"got {num_frames!r}")
        total = T if num_frames is None else int(num_frames)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if output_type == "latent" and total != T:
            raise ValueError(f"output_type='latent' returns the token grid of one window: num_frames must be {T} "
                             f"(got {num_frames}); longer videos re-encode their context frames at every window")
        if callback_on_step_end_tensor_inputs is not None and not all(
                k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a subset of {self._callback_tensor_inputs}")
        if not is_positive_int(num_videos_per_prompt):
            raise ValueError(f"num_videos_per_prompt must be a positive int, got {num_videos_per_prompt!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be a function (pipe, step, timestep, callback_kwargs) -> "
                            f"dict, a PipelineCallback or None; got {callback_on_step_end!r}")
        if decode_batch_size is not None and not is_positive_int(decode_batch_size):  # before any step, not after all
            raise ValueError(f"decode_batch_size must be a positive int or None, got {decode_batch_size!r}")
        if batch_size is not None and not is_positive_int(batch_size):
            raise ValueError(f"batch_size must be a positive int (videos of an unconditional model) or None, "
                             f"got {batch_size!r}")
        if total > T or context_frames is not None:
            self._window_context(context_frames)
        return total

    def _window_context(self, context_frames: int | None) -> int:
        """Pixel frames that each window after the first continues from (videos longer than one window): whole
        blocks of latent frames, fewer than a window's; by default the model's `num_context_frames` latent frames,
        at least 2 (one latent frame is a single pixel frame, which shows no motion)."""
        tok, cfg = self.video_tokenizer, self.transformer.config
        latent_frames, b = cfg.latent_shape[0], cfg.block_shape[0]
        allowed = self._context_lengths()
        if not allowed:
            raise ValueError(f"this model generates its {self.num_frames} frames ({latent_frames} latent) in one "
                             f"block of {b} latent frames and cannot continue videos: num_frames must not exceed "
                             f"{self.num_frames}")
        if context_frames is None:
            wanted = tok.num_frames_for_latent(max(cfg.num_context_frames, 2))
            return next((n for n in allowed if n >= wanted), allowed[-1])
        if not is_positive_int(context_frames) or context_frames not in allowed:
            raise ValueError(f"context_frames must be one of {allowed} (whole blocks of latent frames, fewer than "
                             f"the {self.num_frames} frames of a window); got {context_frames!r}")
        return int(context_frames)

    def _context_lengths(self) -> list[int]:
        """Pixel frames a context may have: whole blocks of latent frames, fewer than a window's."""
        cfg = self.transformer.config
        b = cfg.block_shape[0]
        return [self.video_tokenizer.num_frames_for_latent(k) for k in range(b, cfg.latent_shape[0], b)]

    def encode_context(self, video, num_videos_per_prompt: int = 1) -> torch.Tensor:
        """Context video -> token grids (B, c, H', W') of its latent frames, checked against the model."""
        if not is_positive_int(num_videos_per_prompt):
            raise ValueError(f"num_videos_per_prompt must be a positive int, got {num_videos_per_prompt!r}")
        pixels = preprocess_video(video)
        tok, cfg = self.video_tokenizer, self.transformer.config
        B, _, T, H, W = pixels.shape
        if (H, W) != self.resolution:
            raise ValueError(f"context video must be {self.resolution[0]}x{self.resolution[1]} (height x width) "
                             f"for this model; got {H}x{W}")
        allowed = self._context_lengths()
        if T not in allowed:
            raise ValueError(f"context video must have one of {allowed} frames (whole blocks of {cfg.block_shape[0]} "
                             f"latent frames, fewer than the {self.num_frames} generated); got {T}")
        pixels = pixels.to(device=self._execution_device, dtype=tok.dtype)
        ids = tok.encode(pixels)
        return ids.repeat_interleave(num_videos_per_prompt, dim=0)

    # ---- generation ---------------------------------------------------------------------------------------------
    def _per_video(self, class_labels, condition_ids, num_videos_per_prompt: int) -> tuple:
        """Class ids and condition prefixes repeated for every video: (labels, condition_ids), None when not given."""
        labels = None
        if class_labels is not None:
            labels = torch.tensor(self._class_ids(class_labels)).repeat_interleave(num_videos_per_prompt)
        if condition_ids is not None:
            try:
                condition_ids = torch.as_tensor(condition_ids)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"condition_ids must be (batch, condition tokens) ints; got "
                                f"{type(condition_ids).__name__} {condition_ids!r:.80} ({err})") from None
            if condition_ids.ndim != 2:
                raise ValueError(f"condition_ids must have shape (batch, condition tokens); got "
                                 f"{tuple(condition_ids.shape)}")
            condition_ids = condition_ids.repeat_interleave(num_videos_per_prompt, dim=0)
        return labels, condition_ids

    def _steps(self, class_labels, video, batch_size, num_videos_per_prompt, guidance_scale, top_k, top_p,
               temperature, generator, condition_ids, use_cache, cache_implementation=None, compile_decode=False,
               callback_on_step_end=None, callback_on_step_end_tensor_inputs=None) -> Iterator:
        """Run the generator, handling callbacks, interrupt and the progress bar; yields every step."""
        cfg = self.transformer.config
        labels, condition_ids = self._per_video(class_labels, condition_ids, num_videos_per_prompt)
        context = None if video is None else self.encode_context(video, num_videos_per_prompt)
        if labels is None and context is None and condition_ids is None:
            if cfg.condition_mode == "class":
                raise ValueError("this model is class-conditional: pass class_labels (ints or names from "
                                 f"{self.class_names[:10]}{'...' if len(self.class_names) > 10 else ''})")
            if cfg.condition_mode == "frames":
                raise ValueError("this model predicts frames: pass video= with the context frames")
            batch_size = (batch_size or 1) * num_videos_per_prompt
        else:  # each input gives the number of videos; they must agree (the generator would name its own arguments)
            given = {name: len(x) // num_videos_per_prompt for name, x in (("class_labels", labels), ("video", context),
                     ("condition_ids", condition_ids)) if x is not None}
            if batch_size is not None:
                given["batch_size"] = batch_size
            if len(set(given.values())) > 1:
                raise ValueError(f"{', '.join(given)} give different numbers of videos: "
                                 f"{', '.join(f'{k}: {v}' for k, v in given.items())}")
            batch_size = None
        self._interrupt = False
        self._onload(self.transformer)  # after the context's encoding, which onloads the tokenizer
        steps = self.transformer.iter_generation(
            class_labels=labels, context_ids=context, batch_size=batch_size, temperature=temperature, top_k=top_k,
            top_p=top_p, guidance_scale=guidance_scale, generator=generator, use_cache=use_cache,
            condition_ids=condition_ids, cache_implementation=cache_implementation, compile_decode=compile_decode)
        first = next(steps, None)
        if first is None:
            return
        self._num_timesteps = first.num_steps
        try:
            with self.progress_bar(total=first.num_steps) as progress_bar:
                step = first
                while step is not None:
                    if callback_on_step_end is not None:
                        kwargs = {k: step.video_tokens for k in callback_on_step_end_tensor_inputs or ()}
                        outputs = callback_on_step_end(self, step.step, step.step, kwargs) or {}
                        if "video_tokens" in outputs:  # checked also when edited in place (the live tensor back)
                            tokens = self._checked_callback_tokens(outputs["video_tokens"], step)
                            if tokens is not step.video_tokens:
                                step.video_tokens.copy_(tokens)
                    progress_bar.update()
                    yield step
                    if self.interrupt:
                        steps.close()
                        if self._complete_frames(step.video_tokens, step.end).shape[1] == 0:
                            raise RuntimeError("generation was interrupted before any latent frame was complete")
                        return
                    step = next(steps, None)
        finally:  # also when the consumer stops early (stream's last frame): closing checks the logits were finite
            steps.close()

    def _checked_callback_tokens(self, tokens, step) -> torch.Tensor:
        """Video ids a callback returned, checked: the live tensor's shape, generated positions in the vocabulary."""
        live, V = step.video_tokens, self.transformer.config.video_vocab_size
        tokens = torch.as_tensor(tokens, device=live.device)
        if tokens.shape != live.shape or tokens.is_floating_point():
            raise ValueError(f"callback_on_step_end returned video_tokens of shape {tuple(tokens.shape)} and dtype "
                             f"{tokens.dtype}; expected integer ids of shape {tuple(live.shape)}")
        made = tokens[:, : step.end]
        if made.numel() and (made.min() < 0 or made.max() >= V):
            raise ValueError(f"callback_on_step_end returned video_tokens outside [0, {V}) among the {step.end} "
                             "positions generated so far")
        return tokens

    @staticmethod
    def _onload(module):
        """With model offloading (accelerate hooks), move `module` to its execution device now, as a forward call
        would: generation and decoding allocate their tensors on `module.device` before calling any forward."""
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(module)

    def maybe_free_model_hooks(self):
        # with model offloading the generator's weights move every call, so its kept decode cache (sized for the
        # whole sequence, on the GPU) could not be reused: free it with the rest
        if getattr(self, "_all_hooks", None):
            self.transformer.clear_decode_cache()
        super().maybe_free_model_hooks()

    def _window_pixels(self, steps: Iterator, decode_batch_size, overlap: bool) -> torch.Tensor:
        """Run one window's steps; -> its pixels (B, 3, T, H, W) in [0, 1], as decoded (NaN not checked yet)."""
        if overlap:
            return torch.cat([pixels for _, _, pixels in self._decode_as_completed(steps, decode_batch_size, overlap)],
                             dim=2)
        last = None
        for last in steps:
            pass
        tok = self.video_tokenizer
        grid = self._complete_frames(last.video_tokens, last.end)
        self._onload(tok)
        return tok.decode(grid.to(tok.device), decode_batch_size=decode_batch_size)

    def _later_windows(self, class_labels, condition_ids, num_videos_per_prompt: int, context_frames: int):
        """-> `fn(pixels) -> _steps arguments` of a window that continues `pixels` (B, 3, T, H, W): the last
        `context_frames` frames as its context, the labels / condition of every video (already expanded)."""
        labels, condition_ids = self._per_video(class_labels, condition_ids, num_videos_per_prompt)

        def inputs(pixels):
            context = pixels[:, :, -context_frames:].float().clamp(0, 1).transpose(1, 2)  # (B, T, 3, H, W)
            return dict(class_labels=labels, video=context, batch_size=None, num_videos_per_prompt=1,
                        condition_ids=condition_ids)

        return inputs

    def _decode_as_completed(self, steps: Iterator, decode_batch_size, overlap: bool = False) -> Iterator:
        """Yield (step, first pixel frame, pixels) for every step that completes latent frames: the frames they
        add, decoded once each (`NBPVideoTokenizer.incremental_decoder`). With `overlap` on CUDA the decoding
        runs on a second stream beside the rest of the generation; its pixels are ready for the current stream
        once the iteration has ended."""
        tok = self.video_tokenizer
        if any(hasattr(m, "_hf_hook") for m in (self.transformer, tok)):
            raise ValueError("stream() and overlap_decode alternate the generator and the tokenizer at every latent "
                             "frame; with model CPU offloading each switch would move the weights: use pipe(...) "
                             "without overlap_decode, or keep the pipeline on the GPU (pipe.to('cuda'))")
        decoder = tok.incremental_decoder(decode_batch_size)
        side = torch.cuda.Stream(tok.device) if overlap and tok.device.type == "cuda" else None
        main = torch.cuda.current_stream(tok.device) if side is not None else None
        done = emitted = 0
        for step in steps:
            grid = self._complete_frames(step.video_tokens, step.end)
            if grid.shape[1] == done:
                continue
            chunk = grid[:, done:].to(tok.device, copy=True)  # not a view of the live token buffer
            done = grid.shape[1]
            if side is None:
                pixels = decoder(chunk, validate=False)
            else:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    pixels = decoder(chunk, validate=False)
                chunk.record_stream(side)  # made on the main stream, read on the side one, and vice versa
                pixels.record_stream(main)
            yield step, emitted, pixels
            emitted += pixels.shape[2]
        if side is not None:
            main.wait_stream(side)

    def _complete_frames(self, video_tokens: torch.Tensor, end: int) -> torch.Tensor:
        """Token grids of the latent frames that the first `end` tokens (block order) complete, in whole blocks
        of frames (blocks that span several frames are laid out together)."""
        layout = self.transformer.layout
        n = int((layout.frame_end <= end).sum())
        n -= n % layout.block_shape[0]
        _, H, W = layout.latent_shape
        return layout.sequence_to_grid(video_tokens[:, : n * H * W])

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list | torch.Tensor | None = None,
        video=None,
        num_frames: int | None = None,
        num_videos_per_prompt: int = 1,
        batch_size: int | None = None,
        guidance_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("video_tokens",),
        decode_batch_size: int | None = None,
        condition_ids: torch.Tensor | None = None,
        use_cache: bool = True,
        cache_implementation: str | None = None,
        compile_decode: bool | str = False,
        overlap_decode: bool = False,
        context_frames: int | None = None,
    ):
        r"""Generate videos.

        Args:
            class_labels: class ids or names (`transformer.config.id2label`) for class-conditional models.
            video: context frames for frame prediction (e.g. 5 frames -> 2 latent frames, the K600 setting); any
                form `preprocess_video` accepts, values in [0, 1] (or uint8). The output starts with the
                tokenizer's reconstruction of these frames.
            num_frames: frames per video (default: the model's window, `pipe.num_frames`). More frames are made
                window by window, each continuing the last `context_frames` frames of the video so far (re-encoded,
                as in frame prediction); the last window is cut to length.
            context_frames: pixel frames a further window continues from (1 + t k, fewer than a window; default:
                the model's `num_context_frames` latent frames, at least 2).
            num_videos_per_prompt: videos per class label / context video.
            batch_size: number of videos for unconditional models.
            guidance_scale: classifier-free guidance in one batched forward per step (1 = off).
            top_k, top_p, temperature: sampling (top-k 0 and top-p 1 = off, temperature 0 = greedy).
                Defaults for these four: `transformer.generation_config`, else the paper's sampling (top-k 16000,
                top-p 0.9, temperature 1, no guidance).
            generator: a `torch.Generator` or one per video (then a batch equals the single runs).
            output_type: "pil", "np", "pt" or "latent" (token ids).
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict` (or a diffusers
                `PipelineCallback` / `MultiPipelineCallbacks`: its `tensor_inputs` are then the ones passed), called
                after every step of the window's `pipe.num_timesteps`;
                `callback_kwargs["video_tokens"]` is the live (B, N) tensor of video ids in block order (-1 = not
                generated yet; in a video longer than one window, steps and tokens are those of the current
                window); a returned "video_tokens" replaces it (only the tokens of the step just made can
                still change what follows). Set `pipe._interrupt = True` from it to stop early: the output then
                holds the complete latent frames generated so far.
            decode_batch_size: decode this many videos at a time (less memory).
            condition_ids: a raw (B, P) condition prefix (e.g. free-text ids for the UCF model) instead of labels.
            use_cache: False recomputes the whole sequence each step (the reference path).
            cache_implementation: "static" (the default on CUDA and CPU: preallocated cache, lean steps, replayed from
                CUDA graphs on CUDA) or "dynamic" (the default elsewhere, and for a generator with adapters or hooks
                the static step would skip); see `NBPForVideoGeneration.iter_generation`.
            compile_decode: run the static path's decode step through `torch.compile` (the first call compiles); True
                or a mode of `modeling_nbp.generation.DECODE_COMPILE_MODES`; "triton": through this project's Triton
                kernels (small batches; CUDA); "triton-attention": its attention and sampling only (large batches;
                CUDA).
            overlap_decode: decode each latent frame as soon as it is complete (on CUDA on a second stream, beside
                the rest of the generation) instead of all frames at the end; same frames up to float rounding
                (in a video longer than one window, a rounding difference can change a token of a re-encoded
                context, and so the windows after it).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):  # as diffusers' pipelines
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        total = self.check_inputs(num_frames, output_type, callback_on_step_end_tensor_inputs, num_videos_per_prompt,
                                  context_frames, batch_size, decode_batch_size, callback_on_step_end)
        if class_labels is not None:  # resolved once: an iterator would be used up by the first window
            class_labels = self._class_ids(class_labels)
        sampling = dict(guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, temperature=temperature,
                        generator=generator, use_cache=use_cache, cache_implementation=cache_implementation,
                        compile_decode=compile_decode, callback_on_step_end=callback_on_step_end,
                        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        steps = self._steps(class_labels=class_labels, video=video, batch_size=batch_size,
                            num_videos_per_prompt=num_videos_per_prompt, condition_ids=condition_ids, **sampling)
        if output_type == "latent":
            last = None
            for last in steps:
                pass
            frames = self._complete_frames(last.video_tokens, last.end)
        else:
            pixels = self._window_pixels(steps, decode_batch_size, overlap_decode)
            if pixels.shape[2] < total:  # a longer video: windows that each continue the frames made so far
                c = self._window_context(context_frames)
                continuing = self._later_windows(class_labels, condition_ids, num_videos_per_prompt, c)
                while pixels.shape[2] < total and not self.interrupt:
                    more = self._window_pixels(self._steps(**continuing(pixels), **sampling), decode_batch_size,
                                               overlap_decode)
                    pixels = torch.cat([pixels, more[:, :, c:]], dim=2)
            frames = postprocess_video(pixels[:, :, :total], output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return NBPVideoPipelineOutput(frames=frames)

    @torch.no_grad()
    def stream(self, class_labels=None, video=None, *, num_videos_per_prompt: int = 1, batch_size: int | None = None,
               guidance_scale: float | None = None, top_k: int | None = None, top_p: float | None = None,
               temperature: float | None = None,
               generator=None, output_type: str = "np", decode_batch_size: int | None = None, condition_ids=None,
               use_cache: bool = True, cache_implementation: str | None = None,
               compile_decode: bool | str = False, num_frames: int | None = None,
               context_frames: int | None = None, callback_on_step_end: Callable | None = None,
               callback_on_step_end_tensor_inputs: list[str] = ("video_tokens",)) -> Iterator[NBPVideoStreamChunk]:
        """Like `__call__`, but yields `NBPVideoStreamChunk`s: the pixel frames of each latent frame as soon as
        its blocks are generated (the tokenizer is causal in time, so finished frames decode on their own, each
        once: `NBPVideoTokenizer.incremental_decoder`). Concatenating the chunks' frames gives the frames of
        `__call__(..., overlap_decode=True)` for the same seed, longer videos (`num_frames`, `context_frames`)
        and callbacks included; generation stops as soon as `num_frames` frames are out. Unlike `__call__`, its
        frames are numpy arrays by default (`output_type="np"`), and the arguments after `video` are keyword-only
        (their order differs from `__call__`'s)."""
        if output_type == "latent":
            raise ValueError("stream() hands out pixel frames: output_type must be 'pil', 'np' or 'pt'")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):  # as diffusers' pipelines
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        total = self.check_inputs(num_frames, output_type, callback_on_step_end_tensor_inputs, num_videos_per_prompt,
                                  context_frames, batch_size, decode_batch_size, callback_on_step_end)
        if class_labels is not None:  # resolved once: an iterator would be used up by the first window
            class_labels = self._class_ids(class_labels)
        sampling = dict(guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, temperature=temperature,
                        generator=generator, use_cache=use_cache, cache_implementation=cache_implementation,
                        compile_decode=compile_decode, callback_on_step_end=callback_on_step_end,
                        callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        inputs = dict(class_labels=class_labels, video=video, batch_size=batch_size,
                      num_videos_per_prompt=num_videos_per_prompt, condition_ids=condition_ids)
        # c: context frames each further window repeats; made: the video's frames so far; out: how many
        c, continuing, made, out = 0, None, [], 0
        self._interrupt = False
        while out < total and not self.interrupt:
            steps = self._steps(**inputs, **sampling)
            for step, start, pixels in self._decode_as_completed(steps, decode_batch_size):
                new = pixels[:, :, max(c - start, 0):][:, :, : total - out]  # not the repeated context, not past the end
                if new.shape[2]:
                    made.append(new)
                    yield NBPVideoStreamChunk(frames=postprocess_video(new, output_type), start_frame=out,
                                              step=step.step, done=out + new.shape[2] == total)
                    out += new.shape[2]
                if out == total:
                    steps.close()
                    break
            if out < total:
                if continuing is None:
                    c = self._window_context(context_frames)
                    continuing = self._later_windows(class_labels, condition_ids, num_videos_per_prompt, c)
                made = [torch.cat(made, dim=2)[:, :, -c:]]  # what the next window continues from
                inputs = continuing(made[0])
        self.maybe_free_model_hooks()

    # ---- saving and loading -------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory, safe_serialization: bool = True, push_to_hub: bool = False,
                        carry_code: bool = True, model_card_notes: str | None = None, **kwargs):
        """Save as a diffusers folder (`model_index.json`, one subfolder per component, safetensors) with a model
        card (README.md, `model_card`; `model_card_notes`, e.g. how the model was trained, become a section of it;
        a README.md that is not a generated card is kept). With `carry_code` (default) it also carries the code of
        the pipeline and its components, so `DiffusionPipeline.from_pretrained(path, trust_remote_code=True)` works
        without nbp-video (for a Hub repo, on its `snapshot_download`); without it the folder names the installed
        modules (for folders that live beside the package, like the bundled demo). `push_to_hub=True` uploads it
        (kwargs: repo_id, private, token, commit_message, create_pr); the card then loads it from the repo."""
        hub = {k: kwargs.pop(k) for k in ("repo_id", "private", "token", "commit_message", "create_pr") if k in kwargs}
        repo_id = hub.get("repo_id") or str(save_directory)
        if push_to_hub:  # the full id ("owner/name") for the card
            repo_id = create_hub_repo(hub.get("repo_id") or os.path.basename(os.path.abspath(save_directory)),
                                      hub.get("private"), hub.get("token"))
        # what can fail is worked out before any file is written
        card = self.model_card(repo_id, model_card_notes, carry_code, kwargs.get("variant"))
        code = {name: _module_with_relative_imports(inspect.getsourcefile(type(getattr(self, name))))
                for name in ("transformer", "video_tokenizer")} if carry_code else None
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, push_to_hub=False, **kwargs)
        write_model_card(os.path.join(save_directory, "README.md"), card)
        if carry_code:
            self._write_remote_code(save_directory, code)
        else:  # undo the code copy that transformers makes on its own (register_for_auto_class)
            folder = os.path.join(save_directory, "transformer")
            for name in os.listdir(folder):
                if name.endswith(".py"):
                    os.remove(os.path.join(folder, name))
            with open(os.path.join(folder, "config.json")) as f:
                config = json.load(f)
            config.pop("auto_map", None)
            with open(os.path.join(folder, "config.json.tmp"), "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            os.replace(os.path.join(folder, "config.json.tmp"), os.path.join(folder, "config.json"))
        if push_to_hub:
            return upload_to_hub(save_directory, repo_id, hub.get("token"), hub.get("commit_message"),
                                 hub.get("create_pr", False))

    def push_to_hub(self, repo_id: str, commit_message: str | None = None, private: bool | None = None,
                    token: str | None = None, create_pr: bool = False, safe_serialization: bool = True,
                    variant: str | None = None, model_card_notes: str | None = None) -> str:
        """diffusers' `push_to_hub`, uploading what `save_pretrained` writes: the carried code and this pipeline's
        model card (a card in the repo that is not a generated one is kept). Returns the commit's URL."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return self.save_pretrained(tmp, safe_serialization=safe_serialization, push_to_hub=True, repo_id=repo_id,
                                        private=private, token=token, commit_message=commit_message,
                                        create_pr=create_pr, model_card_notes=model_card_notes,
                                        **({"variant": variant} if variant else {}))

    def model_card(self, repo_id: str, notes: str | None = None, carries_code: bool = True,
                   variant: str | None = None) -> str:
        """A Hub model card (README.md) for this pipeline, loading it from `repo_id` (a Hub id or a folder)."""
        cfg, tok = self.transformer.config, self.video_tokenizer
        T, (H, W) = self.num_frames, self.resolution
        context = max(cfg.num_context_frames, cfg.block_shape[0])  # latent frames; a config may leave 0
        steps = len(self.transformer.layout.decode_schedule(
            self.transformer.layout.context_tokens(context) if cfg.condition_mode == "frames" else 0))
        millions = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
        sampling = self.transformer.default_sampling()
        sampling = "greedy" if sampling["temperature"] == 0 else ", ".join(f"{k} {v}" for k, v in sampling.items())
        seed = "generator=torch.Generator().manual_seed(0)"
        inputs = []  # lines before the call
        if cfg.condition_mode == "class":
            names = self.class_names
            condition = f"class-conditional, {cfg.num_classes} classes" + (
                f" ({', '.join(map(str, names[:8]))}{', ...' if len(names) > 8 else ''})" if names else "")
            call = f"pipe(class_labels=[{repr(names[0]) if names else 0}], {seed})"
        elif cfg.condition_mode == "frames":
            n = tok.num_frames_for_latent(context)
            condition = f"frame prediction: continues {n} given frame{'s' * (n > 1)}"
            inputs = [f"context = torch.zeros({n}, 3, {H}, {W})  # your first {n} frames: (T, 3, H, W) in [0, 1]"]
            call = f"pipe(video=context, {seed})"
        else:
            condition = "unconditional"
            call = f"pipe({seed})"
        where = json.dumps(repo_id) + (f", variant={json.dumps(variant)}" if variant else "")
        lines = [
            "---", "library_name: diffusers", "tags:", "- nbp-video", "- next-block-prediction", "- video-generation",
            "- autoregressive", "---", CARD_MARK, "",
            f"# {os.path.basename(repo_id.rstrip('/'))}", "",
            "A Next-Block Prediction (NBP; Ren et al., 2025, arXiv 2502.07737) video generator in the nbp-video "
            "format: a causal video tokenizer turns clips into grids of discrete tokens, and a decoder-only "
            "transformer with block-causal attention predicts a whole block of tokens per step.", "",
            f"- Output: {T} frames at {H}x{W} per window ({'x'.join(map(str, cfg.latent_shape))} latent tokens, "
            f"blocks of {'x'.join(map(str, cfg.block_shape))} tokens, {steps} steps); longer videos are continued "
            "window by window (`num_frames=`).",
            f"- Condition: {condition}.",
            f"- Generator: {millions(self.transformer):.1f}M parameters, {cfg.num_hidden_layers} layers x "
            f"{cfg.hidden_size}; tokenizer: {millions(tok):.1f}M parameters, FSQ codebook of {tok.codebook_size}.",
            f"- Default sampling (`transformer/generation_config.json`, else the paper's): {sampling}.", "",
            "## Use", "", "```python", "import torch", "from modeling_nbp import NBPVideoPipeline  # the nbp-video package",
            "from modeling_nbp.video_io import export_to_mp4", "",
            f"pipe = NBPVideoPipeline.from_pretrained({where})", *inputs,
            f"video = {call}.frames[0]", 'export_to_mp4(video, "video.mp4", fps=8)', "```", ""]
        if carries_code:  # diffusers' download of a repo id fetches only the first module of each component's code
            lines += ["Without nbp-video installed, the folder carries its code: load a local copy with diffusers and "
                      "transformers, `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, where "
                      f"`folder = huggingface_hub.snapshot_download({json.dumps(repo_id)})` for the Hub repo.", ""]
        if notes:
            lines += ["## Notes", "", notes.strip(), ""]
        return "\n".join(lines)

    def _write_remote_code(self, save_directory, code: dict):
        """Copy the pipeline's file and each component's `code` (its module first, then what it imports)."""
        with open(os.path.join(save_directory, "model_index.json")) as f:
            index = json.load(f)
        shutil.copy(inspect.getsourcefile(type(self)), os.path.join(save_directory, "pipeline_nbp_video.py"))
        index["_class_name"] = ["pipeline_nbp_video", type(self).__name__]
        for name, paths in code.items():
            for path in paths:
                shutil.copy(path, os.path.join(save_directory, name, os.path.basename(path)))
            index[name] = [os.path.splitext(os.path.basename(paths[0]))[0], type(getattr(self, name)).__name__]
        tmp = os.path.join(save_directory, "model_index.json.tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        os.replace(tmp, os.path.join(save_directory, "model_index.json"))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load from a local folder or a Hub repo id. With nbp-video installed the components are built from the
        installed classes (no remote code); pass `transformer=` / `video_tokenizer=` to use your own. Loading
        options: variant, dtype (or its older name torch_dtype; a torch dtype or its name, e.g. "bfloat16"; default
        float32 for both components, whatever dtype the files were saved in: half-precision matrix products are slow
        on CPUs; a dict such as `{"transformer": torch.bfloat16, "default": torch.float32}` sets it per component, as
        in diffusers;
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` without a dtype keeps the generator's saved
        dtype, as transformers does), use_safetensors (True: refuse pickled weights), revision, cache_dir, token,
        local_files_only, force_download. `trust_remote_code`: as in diffusers, the class of a carried copy of this file
        (no nbp-video installed) runs a folder's code only when it is True; the installed classes run none."""
        try:  # not an import statement: diffusers' check of carried code would ask to `pip install modeling_nbp`
            installed = importlib.import_module("modeling_nbp")
        except ImportError:  # running from a repository's copy of this file: diffusers' loader with its code
            given = sorted({"transformer", "video_tokenizer"} & set(kwargs))
            if given:  # diffusers would ask for `modeling_nbp` to be imported, to check the given object's class
                raise TypeError(f"without nbp-video installed, from_pretrained cannot take {', '.join(given)}: load "
                                "the folder, then swap in yours with `type(pipe).from_pipe(pipe, transformer=...)`")
            kwargs["dtype"] = cls._component_dtypes(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("trust_remote_code", None)
        folder = str(pretrained_model_name_or_path)
        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only", "force_download")
                      if k in kwargs}
        weights = {"use_safetensors": kwargs.pop("use_safetensors")} if "use_safetensors" in kwargs else {}
        variant = kwargs.pop("variant", None)
        variant = {"variant": variant} if variant else {}
        dtype = cls._component_dtypes(kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None))
        transformer, video_tokenizer = kwargs.pop("transformer", None), kwargs.pop("video_tokenizer", None)
        if kwargs:  # before any download
            raise TypeError(f"unexpected arguments for NBPVideoPipeline.from_pretrained: {sorted(kwargs)} (it takes "
                            "transformer, video_tokenizer, dtype or torch_dtype, variant, use_safetensors, revision, "
                            "cache_dir, token, local_files_only, force_download, trust_remote_code; place the pipeline "
                            "with pipe.to(device))")
        needed = [name for name, given in (("transformer", transformer), ("video_tokenizer", video_tokenizer))
                  if given is None]  # a component passed in is not downloaded
        folder = pipeline_folder(folder, needed, variant.get("variant"), weights.get("use_safetensors"), **hub_kwargs)
        missing = [f"{name}/config.json" for name, given in (("transformer", transformer),
                                                              ("video_tokenizer", video_tokenizer))
                   if given is None and not os.path.isfile(os.path.join(folder, name, "config.json"))]
        if missing:  # e.g. a training run's folder, or one model's folder
            final = os.path.join(folder, "final")
            hint = (f"its pipeline is {final}" if os.path.isdir(final) else "a training run's pipeline is its final/ "
                    "folder (with a tokenizer: `nbp train --tokenizer`); a generator or a tokenizer alone loads with "
                    "NBPForVideoGeneration.from_pretrained or NBPVideoTokenizer.from_pretrained, and "
                    "NBPVideoPipeline(transformer=..., video_tokenizer=...) joins them")
            raise FileNotFoundError(f"{folder} is not an NBPVideoPipeline folder (no {', '.join(missing)}): {hint}")
        transformer = transformer or installed.NBPForVideoGeneration.from_pretrained(
            os.path.join(folder, "transformer"), dtype=dtype["transformer"], **variant, **weights)
        video_tokenizer = video_tokenizer or installed.NBPVideoTokenizer.from_pretrained(
            os.path.join(folder, "video_tokenizer"), torch_dtype=dtype["video_tokenizer"], **variant, **weights)
        pipe = cls(transformer=transformer.eval(), video_tokenizer=video_tokenizer.eval())
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))  # as diffusers' loader does
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """A new pipeline sharing the components of `pipeline` (an NBPVideoPipeline, also one loaded from carried
        code), as diffusers' `from_pipe`: `transformer=` / `video_tokenizer=` replace one; `dtype` (or torch_dtype;
        one dtype, or a dict per component as in `from_pretrained`) casts the shared components, so `pipeline`'s
        too; without it they keep their dtypes (diffusers' own `from_pipe` casts them to float32)."""
        # not diffusers' from_pipe: it keeps a diffusers model only if its class is the one annotated on `__init__`,
        # and the carried copy of this file cannot import the component classes to annotate it with
        components = {name: kwargs.pop(name) if name in kwargs else getattr(pipeline, name, None)
                      for name in ("transformer", "video_tokenizer")}
        dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
        if kwargs:
            raise TypeError(f"unexpected arguments for NBPVideoPipeline.from_pipe: {sorted(kwargs)} (it takes "
                            "transformer, video_tokenizer, dtype or torch_dtype)")
        pipe = cls(**components)
        given = torch_dtype if dtype is None else dtype
        if given is not None:
            for name, component_dtype in cls._component_dtypes(dtype, torch_dtype).items():
                # a dict casts the components it names (all of them with "default"); the others keep their dtype
                if not isinstance(given, dict) or name in given or "default" in given:
                    getattr(pipe, name).to(component_dtype)
        if getattr(pipeline, "name_or_path", None) is not None:
            pipe.register_to_config(_name_or_path=pipeline.name_or_path)
        return pipe

    @staticmethod
    def _component_dtypes(dtype, torch_dtype) -> dict:
        """`from_pretrained`'s dtype (or torch_dtype, its deprecated name) -> each component's: one dtype for both,
        or a dict per component name with "default" for the others (diffusers' rule); float32 when not given."""
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass dtype or torch_dtype (its deprecated name), not both")
        dtype = torch_dtype if dtype is None else dtype
        names = ("transformer", "video_tokenizer")
        if not isinstance(dtype, dict):
            return dict.fromkeys(names, _torch_dtype(dtype))
        unknown = sorted(set(dtype) - {*names, "default"})
        if unknown:
            raise ValueError(f"dtype names unknown components {unknown}; a dict's keys must be among "
                             f"{[*names, 'default']}")
        return {name: _torch_dtype(dtype.get(name, dtype.get("default"))) for name in names}


def _torch_dtype(dtype) -> torch.dtype:
    """A component's loading dtype: a floating torch dtype or its name ("bfloat16"); float32 for None."""
    if dtype is None:
        return torch.float32
    named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(named, torch.dtype) or not named.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name, e.g. torch.bfloat16 or 'bfloat16' "
                         f"(None: float32; 'auto', the saved dtypes, is not supported), got {dtype!r}")
    return named


def _relative_imports(source: str) -> list[str]:
    """Names of what `source` imports from its own package: `from .x import ...` and `from . import x, y as z` (also
    parenthesised over several lines); a name that is not a module (`from . import SomeClass`) has no file."""
    import re

    names = re.findall(r"^\s*from\s+\.(\w+)\s+import\b", source, flags=re.MULTILINE)
    for group in re.findall(r"^\s*from\s+\.\s+import\s+(\([^)]*\)|[^\n#]+)", source, flags=re.MULTILINE):
        items = re.sub(r"#[^\n]*", "", group).strip("()").split(",")
        names += [item.split()[0] for item in items if item.strip()]  # "x as y" imports the module x
    return names


def _module_with_relative_imports(path: str) -> list[str]:
    """`path` and every sibling file it reaches through relative imports (`_relative_imports`; what the code copy
    needs). A file that is not there is left out: a carried copy (loaded as remote code) holds only what loading
    needed."""
    todo, seen = [path], []
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        with open(current, encoding="utf-8") as f:
            names = _relative_imports(f.read())
        todo += [p for p in (os.path.join(os.path.dirname(current), n + ".py") for n in names) if os.path.isfile(p)]
    return seen
