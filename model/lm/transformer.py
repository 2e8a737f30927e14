"""The Chameleon decoder-only transformer: LLaMA-2 with QK-norm and optional swin-norm ordering.

Parameter names follow Meta's un-fused `consolidated.pth` keys (`layers.{i}.attention.wq.weight`, ...), so a Meta
checkpoint loads with `load_state_dict` and no renaming. Rotary embeddings use Meta's layout: adjacent dimension
pairs (0, 1), (2, 3), ... are rotated together, not HF's rotate_half halves.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.lm.document_attention import (
    BlockMask,
    DocumentAttention,
    document_block_mask,
    document_mask,
    flex_document_attention,
    resolve_document_attention,
)
from model.lm.losses import DEFAULT_CHUNK_SIZE, LossOutput, fused_lm_loss
from schemas.model_config import ModelConfig


class Rope(NamedTuple):
    """The rotary angles of some positions, from `rotary_angles`: cos and sin [B, S, head_dim // 2], and for
    decoding the complex exp(i·angle) [B, S, 1, head_dim // 2] made once for all layers."""

    cos: torch.Tensor
    sin: torch.Tensor
    rotation: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension with a learned scale and no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, computed in fp32 (the mean of squares loses
    precision in bf16). Written out: torch's own rms_norm is slower on CPU for decoding's small inputs."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


@lru_cache(maxsize=16)
def _inverse_frequencies(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float, complex_rotation: bool = False) -> Rope:
    """cos and sin of the rotary angles, each [B, S, head_dim // 2], for integer `positions` [B, S]; with
    `complex_rotation` also exp(i·angle) for `apply_rotary` (decoding: made once instead of once per layer)."""
    angles = positions.to(torch.float32)[..., None] * _inverse_frequencies(head_dim, theta, positions.device)
    cos, sin = angles.cos(), angles.sin()
    return Rope(cos, sin, torch.complex(cos, sin)[:, :, None, :] if complex_rotation else None)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotate adjacent pairs (x[..., 2i], x[..., 2i+1]) of `x` [B, S, H, hd] by the angles (Meta's layout).

    As Meta does it: each pair is a complex number times exp(i·angle), one fused complex multiply (and one in
    backward) instead of strided real arithmetic on the even and odd lanes and a stack.
    """
    if torch.compiler.is_compiling():  # the compiler fuses the real form; complex tensors would break its graph
        pairs = x.float().unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    if rotation is None:
        rotation = torch.complex(cos, sin)[:, :, None, :]  # broadcast over heads
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class KVCache:
    """Keys and values of past tokens for every layer, preallocated as [B, n_kv_heads, max_len, head_dim]."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.max_len = max_len
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, S, hd] at positions start_pos.. and return all keys and values up to the last one."""
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write up to {end}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def update_one(
        self, layer: int, pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`update` for one position: k, v [B, n_kv, hd] stored at column `pos`; keys and values up to it.

        `pos` as a one-element long tensor on the cache's device (CUDA graphs: no host value) returns every column.
        """
        keys, values = self.keys[layer], self.values[layer]
        if isinstance(pos, torch.Tensor):
            keys.index_copy_(2, pos, k[:, :, None].to(keys.dtype))  # index_copy_ does not cast, copy_ does
            values.index_copy_(2, pos, v[:, :, None].to(values.dtype))
            return keys, values
        if pos >= self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; asked to write position {pos}")
        keys.select(2, pos).copy_(k)  # select + copy: fewer ops than slice indexing, on every decoded token
        values.select(2, pos).copy_(v)
        return keys.narrow(2, 0, pos + 1), values.narrow(2, 0, pos + 1)


def head_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over head_dim of x [..., heads, head_dim]; weight and bias [head_dim] (every head), or
    [groups, head_dim], group g applying to the g-th equal run of heads."""
    if weight.dim() == 1:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    per_group = x.shape[-2] // weight.shape[0]
    normed = F.layer_norm(x, (x.shape[-1],), None, None, eps)
    return normed * weight.repeat_interleave(per_group, 0) + bias.repeat_interleave(per_group, 0)


class GroupedLayerNorm(nn.Module):
    """QK-norm with one [head_dim] affine per group of heads (Meta's 34B: one per model-parallel shard)."""

    def __init__(self, groups: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, head_dim))
        self.bias = nn.Parameter(torch.zeros(groups, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_layer_norm(x, self.weight, self.bias, self.eps)


class Attention(nn.Module):
    """Grouped-query self-attention with QK-norm (LayerNorm per head, before rotary) and rotary embeddings."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        # QK-norm has its own eps (config.qk_norm_eps, 1e-5 as in Meta's and HF's), not the RMSNorms' norm_eps.
        if config.qk_norm and config.qk_norm_groups > 1:
            self.q_normalization = GroupedLayerNorm(config.qk_norm_groups, self.head_dim, config.qk_norm_eps)
            self.k_normalization = GroupedLayerNorm(config.qk_norm_groups, self.head_dim, config.qk_norm_eps)
        elif config.qk_norm:
            # One [head_dim] affine shared by all heads, as in Meta's single-shard checkpoint.
            self.q_normalization = nn.LayerNorm(self.head_dim, eps=config.qk_norm_eps)
            self.k_normalization = nn.LayerNorm(self.head_dim, eps=config.qk_norm_eps)
        else:
            self.q_normalization = self.k_normalization = None

    def project(
        self, x: torch.Tensor, positions: torch.Tensor, rope: Rope | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, S, H, hd], k and v [B, S, Hkv, hd]: projected, QK-normed, then rotated (q and k).

        `rope` is `rotary_angles(positions, ...)` when the caller computed it once for all layers.
        """
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim)
        if self.q_normalization is not None:
            q, k = self.q_normalization(q), self.k_normalization(k)
        rope = rope if rope is not None else rotary_angles(positions, self.head_dim, self.rope_theta)
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | BlockMask | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        start_pos: int = 0,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """Attention output [B, S, dim]; `mask` is a boolean SDPA mask, a FlexAttention block mask (packed documents),
        or None for plain causal attention."""
        b, s, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x, positions, rope))  # -> [B, heads, S, hd]
        n_rep = self.n_heads // self.n_kv_heads
        if isinstance(mask, BlockMask):
            out = flex_document_attention(q, k, v, mask, enable_gqa=n_rep > 1)
            return self.wo(out.transpose(1, 2).reshape(b, s, -1))
        if cache is not None:
            k, v = cache.update(layer, start_pos, k, v)
        if n_rep > 1 and cache is not None:
            # Decoding: SDPA reads each KV head for its group of q heads; no copy of the whole cache per step.
            total = k.shape[2]
            if mask is None and s > 1 and total != s:  # new tokens after cached ones: causal among themselves
                q_idx = torch.arange(total - s, total, device=k.device)
                mask = torch.arange(total, device=k.device)[None, :] <= q_idx[:, None]
            causal = mask is None and s > 1
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
            return self.wo(out.transpose(1, 2).reshape(b, s, -1))
        if n_rep > 1:
            # q head h reads kv head h // n_rep, as in Meta's and HF's GQA.
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        if mask is None and k.shape[2] == s:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """One layer: pre-norm (LLaMA) order, or with `swin_norm` the 34B order that normalises sub-layer outputs."""

    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.swin_norm = config.swin_norm
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.ffn_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | BlockMask | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """Block output [B, S, dim]; `rope`: the rotary cos/sin of `positions` when computed once for all layers."""
        attn_args = (positions, mask, cache, self.layer_id, start_pos, rope)
        if self.swin_norm:
            h = x + self.attn_dropout(self.attention_norm(self.attention(x, *attn_args)))
            return h + self.ffn_dropout(self.ffn_norm(self.feed_forward(h)))
        h = x + self.attn_dropout(self.attention(self.attention_norm(x), *attn_args))
        return h + self.ffn_dropout(self.feed_forward(self.ffn_norm(h)))


def init_module_(module: nn.Module, init_std: float) -> None:
    """The transformer's init of one module's own parameters, in place: normal(0, init_std) for Linear and Embedding
    weights (drawn from torch's default generator), norm scales 1 and biases 0; other modules are left alone.

    Kept per module so that a sharded model can be initialised one full tensor at a time with the very draws of
    `Transformer.reset_parameters` (model/training/parallelize.py)."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=init_std)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, nn.LayerNorm | GroupedLayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class Transformer(nn.Module):
    """Token ids [B, S] -> logits [B, S, vocab]; untied embeddings and output, final RMSNorm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # The kernel for `doc_ids` masking (`model.lm.document_attention`); the trainer sets it from its config.
        self.document_attention: DocumentAttention = "auto"
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: ModelConfig) -> Transformer:
        """A freshly initialised model of this shape."""
        return cls(config)

    def reset_parameters(self) -> None:
        """normal(0, init_std) for Linear and Embedding weights; norm scales 1 and biases 0 (`init_module_`, each
        module in `modules()` order: the order of the generator's draws)."""
        for module in self.modules():
            init_module_(module, self.config.init_std)

    def num_params(self) -> int:
        """Number of parameters (embeddings, output and norms included)."""
        return sum(p.numel() for p in self.parameters())

    def make_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on the model's device and dtype, for up to `max_len` (default max_seq_len) tokens."""
        p = self.output.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, device=p.device, dtype=p.dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
        *,
        loss_mask: torch.Tensor | None = None,
        z_loss_weight: float = 1e-5,
        image_token_mask: torch.Tensor | None = None,
        loss_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> torch.Tensor | LossOutput:
        """Logits [B, S, vocab] for `tokens` [B, S]; or, given `loss_mask`, the training loss without any logits.

        `positions` [B, S] default to start_pos, start_pos+1, ...; `doc_ids` [B, S] restrict attention to the same
        document (packed sequences); with `cache`, the tokens continue the cached ones from `start_pos`.

        With `loss_mask` [B, S] the result is `fused_lm_loss` of the final hidden states and the output layer: the
        same values and gradients as `lm_loss(logits, tokens, loss_mask, z_loss_weight, image_token_mask)`, computed
        `loss_chunk_size` supervised positions at a time so the [B, S, vocab] logits never exist. The loss is
        computed inside `forward` so that a DDP or FSDP wrapper sees the output weight used in its forward (DDP
        all-reduces its gradient, FSDP gathers and reduce-scatters it) exactly as in the logits path.
        """
        b, s = tokens.shape
        if positions is None:
            positions = torch.arange(start_pos, start_pos + s, device=tokens.device).expand(b, s)
        mask = None
        if doc_ids is not None:
            if cache is not None:
                raise ValueError("doc_ids (document masking) is for training; decoding with a cache takes none")
            kernel = resolve_document_attention(self.document_attention, tokens.device, self.config.head_dim)
            mask = document_block_mask(doc_ids) if kernel == "flex" else document_mask(doc_ids)
        elif cache is not None and s > 1 and start_pos > 0:
            # New tokens see every cached one and are causal among themselves.
            q_idx = torch.arange(start_pos, start_pos + s, device=tokens.device)
            mask = torch.arange(start_pos + s, device=tokens.device)[None, :] <= q_idx[:, None]
        rope = rotary_angles(positions, self.config.head_dim, self.config.rope_theta)  # once, not once per layer
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, positions, mask, cache, start_pos, rope=rope)
        h = self.norm(h)
        if loss_mask is None:
            return self.output(h)
        return fused_lm_loss(h, self.output.weight, tokens, loss_mask, z_loss_weight, image_token_mask, loss_chunk_size)
