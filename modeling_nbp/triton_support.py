"""Where this project's Triton kernels (`decode_kernels`, `loss_kernels`, `norm_kernels`) can run."""

import importlib.util
import os

import torch


def require_triton(device: torch.device, option: str) -> None:
    """Raise a ValueError naming `option` unless Triton kernels can run on `device`: a CUDA device, or the CPU under
    Triton's interpreter (TRITON_INTERPRET=1, for testing), with the triton package installed."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (device.type == "cuda" or (device.type == "cpu" and interpreted)):
        raise ValueError(f"{option} runs on a CUDA device (got {device}; on CPU only under Triton's interpreter, "
                         "TRITON_INTERPRET=1, for testing)")
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"{option} needs the triton package (pip install triton; CUDA builds of torch bring it)")
