"""Optimizer parameter groups and learning-rate schedules.

Two recipes for the generator (NBP_REFERENCE.md section 2):
  * "official" (the released code): AdamW(0.9, 0.95), weight decay on Linear weights only, and timm's
    `CosineLRScheduler` with a linear warmup from `warmup_lr_init` and cosine decay to `lr_min`;
  * "paper" (the paper's text): Adam(0.9, 0.98) with linear decay after the warmup. The paper lists a weight
    decay of 0.01 as well, so it is applied the decoupled way (AdamW) to the same parameters.

Schedules are plain functions of the optimizer step index (0 = the first update), so their values can be
checked by hand and a resumed run picks up exactly where it stopped.
"""

import math
from collections.abc import Callable

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")

OPTIMIZER_RECIPES = {
    "official": dict(betas=(0.9, 0.95), schedule="cosine"),
    "paper": dict(betas=(0.9, 0.98), schedule="linear"),
}


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: the `weight` of every `nn.Linear` and nothing else
    (biases, LayerNorm/GroupNorm, embeddings, position tables and free parameters such as
    `uncond_embedding` are not decayed)."""
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups, `[decayed, not decayed]`, over the trainable parameters of `model`.

    Each group also holds the parameter `names` (ignored by torch optimizers; handy for checks and logs).
    A parameter shared between modules is listed once.
    """
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be a number >= 0, got {weight_decay!r}")
    decay_names = decay_parameter_names(model)
    groups = {True: ([], []), False: ([], [])}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        params, names = groups[name in decay_names]
        params.append(param)
        names.append(name)
    return [
        {"params": groups[True][0], "names": groups[True][1], "weight_decay": float(weight_decay)},
        {"params": groups[False][0], "names": groups[False][1], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.01,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `build_param_groups(model, weight_decay)`. `fused` is passed to torch (CUDA only)."""
    if not isinstance(learning_rate, (int, float)) or learning_rate <= 0:
        raise ValueError(f"`learning_rate` must be a positive number, got {learning_rate!r}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}")
    groups = build_param_groups(model, weight_decay)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("`model` has no trainable parameters")
    return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, fused=fused)


def lr_at_step(step: int, base_lr: float, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
               lr_min: float = 0.0, warmup_lr_init: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup (step < warmup_steps): linear from `warmup_lr_init` (at step 0) towards `base_lr`.
    After it:
      * "cosine": `lr_min + (base_lr - lr_min) * (1 + cos(pi * step / total_steps)) / 2`. As in timm's
        `CosineLRScheduler` without `warmup_prefix` (the official setting), the cosine is measured from step 0,
        not from the end of the warmup, so it starts a little below `base_lr`.
      * "linear": from `base_lr` at the end of the warmup down to `lr_min` at `total_steps`.
      * "constant": `base_lr`.
    From `total_steps` on, cosine and linear stay at `lr_min`.
    (The official loop steps timm's scheduler after each update with that update's index, so its update k uses the
    rate of step k - 1, and its first two updates `warmup_lr_init`: one step later than here.)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got total_steps="
                         f"{total_steps}, warmup_steps={warmup_steps}")
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}")
    if step < warmup_steps:
        return warmup_lr_init + step * (base_lr - warmup_lr_init) / warmup_steps
    if schedule == "constant":
        return base_lr
    if step >= total_steps:
        return lr_min
    if schedule == "cosine":
        return lr_min + 0.5 * (base_lr - lr_min) * (1.0 + math.cos(math.pi * step / total_steps))
    return lr_min + (base_lr - lr_min) * (total_steps - step) / (total_steps - warmup_steps)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                       schedule: str = "cosine", lr_min: float = 0.0,
                       warmup_lr_init: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_at_step` for every parameter group (relative to each group's initial lr).

    Call `scheduler.step()` once per optimizer update. Its state (the step count) saves and loads with
    `state_dict()`, so a resumed run continues the schedule."""
    lr_at_step(0, 1.0, total_steps, warmup_steps, schedule)  # validates the arguments now, not at step 0
    factors: list[Callable[[int], float]] = []
    for group in optimizer.param_groups:
        base = group.get("initial_lr", group["lr"])

        def factor(step, base=base):
            return lr_at_step(step, base, total_steps, warmup_steps, schedule, lr_min, warmup_lr_init) / base

        factors.append(factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def follow_schedule(scheduler) -> None:
    """Set the optimizer's rates (and `get_last_lr`) to what `scheduler`, a `LambdaLR` (or Accelerate's wrapper of
    one), gives at its step. For a resume: the checkpoint restores the rates of the schedule that saved it, and a
    resumed run may stretch the schedule (a larger --max_steps), whose rate from the resumed step on is this one."""
    scheduler = getattr(scheduler, "scheduler", scheduler)
    rates = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates


__all__ = ["OPTIMIZER_RECIPES", "SCHEDULES", "build_lr_scheduler", "build_optimizer", "build_param_groups",
           "decay_parameter_names", "follow_schedule", "lr_at_step"]
