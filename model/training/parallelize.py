"""The trainer's model for one process, DDP or FSDP2: built, checkpointed, compiled, wrapped and initialised.

Under FSDP2 no rank ever holds the whole model: it is built on the meta device (shapes only), its activation
checkpointing and compilation applied, each block and the root sharded (`fully_shard`), then only this rank's shards
are materialised on the device and initialised. The initialisation makes each parameter's full tensor on the host,
one at a time, with the same draws from the same generator as `Transformer(config)` under the run's seed, and keeps
this rank's shard: the weights are bit for bit those of the unsharded init, on any number of ranks. `init_from`
weights are read by rank 0 only and broadcast into the shards.

On CUDA with bf16, FSDP2 gathers bf16 copies of the fp32 master weights for compute and reduces gradients in fp32
(`MixedPrecisionPolicy`): half the all-gather traffic of fp32 gathers under autocast. Everything else (one process,
DDP, and every CPU run) keeps bf16 autocast over fp32 weights, as before.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from model.files import step_folder
from model.files.state_dicts import model_mismatch
from model.lm.transformer import Transformer, init_module_
from model.training.activation_checkpointing import apply_activation_checkpointing
from model.training.checkpointing import CheckpointError, load_weights, resolve_checkpoint
from schemas.model_config import ModelConfig
from schemas.train_config import TrainConfig


@dataclass(frozen=True)
class PrecisionPlan:
    """How a step computes in bf16: under autocast (`autocast_dtype`), or through FSDP2's gathered bf16 parameters
    (`fsdp_policy`); neither for fp32."""

    autocast_dtype: torch.dtype | None
    fsdp_policy: MixedPrecisionPolicy | None


def precision_plan(precision: str, device_type: str, fsdp: bool, bf16_supported: bool) -> PrecisionPlan:
    """The plan for a run's `precision` (auto, bf16, fp32) on a device type ('cuda', 'cpu'); `bf16_supported`:
    whether the CUDA device computes in bf16 (what `auto` asks).

    bf16 under FSDP2 on CUDA: parameters gathered in bf16, gradients reduced in fp32, the sharded fp32 weights the
    optimizer's masters; no autocast. bf16 anywhere else: autocast over fp32 weights. fp32 (or `auto` without a bf16
    GPU): neither."""
    bf16 = precision == "bf16" or (precision == "auto" and device_type == "cuda" and bf16_supported)
    if not bf16:
        return PrecisionPlan(None, None)
    if fsdp and device_type == "cuda":
        # Inputs are not cast: the rotary angles, computed once per forward in fp32 and passed to every block, would
        # become bf16 (which torch.complex refuses, and which loses the rotation's precision). The blocks get bf16
        # activations anyway, from the embedding's bf16 weight.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
        return PrecisionPlan(None, policy)
    return PrecisionPlan(torch.bfloat16, None)


@dataclass
class BuiltModel:
    """`model`: the Transformer (its parameters sharded DTensors under FSDP2), for the optimizer, state dicts and
    clipping; `module`: what a step calls (DDP around the model, or the model); `autocast_dtype`: the step's autocast
    (None: none)."""

    model: Transformer
    module: nn.Module
    fsdp: bool
    autocast_dtype: torch.dtype | None


def build_model(
    config: TrainConfig,
    model_config: ModelConfig,
    device: torch.device,
    world_size: int,
    log: Callable[[str], None] = print,
) -> BuiltModel:
    """The run's model on `device`: initialised from `config.seed` (or loaded from `config.init_from`), with its
    activation checkpointing, compiled blocks (`config.compile`) and DDP or FSDP2 (`config.parallelism`) for
    `world_size` ranks. Every rank calls this; the process group is already up when `world_size` > 1."""
    fsdp = world_size > 1 and config.parallelism == "fsdp"
    plan = precision_plan(config.precision, device.type, fsdp, device.type == "cuda" and torch.cuda.is_bf16_supported())
    start = resolve_checkpoint(config.init_from) if config.init_from is not None else None
    torch.manual_seed(config.seed)
    if not fsdp:
        model = Transformer(model_config).to(device)
        if start is not None:
            load_weights(start, model)
            log(f"initialised from {start}")
        _prepare_blocks(model, config, log)
        module = nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        return BuiltModel(model, module, False, plan.autocast_dtype)
    model = build_sharded(config, model_config, device, plan.fsdp_policy, start, log)
    return BuiltModel(model, model, True, plan.autocast_dtype)


def build_sharded(
    config: TrainConfig,
    model_config: ModelConfig,
    device: torch.device,
    policy: MixedPrecisionPolicy | None,
    start: Path | None,
    log: Callable[[str], None],
) -> Transformer:
    """The FSDP2 model over the process group's ranks, never whole on any of them: built on the meta device,
    checkpointed and compiled, sharded, then this rank's shards materialised on `device` and initialised (under
    the seed already set) or loaded from checkpoint folder `start`."""
    model = meta_model(model_config)
    templates = init_templates(model)  # the full shapes, before sharding
    _prepare_blocks(model, config, log)
    shard(model, policy)
    materialise(model, device)
    if start is not None:
        load_sharded_weights(start, model)
        log(f"initialised from {start}")
    else:
        init_shards(templates, model_config.init_std)
    return model


def meta_model(model_config: ModelConfig) -> Transformer:
    """The transformer on the meta device: shapes, no storage, no draws from the generator."""
    with torch.device("meta"):
        return Transformer(model_config)


def _prepare_blocks(model: Transformer, config: TrainConfig, log: Callable[[str], None]) -> None:
    """Activation checkpointing, then torch.compile of each block (in place: parameter names stay Meta's)."""
    checkpointing = config.activation_checkpointing
    if checkpointing.mode != "none":
        count = apply_activation_checkpointing(model, checkpointing)
        log(f"activation checkpointing ({checkpointing.mode}): {count} of {len(model.layers)} blocks")
    if config.compile:
        for block in model.layers:
            block.compile()


def shard(model: Transformer, policy: MixedPrecisionPolicy | None) -> None:
    """FSDP2 over every block and the root (embeddings, final norm, output), with `policy`'s mixed precision."""
    from torch.distributed.fsdp import fully_shard

    policy = policy or MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def materialise(model: Transformer, device: torch.device) -> None:
    """Storage on `device` for this rank's shards only (their values are left to `init_shards` or a load)."""
    model.to_empty(device=device)


def init_templates(model: Transformer) -> list[tuple[nn.Module, nn.Module]]:
    """Each module of a meta model that holds parameters, in `modules()` order, with an unsharded meta copy of it
    (taken before sharding: the copy keeps the full shapes)."""
    return [(m, copy.deepcopy(m)) for m in model.modules() if next(m.parameters(recurse=False), None) is not None]


def init_shards(templates: list[tuple[nn.Module, nn.Module]], init_std: float) -> None:
    """Initialise sharded parameters as `Transformer(config)` does under the same seed, bit for bit.

    Two passes over the modules, in construction order, as `Transformer.__init__` draws: first torch's own layers'
    inits from their constructors (`reset_parameters`: values discarded, only the generator's position matters),
    then `init_module_` (the model's init). Each full tensor is made on the host, one at a time, and this rank's
    shard of it copied to the device; the generator ends where the unsharded build leaves it."""
    for _, template in templates:
        twin = copy.deepcopy(template).to_empty(device="cpu")
        if hasattr(twin, "reset_parameters"):
            twin.reset_parameters()
    with torch.no_grad():
        for module, template in templates:
            twin = copy.deepcopy(template).to_empty(device="cpu")
            init_module_(twin, init_std)
            for name, full in twin.named_parameters(recurse=False):
                copy_shard(getattr(module, name), full)


def copy_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's piece of `full` (the whole tensor, on the host) into `param`: a DTensor sharded as FSDP2
    shards (torch.chunk along one dimension of a 1-D mesh) or replicated, or a plain tensor (all of it)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        param.copy_(full)
        return
    local = param.to_local()
    (placement,) = param.placements
    piece = full
    if isinstance(placement, Shard):
        mesh, dim = param.device_mesh, placement.dim
        chunks = torch.chunk(full, mesh.size(), dim=dim)
        rank = mesh.get_local_rank()
        piece = chunks[rank] if rank < len(chunks) else full.narrow(dim, 0, 0)
    if piece.shape != local.shape:
        raise RuntimeError(f"shard of shape {tuple(piece.shape)} does not fit the local tensor {tuple(local.shape)}")
    local.copy_(piece)


def load_sharded_weights(path: Path, model: nn.Module) -> None:
    """Load the weights of checkpoint folder `path` into an FSDP2-sharded model: rank 0 reads and checks the file,
    then broadcasts each tensor into every rank's shards (one full copy on rank 0's host, none on the others). A
    file that cannot be read or does not fit raises CheckpointError on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights: dict[str, torch.Tensor] = {}
    problem = None
    if dist.get_rank() == 0:
        try:
            weights = step_folder.read_weights(path, CheckpointError)
            mismatch = model_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, weights)
            problem = f"{path}: cannot load its weights: {mismatch}" if mismatch else None
        except CheckpointError as err:
            problem = str(err)
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)  # the other ranks would otherwise wait in the broadcast for ever
    if shared[0] is not None:
        raise CheckpointError(shared[0])
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
