"""AdamW with weight decay on weight matrices only, and a gradient clip that reports non-finite gradients."""

from __future__ import annotations

import math

import torch
from torch import nn

from schemas.train_config import OptimizerConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: the weights of Linear and Embedding layers decayed; norms (QK-norm too), biases not."""
    # Decay shrinks matrices toward 0; on a norm's gain or a bias it would only pull toward a worse init. By layer
    # type, not by shape: a per-group QK-norm gain is 2-D too.
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear | nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if id(p) in matrices else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def _fused_kernel_fits(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all parameters) takes plain CPU / CUDA floating tensors; FSDP2's
    DTensor shards keep the default (foreach) implementation."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(
        not isinstance(p, DTensor)
        and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )


def make_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with `config`'s lr, betas and eps; weight decay on weight matrices only (see `param_groups`).

    Fused where the parameters allow it: the same update as the foreach form (to float rounding) in one pass over
    each tensor instead of one per operation (5-8x faster on CPU at ~100M parameters).
    """
    groups = param_groups(model, config.weight_decay)
    fused = _fused_kernel_fits([p for group in groups for p in group["params"]])
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=True if fused else None
    )


def clip_and_check(model: nn.Module, max_norm: float) -> tuple[float, bool]:
    """Clip the global grad norm to `max_norm`; return (pre-clip norm, finite?) so the caller can skip the step."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0, True
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    norm = float(total)
    finite = math.isfinite(norm)
    # Only clip a finite norm: scaling by max_norm/inf or /nan would zero or poison grads the caller discards anyway.
    if finite:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)  # takes parameters, reads .grad
    return norm, finite
