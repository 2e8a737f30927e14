"""Model FLOPs utilisation: training FLOPs per token and the dense bf16 peak of the accelerators we know.

Kept free of the trainer's imports (data loading, TensorBoard) so GPU benchmarks can use it on a bare image.
"""

from __future__ import annotations

import torch

# Dense bf16 peak FLOP/s of accelerators we know, for MFU; unknown devices (CPUs) report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def flops_per_token(n_params: int, n_layers: int, dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus 12·L·d·S for attention (PaLM's accounting)."""
    return 6 * n_params + 12 * n_layers * dim * seq_len


def matmul_params(model: torch.nn.Module) -> int:
    """The N of 6N: parameters that multiply, i.e. all but the input embedding table (a lookup; the output is
    untied, so it counts)."""
    return sum(p.numel() for name, p in model.named_parameters() if name != "tok_embeddings.weight")


def device_peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of `device` if it is a GPU we know, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS.items() if key in name), None)
