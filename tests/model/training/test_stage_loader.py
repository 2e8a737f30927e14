"""The stage loader: deterministic rank/worker split, equal batch counts, exact resume, corrupt shards and damaged
sequences."""

from __future__ import annotations

import io
import itertools
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from model.training.stage_loader import CorruptShardError, ResumeMismatchError, StageLoader, read_batch
from schemas.vocab import PAD_ID


@pytest.fixture(scope="module")
def stage(make_stage) -> Path:
    return make_stage(40_000, prose_weight=3.0)


def written_sequences(folder: Path) -> list[np.ndarray]:
    out = []
    for tar in sorted(folder.glob("shard-*.tar")):
        out += [np.load(io.BytesIO(s["tokens.npy"])) for s in wds.WebDataset(str(tar), shardshuffle=False)]
    return out


def test_single_rank_reads_the_sequences_in_order(stage: Path) -> None:
    loader = StageLoader(stage, batch_size=4)
    written = written_sequences(stage)
    assert len(list(stage.glob("shard-*.tar"))) > 2 and len(loader) == len(written) // 4
    batches = list(loader)
    got = torch.cat([b["tokens"] for b in batches]).numpy()
    assert np.array_equal(got, np.stack(written[: len(got)]).astype(np.int64))
    b = batches[0]
    assert b["tokens"].shape == (4, 128) and b["loss_mask"].dtype == torch.bool
    for i in range(4):  # positions restart at every document; padding belongs to no document
        starts = torch.nonzero(b["positions"][i] == 0).flatten()
        assert (b["doc_ids"][i][starts] >= 0).all()
        pad = b["doc_ids"][i] == -1
        assert not b["loss_mask"][i][pad].any() and (b["tokens"][i][pad] == 1).all()


def test_two_ranks_two_workers_split_every_global_batch(stage: Path) -> None:
    loaders = [StageLoader(stage, batch_size=3, rank=r, world_size=2, num_workers=2) for r in range(2)]
    per_rank = [list(loader) for loader in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])  # equal batch counts: no DDP hang
    written = np.stack(written_sequences(stage)).astype(np.int64)
    for b in range(len(per_rank[0])):
        global_batch = torch.cat([per_rank[0][b]["tokens"], per_rank[1][b]["tokens"]]).numpy()
        assert np.array_equal(global_batch, written[b * 6 : (b + 1) * 6])


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_yields_exactly_the_remaining_batches(stage: Path, rank: int) -> None:
    def make() -> StageLoader:
        return StageLoader(stage, batch_size=2, rank=rank, world_size=2, num_workers=2)

    uninterrupted = [b["tokens"] for b in make()]
    first = make()
    taken = []
    for batch in first:
        taken.append(batch["tokens"])
        if len(taken) == 7:
            break
    state = first.state_dict()
    assert state == {
        "fingerprint": first.fingerprint,
        "stage": "stage1",
        "epoch": 0,
        "sequences_consumed": 7 * 4,
        "global_batch_size": 4,
    }
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["tokens"] for b in resumed]
    assert len(taken) + len(rest) == len(uninterrupted)
    assert all(torch.equal(a, b) for a, b in zip(taken + rest, uninterrupted, strict=True))
    again = list(resumed)  # the next pass is the next epoch
    assert resumed.epoch == 1 and len(again) == len(uninterrupted)


def sequences_per_step(stage: Path, world_size: int, micro: int, global_batch: int, steps: range, state=None):
    """The sequences (as token rows, across all ranks) of each optimizer step in `steps`, read by `world_size` ranks
    of micro-batches of `micro` at `global_batch`, optionally resumed from `state`; and the state after them."""
    loaders = [
        StageLoader(stage, batch_size=micro, rank=r, world_size=world_size, global_batch_size=global_batch)
        for r in range(world_size)
    ]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    streams = [itertools.chain.from_iterable(itertools.repeat(loader)) for loader in loaders]
    per_step = []
    for _ in steps:
        rows = [next(stream)["tokens"] for _ in range(global_batch // (micro * world_size)) for stream in streams]
        per_step.append(sorted(tuple(r.tolist()) for r in torch.cat(rows)))
    return per_step, loaders[0].state_dict()


def test_every_step_reads_the_same_sequences_on_any_number_of_ranks(stage: Path) -> None:
    # 12 sequences of a global batch a step; the stage's epoch is floor(N / 12) steps whatever the world size, so a run
    # resumed 1 -> 2 -> 4 -> 2 ranks (with other micro-batches) reads what one uninterrupted rank reads, across epochs.
    total = len(StageLoader(stage, batch_size=1)) // 12
    steps = total + 3  # into the second epoch
    straight, _ = sequences_per_step(stage, 1, 4, 12, range(steps))
    resumed, state = [], None
    for world, micro, part in [(1, 2, range(0, 2)), (2, 3, range(2, 5)), (4, 1, range(5, total + 1)), (2, 2, None)]:
        part = part or range(total + 1, steps)
        got, state = sequences_per_step(stage, world, micro, 12, part, state)
        resumed += got
    assert resumed == straight
    assert straight[0] == straight[total] and straight[0] != straight[1]  # the second epoch starts over


def test_resume_refuses_another_global_batch_or_stage(stage: Path) -> None:
    loader = StageLoader(stage, batch_size=2, global_batch_size=8)
    _, state = sequences_per_step(stage, 1, 2, 8, range(2))
    with pytest.raises(ResumeMismatchError, match="saved at a global batch of 8 sequences, this run has 2"):
        StageLoader(stage, batch_size=2).load_state_dict(state)
    with pytest.raises(ResumeMismatchError, match=r"saved while training on stage 'stage2', but .* is stage 'stage1'"):
        loader.load_state_dict(state | {"stage": "stage2"})
    with pytest.raises(ResumeMismatchError, match="not a whole number of this run's batches of 6"):
        StageLoader(stage, batch_size=3, world_size=2, global_batch_size=6).load_state_dict(
            state | {"global_batch_size": 6, "sequences_consumed": 8}
        )
    loader.load_state_dict(state)
    assert loader.batches_done == 8  # 2 steps of 8 sequences, in batches of 2
    # A state from before the global batch and stage were recorded still resumes, at its position.
    old = {k: state[k] for k in ("fingerprint", "epoch", "sequences_consumed")}
    loader.load_state_dict(old)
    assert loader.batches_done == 8  # 2 steps of 8 sequences, in batches of 2


def test_resume_refuses_another_dataset(stage: Path) -> None:
    loader = StageLoader(stage, batch_size=2)
    state = loader.state_dict() | {"fingerprint": "0123456789abcdef"}
    with pytest.raises(ResumeMismatchError, match="set allow_data_change: true in the training config"):
        loader.load_state_dict(state)
    loader.load_state_dict(state, allow_fingerprint_change=True)
    with pytest.raises(ResumeMismatchError, match="has no fingerprint"):
        loader.load_state_dict({"epoch": 0, "sequences_consumed": 0})


def test_corrupt_shard_fails_fast_or_is_skipped(stage: Path, tmp_path: Path) -> None:
    copy = tmp_path / "stage"
    shutil.copytree(stage, copy)
    victim = sorted(copy.glob("shard-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CorruptShardError, match=str(victim)):
        StageLoader(copy, batch_size=2)
    skipping = StageLoader(copy, batch_size=2, skip_corrupt=True)
    assert skipping.skipped_shards == [str(victim)]
    assert len(skipping) < len(StageLoader(stage, batch_size=2))
    assert len(list(skipping)) == len(skipping)


@pytest.mark.parametrize("workers", [0, 2])
def test_reading_leaves_torchs_global_rng_alone(stage: Path, workers: int) -> None:
    # Dropout draws from the global RNG: a loader that drew from it too would give a resumed run (a new iterator
    # mid-epoch) other dropout masks than the run it resumes.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = StageLoader(stage, batch_size=4, num_workers=workers)
    for _ in zip(range(3), iter(loader), strict=False):
        pass
    assert torch.equal(torch.get_rng_state(), before)


def test_damaged_sequence_fails_clearly_or_is_read_as_padding(stage: Path, tmp_path: Path, damage_stage) -> None:
    copy = tmp_path / "stage"
    damaged = damage_stage(stage, copy)
    first_shard = str(sorted(copy.glob("shard-*.tar"))[0])
    with pytest.raises(CorruptShardError, match=re.escape(first_shard) + r": .*at byte \d+"):
        list(StageLoader(copy, batch_size=4))
    for rows, text in [([1], "tokens.npy"), ([4], "document bounds"), ([6], "outside the vocabulary of")]:
        loader = StageLoader(copy, batch_size=1)
        with pytest.raises(CorruptShardError, match=text):
            read_batch([loader.index[r] for r in rows], loader.seq_len, {}, loader.vocab_size)
    clean_loader = StageLoader(stage, batch_size=1)
    photos = next(i for i, m in enumerate(clean_loader.index) if (read_batch([m], 128, {})["source_ids"] == 1).any())
    with pytest.raises(CorruptShardError, match=r"source ids span .*; the stage has 1 sources"):
        read_batch([clean_loader.index[photos]], 128, {}, n_sources=1)
    # With DataLoader workers the error reaches the caller as itself, not inside the worker's traceback.
    with pytest.raises(
        CorruptShardError, match=r"^\S+shard-00000\.tar: member tokens\.npy at byte \d+: not a \.npy array$"
    ):
        list(StageLoader(copy, batch_size=4, num_workers=2))
    clean = list(StageLoader(stage, batch_size=4))
    skipping = list(StageLoader(copy, batch_size=4, skip_corrupt=True))
    assert len(skipping) == len(clean)  # batch counts stay as planned: no rank waits on another
    got, want = torch.cat([b["tokens"] for b in skipping]), torch.cat([b["tokens"] for b in clean])
    flags = torch.cat([b["damaged"] for b in skipping])
    assert torch.nonzero(flags).flatten().tolist() == sorted(damaged)
    mask = torch.cat([b["loss_mask"] for b in skipping])
    for row in range(len(got)):
        if row in damaged:
            assert (got[row] == PAD_ID).all() and not mask[row].any()
        else:
            assert torch.equal(got[row], want[row])
