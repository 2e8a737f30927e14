"""The trainer's model setup (model/training/parallelize.py): the precision plan per device, the per-tensor replay of
the transformer's init, and FSDP2's sharded construction on 1, 2 and 4 gloo ranks (parallelize_worker.py) against
one process: the same weights bit for bit, the same losses as the former FSDP2 path, no rank ever holding the whole
model, and init_from loaded into the shards."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

from model.files.step_folder import WEIGHTS
from model.lm.transformer import Transformer
from model.training.parallelize import PrecisionPlan, init_shards, init_templates, meta_model, precision_plan
from schemas.model_config import ModelConfig

REPO = Path(__file__).resolve().parents[3]
# The rotary angles stay fp32 (cast_forward_inputs would make them bf16).
BF16_POLICY = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
AUTOCAST = PrecisionPlan(torch.bfloat16, None)
FP32 = PrecisionPlan(None, None)


@pytest.mark.parametrize(
    ("precision", "device", "fsdp", "bf16_supported", "expected"),
    [
        # CUDA + FSDP2 + bf16: bf16 gathers, fp32 reduction, no autocast.
        ("bf16", "cuda", True, True, PrecisionPlan(None, BF16_POLICY)),
        ("auto", "cuda", True, True, PrecisionPlan(None, BF16_POLICY)),
        ("auto", "cuda", True, False, FP32),
        # One process and DDP on CUDA keep autocast, as before.
        ("bf16", "cuda", False, True, AUTOCAST),
        ("auto", "cuda", False, True, AUTOCAST),
        ("auto", "cuda", False, False, FP32),
        # The CPU keeps autocast under FSDP2 too; auto means fp32 there.
        ("bf16", "cpu", True, False, AUTOCAST),
        ("bf16", "cpu", False, False, AUTOCAST),
        ("auto", "cpu", True, False, FP32),
        ("fp32", "cuda", True, True, FP32),
        ("fp32", "cpu", False, False, FP32),
    ],
)
def test_precision_plan(precision: str, device: str, fsdp: bool, bf16_supported: bool, expected) -> None:
    assert precision_plan(precision, device, fsdp, bf16_supported) == expected


CONFIGS = {
    "tiny": ModelConfig.from_preset("tiny"),
    "grouped_qk_norm_swin": ModelConfig.from_preset("tiny", n_layers=3, qk_norm_groups=2, swin_norm=True),
    "no_qk_norm": ModelConfig.from_preset("tiny", qk_norm=False, init_std=0.05),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_meta_build_then_per_tensor_init_is_the_unsharded_init(name: str) -> None:
    """The meta build draws nothing; the per-module replay gives Transformer(config)'s weights bit for bit and leaves
    the generator where Transformer(config) leaves it (CPU dropout reads it next)."""
    config = CONFIGS[name]
    torch.manual_seed(3)
    expected = Transformer(config).state_dict()
    rng_after = torch.get_rng_state()
    torch.manual_seed(3)
    start = torch.get_rng_state()
    model = meta_model(config)
    assert torch.equal(torch.get_rng_state(), start)
    assert all(p.is_meta for p in model.parameters()) and not list(model.buffers())  # to_empty leaves no buffer unset
    templates = init_templates(model)
    model.to_empty(device="cpu")
    init_shards(templates, config.init_std)
    assert torch.equal(torch.get_rng_state(), rng_after)
    found = model.state_dict()
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(found[key], value), key


def test_one_process_builds_as_before_with_checkpointing(tmp_path: Path) -> None:
    """Without FSDP the model is built whole, as before: Transformer(config) under the seed, then its blocks
    checkpointed (one log line) and autocast chosen by the precision plan."""
    from model.training.parallelize import build_model
    from schemas.train_config import TrainConfig

    config = TrainConfig.model_validate(
        {
            "model": {"preset": "tiny", "n_layers": 3},
            "data": str(tmp_path),
            "out_dir": str(tmp_path / "run"),
            "global_batch_size": 2,
            "steps": 2,
            "schedule": {"warmup_steps": 1},
            "precision": "bf16",
            "activation_checkpointing": {"mode": "every_k_blocks", "every_k": 2},
            "seed": 4,
        }
    )
    lines: list[str] = []
    built = build_model(config, config.model, torch.device("cpu"), 1, lines.append)
    assert not built.fsdp and built.module is built.model and built.autocast_dtype == torch.bfloat16
    assert lines == ["activation checkpointing (every_k_blocks): 2 of 3 blocks"]
    assert [hasattr(block, "activation_checkpointing") for block in built.model.layers] == [True, False, True]
    torch.manual_seed(4)
    expected = Transformer(config.model).state_dict()
    for key, value in built.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def torchrun(world: int, out: Path, good: Path, bad: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    command += ["-m", "tests.model.training.parallelize_worker", str(out), str(good), str(bad)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
        # A rank aborted by std::terminate in torch's C++ (seen twice in a fresh-clone CI run on a heavily loaded
        # machine, then 0 times in 14 runs): not an assertion of ours. Run once more; a second abort fails.
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / f"result-{world}.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_construction_matches_one_process(world: int, tmp_path: Path) -> None:
    from tests.model.training.parallelize_worker import SEED

    config = ModelConfig.from_preset("tiny", n_layers=2, qk_norm_groups=2)
    torch.manual_seed(SEED)
    expected = Transformer(config).state_dict()
    rng_after = torch.get_rng_state()
    # init_from: another model's weights, and a folder whose output layer has the wrong shape.
    torch.manual_seed(SEED + 1)
    other = Transformer(config).state_dict()
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    torch.save(other, good / WEIGHTS)
    torch.save({**other, "output.weight": torch.zeros(5, 7)}, bad / WEIGHTS)

    result = torchrun(world, tmp_path, good, bad)

    # Bit for bit the unsharded init, and the generator where the unsharded build leaves it.
    assert result["built"].keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(result["built"][key], value), key
    assert torch.equal(result["rng_after"], rng_after)
    # The same training as the former path (whole model built, then sharded): equal losses, exactly.
    assert result["new_losses"] == result["old_losses"]
    assert all(math.isfinite(loss) for loss in result["new_losses"])
    for rank, seen in enumerate(result["ranks"]):
        # Before storage existed, every parameter was a sharded DTensor on the meta device.
        assert {p["name"] for p in seen["before"]} == expected.keys()
        for p in seen["before"]:
            assert p["dtensor"] and p["device"] == "meta" and p["placements"] == ["Shard(dim=0)"], (rank, p)
        # Each rank holds its torch.chunk of dim 0 only, never a whole tensor (but for one rank).
        for name, shape in seen["local"].items():
            rows = expected[name].shape[0]
            assert shape[1:] == expected[name].shape[1:]
            assert shape[0] == max(0, min(math.ceil(rows / world), rows - rank * math.ceil(rows / world))), name
    # init_from: the folder's weights in the shards; a folder that does not fit is refused on every rank.
    for key, value in other.items():
        assert torch.equal(result["loaded"][key], value), key
    shape = tuple(expected["output.weight"].shape)
    for seen in result["ranks"]:
        assert seen["refused"] is not None
        assert f"tensor output.weight: checkpoint shape (5, 7) != model shape {shape}" in seen["refused"]
