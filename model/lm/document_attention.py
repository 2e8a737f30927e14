"""Attention within packed documents: a dense boolean mask for SDPA, or a FlexAttention block mask on CUDA.

A dense [B, 1, S, S] mask rules out SDPA's flash kernel on GPUs and makes every query read every key. FlexAttention
takes the same rule as a `mask_mod`, skips the 128 x 128 blocks that are entirely outside a document, and runs one
fused Triton kernel. It needs `torch.compile` to be fast, and it has no CPU backward, so CPU training keeps SDPA.
"""

from __future__ import annotations

from functools import cache
from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from schemas.train_config import DocumentAttention


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, S, S]: causal, within one document; padding (-1) attends only to itself."""
    s = doc_ids.shape[1]
    idx = torch.arange(s, device=doc_ids.device)
    causal = idx[None, :] <= idx[:, None]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    not_pad = (doc_ids != -1)[:, :, None]
    diagonal = torch.eye(s, dtype=torch.bool, device=doc_ids.device)
    # The diagonal keeps every row non-empty, so padding rows softmax to a finite value instead of NaN.
    return ((causal & same_doc & not_pad) | diagonal)[:, None]


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The rule of `document_mask` as a FlexAttention `BlockMask` (shared by all heads), on `doc_ids`' device."""
    b, s = doc_ids.shape

    def within_document(batch, head, q, kv):  # FlexAttention's mask_mod signature; head unused
        doc_q = doc_ids[batch, q]
        return ((q >= kv) & (doc_q == doc_ids[batch, kv]) & (doc_q != -1)) | (q == kv)

    return _compiled(create_block_mask)(within_document, b, None, s, s, device=doc_ids.device)


# FlexAttention's Triton kernel needs head_dim >= 16 (tl.dot); smaller heads keep SDPA on CUDA too.
FLEX_MIN_HEAD_DIM = 16


def resolve_document_attention(
    choice: DocumentAttention, device: torch.device, head_dim: int
) -> Literal["sdpa", "flex"]:
    """`auto` is FlexAttention on CUDA (heads of 16+ dims) and SDPA with a dense mask elsewhere."""
    if choice == "auto":
        return "flex" if device.type == "cuda" and head_dim >= FLEX_MIN_HEAD_DIM else "sdpa"
    if choice == "flex" and device.type == "cuda" and head_dim < FLEX_MIN_HEAD_DIM:
        raise ValueError(
            f"FlexAttention on CUDA needs head_dim >= {FLEX_MIN_HEAD_DIM}, this model's is {head_dim}: "
            "use document_attention 'sdpa'"
        )
    return choice


@cache
def _compiled(function):
    # Compiled once per process. Eager flex_attention is an unfused reference that materialises the scores; eager
    # create_block_mask materialises [B, S, S] intermediates (GBs at 4 x 4,096) and takes 20x longer. A new doc_ids
    # tensor of the same shape reuses the compiled code (the mask_mod's closure is a graph input, not a guard).
    return torch.compile(function)


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool
) -> torch.Tensor:
    """Attention [B, H, S, hd] of q [B, H, S, hd] over k, v [B, Hkv, S, hd] under `block_mask`, compiled."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise ValueError(
            "FlexAttention has no backward on CPU: train on CPU with document_attention 'sdpa' (or 'auto')"
        )
    # Under autocast QK-norm's LayerNorm gives fp32 q and k while v is bf16. SDPA is on autocast's cast list, flex
    # is not in every torch version (mixed dtypes then fail to lower, or run as fp32 kernels): cast as SDPA would.
    q, k = q.to(v.dtype), k.to(v.dtype)
    if q.device.type == "cpu":  # inductor's CPU flex template takes plain buffers, not views (torch 2.13)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _compiled(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
