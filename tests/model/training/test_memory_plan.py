"""The memory plan: its arithmetic for the presets, and its peak against measured peaks of real CPU training steps.

Run as a script (`python test_memory_plan.py SPEC_JSON`), this file is the probe the slow test starts in a fresh
process: it trains a config's model for three steps on one random micro-batch and prints two peaks in bytes, both
from a baseline taken after the imports and a warm-up step of another model (the kernels' first use, libraries and
thread pools, is not training memory):
- rss: the growth of the peak resident size (VmHWM; ru_maxrss would report the test run's) over the first two steps
  (the second is the peak: AdamW's moments exist from the first step on). It includes malloc's slack (fragmentation).
- live: the tensors alive at the worst moment of the third step: the weights' and moments' bytes plus the running
  sum of torch.profiler's allocation records over the step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.training.memory_plan import GiB, block_activations, gpu_allowance, parse_memory, plan_memory
from schemas import ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[3]


def config(model: dict | str, **fields) -> TrainConfig:
    """A TrainConfig of `model` (a preset name or a shape) with the run's fields; data and out_dir unused here."""
    shape = {"preset": model} if isinstance(model, str) else model
    return TrainConfig.model_validate(
        {
            "model": shape,
            "data": str(REPO),
            "out_dir": "/tmp/unused",
            "steps": 10,
            "schedule": {"warmup_steps": 1},
            "global_batch_size": fields.pop("global_batch_size", 8 * fields.get("micro_batch_size", 1)),
            **fields,
        }
    )


def test_parse_memory() -> None:
    assert parse_memory("80GB") == 80 * GiB == parse_memory("80 GiB") == parse_memory("80g")
    assert parse_memory("1.5TB") == int(1.5 * 1024 * GiB) and parse_memory("512") == 512
    assert parse_memory("24MiB") == 24 * 1024**2
    with pytest.raises(ValueError, match="not a memory size: '80 gigs'"):
        parse_memory("80 gigs")


def test_sharding_divides_the_states() -> None:
    seven = config("7b", seq_len=4096, parallelism="fsdp")
    one = plan_memory(seven, 1)
    eight = plan_memory(seven, 8)
    n = seven.model.n_params()
    assert one.parallelism == "single" and eight.parallelism == "fsdp" and one.precision == "bf16"
    assert one.optimizer == 8 * n and eight.optimizer == -(-8 * n // 8)
    assert eight.gradients < one.gradients / 4 and eight.parameters < one.parameters / 2
    ddp = plan_memory(config("7b", seq_len=4096, parallelism="ddp"), 8)
    assert ddp.gradients == 8 * n  # its own fp32 gradients and DDP's bucket copy
    assert ddp.activations == eight.activations  # activations are per rank's micro-batch, not sharded


def test_checkpointing_modes_order_the_activations() -> None:
    def activations(mode: str, every_k: int = 2) -> int:
        ac = {"mode": mode, "every_k": every_k}
        return plan_memory(config("34b", seq_len=4096, parallelism="fsdp", activation_checkpointing=ac), 8).activations

    none, full, selective = activations("none"), activations("full"), activations("selective")
    every_2, every_4 = activations("every_k_blocks", 2), activations("every_k_blocks", 4)
    assert full < selective < none and full < every_2 < every_4 < none
    shape = ModelConfig.from_preset("34b")
    block = block_activations(shape, 4096, 2)
    assert block.block_input == 4096 * shape.dim * 2 and block.block_input < block.matmul < block.full
    # 48 blocks kept in full against one block's input each: the difference is the blocks' activations.
    assert none - full == 48 * (block.full - block.block_input)
    # Under autocast (DDP) the residual stream, what a checkpointed block keeps, is fp32.
    ddp = plan_memory(config("34b", seq_len=4096, activation_checkpointing={"mode": "full"}), 8)
    assert ddp.parallelism == "ddp" and ddp.activations - full == 48 * block.block_input


def test_document_masking_on_sdpa_adds_the_dense_mask() -> None:
    flex = plan_memory(config("7b", seq_len=4096), 8)  # CUDA: FlexAttention, a block mask only
    sdpa = plan_memory(config("7b", seq_len=4096, document_attention="sdpa"), 8)
    no_masking = plan_memory(config("7b", seq_len=4096, document_attention="sdpa", document_masking=False), 8)
    assert flex.activations == no_masking.activations
    assert sdpa.activations - flex.activations == 4096**2 + 33 * 4096**2 * 2  # boolean mask + a bf16 one per layer


def test_fits_and_the_verdict() -> None:
    gpu = parse_memory("80GB")
    assert gpu_allowance(gpu) == 8 * GiB and gpu_allowance(parse_memory("16GB")) == 3 * GiB
    ac = {"mode": "full"}
    fits = plan_memory(config("7b", seq_len=4096, parallelism="fsdp", activation_checkpointing=ac), 8, gpu_memory=gpu)
    assert fits.fits and fits.peak <= gpu - 8 * GiB and "fits in 72.0 GiB" in fits.verdict()
    big = plan_memory(config("34b", seq_len=4096, parallelism="ddp"), 8, gpu_memory=gpu)
    assert big.fits is False and "does not fit" in big.verdict()
    # FSDP2 saves sharded by default: on a GPU each rank copies one tensor shard at a time; in the background it
    # stages its whole shard of weights and moments; a full save gathers everything on rank 0.
    model = ModelConfig.from_preset("7b")
    assert fits.checkpoint_host == -(-4 * max(model.vocab_size * model.dim, model.dim * model.ffn_dim) // 8)
    fsdp = {"seq_len": 4096, "parallelism": "fsdp", "activation_checkpointing": ac}
    staged = plan_memory(config("7b", checkpoint={"async_save": True}, **fsdp), 8)
    assert staged.checkpoint_host == -(-12 * staged.n_params // 8) and "async" in staged.checkpoint_host_note
    gathered = plan_memory(config("7b", checkpoint={"format": "full"}, **fsdp), 8)
    assert gathered.checkpoint_host == 12 * gathered.n_params and "rank 0 gathers" in gathered.checkpoint_host_note
    assert plan_memory(config("tiny"), 1, device="cpu").fits is None
    parts = [name for name, _, _ in fits.rows()]
    assert parts[:7] == ["parameters", "gradients", "optimizer state", "activations", "fused loss", "transient", "peak"]


def test_accumulation_keeps_gradients_through_the_forward() -> None:
    one = plan_memory(config("tiny", micro_batch_size=4, global_batch_size=4, seq_len=256), 1, device="cpu")
    four = plan_memory(config("tiny", micro_batch_size=4, global_batch_size=16, seq_len=256), 1, device="cpu")
    assert (one.accumulation, four.accumulation) == (1, 4) and four.peak > one.peak


# Small shapes whose peaks are mostly activations (1, 3) or mostly states and the fused loss (2); GQA, MHA, swin norm
# with grouped QK-norm, document masking on SDPA and off.
MEASURED = [
    pytest.param(
        {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 704, "vocab_size": 8192},
        {"seq_len": 1024, "micro_batch_size": 2},
        id="gqa-masked",
    ),
    pytest.param(
        {"dim": 512, "n_layers": 2, "n_heads": 8, "n_kv_heads": 8, "ffn_dim": 1408, "vocab_size": 32768},
        {"seq_len": 512, "micro_batch_size": 2, "loss_chunk_size": 256},
        id="big-vocab",
    ),
    pytest.param(
        {
            "dim": 256,
            "n_layers": 4,
            "n_heads": 4,
            "n_kv_heads": 4,
            "ffn_dim": 704,
            "vocab_size": 8192,
            "qk_norm_groups": 2,
            "swin_norm": True,
        },
        {"seq_len": 1024, "micro_batch_size": 2, "document_masking": False},
        id="swin-unmasked",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "run"), MEASURED)
def test_plan_against_measured_cpu_peaks(shape: dict, run: dict) -> None:
    train = config({**shape, "max_seq_len": run["seq_len"]}, **run, global_batch_size=run["micro_batch_size"])
    plan = plan_memory(train, 1, device="cpu")
    probe = [sys.executable, __file__, train.model_dump_json()]
    # glibc serves large blocks from mmap past a threshold it adapts as the process frees memory, so the resident
    # peak varied by run (the plan was 0.84-0.95 x it); a fixed threshold returns freed tensors' pages at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(probe, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    # Measured here: the plan is 1.006-1.028 x the live peak and 0.998-1.020 x the RSS peak (with the fixed threshold).
    assert plan.peak == pytest.approx(measured["live"], rel=0.15), (plan.peak, measured)
    assert plan.peak == pytest.approx(measured["rss"], rel=0.15), (plan.peak, measured)


def _probe(spec: str) -> None:
    import os

    import torch
    from torch.profiler import ProfilerActivity, profile

    from model.lm.transformer import Transformer
    from model.training.cpu_memory import peak_resident_bytes
    from model.training.optim import clip_and_check, make_optimizer

    def step(model, optimizer, batch, chunk: int) -> None:
        out = model(batch["tokens"], doc_ids=batch["doc_ids"], loss_mask=batch["loss_mask"], loss_chunk_size=chunk)
        out.loss.backward()
        clip_and_check(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def batch_of(train: TrainConfig, vocab: int, b: int, s: int) -> dict:
        generator = torch.Generator().manual_seed(0)
        documents = (torch.arange(s) // max(1, s // 3)).expand(b, s).contiguous()
        return {
            "tokens": torch.randint(0, vocab, (b, s), generator=generator),
            "doc_ids": documents if train.document_masking else None,
            "loss_mask": torch.ones(b, s, dtype=torch.bool),
        }

    train = TrainConfig.model_validate_json(spec)
    torch.set_num_threads(1)
    warm = Transformer(ModelConfig.from_preset("tiny"))
    step(warm, make_optimizer(warm, train.optimizer), batch_of(train, warm.config.vocab_size, 1, 64), 16)
    del warm
    batch = batch_of(train, train.model.vocab_size, train.micro_batch_size, train.seq_len)
    base = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    model = Transformer(train.model)
    optimizer = make_optimizer(model, train.optimizer)
    for _ in range(2):
        step(model, optimizer, batch, train.loss_chunk_size)
    rss = peak_resident_bytes() - base
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    state += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        step(model, optimizer, batch, train.loss_chunk_size)
    records = [e for e in profiled.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    print(json.dumps({"rss": rss, "live": state + peak}))


if __name__ == "__main__":
    _probe(sys.argv[1])
