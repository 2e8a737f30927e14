"""VQConfig: the VQGAN image tokenizer's shape (taming-transformers `ddconfig` + codebook), from a preset.

Field names follow taming-transformers / Meta's `vqgan.yaml` so a config round-trips to that file unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from schemas.config_base import StrictModel
from schemas.vocab import CHAMELEON, TINY

VQPreset = Literal["tiny", "chameleon"]

# GroupNorm(32) follows every conv stage, so every channel count must split into 32 groups.
NORM_GROUPS = 32

VQ_PRESETS: dict[str, dict[str, Any]] = {
    # Meta's released tokenizer: 512 px -> 32x32 codes from an 8192 x 256 codebook.
    "chameleon": {
        "resolution": 512,
        "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4],
        "num_res_blocks": 2,
        "attn_resolutions": [],
        "z_channels": 256,
        "n_embed": CHAMELEON.image_codes,
        "embed_dim": 256,
    },
    # Tests and the demo: 64 px -> 8x8 codes from 256 codes (schemas.vocab.TINY); z != embed_dim on purpose
    # so quant_conv / post_quant_conv really change the channel count.
    "tiny": {
        "resolution": 64,
        "ch": 32,
        "ch_mult": [1, 2, 2, 4],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "z_channels": 64,
        "n_embed": TINY.image_codes,
        "embed_dim": 32,
    },
}


class VQConfig(StrictModel):
    """A taming-style VQGAN: conv encoder / decoder, attention in the middle block, one codebook."""

    preset: VQPreset | None = Field(None, description="start from this preset; other keys override it")
    resolution: int = Field(gt=0, description="training image side in pixels; sets where attn_resolutions apply")
    in_channels: int = Field(3, gt=0)
    out_ch: int = Field(3, gt=0)
    ch: int = Field(gt=0, description="base channel count")
    ch_mult: list[int] = Field(min_length=1, description="channel multiplier per level; levels - 1 halvings")
    num_res_blocks: int = Field(gt=0, description="residual blocks per encoder level (decoder: one more)")
    attn_resolutions: list[int] = Field(
        default_factory=list, description="feature sides that get an attention block after each residual block"
    )
    z_channels: int = Field(gt=0)
    double_z: bool = Field(False, description="must be False for a VQ model (True is for KL autoencoders)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    n_embed: int = Field(gt=1, description="codebook size")
    embed_dim: int = Field(gt=0, description="codebook vector size")
    beta: float = Field(0.25, ge=0.0, description="weight of the codebook term in taming's legacy VQ loss")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in VQ_PRESETS:
            return {**VQ_PRESETS[data["preset"]], **data}
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> VQConfig:
        if self.double_z:
            raise ValueError("double_z must be False: the quantizer takes z_channels, not a mean and a variance")
        if any(m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult entries must be positive, got {self.ch_mult}")
        bad = sorted({self.ch * m for m in [1, *self.ch_mult] if (self.ch * m) % NORM_GROUPS})
        if bad:
            raise ValueError(f"channel counts {bad} (ch x ch_mult) must be multiples of {NORM_GROUPS} for GroupNorm")
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} must be divisible by 2**(len(ch_mult)-1) = {self.downsample_factor}"
            )
        return self

    @property
    def downsample_factor(self) -> int:
        """Pixels per code along one side."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        """Codes per image side at `resolution` (Chameleon: 32)."""
        return self.resolution // self.downsample_factor

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @classmethod
    def from_preset(cls, preset: VQPreset, **overrides: Any) -> VQConfig:
        """A preset's config with some fields changed."""
        return cls.model_validate({"preset": preset, **overrides})

    def n_params(self, with_decoder: bool = True) -> int:
        """Parameters of the VQGAN built from this config (decoder and post_quant_conv only if `with_decoder`)."""
        return _count_params(self, with_decoder)


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def _resnet(c_in: int, c_out: int) -> int:
    shortcut = _conv(c_in, c_out, 1) if c_in != c_out else 0
    return 2 * c_in + _conv(c_in, c_out, 3) + 2 * c_out + _conv(c_out, c_out, 3) + shortcut


def _attn(c: int) -> int:
    return 2 * c + 4 * _conv(c, c, 1)


def _count_params(cfg: VQConfig, with_decoder: bool) -> int:
    levels = len(cfg.ch_mult)
    # Encoder: conv_in, levels of res blocks (+ attention) and downsamples, mid, norm_out, conv_out.
    total = _conv(cfg.in_channels, cfg.ch, 3)
    c_in, res = cfg.ch, cfg.resolution
    for i, m in enumerate(cfg.ch_mult):
        c_out = cfg.ch * m
        for _ in range(cfg.num_res_blocks):
            total += _resnet(c_in, c_out) + (_attn(c_out) if res in cfg.attn_resolutions else 0)
            c_in = c_out
        if i != levels - 1:
            total += _conv(c_in, c_in, 3)
            res //= 2
    total += 2 * _resnet(c_in, c_in) + _attn(c_in) + 2 * c_in + _conv(c_in, cfg.z_channels, 3)
    total += _conv(cfg.z_channels, cfg.embed_dim, 1) + cfg.n_embed * cfg.embed_dim
    if not with_decoder:
        return total
    # Decoder mirrors it with num_res_blocks + 1 blocks per level and nearest-upsample convs.
    total += _conv(cfg.embed_dim, cfg.z_channels, 1)
    c_in, res = cfg.ch * cfg.ch_mult[-1], cfg.grid
    total += _conv(cfg.z_channels, c_in, 3) + 2 * _resnet(c_in, c_in) + _attn(c_in)
    for i in reversed(range(levels)):
        c_out = cfg.ch * cfg.ch_mult[i]
        for _ in range(cfg.num_res_blocks + 1):
            total += _resnet(c_in, c_out) + (_attn(c_out) if res in cfg.attn_resolutions else 0)
            c_in = c_out
        if i != 0:
            total += _conv(c_in, c_in, 3)
            res *= 2
    return total + 2 * c_in + _conv(c_in, cfg.out_ch, 3)
