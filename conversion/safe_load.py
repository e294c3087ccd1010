"""Reading official NBP checkpoints without running code from their pickles, and loading their tensors strictly.

`torch.load(..., weights_only=True)` only rebuilds tensors and plain containers. The official generator
checkpoints (PyTorch Lightning) also pickle the training script's `argparse.Namespace` in `hyper_parameters`, so
a second try allows exactly the classes in `ALLOWED_GLOBALS`; anything else is refused, naming what the file asked
for. `weights_only=False` is never used.
"""

import argparse
import os
import pickle
import re
import zipfile

import torch

# plain-data classes that official checkpoints are known to pickle (Lightning's `hyper_parameters["args"]`)
ALLOWED_GLOBALS = (argparse.Namespace,)


def _globals_refused(path: str, error: Exception) -> list[str]:
    """Names of the pickle globals that weights_only loading refused, best effort (for the error message)."""
    try:  # zip checkpoints can be scanned statically: every refused global at once
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if names:
            return sorted(names)
    except (ValueError, RuntimeError, pickle.UnpicklingError):
        pass
    return re.findall(r"GLOBAL ([\w.]+)", str(error))


def _torch_load(path: str, allow: bool):
    """weights_only torch.load, optionally with `ALLOWED_GLOBALS`; damaged or foreign files raise ValueError."""
    kwargs = dict(map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS) if allow else []):
            return torch.load(path, **kwargs)
    except pickle.UnpicklingError:
        raise
    except Exception as error:  # torch raises KeyError, RuntimeError, EOFError, ... on files it cannot parse
        raise ValueError(f"cannot read {path} as a torch checkpoint: {type(error).__name__}: {error}") from error


def require_checkpoint_file(path: str) -> None:
    """Raise FileNotFoundError when `path` does not exist and ValueError when it is a folder, saying how to turn a
    DeepSpeed checkpoint folder into the one file that `safe_torch_load` reads."""
    if os.path.isfile(path):
        return
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if not os.path.isfile(os.path.join(path, "latest")):  # DeepSpeed names its last save there
        raise ValueError(f"{path} is a folder, not a checkpoint file")
    raise ValueError(f"{path} is a folder, not a checkpoint file: it looks like a DeepSpeed checkpoint folder (what "
                     f"the official training saves with --use_deepspeed). {zero_to_fp32_advice(path)}")


def zero_to_fp32_advice(folder: str) -> str:
    """How to make a DeepSpeed checkpoint folder the one file the conversion reads."""
    # DeepSpeed's own copy of zero_to_fp32.py in the folder saves the weights alone; the official one keeps
    # Lightning's hyper_parameters, which the conversion reads
    return (f"Make it one file with the zero_to_fp32.py at the root of the official repository "
            f"(github.com/RenShuhuai-Andy/NBP): `python zero_to_fp32.py {folder} OUTPUT.ckpt`, and give OUTPUT.ckpt "
            "here; the zero_to_fp32.py that DeepSpeed copies into the folder drops the hyper_parameters")


def safe_torch_load(path) -> dict:
    """`torch.load` a checkpoint on the CPU with weights_only=True (plus `ALLOWED_GLOBALS` on a second try).

    Zip checkpoints are memory-mapped, so a 3B checkpoint is not read into memory twice. Raises ValueError
    naming the globals the file needs when it cannot be read this way.
    """
    path = os.fspath(path)
    require_checkpoint_file(path)
    try:
        return _torch_load(path, allow=False)
    except pickle.UnpicklingError:
        pass
    try:
        return _torch_load(path, allow=True)
    except pickle.UnpicklingError as error:
        refused, message = _globals_refused(path, error), str(error).strip()
    if not refused:  # not a global problem: a damaged or foreign file
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:\n\n|$)", message, re.S)
        detail = detail.group(1) if detail else "unreadable pickle"
        raise ValueError(f"cannot read {path} as a torch checkpoint with weights_only=True: {detail}")
    allowed = ", ".join(f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS)
    raise ValueError(
        f"refusing to load {path}: its pickle needs {', '.join(refused)}, which is not allowed (loading it could "
        f"run arbitrary code). Only tensors, plain containers and {allowed} are accepted."
    )


def check_tensor_dict(state_dict, what: str) -> dict:
    """`state_dict` when it maps names (str) to tensors; else ValueError naming `what` and what it holds (a damaged
    or foreign file, refused before any of its keys or shapes is read)."""
    if not isinstance(state_dict, dict):
        raise ValueError(f"{what} must be a dict of tensors, got {type(state_dict).__name__}")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in state_dict.items()
           if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise ValueError(f"{what} must map names to tensors; it holds {bad[:10]}"
                         + (" (and more)" if len(bad) > 10 else ""))
    return state_dict


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    """Drop a leading `prefix` (e.g. DataParallel's `module.`) from every key that has it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_exact_state_dict(model: torch.nn.Module, state_dict: dict, source: str, official_names: dict | None = None,
                          dtype: torch.dtype | None = None):
    """Load `state_dict` into `model` (built on the meta device or not) only if it has exactly the model's keys
    and shapes; tensors are assigned (no copy when `dtype` matches). `official_names` maps our key -> the
    checkpoint's name, for error messages. Raises ValueError listing every missing, unused or misshapen key."""
    expected = model.state_dict()
    name = (official_names or {}).get
    missing = [f"{name(k, k)}" + (f" (-> {k})" if name(k) else "") for k in expected if k not in state_dict]
    unused = [k for k in state_dict if k not in expected]
    if missing or unused:
        raise ValueError(
            f"{source} does not match the model: missing {len(missing)} tensor(s) {missing[:20]}; unused "
            f"{len(unused)} tensor(s) {unused[:20]}" + (" (and more)" if max(len(missing), len(unused)) > 20 else "")
        )
    bad = [f"{name(k, k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
           for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(f"{source}: tensor shapes do not match the model: {bad[:20]}")
    not_float = [k for k, v in state_dict.items() if not v.is_floating_point()]
    if not_float:
        raise ValueError(f"{source}: expected floating-point weights, got integer tensors {not_float[:20]}")
    if dtype is not None:
        state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model
