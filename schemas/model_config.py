"""ModelConfig: the Chameleon transformer's shape, from a preset (`tiny`, the proxies, `7b`, `34b`) plus overrides."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from schemas.config_base import StrictModel
from schemas.vocab import CHAMELEON_VOCAB_SIZE, TINY

ModelPreset = Literal["tiny", "proxy-1m", "proxy-5m", "proxy-20m", "7b", "34b"]
# Meta's QK-norm is torch.nn.LayerNorm(head_dim) (default eps) and HF's ChameleonLayerNorm hard-codes it.
QK_NORM_EPS = 1e-5

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to train in seconds on a laptop CPU; GQA on so tests cover it.
    "tiny": {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "ffn_dim": 176,
        "vocab_size": TINY.vocab_size,
        "max_seq_len": 512,
    },
    # Mixture-search proxies (RegMix-style), named by their non-embedding parameters: 1.0M, 4.7M and 21M. Their
    # vocabulary is the data's: a mixture search sets vocab_size from the stage (MixtureSearchConfig).
    "proxy-1m": {
        "dim": 128,
        "n_layers": 5,
        "n_heads": 4,
        "n_kv_heads": 4,
        "ffn_dim": 344,
        "vocab_size": TINY.vocab_size,
        "max_seq_len": 2048,
    },
    "proxy-5m": {
        "dim": 256,
        "n_layers": 6,
        "n_heads": 4,
        "n_kv_heads": 4,
        "ffn_dim": 688,
        "vocab_size": TINY.vocab_size,
        "max_seq_len": 2048,
    },
    "proxy-20m": {
        "dim": 384,
        "n_layers": 12,
        "n_heads": 6,
        "n_kv_heads": 6,
        "ffn_dim": 1024,
        "vocab_size": TINY.vocab_size,
        "max_seq_len": 2048,
    },
    "7b": {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "n_kv_heads": 32,
        "ffn_dim": 11008,
        "vocab_size": CHAMELEON_VOCAB_SIZE,
        "max_seq_len": 4096,
    },
    "34b": {
        "dim": 8192,
        "n_layers": 48,
        "n_heads": 64,
        "n_kv_heads": 8,
        "ffn_dim": 22016,
        "vocab_size": CHAMELEON_VOCAB_SIZE,
        "max_seq_len": 4096,
        "swin_norm": True,
        "qk_norm_groups": 4,  # Meta's 30B/34B release: 4 model-parallel shards, each with its own QK-norm
    },
}


class ModelConfig(StrictModel):
    """LLaMA-2 shape plus QK-norm and optional norm reordering (swin norm); untied embeddings, no biases."""

    preset: ModelPreset | None = Field(None, description="start from this preset; other keys override it")
    dim: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0, description="< n_heads for grouped-query attention (34B: 8)")
    ffn_dim: int = Field(gt=0, description="SwiGLU hidden size")
    vocab_size: int = Field(gt=0)
    max_seq_len: int = Field(4096, gt=0)
    norm_eps: float = Field(1e-5, gt=0.0, description="epsilon of the RMSNorms (HF: rms_norm_eps)")
    qk_norm_eps: float = Field(
        QK_NORM_EPS,
        gt=0.0,
        description="epsilon of the QK-norm LayerNorms; Meta and Hugging Face fix it at 1e-5 "
        "whatever norm_eps is, so only 1e-5 converts to their formats",
    )
    rope_theta: float = Field(10_000.0, gt=0.0)
    qk_norm: bool = True
    qk_norm_groups: int = Field(
        1,
        ge=1,
        description="distinct QK-norm affines, each for an equal run of heads: 1 (7B), or one per "
        "model-parallel shard of Meta's release, which normalised each shard's heads with that shard's own (34B: 4)",
    )
    swin_norm: bool = Field(False, description="h = x + norm(attn(x)); out = h + norm(ffn(h)) (34B)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="0 in pretraining; SFT sets 0.05")
    init_std: float = Field(0.02, gt=0.0)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in MODEL_PRESETS:
            return {**MODEL_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check_heads(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.qk_norm and (self.n_heads % self.qk_norm_groups or self.n_kv_heads % self.qk_norm_groups):
            raise ValueError(
                f"qk_norm_groups {self.qk_norm_groups} must divide n_heads {self.n_heads} and n_kv_heads "
                f"{self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} (dim / n_heads) must be even for rotary embeddings")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_preset(cls, preset: ModelPreset, **overrides: Any) -> ModelConfig:
        """A preset's config with some fields changed."""
        return cls.model_validate({"preset": preset, **overrides})

    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and output matrices (how proxy sizes are named)."""
        return self.n_params() - 2 * self.vocab_size * self.dim

    def n_params(self) -> int:
        """Parameters of the transformer (embeddings and output included, norms too)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attn = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        ffn = 3 * self.dim * self.ffn_dim
        norms = 2 * self.dim + (4 * self.head_dim * self.qk_norm_groups if self.qk_norm else 0)
        return 2 * self.vocab_size * self.dim + self.n_layers * (attn + ffn + norms) + self.dim
