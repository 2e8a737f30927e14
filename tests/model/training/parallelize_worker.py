"""Run by test_parallelize.py under `torchrun --nproc_per_node=N` (gloo): the sharded construction of a tiny model
(model/training/parallelize.py), what each rank held before materialising it, a few AdamW steps against the FSDP2
path the trainer had before (the whole model built on every rank, then sharded), and `init_from` loaded into the
shards, a good folder and one that does not fit. The sharded model checkpoints its blocks' activations (bit-equal
gradients), the former path does not. Rank 0 writes what the test checks to OUT/result-N.pt.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=N \
    -m tests.model.training.parallelize_worker OUT GOOD_WEIGHTS_FOLDER BAD_WEIGHTS_FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from model.lm.transformer import Transformer
from model.training import parallelize
from model.training.checkpointing import CheckpointError
from schemas.train_config import TrainConfig

SEED, STEPS, ROWS, SEQ = 11, 3, 2, 32  # ROWS sequences per rank per step


def train_config(out: Path, init_from: Path | None = None) -> TrainConfig:
    """Tiny, with grouped QK-norm ([2, head_dim] affines: fewer rows than 4 ranks, so some shards are empty)."""
    model = {"preset": "tiny", "n_layers": 2, "qk_norm_groups": 2}
    return TrainConfig.model_validate(
        {
            "model": model,
            "data": str(out),
            "out_dir": str(out / "run"),
            "global_batch_size": ROWS * dist.get_world_size(),
            "micro_batch_size": ROWS,
            "steps": STEPS,
            "schedule": {"warmup_steps": 1},
            "parallelism": "fsdp",
            "precision": "fp32",
            "activation_checkpointing": {"mode": "full"},  # applied on the meta model, before sharding
            "seed": SEED,
            "init_from": str(init_from) if init_from else None,
        }
    )


def build(config: TrainConfig) -> torch.nn.Module:
    """The trainer's model: build_model, or its FSDP2 path directly on one rank (where build_model does not shard)."""
    device = torch.device("cpu")
    if dist.get_world_size() > 1:
        return parallelize.build_model(config, config.model, device, dist.get_world_size(), lambda _: None).model
    torch.manual_seed(config.seed)
    start = Path(config.init_from) if config.init_from else None
    return parallelize.build_sharded(config, config.model, device, None, start, lambda _: None)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gathered weights, copied (on one rank the gathered tensors are the parameters themselves)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: tensor.clone() for name, tensor in state.items()}


def losses(model: torch.nn.Module, vocab_size: int) -> list[float]:
    """STEPS AdamW steps, each on this rank's rows of a fixed global batch; the mean loss over ranks per step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(5)
    found = []
    for _ in range(STEPS):
        tokens = torch.randint(0, vocab_size, (ROWS * world, SEQ), generator=generator)[rank * ROWS : (rank + 1) * ROWS]
        loss = model(tokens, loss_mask=torch.ones_like(tokens, dtype=torch.bool)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        found.append(float(mean) / world)
    return found


def main() -> None:
    out, good, bad = (Path(arg) for arg in sys.argv[1:4])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = train_config(out)
    before: list[dict[str, Any]] = []
    materialise = parallelize.materialise

    def spy(model: torch.nn.Module, device: torch.device) -> None:  # what the rank holds just before storage exists
        before.extend(
            {
                "name": name,
                "dtensor": isinstance(p, DTensor),
                "device": p.device.type,
                "placements": [repr(x) for x in getattr(p, "placements", ())],
            }
            for name, p in model.named_parameters()
        )
        materialise(model, device)

    parallelize.materialise = spy
    model = build(config)
    rng_after = torch.get_rng_state()
    local = {name: tuple(p.to_local().shape) for name, p in model.named_parameters()}
    built = full_state(model)
    new_losses = losses(model, config.model.vocab_size)
    # The trainer's FSDP2 path before sharded construction: the whole model on every rank, sharded afterwards.
    torch.manual_seed(SEED)
    old = Transformer(config.model)
    for block in old.layers:
        fully_shard(block)
    fully_shard(old)
    old_losses = losses(old, config.model.vocab_size)
    loaded = full_state(build(train_config(out, good)))
    try:
        build(train_config(out, bad))
        refused = None
    except CheckpointError as err:
        refused = str(err)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"before": before, "local": local, "refused": refused})
    if rank == 0:
        result = {
            "built": built,
            "rng_after": rng_after,
            "new_losses": new_losses,
            "old_losses": old_losses,
            "loaded": loaded,
            "ranks": gathered,
        }
        torch.save(result, out / f"result-{world}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
