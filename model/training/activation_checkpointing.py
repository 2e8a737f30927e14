"""Activation checkpointing of transformer blocks: recompute a block's activations in the backward pass instead of
keeping them from the forward pass, trading compute for memory.

Each chosen block's `forward` is replaced, on that block only, by one that runs the original forward under
`torch.utils.checkpoint.checkpoint` (non-reentrant). No wrapper module is inserted, so parameter names and
`state_dict` keys stay Meta's (`layers.{i}.attention.wq.weight`, ...); `torch.distributed`'s `checkpoint_wrapper`
would add `_checkpoint_wrapped_module.` to every key. FSDP2's hooks and `Module.compile` act on `Module.__call__`,
which calls the replaced `forward`, so the order is: checkpointing, then `block.compile()`, then `fully_shard`.

Dropout stays exact: the checkpoint saves the RNG state before the forward and restores it for the recompute, so the
recomputed masks are the forward's.
"""

from __future__ import annotations

import types
from functools import cache, partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from model.lm.transformer import Transformer
from schemas.train_config import ActivationCheckpointConfig

_MODE_ATTRIBUTE = "activation_checkpointing"  # on a checkpointed block: "full" or "selective"


@cache
def _matmul_ops() -> frozenset[Any]:
    """The aten ops whose outputs selective checkpointing keeps: the matmuls (what a linear layer becomes) and every
    fused attention kernel (CPU flash, CUDA flash, memory-efficient, cuDNN; FlexAttention under compile)."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default}
    ops.update(getattr(aten, name).default for name in names if hasattr(aten, name))
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    return frozenset(ops)


def _keep_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective policy: keep the outputs of matmuls and attention (the expensive ops), recompute the rest (norms,
    SiLU, rotary, dropout, additions: cheap, and most of a block's saved tensors)."""
    return CheckpointPolicy.MUST_SAVE if op in _matmul_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _checkpointed_forward(block: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The block's own forward under a non-reentrant checkpoint (bound to the block in place of `forward`)."""
    # type(block).forward: the class's forward, also after FSDP2 swaps the block's class for its sharded subclass.
    forward = partial(type(block).forward, block)
    if not torch.is_grad_enabled():  # evaluation, decoding: nothing is kept for a backward, nothing to recompute
        return forward(*args, **kwargs)
    # preserve_rng_state: the recompute starts from the forward's RNG state, so dropout draws the same masks again.
    # Two calls, not a context_fn variable: torch.compile accepts only a function named at the call.
    if getattr(block, _MODE_ATTRIBUTE) == "selective":
        return checkpoint(
            forward, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_selective_contexts, **kwargs
        )
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def checkpointed_blocks(n_layers: int, config: ActivationCheckpointConfig) -> list[int]:
    """The indexes of the blocks that `config` checkpoints out of `n_layers`: none, all (full, selective), or for
    every_k_blocks the first of each run of `every_k` (0, k, 2k, ...)."""
    if config.mode == "none":
        return []
    if config.mode == "every_k_blocks":
        return list(range(0, n_layers, config.every_k))
    return list(range(n_layers))


def apply_activation_checkpointing(model: Transformer, config: ActivationCheckpointConfig) -> int:
    """Checkpoint the blocks of `model.layers` that `config` chooses, in place; return how many.

    Call it before `block.compile()` and before `fully_shard` / DDP. Parameter names and `state_dict` keys are
    unchanged. Checkpointing a model twice is refused (the second call would nest checkpoints).
    """
    chosen = checkpointed_blocks(len(model.layers), config)
    mode = "selective" if config.mode == "selective" else "full"
    for index in chosen:
        block = model.layers[index]
        if hasattr(block, _MODE_ATTRIBUTE):
            raise ValueError(f"block {index} is already activation-checkpointed ({getattr(block, _MODE_ATTRIBUTE)})")
        setattr(block, _MODE_ATTRIBUTE, mode)
        # A bound method (not a closure): deepcopy and pickle of the model carry it over to the copy's own block.
        block.forward = types.MethodType(_checkpointed_forward, block)
    return len(chosen)
