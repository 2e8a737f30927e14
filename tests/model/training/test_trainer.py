"""The trainer on the sample stages: losses fall, resume is exact, non-finite steps are not applied, the global
batch's targets weigh alike, SFT's dropout, and every logged metric by value."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import pytest
import torch

from model.training.lr_schedule import lr_at
from model.training.stage_loader import CorruptShardError, StageLoader, read_batch
from model.training.trainer import Trainer
from schemas import SFTConfig, TrainConfig, validate_config


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(30_000)


def config(stage: Path, out: Path, steps: int, **changes) -> TrainConfig:
    data = {
        "model": {"preset": "tiny"},
        "data": str(stage),
        "out_dir": str(out),
        "seq_len": 128,
        "steps": steps,
        "global_batch_size": 8,
        "micro_batch_size": 4,
        "optimizer": {"lr": 3e-3},
        "schedule": {"kind": "warmup_exponential", "warmup_steps": 3},
        "checkpoint": {"every_steps": 5, "keep_last": 2},
        "logging": {"every_steps": 5},
    } | changes
    return validate_config(TrainConfig, data)


def test_text_and_image_losses_fall(stage: Path, tmp_path: Path) -> None:
    logged: list[str] = []
    cfg = config(stage, tmp_path, 40)
    history = Trainer(cfg, log=logged.append).train()
    first, last = history[0], history[-1]
    # From about ln(2048) = 7.6 nats, 40 tiny steps take both modalities well down.
    assert last.ce_text < first.ce_text - 0.7 and last.ce_image < first.ce_image - 0.5
    assert first.loss > first.ce and abs(first.z_loss - (first.loss - first.ce)) < 1e-4  # z-loss is in the loss
    # The lr of each step is the schedule's: linear warm-up, then exponential decay to 0 at the last step.
    assert [m.lr for m in history] == pytest.approx([lr_at(s, 40, 3e-3, cfg.schedule) for s in range(40)], rel=1e-9)
    assert history[2].lr == pytest.approx(3e-3) and history[-1].lr == 0.0
    # 8 sequences of 128 positions a step; the supervised ones are the loader's loss mask (targets: positions 1..).
    assert all(m.tokens == 8 * 128 and 0 < m.supervised_tokens <= 8 * 127 for m in history)
    assert all(m.grad_norm > 0 and 0 <= m.data_wait_share < 1 and m.mfu is None for m in history)  # no peak on CPU
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records[-1]["loss"] == last.loss and records[-1]["grad_norm"] == last.grad_norm
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000040"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for name in ("loss", "ce_text", "ce_image", "z_loss", "grad_norm", "lr", "tokens_per_s", "data_wait_share"):
        scalars = events.Scalars(f"train/{name}")
        assert [e.step for e in scalars] == list(range(1, 41)), name
        assert [e.value for e in scalars] == pytest.approx([r[name] for r in records], rel=1e-6, abs=1e-12), name
    # The console line every `logging.every_steps` (5) steps carries every figure.
    lines = [line for line in logged if line.startswith("step ")]
    assert len(lines) == 8
    pattern = (
        r"step 40/40 loss \d+\.\d{4} \(text \d+\.\d{3}, image \d+\.\d{3}, z \d\.\d{2}e[-+]\d+\) "
        r"grad \d+\.\d{2} lr 0\.00e\+00 [\d,]+ tok/s data wait \d+%"
    )
    assert re.fullmatch(pattern, lines[-1]), lines[-1]


def test_metrics_jsonl_and_tensorboard_can_be_off(stage: Path, tmp_path: Path) -> None:
    cfg = config(stage, tmp_path, 4, logging={"every_steps": 1, "jsonl": False, "tensorboard": False})
    assert len(Trainer(cfg, log=lambda _: None).train()) == 4
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "checkpoints" / "latest").is_file()


def test_mfu_and_data_wait_by_value(stage: Path, tmp_path: Path) -> None:
    trainer = Trainer(config(stage, tmp_path, 4), log=lambda _: None)
    trainer.peak = 1e12  # as on an accelerator whose peak we know
    batches = trainer._batches

    def slow_batches():
        for batch in batches():
            time.sleep(0.2)
            yield batch

    trainer._batches = slow_batches
    history = trainer.train()
    cfg = trainer.config.model
    # 6N + 12·L·d·S, N = every parameter but the input embedding table (a lookup, not a matmul).
    n = trainer.model.num_params() - cfg.vocab_size * cfg.dim
    fpt = 6 * n + 12 * cfg.n_layers * cfg.dim * 128
    assert trainer.flops_per_token == fpt
    for m in history:
        assert m.mfu == pytest.approx(m.tokens_per_s * fpt / 1e12, rel=1e-9)
        # 2 micro-batches x 0.2 s of waiting for data: the share times the step's time gives them back, however
        # long the step itself took on a busy machine.
        seconds = m.tokens / m.tokens_per_s
        assert m.data_wait_share * seconds >= 0.4 and m.data_wait_share < 1


def sft_config(stages: Path, init: Path, out: Path, steps: int, **changes) -> SFTConfig:
    data = {
        "model": {"preset": "tiny"},
        "data": str(stages / "sft"),
        "out_dir": str(out),
        "seq_len": 128,
        "steps": steps,
        "global_batch_size": 8,
        "micro_batch_size": 8,
        "init_from": str(init),
        "optimizer": {"lr": 1e-3},
        "logging": {"every_steps": 1, "tensorboard": False},
    } | changes
    return validate_config(SFTConfig, data)


def test_accumulation_weighs_every_target_of_the_global_batch_alike(train_and_sft_stages, tiny_run, tmp_path):
    # The SFT stage's micro-batches hold different numbers of answer targets: a mean of the micro-batch means
    # would differ from the mean over the global batch.
    loader = StageLoader(train_and_sft_stages / "sft", batch_size=2)
    counts = [int(b["loss_mask"][:, 1:].sum()) for b in itertools.islice(iter(loader), 4)]
    assert len(set(counts)) > 1, counts
    runs = {}
    for micro in (8, 2):
        cfg = sft_config(train_and_sft_stages, tiny_run, tmp_path / str(micro), 1, micro_batch_size=micro, dropout=0.0)
        trainer = Trainer(cfg, log=lambda _: None)
        assert trainer.accumulation == 8 // micro
        runs[micro] = (trainer.train()[0], trainer.model.state_dict())
    (whole, whole_state), (parts, parts_state) = runs[8], runs[2]
    assert parts.supervised_tokens == whole.supervised_tokens == sum(counts)
    for name in ("loss", "ce", "ce_text", "z_loss", "grad_norm"):
        assert getattr(parts, name) == pytest.approx(getattr(whole, name), rel=2e-5), name
    for name, tensor in whole_state.items():
        assert torch.allclose(parts_state[name], tensor, atol=1e-6), name


def test_sft_uses_dropout_and_pretraining_none(train_and_sft_stages, tiny_run, stage, tmp_path) -> None:
    sft = Trainer(sft_config(train_and_sft_stages, tiny_run, tmp_path / "sft", 1), log=lambda _: None)
    rates = {m.p for m in sft.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.05}
    pretrain = Trainer(config(stage, tmp_path / "pre", 4), log=lambda _: None)
    assert {m.p for m in pretrain.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    # Dropout is live in SFT: the same batch twice in train mode gives two losses.
    batch = next(iter(sft.loader))
    losses = [float(sft.model(batch["tokens"], loss_mask=batch["loss_mask"]).loss.detach()) for _ in range(2)]
    assert losses[0] != losses[1]
    # Saved checkpoints describe the model for inference: no dropout.
    sft.save()
    saved = json.loads((tmp_path / "sft" / "checkpoints" / "step-00000000" / "model_config.json").read_text())
    assert saved["dropout"] == 0.0


def test_sft_resume_with_dropout_is_exact(train_and_sft_stages, tiny_run, tmp_path) -> None:
    straight = Trainer(
        sft_config(train_and_sft_stages, tiny_run, tmp_path / "a", 4, micro_batch_size=4), log=lambda _: None
    )
    expected = straight.train()
    first = Trainer(
        sft_config(
            train_and_sft_stages, tiny_run, tmp_path / "b", 4, micro_batch_size=4, checkpoint={"every_steps": 2}
        ),
        log=lambda _: None,
    )
    first.train(stop_at=2)
    resumed = Trainer(
        sft_config(train_and_sft_stages, tiny_run, tmp_path / "b", 4, micro_batch_size=4), log=lambda _: None
    )
    assert resumed.step == 2
    got = resumed.train()
    # The dropout masks of steps 3-4 come from the restored RNG: the same losses and weights, bit for bit.
    assert [m.loss for m in got] == [m.loss for m in expected[2:]]
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_autocast_runs_the_blocks_in_bf16(stage: Path, tmp_path: Path) -> None:
    trainer = Trainer(config(stage, tmp_path, 4, precision="bf16"), log=lambda _: None)
    seen: list[torch.dtype] = []
    trainer.model.layers[0].attention.wq.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    metrics = trainer.train(stop_at=1)[0]
    assert seen == [torch.bfloat16, torch.bfloat16]  # two micro-batches
    assert trainer.model.layers[0].attention.wq.weight.dtype == torch.float32  # fp32 master weights
    assert torch.isfinite(torch.tensor(metrics.loss)) and 6 < metrics.ce < 9  # about ln(2048) at the start


def test_resume_is_exact(stage: Path, tmp_path: Path) -> None:
    straight = Trainer(config(stage, tmp_path / "a", 10), log=lambda _: None)
    straight.train()
    first = Trainer(config(stage, tmp_path / "b", 10), log=lambda _: None)
    first.train(stop_at=5)  # as if the job died after the step-5 checkpoint
    resumed = Trainer(config(stage, tmp_path / "b", 10), log=lambda _: None)
    assert resumed.step == 5
    resumed.train()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_non_finite_step_is_not_applied(stage: Path, tmp_path: Path) -> None:
    trainer = Trainer(config(stage, tmp_path, 6), log=lambda _: None)
    trainer.train(stop_at=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hook = trainer.model.output.weight.register_hook(lambda g: g * float("nan"))
    metrics = trainer.train(stop_at=2)[-1]
    hook.remove()
    assert metrics.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.train()[-1].skipped_steps == 1  # later steps apply again


def test_step_without_supervised_targets_is_not_applied(stage: Path, tmp_path: Path) -> None:
    logged: list[str] = []
    trainer = Trainer(config(stage, tmp_path, 6), log=logged.append)
    trainer.train(stop_at=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batches = trainer._batches
    trainer._batches = lambda: ({**b, "loss_mask": torch.zeros_like(b["loss_mask"])} for b in batches())
    metrics = trainer.train(stop_at=2)[-1]
    assert metrics.supervised_tokens == 0 and metrics.loss == 0.0 and metrics.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert "step 2: no supervised targets in the batch; update skipped" in logged


def test_damaged_sequences_stop_the_run_or_are_counted(stage: Path, tmp_path: Path, damage_stage) -> None:
    copy = tmp_path / "stage"
    damaged = damage_stage(stage, copy)  # rows 1, 4 and 6: all in the first global batch of 8
    with pytest.raises(CorruptShardError, match=r"shard-00000\.tar"):
        Trainer(config(copy, tmp_path / "strict", 4), log=lambda _: None).train(stop_at=1)
    logged: list[str] = []
    skipping = Trainer(config(copy, tmp_path / "skip", 4, skip_corrupt_shards=True), log=logged.append)
    history = skipping.train(stop_at=2)
    clean = Trainer(config(stage, tmp_path / "clean", 4), log=lambda _: None).train(stop_at=1)
    rows = StageLoader(stage, batch_size=8).index[:8]
    targets = read_batch(rows, 128, {})["loss_mask"][:, 1:].sum(1)
    lost = int(sum(targets[r] for r in damaged))
    assert [m.damaged_sequences for m in history] == [3, 3]  # cumulative
    assert history[0].supervised_tokens == clean[0].supervised_tokens - lost > 0
    assert "step 1: 3 damaged sequences read as padding (no targets)" in logged
    skipping.save()  # the count lives on in the checkpoint
    resumed = Trainer(config(copy, tmp_path / "skip", 4, skip_corrupt_shards=True), log=lambda _: None)
    assert resumed.train(stop_at=3)[-1].damaged_sequences == 3


def test_config_mismatches_are_clear(stage: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has sequences of 128, config\.seq_len is 256: leave seq_len out"):
        Trainer(config(stage, tmp_path, 10, seq_len=256), log=lambda _: None)
    # seq_len is the stage's (its manifest.json): left out it is taken from there, and must fit the model.
    derived = {k: v for k, v in config(stage, tmp_path, 10).model_dump().items() if k != "seq_len"}
    trainer = Trainer(validate_config(TrainConfig, derived), log=lambda _: None)
    assert trainer.config.seq_len is None and trainer.seq_len == 128
    assert trainer.flops_per_token == Trainer(config(stage, tmp_path, 10), log=lambda _: None).flops_per_token
    short = derived | {"model": {"preset": "tiny", "max_seq_len": 64}}
    with pytest.raises(ValueError, match=r"has sequences of 128, longer than the model's max_seq_len 64"):
        Trainer(validate_config(TrainConfig, short), log=lambda _: None)
    # FlexAttention has no CPU backward: asking for it on CPU fails before any step.
    with pytest.raises(ValueError, match="document_attention 'flex' needs a CUDA device"):
        Trainer(config(stage, tmp_path, 10, document_attention="flex"), log=lambda _: None)
    assert Trainer(config(stage, tmp_path, 10, document_attention="sdpa"), log=print).model.document_attention == "sdpa"


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_and_keep_metas_names(stage: Path, tmp_path: Path) -> None:
    eager = Trainer(config(stage, tmp_path / "eager", 4), log=lambda _: None)
    compiled = Trainer(config(stage, tmp_path / "compiled", 4, compile=True), log=lambda _: None)
    expected, got = eager.train(stop_at=2), compiled.train(stop_at=2)
    assert [m.loss for m in got] == pytest.approx([m.loss for m in expected], rel=1e-4)
    assert list(compiled.model.state_dict()) == list(eager.model.state_dict())  # no `_orig_mod.` in the names
    for name, tensor in eager.model.state_dict().items():
        assert torch.allclose(compiled.model.state_dict()[name], tensor, atol=1e-4), name


def test_sft_loss_counts_answer_targets_only(train_and_sft_stages, tiny_run, tmp_path) -> None:
    from model.lm.losses import lm_loss

    trainer = Trainer(sft_config(train_and_sft_stages, tiny_run, tmp_path, 1, dropout=0.0), log=lambda _: None)
    batch = next(iter(StageLoader(train_and_sft_stages / "sft", batch_size=8)))  # the trainer's first batch
    with torch.no_grad():
        logits = trainer.model(batch["tokens"], positions=batch["positions"], doc_ids=batch["doc_ids"])
    answers = lm_loss(logits, batch["tokens"], batch["loss_mask"])
    everything = lm_loss(logits, batch["tokens"], torch.ones_like(batch["loss_mask"]))
    metrics = trainer.train()[0]
    assert metrics.supervised_tokens == int(batch["loss_mask"][:, 1:].sum()) < 8 * 127  # prompts are masked out
    assert metrics.ce == pytest.approx(float(answers.ce), rel=1e-5)
    assert abs(float(everything.ce) - float(answers.ce)) > 0.05  # counting the prompts would show


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of `tag` TensorBoard shows for a run folder (purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_a_resumed_run_records_each_step_once(stage: Path, tmp_path: Path) -> None:
    Trainer(config(stage, tmp_path / "a", 8, checkpoint={"every_steps": 3}), log=lambda _: None).train()
    run = tmp_path / "b"
    Trainer(config(stage, run, 8, checkpoint={"every_steps": 3}), log=lambda _: None).train(stop_at=5)
    # As if the job died at step 5, after the step-3 checkpoint and a line cut short: steps 4 and 5 are redone.
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    dead = [json.dumps(json.loads(line) | {"loss": 99.0}) for line in lines[3:]]  # the dead run's values
    metrics.write_text("\n".join([*lines[:3], *dead, '{"step": 6, "lo']) + "\n")
    resumed = Trainer(config(stage, run, 8), log=lambda _: None)
    assert resumed.step == 3
    resumed.train()

    expected = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # the redone steps' values: resume is exact
    for tag in ("train/loss", "train/lr", "train/ce_text"):
        points = tensorboard_scalars(run / "tensorboard", tag)
        assert [s for s, _ in points] == list(range(1, 9)), tag
        want = [r[tag.removeprefix("train/")] for r in expected]
        assert [v for _, v in points] == pytest.approx(want, rel=1e-6), tag


def test_a_step_without_targets_of_a_modality_logs_none_not_zero(train_and_sft_stages, tiny_run, tmp_path) -> None:
    from model.tokenizers.vocabulary import Modality, Vocabulary
    from schemas.vocab import VocabLayout

    steps = 6
    loader = StageLoader(train_and_sft_stages / "sft", batch_size=4)  # the trainer's batches, in its order
    image = Vocabulary(VocabLayout.model_validate(loader.manifest["vocab_layout"])).mask(
        Modality.IMAGE, Modality.BOI, Modality.EOI
    )
    n_image = [int(image[b["tokens"][:, 1:][b["loss_mask"][:, 1:].bool()]].sum()) for b in itertools.islice(loader, 6)]
    assert 0 in n_image and any(n_image), n_image  # steps of both kinds
    cfg = sft_config(
        train_and_sft_stages,
        tiny_run,
        tmp_path,
        steps,
        global_batch_size=4,
        micro_batch_size=4,
        logging={"every_steps": 1, "tensorboard": True},
    )
    logged: list[str] = []
    history = Trainer(cfg, log=logged.append).train()

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["ce_image"] is None for r in records] == [n == 0 for n in n_image]
    assert [m.ce_image is None for m in history] == [n == 0 for n in n_image]
    assert all(r["ce_image"] > 1 for r in records if r["ce_image"] is not None)  # real losses, never 0.0
    assert all(r["ce_text"] > 1 for r in records)  # every SFT batch has answer text
    # TensorBoard: no point at all for the steps without image targets; the console line says "-".
    expected = [r["step"] for r in records if r["ce_image"] is not None]
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tensorboard", "train/ce_image")] == expected
    lines = [line for line in logged if line.startswith("step ")]
    assert ["image -," in line for line in lines] == [n == 0 for n in n_image]


def test_the_step_returns_its_metrics_and_the_sinks_record_them(stage: Path, tmp_path: Path) -> None:
    class Collect:
        def __init__(self) -> None:
            self.seen: list = []

        def write(self, metrics) -> None:
            self.seen.append(metrics)

        def close(self) -> None:
            raise AssertionError("the caller closes its own sinks")

    cfg = config(stage, tmp_path, 4, logging={"every_steps": 2, "jsonl": False, "tensorboard": False})
    logged: list[str] = []
    trainer = Trainer(cfg, log=logged.append)
    collect = Collect()
    history = trainer.train(extra_sinks=[collect])
    assert collect.seen == history and [m.step for m in history] == [1, 2, 3, 4]
    assert [line.split()[1] for line in logged if line.startswith("step ")] == ["2/4", "4/4"]
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()
