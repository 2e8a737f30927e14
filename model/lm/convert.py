"""Convert transformer weights between our format, Meta's `consolidated.NN.pth` release and Hugging Face Chameleon.

Our parameter names are Meta's (see model/lm/transformer.py), so the Meta path only merges or splits model-parallel
shards. The HF path renames tensors and converts rotary layouts: HF permutes q/k rows (and the QK-norm affine) from
Meta's adjacent-pair layout to rotate_half's halves, and stores QK-norm params per head as (heads, head_dim).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.files import step_folder
from model.files.reading import load_safetensors_file, load_state_dict_file, read_json_object
from model.files.state_dicts import model_mismatch
from model.lm.transformer import Transformer
from schemas.model_config import QK_NORM_EPS, ModelConfig
from schemas.vocab import IMAGE_CODE_OFFSET, VOCAB_PRESETS, VocabLayout

StateDict = dict[str, torch.Tensor]

# Our format is a step folder's model part (model/files/step_folder.py).
OURS_WEIGHTS, OURS_CONFIG = step_folder.WEIGHTS, step_folder.MODEL_CONFIG
HF_WEIGHTS, HF_INDEX = "model.safetensors", "model.safetensors.index.json"
HF_REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

# A stale buffer in Meta's checkpoints; Meta's own loader requires it (as the one unexpected key) and ignores it.
_META_IGNORED_KEYS = ("rope.freqs",)
# Model-parallel split dimension of each sharded tensor, by the last two name parts; absent = replicated.
_SPLIT_DIM = {
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
_QK_NORM = ("q_normalization", "k_normalization")

_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_normalization.weight": "self_attn.q_norm.weight",
    "attention.q_normalization.bias": "self_attn.q_norm.bias",
    "attention.k_normalization.weight": "self_attn.k_norm.weight",
    "attention.k_normalization.bias": "self_attn.k_norm.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: missing files, unknown or mismatched tensors."""


# ---------------------------------------------------------------------------------------------------- shared


def llama_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU hidden size by LLaMA's (and Meta Chameleon's) rule: 11008 for dim 4096, multiple_of 256."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of our Transformer for `config` (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_state_dict(config: ModelConfig, state: Mapping[str, torch.Tensor], source: str | Path | None = None) -> None:
    """Fail naming the tensor (and the `source` folder) if `state` lacks, adds, or mis-shapes any tensor of our model
    for `config`."""
    problem = model_mismatch(expected_shapes(config), state)
    if problem:
        raise ConversionError(f"{source}: {problem}" if source is not None else problem)


def _state_of(model_or_state: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    if isinstance(model_or_state, nn.Module):
        return {k: v.detach() for k, v in model_or_state.state_dict().items()}
    return dict(model_or_state)


# ---------------------------------------------------------------------------------------------------- ours


def load_ours(folder: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read our format: `model.pt` (state dict) and `model_config.json` (ModelConfig) from `folder`; a sharded
    step folder's weights are gathered here (model/files/step_folder.py)."""
    folder = Path(folder)
    if not step_folder.has_weights(folder):
        raise ConversionError(
            f"{folder} has no {OURS_WEIGHTS} (our format is {OURS_WEIGHTS} + {OURS_CONFIG}, or a sharded step folder)"
        )
    if not (folder / OURS_CONFIG).is_file():
        raise ConversionError(f"{folder} has no {OURS_CONFIG} (our format is {OURS_WEIGHTS} + {OURS_CONFIG})")
    config = step_folder.read_model_config(folder, ConversionError)
    state = step_folder.read_weights(folder, ConversionError)
    check_state_dict(config, state, folder)
    return config, state


def save_ours(model_or_state: nn.Module | Mapping[str, torch.Tensor], config: ModelConfig, folder: str | Path) -> None:
    """Write `model.pt` and `model_config.json` into `folder` (model.pt as the trainer's checkpoints hold it)."""
    state = _state_of(model_or_state)
    check_state_dict(config, state)
    step_folder.write_model(folder, state, config)


# ---------------------------------------------------------------------------------------------------- Meta


def _meta_params(folder: Path) -> dict[str, Any]:
    path = folder / "params.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no params.json (Meta format)")
    params = read_json_object(path, (), ConversionError, "params file")
    # Meta's loader merges the outer dict, the nested "model" dict, then consolidate_params.json.
    merged = {**params, **params.get("model", {})}
    consolidate = folder / "consolidate_params.json"
    if consolidate.is_file():
        merged.update(read_json_object(consolidate, (), ConversionError, "params file"))
    return merged


def meta_config(params: Mapping[str, Any], has_qk_norm: bool | None = None, qk_norm_groups: int = 1) -> ModelConfig:
    """ModelConfig from Meta's merged params.json; qk_norm defaults to whether the checkpoint has QK-norm tensors,
    qk_norm_groups is what the merged shards hold (see `merge_meta_shards`)."""
    try:
        dim, n_heads = int(params["dim"]), int(params["n_heads"])
        fields: dict[str, Any] = {
            "dim": dim,
            "n_layers": int(params["n_layers"]),
            "n_heads": n_heads,
            "n_kv_heads": int(params.get("n_kv_heads") or n_heads),
            "vocab_size": int(params["vocab_size"]),
            "ffn_dim": llama_ffn_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier")),
        }
    except KeyError as err:
        raise ConversionError(f"params.json lacks {err.args[0]!r}") from None
    for ours, theirs in (("norm_eps", "norm_eps"), ("rope_theta", "rope_theta"), ("swin_norm", "swin_norm")):
        if params.get(theirs) is not None:
            fields[ours] = params[theirs]
    if params.get("max_seq_len") is not None:
        fields["max_seq_len"] = int(params["max_seq_len"])
    qk = params.get("qk_normalization")
    fields["qk_norm"] = bool(qk) if qk is not None else bool(has_qk_norm)
    fields["qk_norm_groups"] = qk_norm_groups
    return ModelConfig.model_validate(fields)


def _meta_shards(folder: Path) -> list[Path]:
    single = folder / "consolidated.pth"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("consolidated.[0-9][0-9].pth"))
    if not shards:
        raise ConversionError(f"{folder} has neither consolidated.pth nor consolidated.NN.pth shards")
    names = [p.name for p in shards]
    if names != [f"consolidated.{i:02d}.pth" for i in range(len(shards))]:
        raise ConversionError(f"shards are not numbered 00..{len(shards) - 1:02d}: {names}")
    return shards


def _split_dim(name: str) -> int | None:
    return _SPLIT_DIM.get(".".join(name.split(".")[-2:]))


def _is_qk_norm(name: str) -> bool:
    return any(q in name for q in _QK_NORM)


def _constant_within(rows: torch.Tensor, groups: int) -> bool:
    blocks = rows.view(groups, -1, rows.shape[-1])
    return bool((blocks == blocks[:, :1]).all())


def fewest_qk_groups(tensors: list[torch.Tensor], limit: int) -> int:
    """The fewest groups g (a divisor of `limit`) such that every [rows, head_dim] tensor is constant within each of
    its g equal runs of rows; `limit` if none fewer (rows of per-head QK-norm beyond that are refused later)."""
    for groups in (g for g in range(1, limit + 1) if limit % g == 0):
        if all(_constant_within(t, groups) for t in tensors):
            return groups
    return limit


def merge_meta_shards(shards: list[Mapping[str, torch.Tensor]]) -> StateDict:
    """One state dict from model-parallel shards, each tensor merged by its split rule; rope.freqs dropped.

    QK-norm: Meta's 34B normalised each shard's heads with that shard's own affine. Each QK-norm tensor becomes
    [groups, head_dim], one row per run of shards that share it (our `qk_norm_groups`, the fewest that hold every
    layer's), or the one [head_dim] vector where all shards share it. Other replicated tensors (the RMSNorm gains)
    that differ are averaged, as Hugging Face's converter does, with a warning.
    """
    qk_names = [name for name in shards[0] if _is_qk_norm(name)]
    per_shard = {name: torch.stack([s[name] for s in shards]) for name in qk_names}
    groups = fewest_qk_groups(list(per_shard.values()), len(shards))
    merged: StateDict = {}
    averaged: list[tuple[str, float]] = []
    for name in shards[0]:
        if name in _META_IGNORED_KEYS:
            continue
        parts = [s[name] for s in shards]
        dim = _split_dim(name)
        if dim is not None:
            merged[name] = torch.cat(parts, dim=dim) if len(parts) > 1 else parts[0]
        elif _is_qk_norm(name):  # one row per group of shards that share it
            rows = per_shard[name].view(groups, -1, per_shard[name].shape[-1])[:, 0]
            merged[name] = rows[0].clone() if groups == 1 else rows.clone()
        elif all(torch.equal(parts[0], p) for p in parts[1:]):
            merged[name] = parts[0]
        else:
            stacked = torch.stack([p.float() for p in parts])
            averaged.append((name, float((stacked - stacked.mean(0)).abs().max())))
            merged[name] = stacked.mean(0).to(parts[0].dtype)
    if averaged:
        worst = max(averaged, key=lambda item: item[1])
        warnings.warn(
            f"{len(averaged)} replicated tensors differ between the {len(shards)} model-parallel shards (largest "
            f"deviation from the mean {worst[1]:.3g}, in {worst[0]}); using their mean",
            stacklevel=2,
        )
    return merged


def load_meta(folder: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read Meta's release folder: params.json plus consolidated.pth or consolidated.NN.pth shards (merged)."""
    folder = Path(folder)
    params = _meta_params(folder)
    paths = _meta_shards(folder)
    shards = [load_state_dict_file(p, ConversionError) for p in paths]
    keys = set(shards[0])
    for path, shard in zip(paths[1:], shards[1:], strict=True):
        if set(shard) != keys:
            raise ConversionError(
                f"{path}: other tensor names than {paths[0].name}: lacks "
                f"{sorted(keys - set(shard))[:8]}, adds {sorted(set(shard) - keys)[:8]}"
            )
    state = merge_meta_shards(shards)
    qk = [t for k, t in state.items() if _is_qk_norm(k)]
    groups = qk[0].shape[0] if qk and qk[0].dim() == 2 else 1
    config = meta_config(params, has_qk_norm=bool(qk), qk_norm_groups=groups)
    check_state_dict(config, state, folder)
    return config, state


def _meta_ffn_params(config: ModelConfig) -> tuple[int, float]:
    """multiple_of and ffn_dim_multiplier that reproduce config.ffn_dim through llama_ffn_dim."""
    base = int(8 * config.dim / 3)
    candidates = [(256, 1.0), (config.ffn_dim, min(1.0, config.ffn_dim / base))]
    for multiple_of, mult in candidates:
        if llama_ffn_dim(config.dim, multiple_of, mult) == config.ffn_dim:
            return multiple_of, mult
    raise ConversionError(f"ffn_dim {config.ffn_dim} cannot be written as params.json multiple_of/ffn_dim_multiplier")


def split_meta_state(state: Mapping[str, torch.Tensor], config: ModelConfig, model_parallel: int) -> list[StateDict]:
    """Split a merged state dict into `model_parallel` shards by Meta's rules: norms replicated, QK-norm replicated
    or, with `qk_norm_groups` > 1, each shard given its heads' group."""
    if model_parallel < 1:
        raise ConversionError(f"model_parallel must be >= 1, got {model_parallel}")
    for what, n in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads), ("dim", config.dim)):
        if n % model_parallel:
            raise ConversionError(f"{what} {n} is not divisible by model_parallel {model_parallel}")
    groups = config.qk_norm_groups if config.qk_norm else 1
    if model_parallel % groups:
        raise ConversionError(
            f"qk_norm_groups {groups}: Meta's format holds one QK-norm per shard, so model_parallel "
            f"must be a multiple of {groups} (got {model_parallel})"
        )
    shards: list[StateDict] = [{} for _ in range(model_parallel)]
    for name, tensor in state.items():
        dim = _split_dim(name)
        if dim is not None and tensor.shape[dim] % model_parallel:
            raise ConversionError(f"{name} dim {dim} ({tensor.shape[dim]}) is not divisible by {model_parallel}")
        if _is_qk_norm(name) and groups > 1:  # shard i's heads all lie in group i // (shards per group)
            pieces = [tensor[i * groups // model_parallel] for i in range(model_parallel)]
        elif dim is not None:
            pieces = list(tensor.chunk(model_parallel, dim=dim))
        else:
            pieces = [tensor] * model_parallel
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.clone().contiguous()  # a view would save the whole tensor into every shard
    return shards


def check_reference_qk_norm_eps(config: ModelConfig, target: str) -> None:
    """Refuse a model whose QK-norm eps is not the 1e-5 that Meta's and HF's code hard-code (`target` names them)."""
    if config.qk_norm and config.qk_norm_eps != QK_NORM_EPS:
        raise ConversionError(
            f"{target}'s Chameleon fixes the QK-norm eps at {QK_NORM_EPS:g}; this model's "
            f"qk_norm_eps is {config.qk_norm_eps:g}: it would compute other logits"
        )


def meta_rope_freqs(config: ModelConfig, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `rope.freqs` tensor of Meta's checkpoints (LLaMA's rotary inverse frequencies, [head_dim // 2]): unused
    by Meta's Transformer, but its loader asserts it is the one unexpected key of every shard."""
    hd = config.head_dim
    return (1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)).to(dtype)


def meta_shard_names(model_parallel: int) -> list[str]:
    """Shard file names Meta's loader opens: consolidated.pth when unsharded (its single-GPU path asks for no rank),
    else consolidated.NN.pth for rank NN."""
    return ["consolidated.pth"] if model_parallel == 1 else [f"consolidated.{i:02d}.pth" for i in range(model_parallel)]


def save_meta(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    config: ModelConfig,
    folder: str | Path,
    model_parallel: int = 1,
) -> None:
    """Write params.json, consolidate_params.json and the shards (`meta_shard_names`) into `folder`; each shard holds
    `rope.freqs` besides the model's tensors, as Meta's loader requires."""
    state = _state_of(model_or_state)
    check_state_dict(config, state)
    check_reference_qk_norm_eps(config, "Meta")
    multiple_of, mult = _meta_ffn_params(config)
    shards = split_meta_state(state, config, model_parallel)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_args = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": mult,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "qk_normalization": config.qk_norm,
        "swin_norm": config.swin_norm,
    }
    # Meta's loader reads the nested "model" dict; max_seq_len is ours and outside ModelArgs, so Meta ignores it.
    params = {"model": model_args, "max_seq_len": config.max_seq_len}
    (folder / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    (folder / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": model_parallel}) + "\n")
    dtype = state["norm.weight"].dtype
    # A shard left by an earlier export into this folder would be read (by Meta's loader too) as one of these.
    for stale in [folder / "consolidated.pth", *folder.glob("consolidated.[0-9][0-9].pth")]:
        stale.unlink(missing_ok=True)
    for name, shard in zip(meta_shard_names(model_parallel), shards, strict=True):
        torch.save({**shard, "rope.freqs": meta_rope_freqs(config, dtype)}, folder / name)


# ---------------------------------------------------------------------------------------------------- HF


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta adjacent-pair rows -> HF rotate_half rows, per head (HF's converter `permute`)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate_half rows -> Meta adjacent-pair rows, per head (inverse of permute_rows)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_vector(v: torch.Tensor) -> torch.Tensor:
    """One head's [head_dim] QK-norm vector in Meta's layout -> HF's layout."""
    return v.view(-1, 2).t().reshape(-1)


def unpermute_vector(v: torch.Tensor) -> torch.Tensor:
    """One head's [head_dim] QK-norm vector in HF's layout -> Meta's layout."""
    return v.view(2, -1).t().reshape(-1)


def hf_config(raw: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from an HF Chameleon config.json dict."""
    if raw.get("model_type", "chameleon") != "chameleon":
        raise ConversionError(f"config.json model_type is {raw.get('model_type')!r}, not 'chameleon'")
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10_000.0))
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"rope_type {rope['rope_type']!r} is not supported (only 'default')")
    n_heads = int(raw["num_attention_heads"])
    return ModelConfig(
        dim=int(raw["hidden_size"]),
        n_layers=int(raw["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
        ffn_dim=int(raw["intermediate_size"]),
        vocab_size=int(raw["vocab_size"]),
        max_seq_len=int(raw.get("max_position_embeddings", 4096)),
        norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta),
        qk_norm=True,  # HF Chameleon always has QK-norm
        swin_norm=bool(raw.get("swin_norm", False)),
    )


def _hf_name(ours: str) -> str:
    if ours in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[ours]
    _, layer, rest = ours.split(".", 2)
    return f"model.layers.{layer}.{_HF_LAYER_NAMES[rest]}"


def _read_safetensors(folder: Path) -> StateDict:
    if (folder / HF_WEIGHTS).is_file():
        files = [folder / HF_WEIGHTS]
    elif (folder / HF_INDEX).is_file():
        weight_map = read_json_object(folder / HF_INDEX, ("weight_map",), ConversionError, "safetensors index")[
            "weight_map"
        ]
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        raise ConversionError(f"{folder} has neither {HF_WEIGHTS} nor {HF_INDEX}")
    state: StateDict = {}
    for f in files:
        # The VQGAN (model.vqmodel.*) is the image tokenizer's; it is loaded elsewhere.
        state.update(
            {k: v for k, v in load_safetensors_file(f, ConversionError).items() if not k.startswith("model.vqmodel.")}
        )
    return state


def _qk_from_hf(name: str, t: torch.Tensor, head_dim: int, groups: int) -> torch.Tensor:
    # HF stores (heads, hd) (older HF: (model_parallel_size, hd)); ours holds one [hd] vector for every head, or
    # [groups, hd] for equal runs of heads.
    rows = t.reshape(-1, head_dim)
    if rows.shape[0] % groups or not _constant_within(rows, groups):
        raise ConversionError(
            f"{name}: QK-norm params differ within runs of heads (shape {tuple(t.shape)}, {groups} groups); "
            "our model holds one affine per equal run of heads (qk_norm_groups)"
        )
    vectors = [unpermute_vector(block[0]) for block in rows.view(groups, -1, head_dim)]
    return vectors[0].clone() if groups == 1 else torch.stack(vectors)


def hf_qk_norm_groups(hf_state: Mapping[str, torch.Tensor], config: ModelConfig) -> int:
    """The fewest QK-norm groups that HF's per-head QK-norm tensors hold (1 for the 7B, 4 for the 30B/34B)."""
    tensors = [t.reshape(-1, config.head_dim) for k, t in hf_state.items() if "q_norm" in k or "k_norm" in k]
    return fewest_qk_groups(tensors, math.gcd(config.n_heads, config.n_kv_heads, *(t.shape[0] for t in tensors)))


def state_from_hf(hf_state: Mapping[str, torch.Tensor], config: ModelConfig) -> StateDict:
    """Our state dict from HF tensors: renamed, q/k rows and QK-norm un-permuted, QK-norm reduced to one vector per
    `config.qk_norm_groups` group of heads."""
    reverse = {_hf_name(k): k for k in expected_shapes(config)}
    unknown = sorted(set(hf_state) - set(reverse))
    if unknown:
        raise ConversionError(f"unexpected HF tensors: {unknown[:8]}")
    state: StateDict = {}
    for hf_name, t in hf_state.items():
        ours = reverse[hf_name]
        if ours.endswith("attention.wq.weight"):
            t = unpermute_rows(t, config.n_heads)
        elif ours.endswith("attention.wk.weight"):
            t = unpermute_rows(t, config.n_kv_heads)
        elif _is_qk_norm(ours):
            t = _qk_from_hf(hf_name, t, config.head_dim, config.qk_norm_groups)
        state[ours] = t
    check_state_dict(config, state)
    return state


def state_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig) -> StateDict:
    """HF tensors from our state dict: renamed, q/k rows and QK-norm permuted, QK-norm repeated for each head of
    its group."""
    check_state_dict(config, state)
    out: StateDict = {}
    for ours, t in state.items():
        if ours.endswith("attention.wq.weight"):
            t = permute_rows(t, config.n_heads)
        elif ours.endswith("attention.wk.weight"):
            t = permute_rows(t, config.n_kv_heads)
        elif _is_qk_norm(ours):
            heads = config.n_heads if "q_normalization" in ours else config.n_kv_heads
            groups = t.reshape(-1, config.head_dim)
            t = torch.stack([permute_vector(v) for v in groups]).repeat_interleave(heads // groups.shape[0], 0)
        out[_hf_name(ours)] = t.contiguous()
    return out


def load_hf(folder: str | Path) -> tuple[ModelConfig, StateDict]:
    """Read an HF Chameleon folder (config.json + model.safetensors or a sharded index); the VQGAN is skipped."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json (HF format)")
    raw = read_json_object(folder / "config.json", (), ConversionError, "model config")
    missing = [k for k in HF_REQUIRED_KEYS if k not in raw]
    if missing:
        raise ConversionError(f"{folder / 'config.json'}: not a Chameleon config (no {', '.join(missing)})")
    config = hf_config(raw)
    hf_state = _read_safetensors(folder)
    try:
        groups = hf_qk_norm_groups(hf_state, config)
        config = ModelConfig.model_validate({**config.model_dump(), "qk_norm_groups": groups})
        return config, state_from_hf(hf_state, config)
    except ConversionError as err:
        raise ConversionError(f"{folder}: {err}") from None


def _layout_for(vocab_size: int) -> VocabLayout | None:
    return next((v for v in VOCAB_PRESETS.values() if v.vocab_size == vocab_size), None)


def hf_vocabulary_map(vocab: VocabLayout | None) -> dict[str, int]:
    """The minimal `vocabulary_map` HF needs: image-code names (IMGIMG + digits as letters + Z) and `<image>`."""
    if vocab is None:
        return {}
    mapping = {}
    for code in range(vocab.image_codes):
        letters = "".join(chr(ord("A") + int(d)) for d in str(code))
        mapping[f"IMGIMG{letters}Z"] = IMAGE_CODE_OFFSET + code
    # HF's <image> placeholder is Meta's <reserved08707>, the reserved id right after the prompt separator.
    if vocab.sep_id + 1 < vocab.first_text_id:
        mapping["<image>"] = vocab.sep_id + 1
    return mapping


def hf_config_dict(config: ModelConfig, vocab: VocabLayout | None = None, vq_config: dict | None = None) -> dict:
    """An HF ChameleonConfig dict for `config`; vocab defaults to the preset layout of the same vocab_size."""
    vocab = vocab or _layout_for(config.vocab_size)
    return {
        "architectures": ["ChameleonForConditionalGeneration"],
        "model_type": "chameleon",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # rope_parameters for transformers >= 5, rope_theta for older readers.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "model_parallel_size": 1,
        "swin_norm": config.swin_norm,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "vq_config": vq_config or {"num_embeddings": vocab.image_codes if vocab else 8192},
        "vocabulary_map": hf_vocabulary_map(vocab),
    }


def save_hf(
    model_or_state: nn.Module | Mapping[str, torch.Tensor],
    config: ModelConfig,
    folder: str | Path,
    vocab: VocabLayout | None = None,
    vq_config: dict | None = None,
    config_dict: dict | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write config.json (`config_dict`, default `hf_config_dict`) and model.safetensors (the LM, plus
    `extra_tensors`) loadable by ChameleonForConditionalGeneration.from_pretrained.

    The LM only, for weight conversion: without `model.vqmodel.*` among `extra_tensors` transformers initialises a
    random VQ. `model.lm.hf_export.export_hf` writes the whole usable export (VQ, tokenizer and processor files).
    """
    if not config.qk_norm:
        raise ConversionError("HF Chameleon always applies QK-norm; a model with qk_norm=False has no HF form")
    check_reference_qk_norm_eps(config, "Hugging Face")
    from safetensors.torch import save_file

    tensors = {**state_to_hf(_state_of(model_or_state), config), **(extra_tensors or {})}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = config_dict or hf_config_dict(config, vocab, vq_config)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    save_file(tensors, str(folder / HF_WEIGHTS), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------- dispatch

LOADERS = {"ours": load_ours, "meta": load_meta, "hf": load_hf}
# What a folder of each format holds, for `detect_format` and its errors.
FORMAT_FILES = {
    "ours": f"{OURS_WEIGHTS} + {OURS_CONFIG}",
    "meta": "params.json + consolidated.pth or consolidated.NN.pth",
    "hf": f"config.json + {HF_WEIGHTS} or {HF_INDEX}",
}


def detect_format(folder: str | Path) -> str:
    """'ours', 'meta' or 'hf' by the files in `folder`; a ConversionError when it holds none of them or more
    than one (then --from must say which)."""
    folder = Path(folder)
    found = {
        "ours": step_folder.has_model(folder),
        "meta": (folder / "params.json").is_file()
        and ((folder / "consolidated.pth").is_file() or any(folder.glob("consolidated.[0-9][0-9].pth"))),
        "hf": (folder / "config.json").is_file() and ((folder / HF_WEIGHTS).is_file() or (folder / HF_INDEX).is_file()),
    }
    formats = [name for name, present in found.items() if present]
    if len(formats) == 1:
        return formats[0]
    if formats:
        raise ConversionError(
            f"{folder} holds checkpoints in several formats ({', '.join(formats)}); say which to read with --from"
        )
    expected = "; ".join(f"{name}: {files}" for name, files in FORMAT_FILES.items())
    raise ConversionError(f"{folder} holds no checkpoint in a known format (expected {expected})")


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    from_format: str | None,
    to_format: str,
    model_parallel: int = 1,
    text_tokenizer: str | Path | None = None,
    image_tokenizer: str | Path | None = None,
):
    """Read `src` in from_format (None: `detect_format`) and write `out` in to_format ('ours', 'meta' or 'hf');
    returns the ModelConfig. An HF export also holds the tokenizers (`model.lm.hf_export`): `text_tokenizer` and
    `image_tokenizer`, by default those `src` records (a step folder's tokenizers.json)."""
    if from_format is None:
        from_format = detect_format(src)
    if from_format not in LOADERS:
        raise ConversionError(f"unknown source format {from_format!r}; expected one of {sorted(LOADERS)}")
    if to_format not in LOADERS:
        raise ConversionError(f"unknown target format {to_format!r}; expected one of {sorted(LOADERS)}")
    if model_parallel != 1 and to_format != "meta":
        raise ConversionError("model_parallel applies only to --to meta")
    if to_format != "hf" and (text_tokenizer or image_tokenizer):
        raise ConversionError("tokenizers are written only by --to hf")
    if to_format == "hf":  # the tokenizers first: a missing one fails before the weights are read
        from model.lm.hf_export import export_hf, load_tokenizers, tokenizer_paths

        text, vqgan = load_tokenizers(*tokenizer_paths(Path(src), text_tokenizer, image_tokenizer))
    config, state = LOADERS[from_format](src)
    if to_format == "ours":
        save_ours(state, config, out)
    elif to_format == "meta":
        save_meta(state, config, out, model_parallel=model_parallel)
    else:
        export_hf(state, config, out, text, vqgan)
    return config
