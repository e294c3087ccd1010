"""FLOP accounting for training throughput: FLOPs per token, device peaks, model FLOPs utilisation (MFU)."""

import math

import torch


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix multiplies (every Linear weight; embeddings are lookups)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def training_flops_per_token(matmul_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM's convention: 6 * N for the weight matmuls plus
    12 * L * D * S for attention scores and weighted values over the full S x S matrix (masked entries counted,
    activation recomputation not counted)."""
    return 6.0 * matmul_params + 12.0 * num_layers * hidden_size * seq_len


# dense bf16 tensor-core peaks (FLOP/s) by device-name substring, most specific first
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device (`override_tflops` wins), None when unknown (e.g. CPU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def estimate_mfu(tokens_per_second: float, flops_per_token: float, num_devices: int,
                 peak_flops_per_device: float | None) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved training FLOP/s over the devices' peak (NaN if unknown)."""
    if not peak_flops_per_device or not math.isfinite(tokens_per_second):
        return float("nan")
    return tokens_per_second * flops_per_token / (num_devices * peak_flops_per_device)
