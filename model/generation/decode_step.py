"""The one-token decoding path of `Transformer`: the same function as `forward` with a cache, with fewer ops.

Decoding a small model is bound by the work per op, not by arithmetic: each step runs every layer on [B, dim]. So
the step works on 2-D activations, calls `decode_linear` and `F.layer_norm` on plain weight tensors, rotates q and k
with one complex multiply made once for all layers, writes the cache with `select().copy_()`, and builds no
causal mask (one new token sees every cached column). The weights are gathered once per generation
(`decode_weights`): module calls and attribute lookups were a quarter of the tiny model's step. Large fp32 weights
on the CPU go through `decode_linear`, which picks BLAS's matrix-matrix kernel over its matrix-vector one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.lm.transformer import KVCache, Transformer, apply_rotary, head_layer_norm, rms_norm, rotary_angles


class LayerNormWeights(NamedTuple):
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


class LayerWeights(NamedTuple):
    """One block's tensors, as `TransformerBlock` holds them."""

    layer_id: int
    swin_norm: bool
    attention_norm: torch.Tensor
    attention_norm_eps: float
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    q_norm: LayerNormWeights | None
    k_norm: LayerNormWeights | None
    ffn_norm: torch.Tensor
    ffn_norm_eps: float
    w1: torch.Tensor
    w3: torch.Tensor
    w2: torch.Tensor


class DecodeWeights(NamedTuple):
    """The model's tensors and shapes that `decode_step` reads (the same tensor objects: in-place updates show)."""

    embedding: torch.Tensor
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor
    norm_eps: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float
    dropout: float  # the model's dropout if it is in training mode, else 0


def _layer_norm(module) -> LayerNormWeights | None:
    return None if module is None else LayerNormWeights(module.weight, module.bias, module.eps)


def decode_weights(model: Transformer) -> DecodeWeights:
    """Gather the tensors `decode_step` needs; do it again after replacing (not updating in place) any parameter."""
    cfg = model.config
    layers = []
    for block in model.layers:
        attention, ffn = block.attention, block.feed_forward
        layers.append(
            LayerWeights(
                layer_id=block.layer_id,
                swin_norm=block.swin_norm,
                attention_norm=block.attention_norm.weight,
                attention_norm_eps=block.attention_norm.eps,
                wq=attention.wq.weight,
                wk=attention.wk.weight,
                wv=attention.wv.weight,
                wo=attention.wo.weight,
                q_norm=_layer_norm(attention.q_normalization),
                k_norm=_layer_norm(attention.k_normalization),
                ffn_norm=block.ffn_norm.weight,
                ffn_norm_eps=block.ffn_norm.eps,
                w1=ffn.w1.weight,
                w3=ffn.w3.weight,
                w2=ffn.w2.weight,
            )
        )
    return DecodeWeights(
        embedding=model.tok_embeddings.weight,
        layers=tuple(layers),
        norm=model.norm.weight,
        norm_eps=model.norm.eps,
        n_heads=cfg.n_heads,
        n_kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        dropout=cfg.dropout if model.training else 0.0,
    )


# `decode_linear` takes the matrix-matrix path for fp32 CPU weights at least this big (elements and input width).
# Measured (docs/performance.md): MKL's sgemv streams a 768x768 weight at 2.3x the time of sgemm with two
# right-hand columns, 2.6x at 2048x768 and 2.7x at 8192x768; below 256x256, and for input width 64, the extra
# ops cost more than they save. bf16 weights go to oneDNN, whose F.linear is already the faster one.
_MM_MIN_ELEMENTS = 1 << 16
_MM_MIN_IN_FEATURES = 256


def decode_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for decoding's few rows, x [B, in] -> [B, out] (contiguous); large fp32 CPU weights take
    W @ x.T (x doubled when B = 1), which BLAS streams at memory speed where its matrix-vector kernel does not."""
    if (  # cheapest test first: small models call this ~10 times per token
        weight.numel() < _MM_MIN_ELEMENTS
        or weight.shape[1] < _MM_MIN_IN_FEATURES
        or weight.dtype != torch.float32
        or weight.device.type != "cpu"
    ):
        return F.linear(x, weight)
    if x.shape[0] == 1:  # column 0 of [out, 2] has stride 2: copy it (view_as_complex needs stride 1 later)
        return torch.mm(weight, x.expand(2, -1).contiguous().t())[:, 0].unsqueeze(0).contiguous()
    return torch.mm(weight, x.t()).t().contiguous()


def _rotate_heads(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` for one fp32 token, x [B, H, hd] and rotation [B, 1, hd / 2]: through a complex view of x."""
    b, h, hd = x.shape
    return torch.view_as_real(torch.view_as_complex(x.view(b, h, hd // 2, 2)) * rotation).view(b, h, hd)


def _attention(
    x: torch.Tensor,
    w: DecodeWeights,
    layer: LayerWeights,
    rope,
    cache: KVCache,
    pos: int | torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    b, hd = x.shape[0], w.head_dim
    q = decode_linear(x, layer.wq).view(b, w.n_heads, hd)
    k = decode_linear(x, layer.wk).view(b, w.n_kv_heads, hd)
    v = decode_linear(x, layer.wv).view(b, w.n_kv_heads, hd)
    if layer.q_norm is not None:
        q, k = head_layer_norm(q, *layer.q_norm), head_layer_norm(k, *layer.k_norm)
    if rope.rotation is None or q.dtype != torch.float32:
        q, k = apply_rotary(q[:, None], *rope)[:, 0], apply_rotary(k[:, None], *rope)[:, 0]
    else:
        rotation = rope.rotation[:, 0]
        q, k = _rotate_heads(q, rotation), _rotate_heads(k, rotation)
    keys, values = cache.update_one(layer.layer_id, pos, k, v)
    gqa = w.n_heads != w.n_kv_heads
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, enable_gqa=gqa)
    return decode_linear(out.view(b, -1), layer.wo)


def _feed_forward(x: torch.Tensor, layer: LayerWeights) -> torch.Tensor:
    return decode_linear(F.silu(decode_linear(x, layer.w1)) * decode_linear(x, layer.w3), layer.w2)


def _block(
    h: torch.Tensor,
    w: DecodeWeights,
    layer: LayerWeights,
    rope,
    cache: KVCache,
    pos: int | torch.Tensor,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """`TransformerBlock.forward` for one token per row: pre-norm, or the swin order (norms after sub-layers)."""
    p = w.dropout
    attn_eps, ffn_eps = layer.attention_norm_eps, layer.ffn_norm_eps
    if layer.swin_norm:
        h = h + _drop(rms_norm(_attention(h, w, layer, rope, cache, pos, mask), layer.attention_norm, attn_eps), p)
        return h + _drop(rms_norm(_feed_forward(h, layer), layer.ffn_norm, ffn_eps), p)
    h = h + _drop(_attention(rms_norm(h, layer.attention_norm, attn_eps), w, layer, rope, cache, pos, mask), p)
    return h + _drop(_feed_forward(rms_norm(h, layer.ffn_norm, ffn_eps), layer), p)


def _drop(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p, training=True) if p > 0 else x


def decode_step(
    weights: DecodeWeights,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    pos: int | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final normed hidden states [B, dim] of one new token per row (tokens and positions [B]), written to `cache`
    column `pos`; `mask` [B, pos + 1] (bool) marks the columns each row attends (None: every one).

    Equals `forward(tokens[:, None], positions[:, None], cache=cache, start_pos=pos)` before the output layer.
    With `pos` a one-element long tensor (fixed shapes, for a CUDA graph) every cache column is attended and `mask`
    [B, max_len] is required: it must leave out the columns after `pos`.
    """
    if isinstance(pos, torch.Tensor) and mask is None:
        raise ValueError("decode_step over the whole cache (tensor pos) needs a mask hiding the columns after pos")
    rope = rotary_angles(positions[:, None], weights.head_dim, weights.rope_theta, complex_rotation=True)
    attn_mask = None if mask is None else mask[:, None, None, :]
    h = F.embedding(tokens, weights.embedding)
    for layer in weights.layers:
        h = _block(h, weights, layer, rope, cache, pos, attn_mask)
    return rms_norm(h, weights.norm, weights.norm_eps)
