"""Reading stage shards for training: deterministic batches per rank and worker, equal batch counts on every rank,
and a state that resumes exactly.

Sequences are read in the order the mix job wrote them (that order keeps the mixture's shares in every prefix).
Loader batch b holds sequences [b*G, (b+1)*G), G = world_size x batch_size; rank r takes its slice of each, and
DataLoader worker w of a rank reads the batches b with b % num_workers == w, which PyTorch's in-order DataLoader
returns as 0, 1, 2, ... again. Every member is read by seeking to its offset in the tar: no worker reads what
another one needs.

Elastic resume: an optimizer step of global batch B reads sequences [s*B, (s+1)*B) of its epoch on any number of
ranks, and an epoch is the first floor(N / B) * B of the N sequences (not a multiple of G, which depends on the
world size): so a run saved on N ranks and resumed on M reads the same sequences at every step. The state records the
global batch; resuming at another one is refused, since every later step would read other sequences.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from model.files import storage
from model.files.reading import read_json_object, read_npy
from model.training.shard_cache import RemoteIndex, ShardCache
from schemas.vocab import PAD_ID

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STAGE_MANIFEST_KEYS = ("fingerprint", "seq_len", "shards", "vocab_layout")
ERROR_KEY = "error"  # a batch that carries a reading error from a DataLoader worker instead of tensors
MANIFEST_MAX_BYTES = 256 * 2**20  # a stage manifest lists shards: far below this even for millions of them


class CorruptShardError(RuntimeError):
    """A stage shard that cannot be read; the message names its path."""


class ResumeMismatchError(RuntimeError):
    """A loader state saved for a different dataset (fingerprint) than the one being loaded."""


@dataclass(frozen=True)
class Member:
    shard: str
    offsets: dict[str, tuple[int, int]]  # member suffix -> (offset, size) inside the tar


def index_shard(path: Path, expected: int) -> list[Member]:
    """Byte offsets of every sequence's members in one tar (headers only; payloads are not read)."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                key, _, suffix = info.name.partition(".")
                members.setdefault(key, {})[suffix] = (info.offset_data, info.size)
    except (OSError, tarfile.TarError) as err:
        raise CorruptShardError(f"{path}: {err}") from None
    if len(members) != expected or any("tokens.npy" not in m or "docs.npy" not in m for m in members.values()):
        raise CorruptShardError(f"{path}: expected {expected} sequences with tokens and docs, found {len(members)}")
    return [Member(str(path), members[key]) for key in sorted(members)]


class StageDataset(IterableDataset):
    """Batches of one rank, from `start_batch` on; yields dicts of tensors (see `read_batch`)."""

    def __init__(
        self,
        index: list[Member],
        seq_len: int,
        rank: int,
        world_size: int,
        batch_size: int,
        n_batches: int,
        start_batch: int = 0,
        vocab_size: int | None = None,
        skip_damaged: bool = False,
        n_sources: int | None = None,
    ):
        self.index, self.seq_len, self.vocab_size, self.skip_damaged = index, seq_len, vocab_size, skip_damaged
        self.n_sources = n_sources
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.n_batches, self.start_batch = n_batches, start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        files: dict[str, Any] = {}
        try:
            for batch in range(self.start_batch, self.n_batches):
                if (batch - self.start_batch) % n_workers != worker:
                    continue
                first = batch * self.world_size * self.batch_size + self.rank * self.batch_size
                members = self.index[first : first + self.batch_size]
                try:
                    yield read_batch(members, self.seq_len, files, self.vocab_size, self.skip_damaged, self.n_sources)
                except CorruptShardError as err:
                    # Sent as data: raised in a DataLoader worker, it would reach the trainer wrapped in the worker's
                    # whole traceback.
                    yield {ERROR_KEY: str(err)}
                    return
        finally:
            for f in files.values():
                f.close()


def _read(member: Member, suffix: str, files: dict[str, Any]) -> np.ndarray:
    f = files.get(member.shard)
    if f is None:
        f = files[member.shard] = open(member.shard, "rb")  # noqa: SIM115 - kept open across batches, closed above
    offset, size = member.offsets[suffix]
    f.seek(offset)
    return read_npy(f.read(size), f"{member.shard}: member {suffix} at byte {offset}", CorruptShardError)


def read_sequence(
    member: Member, seq_len: int, files: dict[str, Any], vocab_size: int | None = None, n_sources: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sequence's tokens [S], loss mask [S] and documents [3, n] (start, length, source), checked for shape and
    range: a damaged member raises CorruptShardError naming the shard and byte, never a wrong batch or an index
    error inside the model."""
    offset = member.offsets["tokens.npy"][0]

    def bad(why: str) -> CorruptShardError:
        return CorruptShardError(f"{member.shard}: sequence at byte {offset}: {why}")

    tokens = _read(member, "tokens.npy", files)
    if tokens.shape != (seq_len,) or tokens.dtype.kind not in "iu":
        raise bad(f"tokens are {tokens.dtype} {tokens.shape}, expected integers of shape ({seq_len},)")
    if vocab_size is not None and seq_len and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise bad(f"token ids span {int(tokens.min())}..{int(tokens.max())}, outside the vocabulary of {vocab_size}")
    mask = _read(member, "mask.npy", files) if "mask.npy" in member.offsets else np.ones(seq_len, np.uint8)
    if mask.shape != (seq_len,):
        raise bad(f"mask has shape {mask.shape}, expected ({seq_len},)")
    docs = _read(member, "docs.npy", files)
    if docs.ndim != 2 or docs.shape[0] != 3 or docs.dtype.kind not in "iu":
        raise bad(f"docs are {docs.dtype} {docs.shape}, expected integers of shape (3, n)")
    starts, lengths = docs[0].astype(np.int64), docs[1].astype(np.int64)
    if len(docs[0]) and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > seq_len):
        raise bad(f"document bounds fall outside the {seq_len} positions")
    if n_sources is not None and len(docs[2]) and (docs[2].min() < -1 or docs[2].max() >= n_sources):
        raise bad(f"source ids span {docs[2].min()}..{docs[2].max()}; the stage has {n_sources} sources")
    return tokens, mask.astype(bool), docs


def read_batch(
    members: list[Member],
    seq_len: int,
    files: dict[str, Any],
    vocab_size: int | None = None,
    skip_damaged: bool = False,
    n_sources: int | None = None,
) -> dict[str, torch.Tensor]:
    """tokens [B, S] int64, loss_mask [B, S] bool, doc_ids [B, S] (document index, -1 on padding),
    positions [B, S] (reset at each document), source_ids [B, S] (-1 on padding), damaged [B] bool.

    With `skip_damaged`, a sequence whose members cannot be read becomes an all-padding row with no targets (logged,
    flagged in `damaged`), so batch shapes and counts stay as planned on every rank; otherwise it raises."""
    b = len(members)
    tokens = np.full((b, seq_len), PAD_ID, np.int64)
    mask = np.zeros((b, seq_len), bool)
    doc_ids = np.full((b, seq_len), -1, np.int64)
    positions = np.zeros((b, seq_len), np.int64)
    sources = np.full((b, seq_len), -1, np.int64)
    damaged = np.zeros(b, bool)
    for i, member in enumerate(members):
        try:
            tokens[i], mask[i], docs = read_sequence(member, seq_len, files, vocab_size, n_sources)
        except CorruptShardError as err:
            if not skip_damaged:
                raise
            log.warning("a damaged sequence is read as padding: %s", err)
            tokens[i], mask[i], damaged[i] = PAD_ID, False, True
            continue
        for d, (start, length, src) in enumerate(zip(*docs, strict=True)):
            doc_ids[i, start : start + length] = d
            positions[i, start : start + length] = np.arange(length)
            sources[i, start : start + length] = src
    arrays = {
        "tokens": tokens,
        "loss_mask": mask,
        "doc_ids": doc_ids,
        "positions": positions,
        "source_ids": sources,
        "damaged": damaged,
    }
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


@dataclass(frozen=True)
class StoreCache:
    """Where a stage on an object store is cached locally, how much of it, and how far ahead it is fetched."""

    root: Path | None = None  # default: storage.default_cache_root()
    max_bytes: int = 8 * 2**30
    read_ahead: int = 2

    def folder_for(self, stage_url: str) -> Path:
        return (self.root or storage.default_cache_root()) / "stages" / storage.cache_key(stage_url)


class StageLoader:
    """Batches of one rank over a stage folder written by `cham mix`, resumable exactly.

    `state_dict()` is {fingerprint, epoch, sequences_consumed}; `load_state_dict` refuses another dataset's state
    unless `allow_fingerprint_change`. With `skip_corrupt`, an unreadable shard is left out (on every rank alike,
    so batch counts stay equal) with a warning, and counted in `skipped_shards`; a damaged sequence inside a readable
    shard is read as a padding row without targets, flagged in the batch's `damaged`. Without it, either raises
    CorruptShardError naming the shard.
    """

    def __init__(
        self,
        stage_dir: str | Path,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        skip_corrupt: bool = False,
        global_batch_size: int | None = None,
        cache: StoreCache | None = None,
    ):
        remote = storage.is_url(stage_dir)
        self.stage_dir: Path | str = str(stage_dir) if remote else storage.local_path(stage_dir)
        shard_cache = None
        if remote:
            # A stage on an object store: the manifest is read now, each shard when first needed (shard_cache.py).
            cache = cache or StoreCache()
            shard_cache = ShardCache(
                str(stage_dir), cache.folder_for(str(stage_dir)), cache.max_bytes, cache.read_ahead
            )
            manifest_path = shard_cache.folder / MANIFEST
            try:
                storage.download(storage.join(stage_dir, MANIFEST), manifest_path, max_bytes=MANIFEST_MAX_BYTES)
            except FileNotFoundError:
                raise FileNotFoundError(f"{stage_dir} is not a stage folder (no {MANIFEST}; run `cham mix`)") from None
        else:
            manifest_path = self.stage_dir / MANIFEST
            if not manifest_path.is_file():
                raise FileNotFoundError(f"{self.stage_dir} is not a stage folder (no {MANIFEST}; run `cham mix`)")
        self.manifest = manifest = read_json_object(manifest_path, STAGE_MANIFEST_KEYS, what="stage manifest")
        if not isinstance(manifest["shards"], list) or not all(
            isinstance(s, dict) and {"shard", "sequences"} <= s.keys() for s in manifest["shards"]
        ):
            raise ValueError(f"{manifest_path}: not a stage manifest (shards must list shard and sequences)")
        self.fingerprint, self.seq_len = manifest["fingerprint"], manifest["seq_len"]
        self.source_ids = manifest.get("source_ids", [])
        self.vocab_size = manifest["vocab_layout"].get("vocab_size")
        self.skip_corrupt = skip_corrupt
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.skipped_shards: list[str] = []
        self.shard_cache = shard_cache
        self.index: list[Member] | RemoteIndex = []
        if shard_cache is not None:
            shards = [(f"{s['shard']}.tar", int(s["sequences"])) for s in manifest["shards"]]
            self.index = RemoteIndex(shards, shard_cache)
        for shard in manifest["shards"] if shard_cache is None else []:
            path = self.stage_dir / f"{shard['shard']}.tar"
            try:
                self.index += index_shard(path, shard["sequences"])
            except CorruptShardError as err:
                if not skip_corrupt:
                    raise
                log.warning("skipping a corrupt shard: %s", err)
                self.skipped_shards.append(str(path))
        per_batch = world_size * batch_size
        self.global_batch_size = global_batch_size or per_batch
        if self.global_batch_size % per_batch:
            raise ValueError(
                f"global batch {self.global_batch_size} is not a multiple of {world_size} ranks x {batch_size}"
            )
        steps_per_epoch = len(self.index) // self.global_batch_size
        self.batches_per_epoch = steps_per_epoch * (self.global_batch_size // per_batch)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.stage_dir}: {len(self.index)} sequences are fewer than one global batch "
                f"({self.global_batch_size})"
            )
        self.epoch, self.batches_done = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the loader is, in units that do not depend on the world size: sequences of the epoch consumed, and
        the global batch they were consumed in (what a resume on another number of ranks needs to re-split)."""
        consumed = self.batches_done * self.world_size * self.batch_size
        return {
            "fingerprint": self.fingerprint,
            "stage": self.manifest.get("stage"),
            "epoch": self.epoch,
            "sequences_consumed": consumed,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any], allow_fingerprint_change: bool = False) -> None:
        """Continue where `state` (from `state_dict`) was; a state of another dataset is refused unless allowed (the
        trainer's `allow_data_change`), in which case the same epoch and position are taken in the new data."""
        missing = [k for k in ("fingerprint", "epoch", "sequences_consumed") if k not in state]
        if missing:
            raise ResumeMismatchError(f"the saved loader state has no {', '.join(missing)}: {state}")
        if state["fingerprint"] != self.fingerprint and not allow_fingerprint_change:
            raise ResumeMismatchError(
                f"the saved loader state is for dataset {state['fingerprint']} but {self.stage_dir} is "
                f"{self.fingerprint} (re-mixed?); set allow_data_change: true in the training config to resume on "
                f"it anyway, at the same position"
            )
        stage = self.manifest.get("stage")
        if state.get("stage") is not None and stage is not None and state["stage"] != stage:
            raise ResumeMismatchError(
                f"the checkpoint was saved while training on stage {state['stage']!r}, but {self.stage_dir} is stage "
                f"{stage!r}: point the config at the {state['stage']} folder, or train the new stage in a new out_dir "
                f"(init_from the checkpoint), or name both stages in one run (stages:)"
            )
        saved_batch = state.get("global_batch_size")
        if saved_batch is not None and int(saved_batch) != self.global_batch_size:
            raise ResumeMismatchError(
                f"the checkpoint was saved at a global batch of {saved_batch} sequences, this run has "
                f"{self.global_batch_size}: every later step would read other sequences; keep global_batch_size "
                f"{saved_batch} (any number of ranks and micro_batch_size that divide it)"
            )
        consumed, per_batch = int(state["sequences_consumed"]), self.world_size * self.batch_size
        if consumed % per_batch:
            raise ResumeMismatchError(
                f"the checkpoint was saved {consumed} sequences into its epoch, not a whole number of this run's "
                f"batches of {per_batch} ({self.world_size} ranks x {self.batch_size}): it cannot resume there"
            )
        self.epoch, self.batches_done = int(state["epoch"]), consumed // per_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches from the saved position to the end of the epoch; the next iteration starts the next epoch."""
        if self.batches_done >= self.batches_per_epoch:
            self.epoch, self.batches_done = self.epoch + 1, 0
        dataset = StageDataset(
            self.index,
            self.seq_len,
            self.rank,
            self.world_size,
            self.batch_size,
            self.batches_per_epoch,
            self.batches_done,
            vocab_size=self.vocab_size,
            skip_damaged=self.skip_corrupt,
            n_sources=len(self.source_ids) or None,
        )
        # A generator of its own: otherwise each new DataLoader iterator draws its base seed from torch's global RNG,
        # which dropout also draws from, and a resumed run (a new iterator mid-epoch) would get other dropout masks.
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(self.epoch),
        )
        for batch in loader:
            if ERROR_KEY in batch:
                raise CorruptShardError(batch[ERROR_KEY])
            self.batches_done += 1
            yield batch
