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

from flows.cli.convert import convert
from model.lm.convert import (
    ConversionError,
    check_state_dict,
    detect_format,
    hf_config_dict,
    llama_ffn_dim,
    load_hf,
    load_meta,
    load_ours,
    meta_config,
    meta_shard_names,
    save_hf,
    save_meta,
    save_ours,
)
from model.lm.transformer import Transformer
from schemas.model_config import ModelConfig
from schemas.vocab import TINY


def load_into(model: Transformer, state: dict[str, torch.Tensor]) -> Transformer:
    """Copy `state` into `model` after convert's check of every name and shape (as `load_ours` checks)."""
    check_state_dict(model.config, state)
    model.load_state_dict(state)
    return model


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
    # A QK-norm eps other than the 1e-5 both references hard-code: neither format can hold it.
    odd = tiny(qk_norm_eps=1e-6)
    for save in (save_hf, save_meta):
        with pytest.raises(ConversionError, match=r"fixes the QK-norm eps at 1e-05; this model's qk_norm_eps is 1e-06"):
            save(Transformer(odd), odd, tmp_path / save.__name__)


def small_qk(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    """q and k projections scaled down: per-head variances near 1e-5, where a QK-norm eps mix-up shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(names):
                p.mul_(0.01)


def test_rms_norm_eps_other_than_1e5_converts_with_hf_logits(tmp_path: Path) -> None:
    # HF's rms_norm_eps is the RMSNorms' eps only; its QK-norm eps is 1e-5 (ours too, whatever norm_eps is).
    config = tiny(norm_eps=1e-6)
    hf = hf_model(config)
    small_qk(hf, ("q_proj.weight", "k_proj.weight"))
    hf.save_pretrained(tmp_path / "from")
    loaded_config, state = load_hf(tmp_path / "from")
    assert (loaded_config.norm_eps, loaded_config.qk_norm_eps) == (1e-6, 1e-5)
    ours = load_into(Transformer(loaded_config).eval(), state)
    tokens = text_tokens(config)
    cols = text_columns(hf, config.vocab_size)
    with torch.no_grad():
        hf_logits, our_logits = hf(input_ids=tokens).logits, ours(tokens)
    torch.testing.assert_close(our_logits[..., cols], hf_logits[..., cols], atol=2e-5, rtol=1e-5)
    # ... and back: our export of that model is what transformers computes.
    save_hf(state, loaded_config, tmp_path / "to", vq_config=TINY_VQ)
    again = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "to").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=tokens).logits[..., cols], our_logits[..., cols], atol=2e-5, rtol=1e-5
        )


def test_checkpoints_from_before_qk_norm_eps_load_as_they_were_trained(tmp_path: Path) -> None:
    # Before qk_norm_eps existed, QK-norm ran at norm_eps; a model_config.json without the key keeps that.
    for norm_eps in (1e-5, 1e-6):
        config = tiny(norm_eps=norm_eps)
        save_ours(randomized(config).state_dict(), config, tmp_path / str(norm_eps))
        path = tmp_path / str(norm_eps) / "model_config.json"
        raw = json.loads(path.read_text())
        assert raw.pop("qk_norm_eps") == 1e-5
        path.write_text(json.dumps(raw))
        assert load_ours(tmp_path / str(norm_eps))[0].qk_norm_eps == norm_eps


# ---------------------------------------------------------------------------------------------------- Meta


@pytest.mark.parametrize("model_parallel", [1, 2])
def test_meta_round_trip_is_exact(tmp_path: Path, model_parallel: int) -> None:
    config = tiny(max_seq_len=256)
    original = randomized(config).state_dict()
    save_meta(original, config, tmp_path, model_parallel=model_parallel)

    shards = sorted(p.name for p in tmp_path.glob("consolidated*.pth"))
    assert shards == meta_shard_names(model_parallel)
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


# ModelArgs fields of Meta's chameleon/inference/transformer.py: its loader keeps only these keys of the params.
META_MODEL_ARGS = {
    "model_parallel_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "ffn_dim_multiplier",
    "multiple_of",
    "norm_eps",
    "rope_theta",
    "qk_normalization",
    "swin_norm",
}
# Model-parallel split dimension of each sharded tensor in Meta's Transformer (by the last two name parts).
META_SPLIT = {
    "tok_embeddings.weight": 1,
    "wq.weight": 0,
    "wk.weight": 0,
    "wv.weight": 0,
    "w1.weight": 0,
    "w3.weight": 0,
    "output.weight": 0,
    "wo.weight": 1,
    "w2.weight": 1,
}


def meta_loader_load(folder: Path, rank: int | None, config: ModelConfig) -> dict[str, torch.Tensor]:
    """What Meta's `chameleon.inference.loader.load_model(folder, rank)` checks, step by step: the shard path rule
    of `_get_checkpoint_path`, the params merge, and `_convert`'s assertions on `load_state_dict(strict=False)`:
    no missing keys, `unexpected_keys == ["rope.freqs"]`, and (load_state_dict's own) every shape of a shard."""
    base = folder / "consolidated.pth"
    if not rank and base.exists():
        path = base
    else:
        assert rank is not None, "Meta's loader formats consolidated.{rank:02}.pth: fails for rank None"
        path = folder / f"consolidated.{rank:02}.pth"
        assert path.exists(), "Consolidated checkpoint not found."
    params = json.loads((folder / "params.json").read_text())
    merged = {**params, **params["model"], **json.loads((folder / "consolidate_params.json").read_text())}
    args = {k: v for k, v in merged.items() if k in META_MODEL_ARGS}
    mp = args["model_parallel_size"]
    assert args["dim"] == config.dim and args["qk_normalization"] == config.qk_norm
    state = torch.load(path, weights_only=True)
    expected = Transformer(config.model_copy(update={"qk_norm_groups": 1})).state_dict()
    assert [k for k in expected if k not in state] == []  # missing_keys
    assert [k for k in state if k not in expected] == ["rope.freqs"]  # unexpected_keys, exactly
    for name, tensor in expected.items():
        shape = list(tensor.shape)
        split = META_SPLIT.get(".".join(name.split(".")[-2:]))
        if split is not None:
            shape[split] //= mp
        assert list(state[name].shape) == shape, name
    return state


@pytest.mark.parametrize(("model_parallel", "groups"), [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_meta_loader_accepts_every_export(tmp_path: Path, model_parallel: int, groups: int) -> None:
    config = tiny(n_kv_heads=4, qk_norm_groups=groups, rope_theta=500_000.0)
    save_meta(randomized(config).state_dict(), config, tmp_path, model_parallel=model_parallel)
    # detect_shard_count: consolidated.pth means one shard, else every consolidated.*.pth is one.
    found = 1 if (tmp_path / "consolidated.pth").exists() else len(list(tmp_path.glob("consolidated.*.pth")))
    assert found == model_parallel
    ranks = [None, 0] if model_parallel == 1 else range(model_parallel)  # Meta's single-GPU path passes no rank
    hd = config.head_dim
    # LLaMA's rotary inverse frequencies, the buffer Meta's checkpoints carry (its code no longer reads it).
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    for rank in ranks:
        state = meta_loader_load(tmp_path, rank, config)
        assert state["rope.freqs"].shape == (hd // 2,) and state["rope.freqs"].dtype == torch.float32
        torch.testing.assert_close(state["rope.freqs"], freqs)
    # Re-exporting unsharded into the same folder leaves no shard of the earlier export beside consolidated.pth.
    save_meta(randomized(config).state_dict(), config, tmp_path, model_parallel=groups)
    assert sorted(p.name for p in tmp_path.glob("consolidated*.pth")) == meta_shard_names(groups)


def test_meta_rope_freqs_is_ignored_and_flat_params_work(tmp_path: Path) -> None:
    config = tiny()
    original = randomized(config).state_dict()
    save_meta(original, config, tmp_path)
    shard = torch.load(tmp_path / "consolidated.pth", weights_only=True)
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


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(convert)
    app.command("noop")(lambda: None)  # two commands, so `convert` is a subcommand as in cham
    return app


def test_cli_converts_ours_to_meta_to_hf_and_back(tmp_path: Path, tiny_tokenizers: dict[str, Path]) -> None:
    runner = CliRunner()
    config = tiny()
    original = randomized(config).state_dict()
    save_ours(original, config, tmp_path / "ours")

    tokenizers = ["--text-tokenizer", str(tiny_tokenizers["text"]), "--image-tokenizer", str(tiny_tokenizers["image"])]
    # --from is found from the folder's files; given, it is used as said.
    steps = [("ours", "meta", ["--model-parallel", "2"]), ("meta", "hf", tokenizers), ("hf", "ours", ["--from", "hf"])]
    src = tmp_path / "ours"
    for i, (a, b, extra) in enumerate(steps):
        out = tmp_path / f"step{i}_{b}"
        result = runner.invoke(cli(), ["convert", str(src), str(out), "--to", b, *extra])
        assert result.exit_code == 0, result.output
        assert f"converted {a} " in result.output and f"as {b}" in result.output
        src = out
    loaded_config, state = load_ours(src)
    assert same_shape(loaded_config, config)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name

    result = runner.invoke(
        cli(), ["convert", str(tmp_path / "ours"), str(tmp_path / "x"), "--from", "meta", "--to", "ours"]
    )
    assert result.exit_code == 1
    assert "params.json" in result.output


def test_cli_requires_the_target_and_finds_the_source_format_or_says_why_not(tmp_path: Path) -> None:
    runner = CliRunner()
    config = tiny()
    state = Transformer(config).state_dict()
    save_ours(state, config, tmp_path / "ours")
    # No silent default target: --to is required.
    result = runner.invoke(cli(), ["convert", str(tmp_path / "ours"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "Missing option '--to'" in result.output
    assert not (tmp_path / "x").exists()
    # A folder of no known format, and one holding two formats, name what was expected / found.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "params.json").write_text("{}")  # params.json without shards is not Meta's
    result = runner.invoke(cli(), ["convert", str(tmp_path / "empty"), str(tmp_path / "x"), "--to", "hf"])
    assert result.exit_code == 1
    assert f"{tmp_path / 'empty'} holds no checkpoint in a known format (expected ours: model.pt" in result.output
    save_meta(state, config, tmp_path / "ours")
    result = runner.invoke(cli(), ["convert", str(tmp_path / "ours"), str(tmp_path / "x"), "--to", "hf"])
    assert result.exit_code == 1 and "in several formats (ours, meta); say which to read with --from" in result.output
    result = runner.invoke(
        cli(), ["convert", str(tmp_path / "ours"), str(tmp_path / "x"), "--to", "ours", "--from", "meta"]
    )
    assert result.exit_code == 0, result.output
    save_hf(state, config, tmp_path / "hf")
    assert (detect_format(tmp_path / "hf"), detect_format(tmp_path / "x")) == ("hf", "ours")


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
        (
            load_hf,
            damaged("hf", "config.json", json.dumps(hf_config).encode()),
            r"config\.json: not a Chameleon config \(no hidden_size\)",
        ),
        (load_hf, damaged("hf", "config.json", b"{oops"), r"config\.json: not valid JSON \(line 1, column 2"),
        (load_meta, damaged("meta", "params.json", b""), r"params\.json: not valid JSON"),
        (
            load_meta,
            damaged("meta", "consolidated.00.pth", shard[: len(shard) // 3]),
            r"consolidated\.00\.pth: truncated or damaged PyTorch file",
        ),
        (
            load_meta,
            damaged("meta", "consolidated.01.pth", b"garbage" * 9),
            r"consolidated\.01\.pth: not a weights-only PyTorch file",
        ),
        (
            load_ours,
            damaged("ours", "model_config.json", b'{"dim": "wide"}'),
            r"model_config\.json: not a model config \(dim: Input should be a valid integer",
        ),
        (
            load_meta,
            damaged("meta", "consolidated.00.pth", without("meta/consolidated.00.pth", "norm.weight")),
            r"consolidated\.01\.pth: other tensor names than consolidated\.00\.pth: "
            r"lacks \[\], adds \['norm\.weight'\]",
        ),
        (
            load_ours,
            damaged("ours", "model.pt", without("ours/model.pt", "norm.weight")),
            r"ours-model\.pt-\d+: state dict does not match the model: missing \['norm\.weight'\]",
        ),
    ]
    for loader, folder, message in cases:
        with pytest.raises(ConversionError, match=message) as info:
            loader(folder)
        assert str(folder) in str(info.value)
