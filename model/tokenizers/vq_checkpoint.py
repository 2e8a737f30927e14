"""VQGAN checkpoints: Meta's `vqgan.ckpt` + `vqgan.yaml` (taming format) and Hugging Face ChameleonVQVAE, both ways.

HF -> ours is the identity on names once the `model.vqmodel.` prefix (full Chameleon checkpoint) is stripped;
HF's converter drops every `decoder.*` key, so such a model is encode-only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from torch import Tensor

from model.files.atomic import atomic_path, write_atomic
from model.files.reading import load_tensor_file
from model.files.state_dicts import compare_state_dicts
from model.tokenizers.vqgan import VQGAN
from schemas.config_base import format_location
from schemas.vq_config import VQConfig

META_CKPT_NAME = "vqgan.ckpt"
META_YAML_NAME = "vqgan.yaml"
TAMING_TARGET = "taming.models.vqgan.VQModel"
# Meta's Lightning checkpoint also holds the training loss (LPIPS, discriminator): not part of the tokenizer.
META_IGNORED_PREFIXES = ("loss.",)
# ddconfig keys taming accepts that we do not model; fine only at the value that means "our architecture".
TAMING_DDCONFIG_DEFAULTS: dict[str, Any] = {
    "resamp_with_conv": True,
    "give_pre_end": False,
    "tanh_out": False,
    "use_linear_attn": False,
    "attn_type": "vanilla",
}
DDCONFIG_FIELDS = (
    "double_z",
    "z_channels",
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "dropout",
)
# Top-level yaml key for what taming's VQModel(**params) would reject; Meta's loader reads only model.params.
EXTRA_YAML_KEY = "chameleon_pipeline"
HF_PREFIXES = ("model.vqmodel.", "vqmodel.")
VQ_MODULES = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
# HF ChameleonVQVAEConfig field -> VQConfig field (what HF's converter renamed from vqgan.yaml).
HF_CONFIG_NAMES = {
    "base_channels": "ch",
    "channel_multiplier": "ch_mult",
    "latent_channels": "z_channels",
    "double_latent": "double_z",
    "num_embeddings": "n_embed",
    "out_channels": "out_ch",
    "embed_dim": "embed_dim",
    "resolution": "resolution",
    "in_channels": "in_channels",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
    "beta": "beta",
}


class VQCheckpointError(ValueError):
    """A VQ checkpoint or config that cannot be used; the message names the file and what is wrong."""


def _config_or_error(data: dict[str, Any], source: str) -> VQConfig:
    try:
        return VQConfig.model_validate(data)
    except ValidationError as err:
        problems = [f"{format_location(tuple(e['loc'])) or 'config'}: {e['msg']}" for e in err.errors()]
        raise VQCheckpointError(f"{source}: not a usable VQGAN config: " + "; ".join(problems)) from None


# --- taming / Meta format ----------------------------------------------------------------------------------


def vq_config_from_taming(data: Mapping[str, Any], source: str = "<vqgan.yaml>") -> VQConfig:
    """VQConfig from a parsed taming `vqgan.yaml` (`model.params.{ddconfig, n_embed, embed_dim}`)."""
    model = data.get("model", data) if isinstance(data, Mapping) else None
    params = model.get("params") if isinstance(model, Mapping) else None
    if not isinstance(params, Mapping) or not isinstance(params.get("ddconfig"), Mapping):
        raise VQCheckpointError(f"{source}: expected a taming config with model.params.ddconfig")
    if params.get("remap") is not None:
        raise VQCheckpointError(f"{source}: model.params.remap (codebook index remapping) is not supported")
    ddconfig = dict(params["ddconfig"])
    for key, default in TAMING_DDCONFIG_DEFAULTS.items():
        if key in ddconfig and ddconfig.pop(key) != default:
            raise VQCheckpointError(f"{source}: ddconfig.{key} must be {default!r} (the only variant supported)")
    unknown = sorted(set(ddconfig) - set(DDCONFIG_FIELDS))
    if unknown:
        raise VQCheckpointError(f"{source}: unknown ddconfig keys {unknown}; known: {list(DDCONFIG_FIELDS)}")
    extra = data.get(EXTRA_YAML_KEY) or {}
    fields = {**ddconfig, "n_embed": params.get("n_embed"), "embed_dim": params.get("embed_dim"), **extra}
    return _config_or_error(fields, source)


def taming_config(config: VQConfig) -> dict[str, Any]:
    """The `vqgan.yaml` mapping for a config, loadable by taming-transformers and Meta's ImageTokenizer."""
    ddconfig = {key: getattr(config, key) for key in DDCONFIG_FIELDS}
    params = {
        "embed_dim": config.embed_dim,
        "n_embed": config.n_embed,
        "ddconfig": ddconfig,
        # taming's VQModel requires a loss config; Meta's ImageTokenizer deletes it.
        "lossconfig": {"target": "torch.nn.Identity"},
    }
    # beta is hard-coded (0.25) in taming's VQModel, so it lives outside model.params.
    return {"model": {"target": TAMING_TARGET, "params": params}, EXTRA_YAML_KEY: {"beta": config.beta}}


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise VQCheckpointError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise VQCheckpointError(f"{path}: not valid YAML ({err})") from None


def _read_torch_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise VQCheckpointError(f"{path}: file not found")
    data = load_tensor_file(path, VQCheckpointError)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, Tensor) for v in data.values()):
        raise VQCheckpointError(f"{path}: expected a dict with a 'state_dict' of tensors")
    return dict(data)


def load_meta_vqgan(
    ckpt_path: str | Path, yaml_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> VQGAN:
    """Meta's `vqgan.ckpt` + `vqgan.yaml` (default: beside the ckpt) as a VQGAN in eval mode; `loss.*` ignored."""
    ckpt_path = Path(ckpt_path)
    yaml_path = Path(yaml_path) if yaml_path is not None else ckpt_path.with_name(META_YAML_NAME)
    data = _read_yaml(yaml_path)
    config = vq_config_from_taming(data if isinstance(data, Mapping) else {}, str(yaml_path))
    state = _read_torch_state_dict(ckpt_path)
    return build_vqgan(
        config, state, str(ckpt_path), with_decoder=True, ignore_prefixes=META_IGNORED_PREFIXES, dtype=dtype
    )


def save_meta_vqgan(model: VQGAN, directory: str | Path) -> tuple[Path, Path]:
    """Write `vqgan.ckpt` ({'state_dict': ...}) and `vqgan.yaml` into `directory`; returns both paths."""
    if not model.has_decoder:
        raise VQCheckpointError(
            "this VQGAN has no decoder; Meta's format needs one (its loader would fill it with random weights)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    ckpt, cfg = directory / META_CKPT_NAME, directory / META_YAML_NAME
    with atomic_path(ckpt) as tmp:
        torch.save({"state_dict": state}, tmp)
    write_atomic(cfg, yaml.safe_dump(taming_config(model.config), sort_keys=False))
    return ckpt, cfg


# --- Hugging Face ChameleonVQVAE -----------------------------------------------------------------------------


def vq_config_from_hf(hf_config: Mapping[str, Any], source: str = "<hf config>") -> VQConfig:
    """VQConfig from HF's ChameleonVQVAEConfig dict, or from a full ChameleonConfig dict (its `vq_config`)."""
    data = hf_config.get("vq_config") if hf_config.get("model_type") == "chameleon" else hf_config
    if not isinstance(data, Mapping):
        raise VQCheckpointError(f"{source}: no vq_config in this Chameleon config")
    if data.get("attn_type", "vanilla") != "vanilla":
        raise VQCheckpointError(f"{source}: attn_type {data.get('attn_type')!r} is not supported (only 'vanilla')")
    fields = {ours: data[hf] for hf, ours in HF_CONFIG_NAMES.items() if data.get(hf) is not None}
    return _config_or_error(fields, source)


def hf_vq_config(config: VQConfig) -> dict[str, Any]:
    """HF's ChameleonVQVAEConfig dict (a ChameleonConfig's `vq_config`) for our config; `vq_config_from_hf` reads
    it back to the same VQConfig."""
    fields = {hf: getattr(config, ours) for hf, ours in HF_CONFIG_NAMES.items()}
    return {**fields, "attn_type": "vanilla", "model_type": "chameleon_vqgan"}


def hf_vq_state_dict(model: VQGAN, prefix: str = HF_PREFIXES[0]) -> dict[str, Tensor]:
    """The VQ tensors of a HF Chameleon checkpoint (`model.vqmodel.*`): encoder, quant_conv, codebook and
    post_quant_conv, contiguous on the CPU. HF's ChameleonVQVAE has no decoder, so ours is left out; an encode-only
    model's missing post_quant_conv (it feeds only the decoder, unused by transformers) is written as zeros."""
    state = {
        k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if not k.startswith("decoder.")
    }
    if model.post_quant_conv is None:
        cfg = model.config
        state["post_quant_conv.weight"] = torch.zeros(cfg.z_channels, cfg.embed_dim, 1, 1)
        state["post_quant_conv.bias"] = torch.zeros(cfg.z_channels)
    return {prefix + k: v for k, v in state.items()}


def hf_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """VQ tensors of a HF state dict under our names: strip `model.vqmodel.` / `vqmodel.`, drop the LM's tensors."""
    for prefix in HF_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)  # a bare ChameleonVQVAE: names are already ours


def vqgan_from_hf_state_dict(
    state_dict: Mapping[str, Tensor], config: VQConfig, source: str = "<hf state dict>"
) -> VQGAN:
    """A VQGAN from HF weights (full Chameleon or bare ChameleonVQVAE); encode-only unless decoder keys exist."""
    state = hf_to_ours(state_dict)
    with_decoder = any(k.startswith("decoder.") for k in state)
    # An encode-only model has no post_quant_conv (it only feeds the decoder); HF keeps one, unused.
    ignore = () if with_decoder else ("post_quant_conv.",)
    return build_vqgan(config, state, source, with_decoder=with_decoder, ignore_prefixes=ignore)


def load_hf_vqvae(path: str | Path, config: VQConfig | None = None) -> VQGAN:
    """A VQGAN from a HF checkpoint: a directory (config.json + safetensors, sharded or not) or one .safetensors."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if config is None:
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise VQCheckpointError(f"{config_file}: file not found (pass config= to load bare weights)")
        config = vq_config_from_hf(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))
    files = [path] if path.is_file() else _hf_weight_files(path)
    state = _read_safetensors(files, HF_PREFIXES)
    return vqgan_from_hf_state_dict(state, config, str(path))


def _hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        # Only the shards that hold VQ tensors: a 7B checkpoint's other shards are many GB of LM weights.
        names = {f for k, f in weight_map.items() if k.startswith(HF_PREFIXES) or k.startswith(VQ_MODULES)}
        return [folder / name for name in sorted(names)]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise VQCheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _read_safetensors(files: Iterable[Path], prefixes: tuple[str, ...]) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    out: dict[str, Tensor] = {}
    for file in files:
        if not file.is_file():
            raise VQCheckpointError(f"{file}: file not found")
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
                prefixed = [k for k in keys if k.startswith(prefixes)]
                # Full checkpoint: read only the VQ tensors; bare VQVAE: read everything.
                for key in prefixed or keys:
                    out[key] = handle.get_tensor(key)
        except SafetensorError as err:
            raise VQCheckpointError(f"{file}: not a readable safetensors file ({err})") from None
    return out


# --- shared ---------------------------------------------------------------------------------------------------


def check_state_dict(
    expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Raise one VQCheckpointError naming every missing, unexpected or wrongly shaped tensor (expected vs found)."""
    diff = compare_state_dicts(expected, found, ignore_prefixes)
    problems = []
    if diff.missing:
        problems.append(f"{len(diff.missing)} missing tensors: {_some(diff.missing)}")
    if diff.unexpected:
        problems.append(f"{len(diff.unexpected)} unexpected tensors: {_some(diff.unexpected)}")
    problems += [
        f"tensor {key}: expected shape {want} (from the config), found {got}" for key, want, got in diff.mismatched
    ]
    if problems:
        raise VQCheckpointError(f"{source}: does not fit the VQ config: " + "; ".join(problems))


def _some(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def build_vqgan(
    config: VQConfig,
    state_dict: Mapping[str, Tensor],
    source: str,
    with_decoder: bool = True,
    ignore_prefixes: tuple[str, ...] = (),
    dtype: torch.dtype = torch.float32,
) -> VQGAN:
    """A VQGAN for `config` holding exactly `state_dict` (after dropping ignored prefixes), in eval mode."""
    # Build on the meta device: no random init of ~70M parameters only to overwrite them.
    with torch.device("meta"):
        model = VQGAN(config, with_decoder=with_decoder)
    expected = model.state_dict()
    check_state_dict(expected, state_dict, source, ignore_prefixes)
    # A copy: the model must not share storage with the caller's tensors (e.g. a live HF model).
    state = {k: state_dict[k].to(dtype=dtype, copy=True) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
