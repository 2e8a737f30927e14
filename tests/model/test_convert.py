"""Weight conversion: Meta shards merge/split exactly, HF's rotary permutation is undone (logit parity), the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import typer
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from typer.testing import CliRunner

from flows.cli_convert import convert
from model.convert import (
    ConversionError,
    hf_config_dict,
    llama_ffn_dim,
    load_hf,
    load_into,
    load_meta,
    load_ours,
    meta_config,
    save_hf,
    save_meta,
    save_ours,
)
from model.transformer import Transformer
from schemas.model_config import ModelConfig
from schemas.vocab import TINY

# Smallest VQGAN transformers will build (GroupNorm needs 32 channels); its weights are never compared.
TINY_VQ = {
    "num_embeddings": TINY.image_codes,
    "embed_dim": 4,
    "latent_channels": 32,
    "base_channels": 32,
    "channel_multiplier": [1],
    "num_res_blocks": 1,
    "resolution": 16,
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **overrides)


def same_shape(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal configs up to `preset` (converted configs spell every field out)."""
    return a.model_dump(exclude={"preset"}) == b.model_dump(exclude={"preset"})


def randomized(config: ModelConfig) -> Transformer:
    """Our model with large random weights and non-trivial norms, so layout mistakes change the logits."""
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "normalization.weight" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if "normalization" in name else 0.15)
    return model


def hf_model(config: ModelConfig) -> ChameleonForConditionalGeneration:
    """A tiny HF Chameleon with random weights; QK-norm params random but equal across heads (representable)."""
    hf = ChameleonForConditionalGeneration(ChameleonConfig(**hf_config_dict(config, vq_config=TINY_VQ))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "vqmodel" in name:
                continue
            if "q_norm" in name or "k_norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_((base + 0.3 * torch.randn(p.shape[-1])).expand_as(p))
            elif name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return hf


def text_columns(hf: ChameleonForConditionalGeneration, vocab_size: int) -> torch.Tensor:
    image = set(hf.model.vocabulary_mapping.image_tokens)
    return torch.tensor([i for i in range(vocab_size) if i not in image])


def text_tokens(config: ModelConfig, length: int = 12) -> torch.Tensor:
    return torch.randint(TINY.first_text_id, config.vocab_size, (2, length))


# ---------------------------------------------------------------------------------------------------- HF


@pytest.mark.parametrize("swin_norm", [False, True])
def test_hf_logits_match_ours_after_load_hf(tmp_path: Path, swin_norm: bool) -> None:
    config = tiny(swin_norm=swin_norm)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path)
    loaded_config, state = load_hf(tmp_path)
    assert same_shape(loaded_config, config)
    assert not any("vqmodel" in k for k in state)
    ours = load_into(Transformer(loaded_config).eval(), state)

    tokens = text_tokens(config)
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens).logits
        our_logits = ours(tokens)
    cols = text_columns(hf, config.vocab_size)
    # HF's ForConditionalGeneration masks image-token logits to finfo.min; only text columns are comparable.
    assert (hf_logits[..., TINY.eoi_id - 1] == torch.finfo(hf_logits.dtype).min).all()
    torch.testing.assert_close(our_logits[..., cols], hf_logits[..., cols], atol=1e-4, rtol=1e-4)


def test_hf_per_group_qk_norm_loads_as_groups_and_per_head_beyond_is_refused(tmp_path: Path) -> None:
    # HF's 30B conversion repeats each Meta shard's QK-norm over that shard's heads: rows equal within runs of heads.
    config = tiny()  # 4 q heads, 2 kv heads: at most 2 groups
    hf = hf_model(config)
    with torch.no_grad():
        for layer in hf.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                half = norm.weight.shape[0] // 2
                norm.weight[half:] += 0.4 * torch.randn(norm.weight.shape[1])
                norm.bias[half:] -= 0.3 * torch.randn(norm.bias.shape[1])
    hf.save_pretrained(tmp_path / "groups")
    loaded_config, state = load_hf(tmp_path / "groups")
    assert loaded_config.qk_norm_groups == 2 and state["layers.0.attention.q_normalization.weight"].shape == (2, 16)
    ours = load_into(Transformer(loaded_config).eval(), state)
    tokens = text_tokens(config)
    with torch.no_grad():
        hf_logits, our_logits = hf(input_ids=tokens).logits, ours(tokens)
    cols = text_columns(hf, config.vocab_size)
    torch.testing.assert_close(our_logits[..., cols], hf_logits[..., cols], atol=1e-4, rtol=1e-4)

    with torch.no_grad():  # q head 1 alone differs from head 0: not a run of heads our model can hold
        hf.model.layers[1].self_attn.q_norm.bias[1] += 0.5
    hf.save_pretrained(tmp_path / "heads")
    with pytest.raises(ConversionError, match=r"layers\.1\.self_attn\.q_norm\.bias.*differ within runs of heads"):
        load_hf(tmp_path / "heads")


def test_save_hf_round_trips_and_transformers_loads_it(tmp_path: Path) -> None:
    config = tiny()
    ours = randomized(config)
    save_hf(ours, config, tmp_path, vq_config=TINY_VQ)
    loaded_config, state = load_hf(tmp_path)
    assert same_shape(loaded_config, config)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(state[name], tensor), name

    # No VQGAN weights are written: transformers initialises model.vqmodel itself and still loads the LM.
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path).eval()
    tokens = text_tokens(config)
    with torch.no_grad():
        hf_logits, our_logits = hf(input_ids=tokens).logits, ours(tokens)
    cols = text_columns(hf, config.vocab_size)
    torch.testing.assert_close(our_logits[..., cols], hf_logits[..., cols], atol=1e-4, rtol=1e-4)


def test_save_hf_refuses_what_hf_cannot_express(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="QK-norm"):
        save_hf(Transformer(tiny(qk_norm=False)), tiny(qk_norm=False), tmp_path)


# ---------------------------------------------------------------------------------------------------- Meta


@pytest.mark.parametrize("model_parallel", [1, 2])
def test_meta_round_trip_is_exact(tmp_path: Path, model_parallel: int) -> None:
    config = tiny(max_seq_len=256)
    original = randomized(config).state_dict()
    save_meta(original, config, tmp_path, model_parallel=model_parallel)

    shards = sorted(p.name for p in tmp_path.glob("consolidated.*.pth"))
    assert shards == [f"consolidated.{i:02d}.pth" for i in range(model_parallel)]
    first = torch.load(tmp_path / shards[0], weights_only=True)
    assert first["tok_embeddings.weight"].shape == (config.vocab_size, config.dim // model_parallel)
    assert first["layers.0.attention.wo.weight"].shape == (config.dim, config.dim // model_parallel)
    assert first["layers.0.attention.q_normalization.weight"].shape == (config.head_dim,)
    assert "model" in json.loads((tmp_path / "params.json").read_text())  # Meta's loader reads params["model"]

    loaded_config, state = load_meta(tmp_path)
    assert same_shape(loaded_config, config)
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name


def test_meta_rope_freqs_is_ignored_and_flat_params_work(tmp_path: Path) -> None:
    config = tiny()
    original = randomized(config).state_dict()
    save_meta(original, config, tmp_path)
    shard = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    (tmp_path / "consolidated.00.pth").unlink()
    torch.save({**shard, "rope.freqs": torch.randn(config.head_dim // 2)}, tmp_path / "consolidated.pth")
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params["model"]))  # flat, no nested "model"
    loaded_config, state = load_meta(tmp_path)
    assert "rope.freqs" not in state
    assert loaded_config.ffn_dim == config.ffn_dim
    load_into(Transformer(loaded_config), state)


def test_meta_per_shard_qk_norm_loads_as_groups_and_matches_hf(tmp_path: Path) -> None:
    # Meta's 34B: each model-parallel shard holds its own [head_dim] QK-norm for its own heads.
    config = tiny(qk_norm_groups=2)
    original = randomized(config)
    save_meta(original.state_dict(), config, tmp_path / "meta", model_parallel=2)
    shards = [torch.load(tmp_path / "meta" / f"consolidated.0{i}.pth", weights_only=True) for i in range(2)]
    name = "layers.0.attention.q_normalization.weight"
    assert all(shard[name].shape == (config.head_dim,) for shard in shards)  # Meta's per-shard layout
    for i, shard in enumerate(shards):
        assert torch.equal(shard[name], original.state_dict()[name][i])
    loaded_config, state = load_meta(tmp_path / "meta")
    assert same_shape(loaded_config, config)
    for key, tensor in original.state_dict().items():
        assert torch.equal(state[key], tensor), key
    # Against transformers' own per-head QK-norm: each shard's affine on that shard's heads.
    save_hf(state, loaded_config, tmp_path / "hf", vq_config=TINY_VQ)
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(hf.model.layers[0].self_attn.q_norm.weight[0], hf.model.layers[0].self_attn.q_norm.weight[1])
    assert not torch.equal(hf.model.layers[0].self_attn.q_norm.weight[1], hf.model.layers[0].self_attn.q_norm.weight[2])
    tokens = text_tokens(config)
    with torch.no_grad():
        hf_logits, our_logits = hf(input_ids=tokens).logits, original(tokens)
    cols = text_columns(hf, config.vocab_size)
    torch.testing.assert_close(our_logits[..., cols], hf_logits[..., cols], atol=1e-4, rtol=1e-4)
    with pytest.raises(ConversionError, match="model_parallel must be a multiple of 2"):
        save_meta(original.state_dict(), config, tmp_path / "one", model_parallel=1)
    # 4 shards of 2 groups: shards 0-1 carry group 0, shards 2-3 group 1, and load back as the same 2 groups.
    mha = tiny(qk_norm_groups=2, n_kv_heads=4)
    original = randomized(mha).state_dict()
    save_meta(original, mha, tmp_path / "meta4", model_parallel=4)
    shards = [torch.load(tmp_path / "meta4" / f"consolidated.0{i}.pth", weights_only=True) for i in range(4)]
    assert [torch.equal(shards[i][name], original[name][i // 2]) for i in range(4)] == [True] * 4
    loaded_config, state = load_meta(tmp_path / "meta4")
    assert same_shape(loaded_config, mha)
    assert all(torch.equal(state[key], tensor) for key, tensor in original.items())


def test_meta_norms_that_differ_between_shards_are_averaged(tmp_path: Path) -> None:
    config = tiny()
    original = randomized(config).state_dict()
    save_meta(original, config, tmp_path, model_parallel=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.ffn_norm.weight"] += 2e-3
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.warns(UserWarning, match=r"1 replicated tensors differ .*mean 0\.001, in layers\.1\.ffn_norm\.weight"):
        loaded_config, state = load_meta(tmp_path)
    torch.testing.assert_close(state["layers.1.ffn_norm.weight"], original["layers.1.ffn_norm.weight"] + 1e-3)
    assert loaded_config.qk_norm_groups == 1  # the QK-norms were all equal: one shared affine


def test_ffn_dim_follows_llamas_rule() -> None:
    assert llama_ffn_dim(4096, 256, 1.0) == 11008
    assert llama_ffn_dim(4096, 256) == 11008
    assert llama_ffn_dim(8192, 256, 1.0) == 22016
    params = {"model": {"dim": 4096, "n_layers": 32, "n_heads": 32, "vocab_size": 65536, "multiple_of": 256}}
    config = meta_config({**params, **params["model"], "ffn_dim_multiplier": 1.0, "qk_normalization": True})
    assert (config.ffn_dim, config.n_kv_heads, config.qk_norm) == (11008, 32, True)


# ---------------------------------------------------------------------------------------------------- errors, CLI


def test_shape_mismatch_names_the_tensor_and_both_shapes() -> None:
    config = tiny()
    state = Transformer(config).state_dict()
    state["layers.1.feed_forward.w2.weight"] = torch.zeros(config.dim, config.ffn_dim + 16)
    with pytest.raises(ConversionError, match=r"layers\.1\.feed_forward\.w2\.weight.*\(64, 192\).*\(64, 176\)"):
        load_into(Transformer(config), state)


def test_cli_converts_ours_to_meta_to_hf_and_back(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(convert)
    app.command("noop")(lambda: None)  # two commands, so `convert` is a subcommand as in cham
    runner = CliRunner()
    config = tiny()
    original = randomized(config).state_dict()
    save_ours(original, config, tmp_path / "ours")

    steps = [("ours", "meta", ["--model-parallel", "2"]), ("meta", "hf", []), ("hf", "ours", [])]
    src = tmp_path / "ours"
    for i, (a, b, extra) in enumerate(steps):
        out = tmp_path / f"step{i}_{b}"
        result = runner.invoke(app, ["convert", str(src), str(out), "--from", a, "--to", b, *extra])
        assert result.exit_code == 0, result.output
        src = out
    loaded_config, state = load_ours(src)
    assert same_shape(loaded_config, config)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name

    result = runner.invoke(app, ["convert", str(tmp_path / "ours"), str(tmp_path / "x"), "--from", "meta"])
    assert result.exit_code == 1
    assert "params.json" in result.output


def test_damaged_inputs_fail_naming_the_file(tmp_path: Path) -> None:
    config = tiny()
    state = Transformer(config).state_dict()
    save_ours(state, config, tmp_path / "ours")
    save_meta(state, config, tmp_path / "meta", model_parallel=2)
    save_hf(state, config, tmp_path / "hf")

    def damaged(folder: str, name: str, payload: bytes) -> Path:
        copy = tmp_path / f"{folder}-{name}-{len(payload)}"
        copy.mkdir()
        for f in (tmp_path / folder).iterdir():
            (copy / f.name).write_bytes(f.read_bytes())
        (copy / name).write_bytes(payload)
        return copy

    def without(file: str, name: str) -> bytes:
        buffer = io.BytesIO()
        torch.save({k: v for k, v in torch.load(tmp_path / file, weights_only=True).items() if k != name}, buffer)
        return buffer.getvalue()

    safetensors = (tmp_path / "hf" / "model.safetensors").read_bytes()
    shard = (tmp_path / "meta" / "consolidated.00.pth").read_bytes()
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del hf_config["hidden_size"]
    cases = [
        (load_hf, damaged("hf", "model.safetensors", safetensors[:100]), "model.safetensors: truncated or damaged"),
        (load_hf, damaged("hf", "config.json", json.dumps(hf_config).encode()),
         r"config\.json: not a Chameleon config \(no hidden_size\)"),
        (load_hf, damaged("hf", "config.json", b"{oops"), r"config\.json: not valid JSON \(line 1, column 2"),
        (load_meta, damaged("meta", "params.json", b""), r"params\.json: not valid JSON"),
        (load_meta, damaged("meta", "consolidated.00.pth", shard[: len(shard) // 3]),
         r"consolidated\.00\.pth: truncated or damaged PyTorch file"),
        (load_meta, damaged("meta", "consolidated.01.pth", b"garbage" * 9),
         r"consolidated\.01\.pth: not a weights-only PyTorch file"),
        (load_ours, damaged("ours", "model_config.json", b'{"dim": "wide"}'),
         r"model_config\.json: not a model config \(dim: Input should be a valid integer"),
        (load_meta, damaged("meta", "consolidated.00.pth", without("meta/consolidated.00.pth", "norm.weight")),
         r"consolidated\.01\.pth: other tensor names than consolidated\.00\.pth: lacks \[\], adds \['norm\.weight'\]"),
        (load_ours, damaged("ours", "model.pt", without("ours/model.pt", "norm.weight")),
         r"ours-model\.pt-\d+: state dict does not match the model: missing \['norm\.weight'\]"),
    ]  # fmt: skip
    for loader, folder, message in cases:
        with pytest.raises(ConversionError, match=message) as info:
            loader(folder)
        assert str(folder) in str(info.value)
