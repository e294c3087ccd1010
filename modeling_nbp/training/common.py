"""Accelerate plumbing shared by the generator and tokenizer training scripts.

* Checkpoints: `output_dir/checkpoint-{step}` folders written by `accelerator.save_state` into a temporary
  folder, completed by a marker file (`trainer_state.json`, written last) and then renamed into place. Only
  renamed folders holding the marker count, so a run killed mid-save is never resumed from a half-written
  checkpoint. Old checkpoints are rotated out (`total_limit`).
* Data order: `StepBatchSampler` gives every process its share of micro-batch `m` as a pure function of
  (seed, m), so a resumed run sees exactly the batches an uninterrupted run would; an optimizer step takes the
  same clips whatever the number of processes and accumulation steps (for the same global batch); with
  `item_seeds` it also gives each item a seed from (seed, epoch, item), which fixes a clip's random window.
* A resume restores the optimizer, the EMA and the data order from the checkpoint, so `check_resume_settings`
  refuses one that asks for other learning rates, seed, data and so on, instead of overriding them silently.
* Randomness inside a step (dropout, class-label dropout) is reseeded from (seed, micro-step, process) by
  `seed_step`, so it does not depend on what ran before a resume either.
* Logging: per-step JSON lines (`JsonlLog`), trackers (TensorBoard, W&B when installed and configured),
  sample videos; throughput and MFU estimates.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..data.video_datasets import item_seed
from ..pipelines.pipeline_nbp_video import create_hub_repo
from ..run_files import settings_differences, write_json
from ..video_io import atomic_output_path, export_to_mp4, flush_to_disk, make_contact_sheet

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
_TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
REPORT_TO = ("auto", "tensorboard", "wandb", "all", "none")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


# ---------------------------------------------------------------------------------------------- checkpoints
def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, CHECKPOINT_MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Path of the newest complete checkpoint in `output_dir`, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """`None` -> None; "latest" -> the newest complete checkpoint of `output_dir` (None if there is none yet,
    so the same command starts or resumes a run); a path -> that path, which must be a complete checkpoint."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume_from_checkpoint, CHECKPOINT_MARKER)):
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint folder "
                         f"(no {CHECKPOINT_MARKER}); pass 'latest' or a {CHECKPOINT_PREFIX}<step> folder")
    return resume_from_checkpoint


def read_trainer_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, CHECKPOINT_MARKER), encoding="utf-8") as f:
        return json.load(f)


def keep_resumed_defaults(args, resume: str | None, groups: dict[str, str]) -> None:
    """On a resume, the flags left to a default that is a share of --max_steps (`args._from_max_steps`, set by the
    scripts' parse_args) take the checkpoint's values (`groups`: flag -> its group in the trainer state), so that a
    resume may raise --max_steps without moving the warmup or the GAN's start (which it could not change)."""
    if resume is None:
        return
    state = read_trainer_state(resume)
    for name in getattr(args, "_from_max_steps", ()):
        value = state.get(groups[name], {}).get(name)
        if value is not None:
            setattr(args, name, value)


def check_run_start(output_dir: str, resume: str | None, overwrite: bool, is_main_process: bool) -> None:
    """Refuse to mix two runs' checkpoints in `output_dir`: a fresh run (`resume` None) finds none there, a
    resumed one none newer than the checkpoint it resumes. With `overwrite` (--overwrite_output_dir) the main
    process deletes them instead, and for a fresh run also the earlier run's samples/ and logs/ (TensorBoard)."""
    step = -1 if resume is None else read_trainer_state(resume)["global_step"]
    others = [path for s, path in list_checkpoints(output_dir) if s > step]
    if overwrite:
        if is_main_process:
            earlier = [os.path.join(output_dir, name) for name in ("samples", "logs")] if resume is None else []
            for path in others + [p for p in earlier if os.path.isdir(p)]:
                remove_tree(path)
        return
    if not others:
        return
    names = ", ".join(os.path.basename(p) for p in others)
    if resume is None:
        raise ValueError(f"--output_dir {output_dir!r} holds checkpoints of an earlier run ({names}): pass "
                         "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to delete them and "
                         "start over")
    raise ValueError(f"--output_dir {output_dir!r} holds checkpoints newer than the resumed step {step} ({names}), "
                     "which rotation and 'latest' would mix with this run: resume from the newest, or pass "
                     "--overwrite_output_dir to delete them")


def remove_tree(path: str) -> None:
    """Delete a folder by first renaming it, so a crash mid-delete never leaves a damaged checkpoint behind."""
    trash = os.path.join(os.path.dirname(path), f".deleting-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_temporaries(output_dir: str) -> None:
    """Delete what a killed run left half written (call from the main process before training): temporary checkpoint
    folders, and `atomic_output_path`'s temporaries of final/ and the log. An earlier final/ that was set aside to make
    room for a new one is kept while it is the only one."""
    if not os.path.isdir(output_dir):
        return
    stale = (_TMP_PREFIX, ".deleting-", ".final.tmp-", ".train_log.tmp-")
    if os.path.isdir(os.path.join(output_dir, "final")):
        stale += (".final.old-",)
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(stale) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(stale):
            os.remove(path)


def prepare_output_dir(accelerator, args) -> str | None:
    """On the main process: create `args.output_dir`, clear what a killed run left there, and create the Hub
    repository now when `args.push_to_hub` (a missing token fails before training, not after it).
    -> the repository's full id, or None."""
    if not accelerator.is_main_process:
        return None
    os.makedirs(args.output_dir, exist_ok=True)
    remove_stale_temporaries(args.output_dir)
    if not args.push_to_hub:
        return None
    try:
        return create_hub_repo(args.hub_model_id, args.hub_private or None)
    except Exception as error:  # no network, offline mode, no or a wrong token, a name taken by someone else
        reason = (str(error).splitlines() or [""])[0]
        raise RuntimeError(f"--push_to_hub: could not create the Hub repository {args.hub_model_id!r} before training "
                           f"({type(error).__name__}: {reason}): check the network and your Hub login (`hf auth "
                           "login` or HF_TOKEN), or leave out --push_to_hub and upload final/ later") from error


def save_checkpoint(accelerator, output_dir: str, step: int, trainer_state: dict,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
                    total_limit: int | None = None) -> str:
    """Save the full training state as `output_dir/checkpoint-{step}`; every process must call this.

    `accelerator.save_state` writes models, optimizers, schedulers and RNG states; `tensors` maps a file stem
    to a flat tensor dict saved as `<stem>.safetensors` by the main process (e.g. EMA weights); the marker
    `trainer_state.json` (`trainer_state` plus the step) is written last, then the folder is renamed into
    place. Keeps at most `total_limit` complete checkpoints (None = all)."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(output_dir, f"{_TMP_PREFIX}{step}")  # same name on every process (shared folder)
    if accelerator.is_main_process and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for stem, flat in (tensors or {}).items():
            flat = {k: v.detach().contiguous().cpu() for k, v in flat.items()}
            save_file(flat, os.path.join(tmp, f"{stem}.safetensors"))
        write_json(os.path.join(tmp, CHECKPOINT_MARKER), dict(trainer_state, global_step=step), indent=2)
        if os.path.isdir(final):  # a run resumed from an earlier checkpoint writes this step again
            remove_tree(final)
        flush_to_disk(tmp)  # `latest` must never pick a checkpoint whose files a crash left empty
        os.replace(tmp, final)
        flush_to_disk(output_dir, entries_only=True)
        if total_limit is not None:  # drop the oldest others, never the one just written
            kept = list_checkpoints(output_dir)
            for _, old in [c for c in kept if c[1] != final][: max(0, len(kept) - total_limit)]:
                remove_tree(old)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


_LAST_BARRIER = []  # see `wait_for_everyone_at_exit`


def wait_for_everyone_at_exit(accelerator) -> None:
    """The last `accelerator.wait_for_everyone()` of a run, safe from a deadlock of gloo (DDP on the CPU) at exit: a
    barrier keeps the collectives still in progress when it starts, and a worker thread that frees the last of them
    after a collective on tensors made in Python (reduce, gather) needs the GIL, which the main thread holds while it
    tears the process group down at exit. A second barrier, kept alive here until the interpreter exits, takes over
    the first one, so no worker thread frees them."""
    accelerator.wait_for_everyone()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":  # (NCCL untouched)
        work = dist.barrier(async_op=True)
        work.wait()
        _LAST_BARRIER.append(work)


def load_checkpoint(accelerator, path: str, settings: dict | None = None, earlier_defaults: dict | None = None) -> dict:
    """Restore what `save_checkpoint` saved through the accelerator, once `settings` are checked against the
    checkpoint's (`check_resume_settings`: before the states are loaded, which would fail on another model with an
    opaque error); returns the trainer state (with `global_step`). Extra tensor files: `load_checkpoint_tensors`."""
    state = read_trainer_state(path)
    if settings is not None:
        check_resume_settings(path, state, settings, earlier_defaults)
    try:
        accelerator.load_state(path)
    except FileNotFoundError as error:  # e.g. scaler.pt: fp16's gradient scaler is saved by fp16 runs only
        raise ValueError(f"{path} lacks {os.path.basename(error.filename or str(error))}, which this run loads: resume "
                         "with the settings that started the run (--mixed_precision fp16 needs a checkpoint of an fp16 "
                         "run), or from a complete checkpoint") from error
    except OSError:  # a file that cannot be read (permissions, the filesystem) is not damaged: its error names it
        raise
    except Exception as error:  # another model (checkpoints from before the settings were kept), or a damaged file
        reason = (str(error).splitlines() or [""])[0][:300]
        raise ValueError(f"{path} could not be loaded ({type(error).__name__}: {reason}): it holds another model or "
                         "optimizer than this run builds (resume with the flags that started the run), or a damaged "
                         f"file (delete {os.path.basename(path)} to resume from the checkpoint before it)") from error
    # load_state restores the micro-step count, which decides where `accumulate` updates: a checkpoint is taken at an
    # update, so count from 0 (the saved count is off the boundaries when the accumulation steps change)
    accelerator.step = 0
    return state


def check_resume_settings(resume: str, state: dict, wanted: dict, earlier_defaults: dict | None = None) -> None:
    """Refuse to resume checkpoint `resume` (trainer state `state`) with other settings than it was trained with:
    `wanted` maps top-level keys of the trainer state to this run's values (nested dicts allowed). A group the
    checkpoint lacks (written before it was kept) is not checked; `earlier_defaults` as in `settings_differences`."""
    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as they read back from the checkpoint
    found = {key: state.get(key, value) for key, value in wanted.items()}
    differences = settings_differences(found, wanted, earlier_defaults)
    if differences:
        raise ValueError(f"{resume} was trained with other settings ({'; '.join(differences)}): a resume continues "
                         "that run (its model, optimizer state, EMA and data order) and cannot change them; pass the "
                         "same values, or start a new run")


def warn_if_global_batch_changed(state: dict, global_batch: int) -> None:
    if state.get("global_batch_size") != global_batch:
        logger.warning("resuming with a global batch of %d clips instead of %s: the data order changes", global_batch,
                       state.get("global_batch_size"))


def load_checkpoint_tensors(path: str, stem: str) -> dict[str, torch.Tensor]:
    file = os.path.join(path, f"{stem}.safetensors")
    try:
        return load_file(file)
    except SafetensorError as error:  # a file cut short or damaged on disk
        raise ValueError(f"{file} could not be loaded ({type(error).__name__}: {str(error)[:300]}): a damaged file "
                         f"(delete {os.path.basename(path)} to resume from the checkpoint before it)") from error


# ------------------------------------------------------------------------------------- data order, seeding
def _derived_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0])


def seed_step(seed: int, micro_step: int, process_index: int) -> None:
    """Reseed torch (CPU and CUDA) for one micro-step: dropout masks become a function of (seed, step, process)."""
    torch.manual_seed(_derived_seed(seed, micro_step, process_index))


class StepBatchSampler(torch.utils.data.Sampler):
    """Infinite batch sampler: this process's indices for micro-steps `start_step`, `start_step + 1`, ...

    An optimizer step takes G = `batch_size * accumulation_steps * num_processes` items: optimizer step `s` takes
    the `(s % S)`-th slice of G items of epoch `s // S`'s permutation (seeded by (seed, epoch); S = optimizer
    steps per epoch, the incomplete tail of each permutation is dropped), and its micro-step `a`, process `p` the
    `(a * num_processes + p)`-th `batch_size` items of that slice. So the clips of every optimizer step depend only
    on the seed and G, not on how G is split over processes and accumulation, nor on resumes. With `item_seeds` each
    index comes as (index, a seed derived from (seed, epoch, index)), for per-item randomness such as a clip's
    random window (`VideoClipDataset`) that must not depend on workers or on what ran before a resume either."""

    def __init__(self, num_items: int, batch_size: int, num_processes: int = 1, process_index: int = 0,
                 seed: int = 0, start_step: int = 0, shuffle: bool = True, accumulation_steps: int = 1,
                 item_seeds: bool = False):
        if (batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes or start_step < 0
                or accumulation_steps < 1):
            raise ValueError(f"need batch_size >= 1, 0 <= process_index < num_processes, start_step >= 0, "
                             f"accumulation_steps >= 1; got {batch_size}, {process_index}, {num_processes}, "
                             f"{start_step}, {accumulation_steps}")
        self.global_batch = batch_size * accumulation_steps * num_processes
        if num_items < self.global_batch:
            raise ValueError(f"the dataset has {num_items} items, fewer than one global batch ({batch_size} per "
                             f"process x {accumulation_steps} accumulation steps x {num_processes} processes); lower "
                             "the batch size")
        self.num_items, self.batch_size, self.num_processes = num_items, batch_size, num_processes
        self.process_index, self.accumulation_steps = process_index, accumulation_steps
        self.seed, self.start_step, self.shuffle, self.item_seeds = seed, start_step, shuffle, item_seeds
        self.steps_per_epoch = num_items // self.global_batch  # optimizer steps

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_items)
        generator = torch.Generator().manual_seed(_derived_seed(self.seed, epoch))
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self):
        micro, epoch, order = self.start_step, None, None
        while True:
            step, a = divmod(micro, self.accumulation_steps)
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = self.epoch_order(epoch)
            start = ((step % self.steps_per_epoch) * self.global_batch
                     + (a * self.num_processes + self.process_index) * self.batch_size)
            batch = order[start:start + self.batch_size].tolist()
            yield [(i, item_seed(self.seed, epoch, i)) for i in batch] if self.item_seeds else batch
            micro += 1


def dataloader_worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # many workers x many intra-op threads oversubscribe the CPU during collation


# ------------------------------------------------------------------------------------------------- weights
class EMA:
    """Exponential moving average of a model's trainable parameters, kept in float32 on the model's device."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"`ema_decay` must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names],
                             1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("the EMA weights in the checkpoint do not match this model's parameters")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module):
        """The EMA weights in `model` inside the block (validation and samples see what final/ will hold), the model's
        own again after it (kept on the CPU meanwhile)."""
        params = dict(model.named_parameters())
        own = {name: params[name].detach().to("cpu", copy=True) for name in self.shadow}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in own.items():
                    params[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ValueError(f"the model has no parameters named {missing[:3]} (of {len(missing)}) that the EMA holds")
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))


# ------------------------------------------------------------------------------------------------- logging
class JsonlLog:
    """One JSON object per line (`{"step": ..., ...}`), appended and flushed by the main process."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def append(self, record: dict) -> None:
        if self.enabled:
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def last(self, key: str, default=None):
        """The last value of `key` logged (None and non-finite values aside), else `default`: what a resumed run
        that has no step left to train reports."""
        value = default
        if self.enabled and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        logged = json.loads(line).get(key)
                    except json.JSONDecodeError:  # a line cut short when a run was killed
                        continue
                    value = value if logged is None else logged
        return value

    def truncate(self, last_step: int, redone: tuple[str, ...] = ()) -> None:
        """Drop records after `last_step` (those a killed run wrote after the checkpoint it is resumed from), and those
        at `last_step` that hold a key of `redone` (an evaluation that the resumed run makes again)."""
        if not (self.enabled and os.path.isfile(self.path)):
            return
        keep, torn = [], 0
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short when the run was killed
                    torn += 1
                    continue
                step = record.get("step", 0)
                if step < last_step or step == last_step and not any(key in record for key in redone):
                    keep.append(line)
        if torn:
            logger.warning("%s: dropped %d unreadable line(s) (a run killed while writing)", self.path, torn)
        with atomic_output_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)


def resolve_report_to(report_to: str) -> list[str]:
    """Tracker names for `Accelerator(log_with=...)`. "auto": TensorBoard, plus W&B when `wandb` is installed
    and configured (WANDB_API_KEY or WANDB_MODE set), so a run never stops at a login prompt."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report_to must be one of {REPORT_TO}, got {report_to!r}")
    import importlib.util

    has_wandb = importlib.util.find_spec("wandb") is not None
    if report_to == "auto":
        configured = bool(os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))
        return ["tensorboard"] + (["wandb"] if has_wandb and configured else [])
    if report_to in ("wandb", "all") and not has_wandb:
        raise ValueError(f"--report_to {report_to} needs the `wandb` package (pip install wandb)")
    return {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"], "none": []}[report_to]


def init_trackers(accelerator, args, global_step: int) -> None:
    """Start the trackers for a run that logs from step `global_step + 1` on. TensorBoard hides what an earlier run
    in the same folder logged from that step on (`purge_step`): a run killed after its last checkpoint logged steps
    that the resumed run logs again, which would otherwise show twice (train_log.jsonl drops them likewise)."""
    accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args),
                              init_kwargs={"tensorboard": {"purge_step": global_step + 1}})


def tracker_config(args) -> dict:
    """argparse namespace -> flat dict of str/int/float/bool, as TensorBoard's hparams need."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()
            if not k.startswith("_")}


def resolve_mixed_precision(value: str, cpu: bool = False) -> str | None:
    """"auto": the `accelerate launch` config's choice if there is one, else bf16 where CUDA supports it and the run
    is not on the CPU (`cpu`), else no. fp16 on the CPU is refused: Accelerate applies none there (no autocast, no
    gradient scaling), so the run would train in fp32."""
    if value not in MIXED_PRECISION:
        raise ValueError(f"--mixed_precision must be one of {MIXED_PRECISION}, got {value!r}")
    if value == "fp16" and cpu:
        raise ValueError("--mixed_precision fp16 needs a GPU: on the CPU (--cpu, or several processes without CUDA) "
                         "Accelerate applies no fp16 and the run would train in fp32; pass bf16, no or auto")
    if value != "auto":
        return value
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # Accelerator reads it from the environment
    return "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def resolve_batch_layout(train_batch_size: int | None, gradient_accumulation_steps: int | None,
                         global_batch_size: int | None, num_processes: int, default_batch_size: int) -> tuple[int, int]:
    """(per-process micro-batch, accumulation steps). Without a global batch: the given values (defaults
    `default_batch_size` and 1). With one: whichever of the other two is missing is derived (if both are, the
    micro-batch is the largest divisor of the per-process share up to `default_batch_size`, so a large global batch
    accumulates rather than running out of memory), and `micro-batch x accumulation x processes` must equal it."""
    b, a, G = train_batch_size, gradient_accumulation_steps, global_batch_size
    if G is None:
        b, a, rem = b or default_batch_size, a or 1, 0
    elif b is None and a is None:
        share, rem = divmod(G, num_processes)
        b = max((d for d in range(1, min(share, default_batch_size) + 1) if share % d == 0), default=0)
        a = share // b if b else 0
    elif b is None:
        b, rem = divmod(G, a * num_processes)
    elif a is None:
        a, rem = divmod(G, b * num_processes)
    else:
        rem = G - a * b * num_processes
    if rem or b < 1 or a < 1:
        raise ValueError(f"--global_batch_size {G} (given, or set by a --preset: pass your own to change it) must "
                         f"equal --train_batch_size x --gradient_accumulation_steps x {num_processes} processes (got "
                         f"{train_batch_size}, {gradient_accumulation_steps})")
    return b, a


def make_accelerator(args, gradient_accumulation_steps: int):
    """The `Accelerator` both scripts use, from their shared flags (--cpu, --mixed_precision, --report_to,
    --output_dir). The scheduler is stepped by the scripts themselves, once per optimizer update."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = use_cpu(args.cpu)
    return Accelerator(
        cpu=cpu, mixed_precision=resolve_mixed_precision(args.mixed_precision, cpu),
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=resolve_report_to(args.report_to) or None, step_scheduler_with_optimizer=False,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, "logs")))


def enable_activation_checkpointing(model) -> None:
    """Keep only each layer's input for the backward (transformers' `activation_checkpointing_enable`; versions
    before it have only the older name, which later ones deprecate)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def bare_model(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The model under what `accelerator.prepare` wrapped it in (DDP, and torch.compile with `accelerate launch
    --dynamo_backend ...`): the module whose parameter and state-dict names are the model's own."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def use_cpu(requested: bool) -> bool:
    """`Accelerator(cpu=...)`: as requested, and always for several processes without CUDA (DDP over gloo; without
    it Accelerate would start each process as a separate single-process run)."""
    return requested or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def log_videos(accelerator, tag: str, videos: torch.Tensor, step: int, output_dir: str, fps: float = 8,
               labels: list[str] | None = None) -> list[str]:
    """Main process: write `videos` (B, 3, T, H, W) in [0, 1] as MP4 files and a contact sheet under
    `output_dir/samples/step-{step}/`, add the sheet to TensorBoard and the clips to W&B. Returns the paths."""
    if not accelerator.is_main_process:
        return []
    folder = os.path.join(output_dir, "samples", f"step-{step:07d}")
    videos = videos.detach().float().clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy()  # (B, T, H, W, 3): unambiguous
    paths = [export_to_mp4(video, os.path.join(folder, f"{tag}_{i}.mp4"), fps=fps) for i, video in enumerate(videos)]
    sheet = make_contact_sheet(list(videos), os.path.join(folder, f"{tag}.png"), labels=labels)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(sheet), step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Video(p, fps=fps, format="mp4") for p in paths]}, step=step)
    return paths


# ------------------------------------------------------------------------------------- throughput and MFU
class ThroughputMeter:
    """Tokens (or items) per second of training steps. The clock starts after the first `skip` steps (warm-up,
    compilation) and stops between `pause()` and `resume()` (evaluation, samples, checkpoints)."""

    def __init__(self, skip: int = 1):
        self.skip, self.steps, self.count = skip, 0, 0
        self.start = self.paused_at = None
        self.excluded = 0.0

    def step(self, count: int) -> None:
        self.steps += 1
        if self.steps == self.skip:
            self.start = time.perf_counter()
        elif self.steps > self.skip:
            self.count += count

    def pause(self) -> None:
        self.paused_at = time.perf_counter()

    def resume(self) -> None:
        if self.paused_at is not None and self.start is not None:
            self.excluded += time.perf_counter() - max(self.paused_at, self.start)
        self.paused_at = None

    @property
    def rate(self) -> float:
        if self.start is None or self.count == 0:
            return float("nan")
        now = self.paused_at if self.paused_at is not None else time.perf_counter()
        return self.count / (now - self.start - self.excluded)

    def describe(self, unit: str, digits: int = 0) -> str:
        """The rate for a summary line; a run too short to time (the first step is not counted) says so."""
        if math.isnan(self.rate):
            return f"{unit} n/a (no timed step: the first {self.skip} of a run is not counted)"
        return f"{self.rate:.{digits}f} {unit}"


__all__ = [
    "CHECKPOINT_MARKER", "CHECKPOINT_PREFIX", "EMA", "check_run_start", "dataloader_worker_init",
    "find_latest_checkpoint", "init_trackers", "JsonlLog", "keep_resumed_defaults", "list_checkpoints",
    "load_checkpoint", "load_checkpoint_tensors", "log_videos", "make_accelerator", "prepare_output_dir",
    "read_trainer_state", "remove_stale_temporaries", "remove_tree", "resolve_batch_layout", "resolve_mixed_precision",
    "resolve_report_to", "resolve_resume_checkpoint", "save_checkpoint", "seed_step", "StepBatchSampler",
    "ThroughputMeter", "tracker_config", "training_progress", "use_cpu", "wait_for_everyone_at_exit", "write_json",
]


def int_list(text: str) -> list[int]:
    """argparse type for comma-separated integers such as 1,1,16."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,1,16; got {text!r}") from None


def training_progress(accelerator, global_step: int, max_steps: int):
    """The console progress bar of a training loop (local main process), starting at a resumed step; says so when
    a resumed run has nothing left to train."""
    from tqdm.auto import tqdm

    if global_step >= max_steps:
        accelerator.print(f"the checkpoint is at step {global_step}, at or past --max_steps {max_steps}: nothing to "
                          "train (raise --max_steps to go on); the final folder is written from it")
    return tqdm(total=max_steps, initial=min(global_step, max_steps), desc="steps", dynamic_ncols=True,
                disable=not accelerator.is_local_main_process)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type for counts that may be 0."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """argparse type for rates that must be > 0 and finite (frame rates)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def add_batch_arguments(group, default_batch_size: int) -> None:
    """Batch layout, precision, seed and device flags, shared by the training scripts."""
    group.add_argument("--train_batch_size", type=positive_int,
                       help=f"clips per process and micro-step (default {default_batch_size}, or the largest "
                            f"divisor of the per-process share of --global_batch_size up to {default_batch_size})")
    group.add_argument("--global_batch_size", type=positive_int,
                       help="per optimizer step over all processes; sets whichever of --train_batch_size and "
                            "--gradient_accumulation_steps is not given")
    group.add_argument("--gradient_accumulation_steps", type=positive_int)
    group.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="auto",
                       help="auto: the accelerate config's, else bf16 on CUDA (not with --cpu), else no; fp16 needs "
                            "a GPU")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present (several "
                       "processes without CUDA always use CPU + gloo)")


def add_checkpoint_arguments(group) -> None:
    """--checkpointing_steps / --checkpoints_total_limit / --resume_from_checkpoint / --logging_steps."""
    group.add_argument("--checkpointing_steps", type=positive_int, default=1000)
    group.add_argument("--checkpoints_total_limit", type=positive_int, help="keep this many (default: all)")
    group.add_argument("--resume_from_checkpoint",
                       help="'latest' (start fresh if there is none) or a checkpoint folder")
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="delete an earlier run's checkpoints in --output_dir (those newer than the resumed one; "
                            "for a fresh run all, with its samples/ and logs/)")
    group.add_argument("--logging_steps", type=positive_int, default=10)


def add_tracking_arguments(group, project: str) -> None:
    """--report_to / --tracker_project_name and the Hub flags."""
    group.add_argument("--report_to", choices=REPORT_TO, default="auto",
                       help="auto: TensorBoard, plus W&B when installed and configured")
    group.add_argument("--tracker_project_name", default=project)
    add_hub_arguments(group)


def add_hub_arguments(group) -> None:
    """--push_to_hub / --hub_model_id / --hub_private, shared by the training scripts."""
    group.add_argument("--push_to_hub", action="store_true", help="upload the final folder to the Hub")
    group.add_argument("--hub_model_id", help="repo id, required with --push_to_hub (e.g. your-name/nbp-ucf)")
    group.add_argument("--hub_private", action="store_true")
