"""The VQGAN tokenizer: shapes, nearest-code quantization, gradients, Meta's and Hugging Face's checkpoint formats."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    ChameleonVQVAE,
    ChameleonVQVAEConfig,
)

from model.tokenizers.vq_checkpoint import (
    VQCheckpointError,
    hf_to_ours,
    load_hf_vqvae,
    load_meta_vqgan,
    save_meta_vqgan,
    vq_config_from_hf,
    vqgan_from_hf_state_dict,
)
from model.tokenizers.vqgan import VQGAN, MissingDecoderError
from schemas.vocab import CHAMELEON, IMAGE_CODE_OFFSET, TINY
from schemas.vq_config import VQConfig

TINY_CFG = VQConfig.from_preset("tiny")
# HF's names for the same tiny shape (what its converter renames from vqgan.yaml).
TINY_HF = {
    "embed_dim": 32,
    "num_embeddings": 256,
    "latent_channels": 64,
    "resolution": 64,
    "base_channels": 32,
    "channel_multiplier": [1, 2, 2, 4],
    "num_res_blocks": 1,
    "attn_resolutions": [],
}
# Parameter counts of Meta's VQGAN shape, summed by hand from the layer list in chameleon-model-facts.md §3.
CHAMELEON_PARAMS = 68_718_467
CHAMELEON_ENCODER_PARAMS = 29_357_824  # encoder + quant_conv + codebook


def _pixels(n: int, seed: int, side: int = 64) -> torch.Tensor:
    """Smooth-ish random images in [-1, 1] (blurred noise, so the encoder sees some structure)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, side // 4, side // 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False).clamp(-1, 1)


@torch.no_grad()
def _spread_codebook(codebook: torch.Tensor, latents: torch.Tensor, seed: int) -> None:
    """Codebook rows = sampled latent vectors plus noise, so codes are diverse (a random init collapses to a few)."""
    g = torch.Generator().manual_seed(seed)
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    rows = flat[torch.randint(0, flat.shape[0], (codebook.shape[0],), generator=g)]
    codebook.copy_(rows + 0.1 * rows.std() * torch.randn(rows.shape, generator=g))


@pytest.fixture(scope="module")
def tiny() -> VQGAN:
    torch.manual_seed(0)
    model = VQGAN(TINY_CFG).eval()
    with torch.no_grad():
        _spread_codebook(model.quantize.embedding.weight, model.latents(_pixels(8, 1)), seed=2)
    return model


def _same_fields(a: VQConfig, b: VQConfig) -> bool:
    return a.model_dump(exclude={"preset"}) == b.model_dump(exclude={"preset"})


# --- config -------------------------------------------------------------------------------------------------


def test_presets_match_the_vocabulary_layouts() -> None:
    assert (TINY_CFG.grid, TINY_CFG.tokens_per_image, TINY_CFG.n_embed) == (TINY.image_grid, 64, TINY.image_codes)
    cham = VQConfig.from_preset("chameleon")
    assert (cham.grid, cham.tokens_per_image, cham.n_embed) == (CHAMELEON.image_grid, 1024, CHAMELEON.image_codes)
    assert (cham.ch, cham.ch_mult, cham.z_channels, cham.embed_dim, cham.beta) == (128, [1, 1, 2, 2, 4], 256, 256, 0.25)
    assert VQConfig.from_preset("tiny", n_embed=512).n_embed == 512


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"ch": 48}, "multiples of 32"),
        ({"double_z": True}, "double_z must be False"),
        ({"resolution": 60}, "divisible by 2**(len(ch_mult)-1) = 8"),
        ({"codebook": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_config_is_rejected_with_the_reason(override: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        VQConfig.from_preset("tiny", **override)


# --- model --------------------------------------------------------------------------------------------------


def test_encode_decode_shapes_and_code_range(tiny: VQGAN) -> None:
    codes = tiny.encode(_pixels(3, 5))
    assert codes.shape == (3, 64) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < TINY_CFG.n_embed
    assert codes.unique().numel() > 16  # not collapsed onto a few codes, so the checks below mean something
    pixels = tiny.decode(codes)
    assert pixels.shape == (3, 3, 64, 64) and pixels.dtype == torch.float32
    assert torch.equal(tiny.decode(codes.view(3, 8, 8)), pixels)
    # Batched = one at a time.
    assert torch.equal(torch.cat([tiny.encode(_pixels(3, 5)[i : i + 1]) for i in range(3)]), codes)


def test_codes_are_the_nearest_codebook_vectors_in_row_major_order(tiny: VQGAN) -> None:
    pixels = _pixels(2, 7)
    codes = tiny.encode(pixels)
    with torch.no_grad():
        z = tiny.latents(pixels).double()
    book = tiny.quantize.embedding.weight.detach().double()
    for b in range(2):
        for row in range(8):
            for col in range(8):
                dist = ((book - z[b, :, row, col]) ** 2).sum(1)
                assert codes[b, row * 8 + col] == dist.argmin(), (b, row, col)


def test_forward_returns_loss_terms_and_straight_through_gradients() -> None:
    torch.manual_seed(3)
    model = VQGAN(TINY_CFG)
    pixels = _pixels(2, 9)
    out = model(pixels)
    assert out.reconstruction.shape == pixels.shape and out.codes.shape == (2, 64)
    assert torch.equal(out.codes, model.encode(pixels))
    torch.testing.assert_close(out.vq_loss, out.commitment_loss + 0.25 * out.codebook_loss)
    # The decoder sees exactly the codebook vectors ...
    with torch.no_grad():
        z_q = model.quantize(model.latents(pixels)).quantized
    torch.testing.assert_close(z_q, model.quantize.lookup(out.codes, 8, 8))
    # ... yet the reconstruction's gradient reaches the encoder (straight-through), not the codebook.
    conv_in, book = model.encoder.conv_in.weight, model.quantize.embedding.weight
    out.reconstruction.square().mean().backward(retain_graph=True)
    assert conv_in.grad is not None and conv_in.grad.abs().sum() > 0
    assert book.grad is None or book.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)
    out.codebook_loss.backward(retain_graph=True)  # moves the codebook only
    assert book.grad.abs().sum() > 0 and conv_in.grad is None
    model.zero_grad(set_to_none=True)
    out.commitment_loss.backward()  # moves the encoder only
    assert conv_in.grad.abs().sum() > 0 and (book.grad is None or book.grad.abs().sum() == 0)


def test_channels_last_gives_the_same_codes(tiny: VQGAN) -> None:
    pixels = _pixels(4, 11)
    codes, decoded = tiny.encode(pixels), tiny.decode(tiny.encode(pixels))
    fast = VQGAN(TINY_CFG).eval()
    fast.load_state_dict(tiny.state_dict())
    fast.channels_last()
    assert fast.is_channels_last and not tiny.is_channels_last
    assert torch.equal(fast.encode(pixels), codes)
    torch.testing.assert_close(fast.decode(codes), decoded, atol=1e-4, rtol=1e-4)


def _group_norm_reference(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    return torch.nn.functional.group_norm(
        x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps
    )


@pytest.mark.parametrize(
    ("case", "shape", "scale", "mean"),
    [
        ("a group's mean large against its spread (a flat region)", (1, 32, 512, 512), 0.1, 10.0),
        ("a zero-mean group of a million values", (1, 32, 512, 512), 1.0, 0.0),
        ("several groups of several channels, a batch", (2, 128, 96, 96), 0.05, -3.0),
    ],
)
def test_group_norm_is_accurate_in_channels_last(case: str, shape: tuple, scale: float, mean: float) -> None:
    """PyTorch's CPU channels_last GroupNorm takes var = E[x^2] - E[x]^2 in fp32 (0.4 off float64 on the first
    case); ours is as accurate as the contiguous kernel in either layout, and keeps the layout and the parameters."""
    from model.tokenizers.vqgan import GroupNorm

    torch.manual_seed(0)
    norm = GroupNorm(32, shape[1], eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = torch.randn(shape) * scale + mean
    reference = _group_norm_reference(x, norm)
    for layout in (torch.channels_last, torch.contiguous_format):
        with torch.no_grad():
            out = norm(x.contiguous(memory_format=layout))
        assert out.is_contiguous(memory_format=layout) and out.dtype == torch.float32
        assert (out.double() - reference).abs().max().item() < 4e-5, (case, layout)
    assert list(norm.state_dict()) == list(torch.nn.GroupNorm(32, shape[1]).state_dict())  # checkpoints unchanged


def test_group_norm_gradients_and_16_bit_input_in_channels_last() -> None:
    from model.tokenizers.vqgan import GroupNorm

    torch.manual_seed(0)
    ours, theirs = GroupNorm(32, 64, eps=1e-6), torch.nn.GroupNorm(32, 64, eps=1e-6)
    theirs.load_state_dict(ours.state_dict())
    x = (torch.randn(2, 64, 16, 16) + 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.detach().contiguous().requires_grad_()
    upstream = torch.randn(2, 64, 16, 16)
    (ours(x) * upstream).sum().backward()
    (theirs(x_ref) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
    half = (torch.randn(1, 64, 64, 64) * 0.1 + 10).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = ours(half)
    assert out.dtype == torch.bfloat16
    reference = _group_norm_reference(half, ours).bfloat16().double()
    assert (out.double() - reference).abs().max().item() <= 0.0625  # a bf16 step at these magnitudes


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (torch.zeros(1, 1, 64, 64), r"expected pixels \[B, 3, H, W\]"),
        (torch.zeros(1, 3, 60, 64), "multiples of 8 pixels"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "expected float pixels"),
        (torch.full((1, 3, 64, 64), 255.0), r"pixels must be in \[-1, 1\]"),
    ],
)
def test_bad_pixels_are_rejected_with_the_reason(tiny: VQGAN, pixels: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tiny.encode(pixels)


def test_bad_codes_are_rejected_with_the_reason(tiny: VQGAN) -> None:
    with pytest.raises(ValueError, match=r"expected codes \[B, 64\]"):
        tiny.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 256\)"):
        tiny.decode(torch.full((1, 64), 256))


def test_chameleon_preset_parameters_names_and_a_small_forward() -> None:
    cfg = VQConfig.from_preset("chameleon")
    torch.manual_seed(0)
    model = VQGAN(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) == CHAMELEON_PARAMS == cfg.n_params()
    assert cfg.n_params(with_decoder=False) == CHAMELEON_ENCODER_PARAMS
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Taming's names and Meta's shapes (reference §3.2-3.4).
    assert shapes["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes["encoder.down.4.block.0.nin_shortcut.weight"] == (512, 256, 1, 1)
    assert shapes["encoder.down.3.downsample.conv.weight"] == (256, 256, 3, 3)
    assert shapes["encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
    assert shapes["quant_conv.weight"] == shapes["post_quant_conv.weight"] == (256, 256, 1, 1)
    assert shapes["quantize.embedding.weight"] == (8192, 256)
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.up.4.block.2.conv2.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (128, 128, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert not any(".attn." in k for k in shapes)  # attention only in the middle blocks
    assert not any(k.startswith(("encoder.down.4.downsample", "decoder.up.0.upsample")) for k in shapes)
    # The architecture is fully convolutional: one 64 px image -> a 4x4 grid -> 64 px back, in well under 5 s.
    start = time.perf_counter()
    codes = model.encode(_pixels(1, 13))
    assert codes.shape == (1, 16)
    assert model.decode(codes, grid=(4, 4)).shape == (1, 3, 64, 64)
    assert time.perf_counter() - start < 5


def test_chameleon_preset_names_and_shapes_equal_hugging_face() -> None:
    hf = ChameleonVQVAE(ChameleonVQVAEConfig())  # HF's defaults are Chameleon's shape
    ours = VQGAN(VQConfig.from_preset("chameleon"), with_decoder=False)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if not k.startswith("post_quant_conv.")}
    assert hf_shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert _same_fields(vq_config_from_hf(ChameleonVQVAEConfig().to_dict()), VQConfig.from_preset("chameleon"))


def _reference_decode(state: dict[str, torch.Tensor], cfg: VQConfig, z_q: torch.Tensor) -> torch.Tensor:
    """Taming's decoder written out from its source loop over the raw state dict (explicit softmax attention)."""
    F = torch.nn.functional

    def conv(x, name, **kw):
        return F.conv2d(x, state[f"{name}.weight"], state[f"{name}.bias"], **kw)

    def gn_swish(x, name):
        return F.silu(F.group_norm(x, 32, state[f"{name}.weight"], state[f"{name}.bias"], eps=1e-6))

    def res(x, name):
        h = conv(gn_swish(x, f"{name}.norm1"), f"{name}.conv1", padding=1)
        h = conv(gn_swish(h, f"{name}.norm2"), f"{name}.conv2", padding=1)
        return (conv(x, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in state else x) + h

    def attn(x, name):
        b, c, hh, ww = x.shape
        n = F.group_norm(x, 32, state[f"{name}.norm.weight"], state[f"{name}.norm.bias"], eps=1e-6)
        q, k, v = (conv(n, f"{name}.{p}").reshape(b, c, hh * ww) for p in "qkv")
        w = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c**-0.5, dim=2)
        return x + conv(torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww), f"{name}.proj_out")

    h = conv(conv(z_q, "post_quant_conv"), "decoder.conv_in", padding=1)
    h = res(attn(res(h, "decoder.mid.block_1"), "decoder.mid.attn_1"), "decoder.mid.block_2")
    for i in reversed(range(len(cfg.ch_mult))):
        for j in range(cfg.num_res_blocks + 1):
            h = res(h, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in state:
                h = attn(h, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), f"decoder.up.{i}.upsample.conv", padding=1)
    return conv(gn_swish(h, "decoder.norm_out"), "decoder.conv_out", padding=1)


@pytest.mark.parametrize("attn_resolutions", [[], [16]])
def test_decoder_matches_taming_written_out(attn_resolutions: list[int]) -> None:
    cfg = VQConfig.from_preset("tiny", attn_resolutions=attn_resolutions)
    torch.manual_seed(4)
    model = VQGAN(cfg).eval()
    assert any(".attn.0." in k for k in model.state_dict()) == bool(attn_resolutions)
    codes = torch.randint(0, cfg.n_embed, (2, 64))
    with torch.no_grad():
        # In float64: the looked-up latents are channels_last in memory, where PyTorch's fp32 GroupNorm is inexact.
        state = {name: tensor.double() for name, tensor in model.state_dict().items()}
        expected = _reference_decode(state, cfg, model.quantize.lookup(codes, 8, 8).double()).float()
    torch.testing.assert_close(model.decode(codes), expected, atol=5e-5, rtol=1e-4)  # fp32 rounding, 20 layers


# --- Meta's format ----------------------------------------------------------------------------------------


def test_meta_checkpoint_round_trip_gives_identical_codes_and_pixels(tiny: VQGAN, tmp_path: Path) -> None:
    ckpt, cfg = save_meta_vqgan(tiny, tmp_path / "vq")
    assert (ckpt.name, cfg.name) == ("vqgan.ckpt", "vqgan.yaml")
    params = yaml.safe_load(cfg.read_text())["model"]["params"]
    assert (params["n_embed"], params["embed_dim"], params["ddconfig"]["ch_mult"]) == (256, 32, [1, 2, 2, 4])
    assert set(torch.load(ckpt, weights_only=True)["state_dict"]) == set(tiny.state_dict())

    loaded = load_meta_vqgan(ckpt, cfg)
    assert _same_fields(loaded.config, TINY_CFG) and not loaded.training
    pixels = _pixels(3, 17)
    codes = tiny.encode(pixels)
    assert torch.equal(loaded.encode(pixels), codes)
    assert torch.equal(loaded.decode(codes), tiny.decode(codes))
    assert load_meta_vqgan(ckpt).has_decoder  # yaml found beside the ckpt


def test_bf16_meta_checkpoint_loads_as_fp32(tiny: VQGAN, tmp_path: Path) -> None:
    ckpt, cfg = save_meta_vqgan(tiny, tmp_path)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    torch.save({"state_dict": {k: v.bfloat16() for k, v in state.items()}}, ckpt)
    loaded = load_meta_vqgan(ckpt, cfg)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.encode(_pixels(1, 18)).shape == (1, 64)


def test_meta_checkpoint_keeps_a_non_default_beta(tmp_path: Path) -> None:
    model = VQGAN(VQConfig.from_preset("tiny", beta=0.5))
    _, cfg = save_meta_vqgan(model, tmp_path)
    assert "beta" not in yaml.safe_load(cfg.read_text())["model"]["params"]  # taming's VQModel would reject it
    assert load_meta_vqgan(tmp_path / "vqgan.ckpt").config.beta == 0.5


def test_meta_checkpoint_with_loss_keys_and_lightning_extras_loads(tiny: VQGAN, tmp_path: Path) -> None:
    ckpt, cfg = save_meta_vqgan(tiny, tmp_path)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    state["loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4)
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save({"epoch": 3, "global_step": 1200, "state_dict": state}, ckpt)
    pixels = _pixels(2, 19)
    assert torch.equal(load_meta_vqgan(ckpt, cfg).encode(pixels), tiny.encode(pixels))


def test_meta_checkpoint_with_missing_or_unknown_keys_names_them(tiny: VQGAN, tmp_path: Path) -> None:
    ckpt, cfg = save_meta_vqgan(tiny, tmp_path)
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    del state["decoder.conv_out.bias"]
    state["ema.decay"] = torch.tensor(0.99)
    torch.save({"state_dict": state}, ckpt)
    with pytest.raises(VQCheckpointError) as err:
        load_meta_vqgan(ckpt, cfg)
    assert "1 missing tensors: decoder.conv_out.bias" in str(err.value)
    assert "1 unexpected tensors: ema.decay" in str(err.value)


def test_shape_mismatch_names_the_tensor_and_both_shapes(tiny: VQGAN, tmp_path: Path) -> None:
    _, cfg = save_meta_vqgan(tiny, tmp_path)
    config = yaml.safe_load(cfg.read_text())
    config["model"]["params"]["n_embed"] = 512
    cfg.write_text(yaml.safe_dump(config))
    with pytest.raises(VQCheckpointError) as err:
        load_meta_vqgan(tmp_path / "vqgan.ckpt", cfg)
    message = str(err.value)
    assert "vqgan.ckpt" in message
    assert "tensor quantize.embedding.weight: expected shape (512, 32) (from the config), found (256, 32)" in message


def test_meta_yaml_with_an_unsupported_variant_is_refused(tiny: VQGAN, tmp_path: Path) -> None:
    _, cfg = save_meta_vqgan(tiny, tmp_path)
    config = yaml.safe_load(cfg.read_text())
    ddconfig = config["model"]["params"]["ddconfig"]
    ddconfig.update(resamp_with_conv=True, give_pre_end=False)  # taming's defaults: accepted
    cfg.write_text(yaml.safe_dump(config))
    assert load_meta_vqgan(tmp_path / "vqgan.ckpt", cfg).has_decoder
    for key, value, message in [
        ("tanh_out", True, "ddconfig.tanh_out must be False"),
        ("padding_mode", "zeros", r"unknown ddconfig keys \['padding_mode'\]"),
    ]:
        cfg.write_text(
            yaml.safe_dump(
                {**config, "model": {"params": {**config["model"]["params"], "ddconfig": {**ddconfig, key: value}}}}
            )
        )
        with pytest.raises(VQCheckpointError, match=message):
            load_meta_vqgan(tmp_path / "vqgan.ckpt", cfg)


class _NotATensor:
    pass


def test_checkpoints_are_read_weights_only(tmp_path: Path) -> None:
    _, cfg = save_meta_vqgan(VQGAN(TINY_CFG), tmp_path)
    torch.save({"state_dict": {}, "callback": _NotATensor()}, tmp_path / "vqgan.ckpt")
    with pytest.raises(VQCheckpointError, match="not a weights-only PyTorch file"):
        load_meta_vqgan(tmp_path / "vqgan.ckpt", cfg)
    with pytest.raises(VQCheckpointError, match="file not found"):
        load_meta_vqgan(tmp_path / "nothing.ckpt", cfg)


def test_encode_only_model_cannot_be_saved_in_meta_format(tmp_path: Path) -> None:
    with pytest.raises(VQCheckpointError, match="no decoder"):
        save_meta_vqgan(VQGAN(TINY_CFG, with_decoder=False), tmp_path)


# --- Hugging Face -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_vqvae() -> ChameleonVQVAE:
    torch.manual_seed(21)
    model = ChameleonVQVAE(ChameleonVQVAEConfig(**TINY_HF)).eval()
    with torch.no_grad():
        latents = model.quant_conv(model.encoder(_pixels(8, 22)))
        _spread_codebook(model.quantize.embedding.weight, latents, seed=23)
    return model


def test_hugging_face_vqvae_gives_the_same_codes(hf_vqvae: ChameleonVQVAE) -> None:
    config = vq_config_from_hf(hf_vqvae.config.to_dict())
    assert _same_fields(config, TINY_CFG)
    ours = vqgan_from_hf_state_dict(hf_vqvae.state_dict(), config)
    assert not ours.has_decoder and ours.post_quant_conv is None
    pixels = _pixels(4, 24)
    with torch.no_grad():
        hf_out = hf_vqvae.encode(pixels, return_dict=True)
        torch.testing.assert_close(ours.latents(pixels), hf_vqvae.quant_conv(hf_out.last_hidden_state))
        ours_out = ours.quantize(ours.latents(pixels))
    codes = ours.encode(pixels)
    assert codes.unique().numel() > 16
    assert torch.equal(codes, hf_out.image_tokens.view(4, -1))
    torch.testing.assert_close(ours_out.commitment_loss + 0.25 * ours_out.codebook_loss, hf_out.embedding_loss)
    with pytest.raises(MissingDecoderError, match="no decoder weights"):
        ours.decode(codes)
    # Our weights are copies: changing them leaves HF's model alone.
    with torch.no_grad():
        ours.encoder.conv_in.weight.zero_()
    assert hf_vqvae.encoder.conv_in.weight.abs().sum() > 0


def test_hugging_face_vqvae_with_level_attention_gives_the_same_codes() -> None:
    torch.manual_seed(27)
    hf = ChameleonVQVAE(ChameleonVQVAEConfig(**{**TINY_HF, "attn_resolutions": [16]})).eval()
    assert "encoder.down.2.attn.0.q.weight" in hf.state_dict()
    pixels = _pixels(3, 28)
    with torch.no_grad():
        _spread_codebook(hf.quantize.embedding.weight, hf.quant_conv(hf.encoder(pixels)), seed=29)
        expected = hf.encode(pixels, return_dict=True).image_tokens.view(3, -1)
    ours = vqgan_from_hf_state_dict(hf.state_dict(), vq_config_from_hf(hf.config.to_dict()))
    assert ours.config.attn_resolutions == [16]
    assert torch.equal(ours.encode(pixels), expected)


def test_hugging_face_vqvae_loads_from_save_pretrained(hf_vqvae: ChameleonVQVAE, tmp_path: Path) -> None:
    hf_vqvae.save_pretrained(tmp_path)
    ours = load_hf_vqvae(tmp_path)
    pixels = _pixels(2, 25)
    with torch.no_grad():
        assert torch.equal(ours.encode(pixels), hf_vqvae.encode(pixels, return_dict=True).image_tokens.view(2, -1))


def test_hugging_face_state_dict_with_a_wrong_shape_names_the_tensor(hf_vqvae: ChameleonVQVAE) -> None:
    with pytest.raises(VQCheckpointError, match=r"tensor quant_conv.weight: expected shape \(16, 64, 1, 1\)"):
        vqgan_from_hf_state_dict(hf_vqvae.state_dict(), VQConfig.from_preset("tiny", embed_dim=16))


def _image_token_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def test_full_chameleon_model_image_tokens_equal_our_codes_plus_offset(
    hf_vqvae: ChameleonVQVAE, tmp_path: Path
) -> None:
    vocabulary = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocabulary |= {_image_token_name(c): c + IMAGE_CODE_OFFSET for c in range(TINY.image_codes)}
    vocabulary |= {"<eoss>": TINY.eoi_id, "<racm3:break>": TINY.boi_id, "<image>": TINY.boi_id + 1}
    config = ChameleonConfig(
        vocab_size=TINY.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vq_config=TINY_HF,
        vocabulary_map=vocabulary,
    )
    full = ChameleonForConditionalGeneration(config).eval()
    full.model.vqmodel.load_state_dict(hf_vqvae.state_dict())
    pixels = _pixels(2, 26)
    with torch.no_grad():
        bpe = full.model.get_image_tokens(pixels)
    # Both prefixes HF uses: model.vqmodel. (ForConditionalGeneration) and vqmodel. (a bare ChameleonModel).
    from_full = vqgan_from_hf_state_dict(full.state_dict(), TINY_CFG)
    assert set(hf_to_ours(full.model.state_dict())) == set(hf_vqvae.state_dict())
    assert torch.equal(from_full.encode(pixels) + IMAGE_CODE_OFFSET, bpe)
    # From disk: the VQ config nested in the full config, the VQ tensors picked out of the LM checkpoint.
    full.save_pretrained(tmp_path / "one")
    assert torch.equal(load_hf_vqvae(tmp_path / "one").encode(pixels) + IMAGE_CODE_OFFSET, bpe)
    # Sharded like the released checkpoints: only the shards listed for VQ tensors are opened.
    full.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert torch.equal(load_hf_vqvae(tmp_path / "sharded").encode(pixels) + IMAGE_CODE_OFFSET, bpe)
