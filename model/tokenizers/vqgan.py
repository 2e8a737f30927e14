"""The VQGAN image tokenizer: pixels in [-1, 1] -> a grid of codebook indices, and back.

Module and parameter names follow taming-transformers' `VQModel` (which Meta's Chameleon code copies), so
Meta's `vqgan.ckpt` and Hugging Face's `ChameleonVQVAE` weights load with strict key matching.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from schemas.vq_config import NORM_GROUPS, VQConfig

# Pixels are in [-1, 1]; allow float rounding from preprocessing, catch [0, 255] or uint8 mistakes.
PIXEL_RANGE_SLACK = 1e-3
# Rows of the [rows, n_embed] distance matrix computed at once (8192 rows x 8192 codes = 256 MiB in fp32).
DISTANCE_CHUNK_ROWS = 8192
# Bytes of input per band when GroupNorm gathers statistics (temporaries this size stay in cache).
STATS_BAND_BYTES = 4 << 20


class MissingDecoderError(RuntimeError):
    """decode() on a model loaded without decoder weights (Hugging Face's ChameleonVQVAE ships none)."""


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` (same parameters and names) whose statistics are accurate to fp32 rounding in any layout.

    PyTorch's CPU kernel for channels_last input accumulates sum(x) and sum(x^2) naively and takes their
    difference: where a group's mean is large against its spread (flat or smooth regions at 512 px) the variance
    cancels away (0.4 off a float64 reference where the contiguous kernel is 1e-5 off), and even a zero-mean group of
    a million values is 1e-4 off. Such input (CPU, not contiguous) takes a two-pass path here instead: per-channel
    means (cascade sums), then the sum of squares around the group mean, so nothing cancels. Contiguous input and
    other devices keep PyTorch's kernel, which is accurate for them.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.ndim != 4 or x.is_contiguous():
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return _group_norm_two_pass(x, self.num_groups, self.weight, self.bias, self.eps)


def _group_norm_two_pass(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Group norm of [B, C, H, W] in any memory layout (the output keeps it), statistics in fp32 or wider."""
    b, c, h, w = x.shape
    per_group, n = c // groups, (c // groups) * h * w
    stat_dtype = torch.promote_types(x.dtype, torch.float32)  # 16-bit input: statistics in fp32, as PyTorch does

    def to_groups(per_channel: Tensor) -> Tensor:  # [B, C] -> [B, groups]
        return per_channel.view(b, groups, per_group).sum(2)

    def to_channels(per_group_values: Tensor) -> Tensor:  # [B, groups] -> [B, C, 1, 1]
        return per_group_values.repeat_interleave(per_group, 1)[:, :, None, None]

    # Corrected two-pass: a first mean (cascade sums, accurate in either layout), then the sum and the sum of
    # squares of what is left around it, so the variance never comes from a difference of large numbers and the
    # first mean's own rounding is corrected too. Bands of rows keep the temporaries in cache.
    mean = to_channels(to_groups(x.sum((2, 3), dtype=stat_dtype)) / n)
    sums, squares = x.new_zeros(b, c, dtype=stat_dtype), x.new_zeros(b, c, dtype=stat_dtype)
    rows = max(1, STATS_BAND_BYTES // max(1, c * w * x.element_size() * b))
    for band in x.split(rows, dim=2):
        centred = band.to(stat_dtype) - mean
        sums += centred.sum((2, 3))
        squares += centred.square_().sum((2, 3))
    residual = to_groups(sums) / n
    var = to_groups(squares) / n - residual.square()
    scale = to_channels((var + eps).rsqrt())
    if weight is not None:
        scale = scale * weight[:, None, None]
    shift = -to_channels(residual) * scale
    if bias is not None:
        shift = shift + bias[:, None, None]
    # (x - mean) * scale + shift: rounding relative to the spread, not to the mean.
    out = x.to(stat_dtype) - mean
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return (out * scale + shift).to(x.dtype)
    return torch.addcmul(shift, out, scale, out=out).to(x.dtype)


def _norm(channels: int) -> GroupNorm:
    return GroupNorm(num_groups=NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: Tensor) -> Tensor:
    """x * sigmoid(x); in place when no autograd graph is being built (x is always a fresh norm output here)."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a 1x1 `nin_shortcut` when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions with 1x1-conv projections; residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: Tensor) -> Tensor:  # [B, C, H, W] -> [B, 1, H*W, C]; a view when channels_last
            return t.reshape(b, c, h * w).transpose(1, 2).unsqueeze(1)

        # SDPA's default scale is C^-0.5, as in taming's explicit softmax(q k^T / sqrt(C)) v.
        out = F.scaled_dot_product_attention(tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn)))
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv (taming's asymmetric downsample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: residual blocks, their attention blocks (often none) and an optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], attn: list[AttnBlock], resample: str | None, channels: int):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        if resample == "down":
            self.downsample = Downsample(channels)
        elif resample == "up":
            self.upsample = Upsample(channels)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Middle(nn.Module):
    """Residual block, attention, residual block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels [B, in_channels, H, W] -> z [B, z_channels, H/f, W/f] with f = 2**(len(ch_mult)-1)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        # Level i goes from ch*in_ch_mult[i] to ch*ch_mult[i], in_ch_mult = (1,) + ch_mult as in taming.
        in_ch_mult = (1, *cfg.ch_mult)
        levels, res = [], cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            c_in, c_out = cfg.ch * in_ch_mult[i], cfg.ch * mult
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks)]
            attn = [AttnBlock(c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            last = i == len(cfg.ch_mult) - 1
            levels.append(Level(blocks, attn, None if last else "down", c_out))
            res = res if last else res // 2
        self.down = nn.ModuleList(levels)
        top = cfg.ch * cfg.ch_mult[-1]
        self.mid = Middle(top, cfg.dropout)
        self.norm_out = _norm(top)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    """z [B, z_channels, h, w] -> pixels [B, out_ch, h*f, w*f]; num_res_blocks + 1 blocks per level, no tanh."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        c_in, res = cfg.ch * cfg.ch_mult[-1], cfg.grid
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = Middle(c_in, cfg.dropout)
        # Built from the lowest resolution up, stored by level index so names read decoder.up.{level}.
        levels: dict[int, Level] = {}
        for i in reversed(range(len(cfg.ch_mult))):
            c_out = cfg.ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out, cfg.dropout) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(c_out) for _ in blocks] if res in cfg.attn_resolutions else []
            levels[i] = Level(blocks, attn, "up" if i != 0 else None, c_out)
            c_in, res = c_out, (res * 2 if i != 0 else res)
        self.up = nn.ModuleList(levels[i] for i in range(len(cfg.ch_mult)))
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # [B, C, h, w], straight-through: forward value of the codes, gradient of z
    codebook_loss: Tensor  # mean (e - sg[z])^2: moves the codebook
    commitment_loss: Tensor  # mean (sg[e] - z)^2: moves the encoder
    codes: Tensor  # [B, h*w] int64, row-major over the grid


class VectorQuantizer(nn.Module):
    """Nearest codebook vector by squared L2 distance (taming's VectorQuantizer2, legacy loss, no remap)."""

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def distances(self, z_flat: Tensor) -> Tensor:
        """Squared distances [N, n_embed] from rows of z_flat [N, embed_dim], as |z|^2 + |e|^2 - 2 z.e."""
        e = self.embedding.weight
        if e.dtype in (torch.float16, torch.bfloat16):  # 16-bit distances tie far too often
            z_flat, e = z_flat.float(), e.float()
        # Same expression and order as taming, so ties and near-ties resolve the same way.
        return z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * (z_flat @ e.t())

    def codes(self, z: Tensor) -> Tensor:
        """Indices [B, h*w] of the nearest code for each position of z [B, embed_dim, h, w]."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # free for channels_last z
        out = [self.distances(part).argmin(1) for part in flat.split(DISTANCE_CHUNK_ROWS)]
        return torch.cat(out).view(b, h * w)

    def lookup(self, codes: Tensor, h: int, w: int) -> Tensor:
        """Codebook vectors [B, embed_dim, h, w] for codes [B, h*w]."""
        return self.embedding(codes).view(codes.shape[0], h, w, self.embed_dim).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> QuantizerOutput:
        h, w = z.shape[2:]
        codes = self.codes(z.detach())
        z_q = self.lookup(codes, h, w)
        codebook_loss = torch.mean((z_q - z.detach()) ** 2)
        commitment_loss = torch.mean((z_q.detach() - z) ** 2)
        return QuantizerOutput(z + (z_q - z).detach(), codebook_loss, commitment_loss, codes)


class VQGANOutput(NamedTuple):
    reconstruction: Tensor  # [B, out_ch, H, W], unclamped
    codebook_loss: Tensor
    commitment_loss: Tensor
    codes: Tensor  # [B, h*w]
    vq_loss: Tensor  # taming's legacy sum: commitment + beta * codebook (HF's `embedding_loss`)


class VQGAN(nn.Module):
    """Encoder, quant_conv, codebook, post_quant_conv, decoder; `with_decoder=False` builds an encode-only model."""

    def __init__(self, config: VQConfig, with_decoder: bool = True):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config) if with_decoder else None
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim, config.beta)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1) if with_decoder else None

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @property
    def is_channels_last(self) -> bool:
        # conv_in's weight is [ch, in, 3, 3]: its two layouts are distinguishable.
        return self.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def channels_last(self, enabled: bool = True) -> VQGAN:
        """Switch weights (and, from then on, inputs) to channels_last, usually faster for CPU convs."""
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def latents(self, pixels: Tensor) -> Tensor:
        """Pre-quantization latents [B, embed_dim, h, w] (after quant_conv)."""
        return self.quant_conv(self.encoder(pixels))

    def _prepare(self, pixels: Tensor) -> Tensor:
        self._check_pixels(pixels)
        weight = self.encoder.conv_in.weight
        fmt = torch.channels_last if self.is_channels_last else torch.contiguous_format
        return pixels.to(device=weight.device, dtype=weight.dtype).contiguous(memory_format=fmt)

    def _check_pixels(self, pixels: Tensor) -> None:
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1] != cfg.in_channels:
            raise ValueError(f"expected pixels [B, {cfg.in_channels}, H, W], got shape {tuple(pixels.shape)}")
        f = cfg.downsample_factor
        if pixels.shape[2] % f or pixels.shape[3] % f:
            raise ValueError(f"image sides must be multiples of {f} pixels, got {pixels.shape[2]}x{pixels.shape[3]}")
        if not pixels.is_floating_point():
            raise ValueError(f"expected float pixels in [-1, 1], got dtype {pixels.dtype}")
        if pixels.numel():
            low, high = pixels.aminmax()
            if low < -1 - PIXEL_RANGE_SLACK or high > 1 + PIXEL_RANGE_SLACK:
                raise ValueError(f"pixels must be in [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]")

    @torch.inference_mode()
    def encode(self, pixels: Tensor) -> Tensor:
        """Codes [B, h*w] (int64, row-major over the grid) for pixels [B, 3, H, W] in [-1, 1]; call .eval() first."""
        return self.quantize.codes(self.latents(self._prepare(pixels)))

    def _require_decoder(self) -> None:
        if self.decoder is None or self.post_quant_conv is None:
            raise MissingDecoderError(
                "this VQGAN has no decoder weights (Hugging Face's ChameleonVQVAE carries only the encoder); "
                "load Meta's vqgan.ckpt/vqgan.yaml with load_meta_vqgan to decode codes into pixels"
            )

    def decode_latents(self, quantized: Tensor) -> Tensor:
        """Pixels [B, out_ch, H, W] from codebook vectors [B, embed_dim, h, w] (differentiable)."""
        self._require_decoder()
        return self.decoder(self.post_quant_conv(quantized))

    @torch.inference_mode()
    def decode(self, codes: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Pixels [B, out_ch, H, W] (about [-1, 1], unclamped) from codes [B, h*w] or [B, h, w]."""
        self._require_decoder()
        if codes.ndim == 3:
            grid = (codes.shape[1], codes.shape[2])
            codes = codes.reshape(codes.shape[0], -1)
        h, w = grid or (self.config.grid, self.config.grid)
        if codes.ndim != 2 or codes.shape[1] != h * w:
            raise ValueError(f"expected codes [B, {h * w}] for a {h}x{w} grid, got shape {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.n_embed):
            raise ValueError(f"codes must be in [0, {self.config.n_embed}), got [{codes.min()}, {codes.max()}]")
        weight = self.quantize.embedding.weight
        quantized = self.quantize.lookup(codes.to(device=weight.device, dtype=torch.long), h, w)
        if self.is_channels_last:
            quantized = quantized.contiguous(memory_format=torch.channels_last)
        return self.decode_latents(quantized)

    def forward(self, pixels: Tensor) -> VQGANOutput:
        """Reconstruction, the two VQ loss terms (unweighted), codes and taming's weighted VQ loss, for training."""
        self._require_decoder()
        q = self.quantize(self.latents(pixels))
        vq_loss = q.commitment_loss + self.quantize.beta * q.codebook_loss
        return VQGANOutput(self.decode_latents(q.quantized), q.codebook_loss, q.commitment_loss, q.codes, vq_loss)
