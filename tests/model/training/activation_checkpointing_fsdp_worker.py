"""Run by test_activation_checkpointing.py under `torchrun --nproc_per_node=2` (gloo): the tiny model, activation
checkpointing applied before FSDP2's `fully_shard` (the trainer's order), one forward + backward of this rank's half of
a fixed batch with document masking; rank 0 writes the loss and every parameter's full gradient per mode to argv[1].

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m tests.model.training.activation_checkpointing_fsdp_worker OUT.pt MODE [MODE ...]
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from model.lm.transformer import Transformer
from model.training.activation_checkpointing import apply_activation_checkpointing
from schemas.model_config import ModelConfig
from schemas.train_config import ActivationCheckpointConfig

SEQ, BATCH = 48, 4  # the global batch; each of the 2 ranks takes BATCH // 2 rows


def fixed_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and document ids [BATCH, SEQ]: the same on every rank and in the test's single process."""
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ), generator=generator)
    doc_ids = (torch.arange(SEQ) >= SEQ // 3).long().expand(BATCH, SEQ) + (torch.arange(SEQ) >= SEQ // 2).long()
    return tokens, doc_ids


def model_config() -> ModelConfig:
    return ModelConfig.from_preset("tiny", n_layers=3)


def main() -> None:
    out, modes = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = model_config()
    tokens, doc_ids = fixed_batch(config.vocab_size)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for mode in modes:
        torch.manual_seed(0)
        model = Transformer(config)
        checkpointed = apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=mode))
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        mine = tokens[rows]
        loss = model(mine, doc_ids=doc_ids[rows], loss_mask=torch.ones_like(mine, dtype=torch.float)).loss
        loss.backward()  # FSDP2 averages the gradients over ranks: each rank's mean is over as many tokens
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[mode] = {"checkpointed": checkpointed, "loss": mean_loss / world, "grads": grads}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
