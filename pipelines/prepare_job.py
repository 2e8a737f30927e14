"""The prepare job: raw sources -> tokenized WebDataset shards, one folder per source, every reject accounted for.

Per source: read tasks (about `samples_per_shard` records each) -> read + clean + normalize images + faces ->
deduplication (across every source of the build and the index of earlier builds) -> VQ codes through RunInference ->
join -> tokenize -> one shard per read task, written whole. A source without deduplication VQ-encodes and tokenizes
its records in the read stage itself (record_tokenizer): no join, one shuffle fewer. A shard whose stats file holds
the same fingerprint and task is complete, and a re-run skips its task without reading it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np

from model.files import storage
from model.files.run_lock import RunLock, RunLockedError
from model.tokenizers.image_tokenizer import ImageTokenizer
from model.tokenizers.mixed_tokenizer import MixedModalTokenizer
from model.tokenizers.text_tokenizer import load_text_tokenizer
from pipelines.dedup import (
    DEDUP_STAGE,
    DUPLICATE,
    EntryRow,
    MinHasher,
    Node,
    Thresholds,
    bucket_edges,
    bucket_keys,
    duplicate_detail,
    entry_row,
    index_folder,
    index_parts,
    read_index_part,
    record_entry,
    resolve,
    row_entry,
    write_index_part,
)
from pipelines.documents import TEXT_SEPARATOR_BY_FORMAT
from pipelines.face_detection import HaarFaceDetector
from pipelines.image_download import UrlImages, download_totals
from pipelines.prepare_record import PreparedRecord, PrepareSettings, assemble_sample, prepare_record
from pipelines.raw_records import Reject
from pipelines.record_tokenizer import RecordTokenizer
from pipelines.runners import pipeline_options
from pipelines.shard_writer import (
    SHARD_IDS,
    STATS_SUFFIX,
    is_complete,
    remove_temporaries,
    shard_id_of,
    shard_name,
    write_shard,
)
from pipelines.source_reader import ReadTask, plan_read_tasks, read_task
from pipelines.vq_inference import VQCodes, VQModelHandler, process_model
from schemas.prepare_config import PrepareConfig, RunnerConfig, SourceConfig

MANIFEST = "manifest.json"
# DoFns emit (OK, value) or (REJECT, (shard id, Reject)); two filters split them. Tagged outputs would be
# neater, but Beam's DaskRunner routes them wrongly.
OK, REJECT = "ok", "reject"


class PrepareError(RuntimeError):
    """The job cannot start: tokenizers that do not fit each other or the config."""


def settings_for(config: PrepareConfig, source: SourceConfig) -> PrepareSettings:
    """Per-record settings: each PrepareSettings field from the source's option of its name when set, else from the
    config's shard setting of its name, else the step's default; the text separator as the format implies."""
    job = config.shard_settings()
    values = {}
    for name in (f.name for f in fields(PrepareSettings)):
        value = getattr(source.options, name, None)
        values[name] = value if value is not None else job.get(name)
    values["text_separator"] = _text_separator(source)
    return PrepareSettings(**{name: value for name, value in values.items() if value is not None})


def _text_separator(source: SourceConfig) -> str | None:
    """Interleaved sources: the option, else what the format implies (documents.py); None for other kinds."""
    if source.kind != "interleaved":
        return None
    chosen = getattr(source.options, "text_separator", None)
    return chosen if chosen is not None else TEXT_SEPARATOR_BY_FORMAT[source.format]


def source_fingerprint(config: PrepareConfig, source: SourceConfig, tokenizer_fps: dict[str, str]) -> str:
    """Changes when anything that changes this source's samples changes: its own config, the per-record settings,
    the job's other shard settings (samples_per_shard), the tokenizers' fingerprints and the download outcomes."""
    settings = asdict(settings_for(config, source))
    if settings["text_separator"] is None:  # kinds without one keep the fingerprints they had before it existed
        del settings["text_separator"]
    payload = {"source": source.model_dump(mode="json", exclude={"dedup"}), "settings": settings}
    payload["tokenizers"] = tokenizer_fps
    dedup = config.dedup.settings_for(source.dedup)
    if dedup is not None:  # the default (off) adds nothing: shards from before deduplication keep their fingerprints
        payload["dedup"] = dedup
    # Shard settings the records never see sit beside "settings" (where samples_per_shard always was).
    payload |= {k: v for k, v in config.shard_settings().items() if k not in settings}
    if config.download.outcome_fingerprint() is not None:  # downloads off: the fingerprints they always had
        payload["download"] = config.download.outcome_fingerprint()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def task_signature(task: ReadTask) -> list[Any]:
    """What a shard was made from: its read task's file, with the file's size and modification time (its ETag on a
    store, as the plan saw it; a file changed since is another task), and the range read."""
    identity = task.identity if task.identity is not None else storage.identity(task.path)
    return [task.path, task.start, task.stop, *identity]


def read_stats_files(out_dir: str | Path, names: Iterable[str]) -> dict[int, dict[str, Any]]:
    """The stats files among `names` (the folder's listing), parsed, by shard id; an unreadable one is left out (its
    shard is not complete). On a store they are fetched in one concurrent batch."""
    wanted = [n for n in names if n.endswith(STATS_SUFFIX) and shard_id_of(n) is not None]
    out = {}
    for name, text in storage.read_texts(out_dir, sorted(wanted)).items():
        try:
            stats = json.loads(text)
        except ValueError:
            continue
        if isinstance(stats, dict):
            out[shard_id_of(name)] = stats
    return out  # type: ignore[return-value]


def shard_ledger(
    out_dir: str | Path, fingerprint: str, stats: dict[int, dict[str, Any]] | None = None
) -> dict[tuple, int]:
    """Which shard each read task of earlier builds of a source went to (task signature -> shard id), under the same
    fingerprint: the source's shard_ids.json (written before each build runs, so a killed build's re-run gives its
    tasks the same ids), and the stats files of complete shards (written last: a shard with one is whole); `stats`,
    those files if the caller has read them (read_stats_files)."""
    ledger: dict[tuple, int] = {}
    try:
        table = json.loads(storage.read_text(storage.join(out_dir, SHARD_IDS)))
    except (OSError, ValueError):
        table = None
    if isinstance(table, dict) and table.get("fingerprint") == fingerprint and isinstance(table.get("shards"), list):
        for entry in table["shards"]:
            if isinstance(entry, dict) and isinstance(entry.get("id"), int) and isinstance(entry.get("task"), list):
                ledger[tuple(entry["task"])] = entry["id"]
    if stats is None:
        stats = read_stats_files(out_dir, storage.list_names(out_dir))
    for shard_id, shard_stats in sorted(stats.items()):
        if shard_stats.get("fingerprint") == fingerprint:
            ledger[tuple(shard_stats.get("task") or ())] = shard_id
    return ledger


def write_shard_ids(out_dir: str | Path, fingerprint: str, tasks: list[tuple[int, ReadTask]]) -> None:
    """Record this build's task -> shard id assignment (before the build runs; see shard_ledger)."""
    table = {"fingerprint": fingerprint, "shards": [{"id": i, "task": task_signature(t)} for i, t in tasks]}
    storage.write_text(storage.join(out_dir, SHARD_IDS), json.dumps(table, indent=1))


def assign_shards(tasks: list[ReadTask], ledger: dict[tuple, int]) -> list[tuple[int, ReadTask]]:
    """Shard ids for this build's tasks: a task an earlier build made keeps its shard (untouched, byte for byte),
    a new one (a new file, whatever its name, or a changed one) gets the next unused id, in task order."""
    taken = set(ledger.values())
    next_id = max(taken, default=-1) + 1
    assigned = []
    for task in tasks:
        shard_id = ledger.get(tuple(task_signature(task)))
        if shard_id is None:
            shard_id, next_id = next_id, next_id + 1
        assigned.append((shard_id, task))
    return assigned


def check_tokenizers(config: PrepareConfig) -> tuple[dict[str, str], MixedModalTokenizer, ImageTokenizer]:
    """Load both tokenizers once in the driver and check they fit each other and the config."""
    text = load_text_tokenizer(config.tokenizers.text)
    image = ImageTokenizer.load(config.tokenizers.image)
    layout, vq = text.vocab.layout, image.config
    if (layout.image_codes, layout.image_grid) != (vq.n_embed, vq.grid):
        raise PrepareError(
            f"the text tokenizer's vocabulary has {layout.image_codes} image codes on a {layout.image_grid}x"
            f"{layout.image_grid} grid but the VQ tokenizer has {vq.n_embed} codes on a {vq.grid}x{vq.grid} grid"
        )
    if config.image_size != vq.resolution:
        raise PrepareError(f"image_size {config.image_size} does not match the VQ tokenizer's {vq.resolution} px")
    return {"text": text.fingerprint, "image": image.fingerprint}, MixedModalTokenizer(text), image


class ReadAndPrepare(beam.DoFn):
    """A read task -> (OK, prepared record) and (REJECT, (shard id, reject))."""

    def __init__(self, source: SourceConfig, settings: PrepareSettings, urls: UrlImages | None = None):
        self.source, self.settings = source, settings
        self.urls = urls or UrlImages(None, source.name, source.kind)  # URL images: fetched, or image_not_local

    def setup(self) -> None:
        import cv2

        cv2.setNumThreads(1)  # parallelism comes from workers, not from threads inside one image
        self.detector = HaarFaceDetector() if self.settings.detect_faces else None
        self.urls.open()

    def teardown(self) -> None:
        self.urls.close()

    def process(self, element: tuple[int, ReadTask, int, int]) -> Iterator[Any]:
        """Piece `part` of `parts` of a task (see read_parts): every `parts`-th item from the `part`-th on; each
        record keeps the index it has in the whole task, so the pieces together give what one would."""
        shard_id, task, part, parts = element
        index = 0
        # One download report per shard: the pieces all see the same items.
        items = self.urls.resolve(read_task(task), shard_id if part == 0 else None)
        for position, item in enumerate(items):
            mine = position % parts == part
            if isinstance(item, Reject):
                if mine:
                    yield REJECT, (shard_id, item)
                continue
            if mine:
                prepared = prepare_record(
                    self.source.name, self.source.kind, shard_id, index, item, self.settings, self.detector
                )
                yield (REJECT, (shard_id, prepared)) if isinstance(prepared, Reject) else (OK, prepared)
            index += 1


class ReadAndTokenize(ReadAndPrepare):
    """A read task -> (OK, (shard id, TokenizedSample)) and (REJECT, (shard id, reject)): ReadAndPrepare with each
    piece's records VQ-encoded (in batches across records) and tokenized in the same worker."""

    def __init__(
        self, source: SourceConfig, settings: PrepareSettings, urls: UrlImages, vq: VQModelHandler, text_tokenizer: str
    ):
        super().__init__(source, settings, urls)
        self.vq, self.text_tokenizer = vq, text_tokenizer

    def setup(self) -> None:
        super().setup()
        tokenizer = MixedModalTokenizer(load_text_tokenizer(self.text_tokenizer))
        self.tokenizer = RecordTokenizer(
            process_model(self.vq), tokenizer, self.settings, self.vq.max_batch_size, (OK, REJECT)
        )

    def process(self, element: tuple[int, ReadTask, int, int]) -> Iterator[Any]:
        # Everything is emitted from `process` (none from finish_bundle, which Beam's DaskRunner drops).
        for tag, value in super().process(element):
            yield from self.tokenizer.add(value) if tag == OK else [(tag, value)]
        yield from self.tokenizer.flush()


class Assemble(beam.DoFn):
    """(record key, {record, codes}) -> (OK, (shard id, TokenizedSample)) or (REJECT, (shard id, reject))."""

    def __init__(self, text_tokenizer: str, settings: PrepareSettings):
        self.text_tokenizer, self.settings = text_tokenizer, settings

    def setup(self) -> None:
        self.tokenizer = MixedModalTokenizer(load_text_tokenizer(self.text_tokenizer))

    def process(self, element: tuple[Any, dict[str, Iterable[Any]]]) -> Iterator[Any]:
        _, groups = element
        (record,) = groups["record"]
        codes = {slot: np.asarray(c) for slot, c in groups["codes"]}
        out = assemble_sample(record, codes, self.tokenizer, self.settings)
        yield (REJECT, (record.task, out)) if isinstance(out, Reject) else (OK, (record.task, out))


class WriteShard(beam.DoFn):
    """(shard id, {task, samples, rejects, dedup}) -> the shard written whole; yields its stats. With `index_dir`,
    the dedup entries of the shard's samples are written there first (dedup.write_index_part), the stats last."""

    def __init__(
        self,
        out_dir: str,
        vocab_size: int,
        fingerprint: str,
        index_dir: str | None = None,
        hasher: MinHasher | None = None,
    ):
        self.out_dir, self.vocab_size, self.fingerprint = out_dir, vocab_size, fingerprint
        self.index_dir, self.hasher = index_dir, hasher

    def process(self, element: tuple[int, dict[str, Iterable[Any]]]) -> Iterator[dict[str, Any]]:
        shard_id, groups = element
        (task,) = groups["task"]
        samples = list(groups["samples"])
        if self.index_dir is not None:  # only records that became samples (not those rejected after dedup)
            keys = {s.key for s in samples}
            kept = [row_entry(row) for row in groups.get("dedup", ()) if row[0][3] in keys]  # row[0]: the node
            part = storage.join(self.index_dir, f"{shard_name(shard_id)}.npz")
            write_index_part(part, kept, self.hasher or MinHasher())
        stats = write_shard(
            self.out_dir,
            shard_id,
            samples,
            list(groups["rejects"]),
            vocab_size=self.vocab_size,
            fingerprint=self.fingerprint,
            extra={"task": task_signature(task)},
        )
        yield stats


def torch_threads_per_worker(config: PrepareConfig) -> int | None:
    """For the local runner, the cores shared out between its worker processes; elsewhere torch's default."""
    if config.runner.kind != "local":
        return None
    return max(1, (os.cpu_count() or 1) // parallelism(config.runner))


def read_parts(config: PrepareConfig, n_tasks: int, per_worker: int = 16, most: int = 8) -> int:
    """How many pieces each read task is prepared in: enough for `per_worker` pieces a worker when a job has few
    tasks, so that every worker gets an even share of the decoding and face detection.

    Beam's local runner hands a stage's elements out to its workers in fixed shares, so 15 tasks on 2 workers are
    8 against 7 and one worker idles through the last task. A piece reads its whole task again (cheap next to
    preparing the images) and prepares every `parts`-th record (ReadAndPrepare). One piece when tasks are many,
    on one worker, and with downloads on (each piece would fetch the task's images again).
    """
    if config.download.enabled or n_tasks == 0:
        return 1
    workers = parallelism(config.runner)
    if workers == 1:
        return 1
    return max(1, min(most, -(-per_worker * workers // n_tasks)))


def parallelism(runner: RunnerConfig) -> int:
    """How many records a runner prepares at once: 1 embedded; `workers` when set; on a Dask cluster the worker
    threads its scheduler reports; otherwise this machine's cores."""
    if runner.kind == "embedded":
        return 1
    if runner.workers:
        return runner.workers
    if runner.kind == "dask" and runner.address:
        return dask_threads(runner.address) or os.cpu_count() or 1
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=8)
def dask_threads(address: str) -> int | None:
    """The worker threads of the Dask cluster at `address`, or None when it cannot be asked (the job itself then
    reports why it cannot connect)."""
    try:
        from distributed import Client

        with Client(address, timeout=10) as client:
            return sum(client.nthreads().values()) or None
    except (OSError, TimeoutError):
        return None


DASK_MOST_PARTITIONS = 1024  # beyond this, Dask's shuffles cost more than finer partitions give back
DASK_PARTITIONS_PER_THREAD = 4  # enough for dask to balance uneven pieces; more only feeds the shuffles


def runner_for(config: PrepareConfig, todo: dict[str, dict[str, Any]]) -> RunnerConfig:
    """config.runner; on Dask, with a dask partition per read piece, at most DASK_PARTITIONS_PER_THREAD a worker
    thread (and DASK_MOST_PARTITIONS), unless its options set `dask_npartitions` or `dask_partition_size` themselves.

    Beam's DaskRunner (2.77/2.78) puts up to 128 elements of a Create in one partition and its Reshuffle does
    nothing, so a source of up to 128 read tasks was prepared in one dask task, on one worker, whatever the cluster.
    Every later GroupByKey is a dask shuffle whose tasks grow with the partitions, all through the scheduler: 45
    partitions on 2 worker threads took 39 s where 8 took 22 s (docs/performance.md).
    """
    runner = config.runner
    if runner.kind != "dask" or {"dask_npartitions", "dask_partition_size"} & set(runner.options):
        return runner
    pieces = sum(len(p["todo"]) * read_parts(config, len(p["todo"])) for p in todo.values())
    partitions = max(1, min(DASK_MOST_PARTITIONS, DASK_PARTITIONS_PER_THREAD * parallelism(runner), pieces))
    return runner.model_copy(update={"options": {**runner.options, "dask_npartitions": partitions}})


def _split(pcoll: beam.PCollection, label: str) -> tuple[beam.PCollection, beam.PCollection]:
    """(OK, x) / (REJECT, y) pairs -> the x and the y."""
    ok = pcoll | f"{label}/ok" >> beam.FlatMap(lambda t: [t[1]] if t[0] == OK else [])
    rejected = pcoll | f"{label}/rejected" >> beam.FlatMap(lambda t: [t[1]] if t[0] == REJECT else [])
    return ok, rejected


def _images_of(record: PreparedRecord) -> Iterator[tuple[tuple[str, int], np.ndarray]]:
    for slot, pixels in enumerate(record.images):
        yield (record.key, slot), pixels


def hasher_of(config: PrepareConfig) -> MinHasher:
    """The MinHash settings of PrepareConfig.dedup."""
    d = config.dedup
    return MinHasher(ngram=d.ngram, bands=d.bands, rows=d.rows, seed=d.seed)


def thresholds_of(config: PrepareConfig) -> Thresholds:
    """The thresholds candidates are verified with, from PrepareConfig.dedup."""
    return Thresholds(jaccard=config.dedup.jaccard, image_distance=config.dedup.image_distance)


def dedup_entry(record: PreparedRecord, rank: int, near: bool, hasher: MinHasher) -> EntryRow:
    """A prepared record's dedup entry (as plain values, dedup.entry_row): its cleaned texts and normalized images
    (before the pixels are dropped)."""
    texts = [p for p in [*record.prompt, *(record.answer or [])] if isinstance(p, str)]
    node = Node(1, rank, record.source, record.key, record.record_id)
    return entry_row(record_entry(node, record.task, record.kind, texts, record.images, near, hasher))


def _keep_or_reject(element: tuple[str, dict[str, Iterable[Any]]]) -> Iterator[Any]:
    """(record key, {record, duplicate}) -> (OK, record), or (REJECT, (shard id, duplicate reject))."""
    _, groups = element
    (record,) = groups["record"]
    found = next(iter(groups["duplicate"]), None)
    if found is None:
        yield OK, record
        return
    reject = Reject(record.source, record.record_id, DEDUP_STAGE, DUPLICATE, duplicate_detail(*found))
    yield REJECT, (record.task, reject)


def earlier_index(config: PrepareConfig, plans: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """(source, path) of the index parts the build dedups against: those of complete shards of earlier runs (parts of
    shards about to be redone were removed with their stats), and every part of sources no longer configured."""
    out = []
    for source, paths in index_parts(config.output_dir).items():
        ids = {i for i, _ in plans[source]["tasks"]} if source in plans else None
        for path in paths:
            shard = shard_id_of(str(path).rsplit("/", 1)[-1])
            if ids is None or (shard is not None and shard in ids):
                out.append((source, str(path)))
    return out


def add_dedup(
    p: beam.Pipeline, config: PrepareConfig, records: dict[str, beam.PCollection], index: list[tuple[str, str]]
) -> tuple[dict[str, beam.PCollection], dict[str, beam.PCollection], dict[str, beam.PCollection]]:
    """The dedup stage over every source's prepared records: entries grouped by exact hash and LSH band with the
    earlier builds' index, candidates verified, groups resolved (dedup.resolve), duplicates rejected. Returns per
    source its kept records, its duplicate rejects ((shard id, Reject)) and its entries by shard id (for the index);
    sources with dedup off pass through untouched."""
    hasher, thresholds = hasher_of(config), thresholds_of(config)
    ranks = {s.name: n for n, s in enumerate(config.sources)}
    modes = {s.name: s.dedup for s in config.sources}
    entries = {
        name: pcoll | f"{name}/dedup entries" >> beam.Map(dedup_entry, ranks[name], modes[name] == "on", hasher)
        for name, pcoll in records.items()
        if modes[name] != "off"
    }
    kept = {name: pcoll for name, pcoll in records.items() if name not in entries}
    if not entries:
        return kept, {}, {}
    earlier = (
        p
        | "dedup/index parts" >> beam.Create(index)
        | "dedup/read index"
        >> beam.FlatMap(lambda part: [entry_row(e) for e in read_index_part(part[1], part[0], hasher)])
    )
    duplicates = (
        (*entries.values(), earlier)
        | "dedup/all entries" >> beam.Flatten()
        | "dedup/keys" >> beam.FlatMap(lambda row: [(k, row) for k in bucket_keys(row_entry(row), hasher, thresholds)])
        | "dedup/buckets" >> beam.GroupByKey()
        | "dedup/verify" >> beam.FlatMap(lambda kv: bucket_edges(kv[0][0], map(row_entry, kv[1]), thresholds))
        # One list of the verified edges: only duplicates make edges, so it is as small as what is removed.
        | "dedup/edges" >> beam.combiners.ToList()
        | "dedup/resolve"
        >> beam.FlatMap(lambda edges: [(n.source, n.key, *found) for n, found in resolve(edges).items()])
    )
    rejects, by_shard = {}, {}
    for name, pcoll in entries.items():
        mine = duplicates | f"{name}/its duplicates" >> beam.FlatMap(
            lambda d, n=name: [(d[1], (d[2], d[3]))] if d[0] == n else []
        )
        decided = (
            {"record": records[name] | f"{name}/by key" >> beam.Map(lambda r: (r.key, r)), "duplicate": mine}
            | f"{name}/dedup join" >> beam.CoGroupByKey()
            | f"{name}/dedup" >> beam.FlatMap(_keep_or_reject)
        )
        kept[name], rejects[name] = _split(decided, f"{name}/deduplicated")
        by_shard[name] = pcoll | f"{name}/entries by shard" >> beam.Map(lambda row: (row[1], row))
    return kept, rejects, by_shard


def tokenizes_in_read(source: SourceConfig) -> bool:
    """Whether a source's records are tokenized in its read stage (ReadAndTokenize): when none is removed later as
    a duplicate, so no record is encoded in vain."""
    return source.dedup == "off"


def vq_handler(config: PrepareConfig) -> VQModelHandler:
    """The VQ model as each worker process loads it."""
    return VQModelHandler(str(config.tokenizers.image), threads=torch_threads_per_worker(config))


def read_source(
    p: beam.Pipeline, config: PrepareConfig, source: SourceConfig, tasks: list[tuple[int, ReadTask]]
) -> tuple[beam.PCollection, beam.PCollection, beam.PCollection]:
    """The first part of a source's branch: its tasks, its prepared records (its tokenized samples where
    `tokenizes_in_read`), its read/clean/image (and tokenize) rejects."""
    settings = settings_for(config, source)
    name = source.name
    created = p | f"{name}/tasks" >> beam.Create(tasks)
    parts = read_parts(config, len(tasks))
    pieces = [(i, task, part, parts) for i, task in tasks for part in range(parts)]
    spread = p | f"{name}/pieces" >> beam.Create(pieces) | f"{name}/spread" >> beam.Reshuffle()
    urls = UrlImages(config.download, name, source.kind, report_dir=str(storage.join(config.output_dir, name)))
    if tokenizes_in_read(source):
        read = ReadAndTokenize(source, settings, urls, vq_handler(config), str(config.tokenizers.text))
        prepared = spread | f"{name}/read+download+prepare+tokenize" >> beam.ParDo(read)
    else:
        prepared = spread | f"{name}/read+download+prepare" >> beam.ParDo(ReadAndPrepare(source, settings, urls))
    records, read_rejects = _split(prepared, f"{name}/prepared")
    return created, records, read_rejects


def add_source(
    config: PrepareConfig,
    source: SourceConfig,
    read: tuple[beam.PCollection, beam.PCollection, beam.PCollection],
    fp: str,
    vocab_size: int,
    dedup: tuple[beam.PCollection | None, beam.PCollection | None] = (None, None),
) -> beam.PCollection:
    """The rest of one source's branch (labels prefixed with the source name), from its deduplicated records (or
    its samples, where `tokenizes_in_read`): VQ codes, tokens, shards; `dedup` holds its duplicate rejects and its
    dedup entries by shard. Returns shard stats."""
    name = source.name
    created, records, read_rejects = read
    duplicate_rejects, entries = dedup
    if tokenizes_in_read(source):
        samples, all_rejects = records, [read_rejects]
    else:
        samples, token_rejects = tokenize(config, source, records)
        all_rejects = [read_rejects, token_rejects]
    all_rejects += [duplicate_rejects] if duplicate_rejects is not None else []
    rejects = tuple(all_rejects) | f"{name}/rejects" >> beam.Flatten()
    out_dir = str(storage.join(config.output_dir, name))
    groups = {"task": created, "samples": samples, "rejects": rejects}
    index_dir = None
    if entries is not None:
        groups["dedup"] = entries
        index_dir = str(index_folder(config.output_dir, name))
    return (
        groups
        | f"{name}/by-shard" >> beam.CoGroupByKey()
        | f"{name}/write" >> beam.ParDo(WriteShard(out_dir, vocab_size, fp, index_dir, hasher_of(config)))
    )


def tokenize(
    config: PrepareConfig, source: SourceConfig, records: beam.PCollection
) -> tuple[beam.PCollection, beam.PCollection]:
    """Deduplicated records -> (shard id, sample) and (shard id, reject): their images' VQ codes through
    RunInference, joined back to the records, tokenized."""
    settings = settings_for(config, source)
    name = source.name
    codes = (
        records
        | f"{name}/images" >> beam.FlatMap(_images_of)
        | f"{name}/vq" >> VQCodes(vq_handler(config), use_run_inference=config.runner.kind != "dask")
        | f"{name}/codes" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1])))
    )
    keyed = records | f"{name}/strip" >> beam.Map(lambda r: (r.key, r.without_pixels()))
    assembled = (
        {"record": keyed, "codes": codes}
        | f"{name}/join" >> beam.CoGroupByKey()
        | f"{name}/tokenize" >> beam.ParDo(Assemble(str(config.tokenizers.text), settings))
    )
    return _split(assembled, f"{name}/assembled")


def plan(config: PrepareConfig, fingerprints: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per source: its fingerprint, all its tasks by shard id, and those whose shard is not yet complete."""
    plans = {}
    for source in config.sources:
        fp = source_fingerprint(config, source, fingerprints)
        try:
            read_tasks = plan_read_tasks(source, records_per_task=config.samples_per_shard)
        except (ValueError, FileNotFoundError) as err:  # inputs gone, or a config loaded without its path checks
            raise PrepareError(f"source {source.name}: {err}") from None
        out_dir = storage.join(config.output_dir, source.name)
        names = set(storage.list_names(out_dir))  # one listing, not a request a shard (on a store)
        stats = read_stats_files(out_dir, names)  # each read once, for the ledger and the completeness check
        ledger = shard_ledger(out_dir, fp, stats)
        tasks = assign_shards(read_tasks, ledger)
        todo = [(i, t) for i, t in tasks if not is_complete(out_dir, i, fp, {"task": task_signature(t)}, names, stats)]
        kept = {i for i, _ in tasks}
        plans[source.name] = {
            "fingerprint": fp,
            "tasks": tasks,
            "todo": todo,
            "removed": sorted(set(ledger.values()) - kept),  # shards of inputs gone or changed since
            "builds": previous_builds(out_dir, fp),
        }
    return plans


def previous_builds(out_dir: str | Path, fingerprint: str) -> list[dict[str, Any]]:
    """The builds the source's manifest lists, if it was written under the same fingerprint ([] otherwise)."""
    try:
        manifest = json.loads(storage.read_text(storage.join(out_dir, MANIFEST)))
    except (OSError, ValueError):
        return []
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return []
    builds = manifest.get("builds")
    return builds if isinstance(builds, list) else []


def remove_stale_shards(out_dir: str | Path, keep: set[int]) -> list[str | Path]:
    """Delete the files of shards this build does not list: inputs removed or changed since, or an earlier run that
    planned other tasks (another samples_per_shard); they would hold samples twice for anything that globs the
    folder."""
    names = [n for n in storage.list_names(out_dir) if n.startswith("shard-") and shard_id_of(n) not in keep]
    stale = [storage.join(out_dir, n) for n in names]
    for path in stale:
        storage.remove(path)
    return stale


def remove_listed(folder: str | Path, names: set[str]) -> None:
    """Delete those of `names` that are in `folder` (listed once: on a store, a request a file there, not a name)."""
    for name in sorted(names & set(storage.list_names(folder))):
        storage.remove(storage.join(folder, name))


def write_manifest(config: PrepareConfig, source: SourceConfig, plan: dict[str, Any], fps: dict[str, str]) -> dict:
    """manifest.json of one source: its shards with counts, tokenizer fingerprints and the config."""
    out_dir = storage.join(config.output_dir, source.name)
    shards = []
    ids = sorted(i for i, _ in plan["tasks"])  # in id order: the earlier builds' shards first
    texts = storage.read_texts(out_dir, [f"{shard_name(i)}{STATS_SUFFIX}" for i in ids])  # one batch on a store
    for shard_id in ids:
        stats_file = storage.join(out_dir, f"{shard_name(shard_id)}{STATS_SUFFIX}")
        try:
            shards.append(json.loads(texts[f"{shard_name(shard_id)}{STATS_SUFFIX}"]))
        except (KeyError, ValueError) as err:
            problem = "no stats file" if isinstance(err, KeyError) else err
            raise PrepareError(
                f"{stats_file}: shard {shard_id} of source {source.name} is not complete ({problem})"
            ) from None
    totals = {k: sum(s[k] for s in shards) for k in ("records_in", "samples", "rejects", "tokens", "images", "faces")}
    by_reason: dict[str, int] = {}
    for stats in shards:
        for reason, n in stats["rejects_by_reason"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    manifest = {
        "source": source.name,
        "kind": source.kind,
        "fingerprint": plan["fingerprint"],
        "tokenizers": {
            # absolute (or a URL): a run finds them from anywhere
            **{k: storage.absolute(getattr(config.tokenizers, k)) for k in ("text", "image")},
            **{f"{k}_fingerprint": v for k, v in fps.items()},
        },
        "config": {"source": source.model_dump(mode="json"), **config.shard_settings()},
        "totals": totals | {"rejects_by_reason": dict(sorted(by_reason.items()))},
        "shards": [
            {k: s[k] for k in ("shard", "samples", "tokens", "images", "faces", "rejects", "records_in")}
            for s in shards
        ],
    }
    manifest["builds"] = [*plan.get("builds", []), build_record(plan, shards)]  # every run is a build, a no-op one too
    manifest["dedup"] = {"mode": source.dedup} | (config.dedup.model_dump(mode="json") if source.dedup == "on" else {})
    downloads = download_totals(out_dir, [i for i, _ in plan["tasks"]])
    if downloads is not None:  # sources with URL images: what was fetched, dropped and why
        manifest["downloads"] = downloads
    storage.write_text(storage.join(out_dir, MANIFEST), json.dumps(manifest, indent=2))  # last: the source is whole
    return manifest


def build_record(plan: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """One build of a source, as its manifest lists it: the shards it wrote, kept and removed, and their records."""
    written = {i for i, _ in plan.get("todo", [])}
    by_id = {shard_id_of(s["shard"]): s for s in shards}
    new = [by_id[i] for i in sorted(written) if i in by_id]
    reused = [s for i, s in by_id.items() if i not in written]
    return {
        "build": len(plan.get("builds", [])) + 1,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "new_shards": [s["shard"] for s in new],
        "reused_shards": len(reused),
        "removed_shards": [shard_name(i) for i in plan.get("removed", [])],
        "new_records": sum(s["records_in"] for s in new),
        "reused_records": sum(s["records_in"] for s in reused),
    }


class ShardWatcher(threading.Thread):
    """Reports (shards done, shards to do) while the job runs, from the stats files appearing in the output folders
    (the stats of the shards to do were removed before the job started).

    It works the same on every runner: workers in other processes or machines write to the shared output folder, a
    local one or a store (listed every 2 s there: one request a source, not one a shard).
    """

    def __init__(self, config: PrepareConfig, plans: dict[str, dict[str, Any]], report: Callable[[int, int], None]):
        super().__init__(daemon=True)
        self.waiting = {
            storage.join(config.output_dir, name): {f"{shard_name(i)}{STATS_SUFFIX}" for i, _ in p["todo"]}
            for name, p in plans.items()
        }
        self.total = sum(len(names) for names in self.waiting.values())
        self.interval = 2.0 if storage.is_url(config.output_dir) else 0.5
        self.report = report
        self.stop = threading.Event()
        self.seen = 0

    def done(self) -> int:
        with contextlib.suppress(OSError):  # a store that did not answer this time: the last count stands
            self.seen = sum(len(names & set(storage.list_names(d))) for d, names in self.waiting.items())
        return self.seen

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.report(self.done(), self.total)
        self.report(self.done(), self.total)


def _run_pipeline(
    config: PrepareConfig,
    plans: dict[str, dict[str, Any]],
    todo: dict[str, dict[str, Any]],
    vocab_size: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    """One Beam pipeline with a branch per source that has shards to do; returns when every branch is done."""
    watcher = ShardWatcher(config, todo, progress) if progress else None
    if watcher:
        watcher.start()
    try:
        pipeline = beam.Pipeline(options=pipeline_options(runner_for(config, todo)))
        sources = [s for s in config.sources if s.name in todo]
        read = {s.name: read_source(pipeline, config, s, plans[s.name]["todo"]) for s in sources}
        kept, duplicates, entries = add_dedup(
            pipeline, config, {name: r[1] for name, r in read.items()}, earlier_index(config, plans)
        )
        stats = [
            add_source(
                config,
                s,
                (read[s.name][0], kept[s.name], read[s.name][2]),
                plans[s.name]["fingerprint"],
                vocab_size,
                (duplicates.get(s.name), entries.get(s.name)),
            )
            for s in sources
        ]
        # One final transform downstream of every branch: Beam's DaskRunner computes only the last one.
        _ = tuple(stats) | "all shards" >> beam.Flatten() | "count" >> beam.combiners.Count.Globally()
        result = pipeline.run()
        try:
            result.wait_until_finish()
        finally:
            client = getattr(result, "client", None)  # the DaskRunner leaves its client open
            if client is not None:
                client.close()
    finally:
        if watcher:
            watcher.stop.set()
            watcher.join()


def run_prepare(config: PrepareConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run the job for every source on the configured runner; return per-source manifests and timing.

    `progress(done, total)` is called about twice a second with the number of shards written. One job writes an
    output at a time: a second one fails at once (PrepareError naming the first's pid), from a lock on
    `output_dir/.lock` (on this machine's mirror of an output on a store: there, a lock of this machine only).
    """
    lock = RunLock(storage.local_mirror(config.output_dir, "prepare-logs"), "prepare job", "output", OTHER_OUTPUT)
    try:
        lock.acquire()
    except RunLockedError as err:
        raise PrepareError(str(err)) from None
    try:
        return _run_prepare(config, progress)
    finally:
        lock.release()


OTHER_OUTPUT = "prepare into another output_dir"


def _run_prepare(config: PrepareConfig, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    started = time.perf_counter()
    fps, tokenizer, _ = check_tokenizers(config)
    plans = plan(config, fps)
    todo = {name: p for name, p in plans.items() if p["todo"]}
    failure: BaseException | None = None
    for name in plans:  # what a killed run was writing (each writer's temporaries are named uniquely)
        remove_temporaries(storage.join(config.output_dir, name))
        remove_temporaries(index_folder(config.output_dir, name))
    for name, source_plan in plans.items():
        write_shard_ids(storage.join(config.output_dir, name), source_plan["fingerprint"], source_plan["tasks"])
    if todo:
        for name in todo:  # stale stats of shards about to be redone must not count as progress
            redo = [shard_name(i) for i, _ in plans[name]["todo"]]
            # nor an old manifest as current, nor its old dedup entries as an earlier build's: the shard's records
            # are deduplicated again
            remove_listed(storage.join(config.output_dir, name), {MANIFEST, *(f"{n}{STATS_SUFFIX}" for n in redo)})
            remove_listed(index_folder(config.output_dir, name), {f"{n}.npz" for n in redo})
        try:
            _run_pipeline(config, plans, todo, tokenizer.vocab.size, progress)
        except BaseException as err:  # the manifests of the sources that did finish are still written below
            failure = err
    manifests, problems = {}, []
    for source in config.sources:  # one source's problem never costs the others their manifests
        try:
            keep = {i for i, _ in plans[source.name]["tasks"]}
            remove_stale_shards(storage.join(config.output_dir, source.name), keep)
            remove_stale_shards(index_folder(config.output_dir, source.name), keep)
            manifests[source.name] = write_manifest(config, source, plans[source.name], fps)
        except (OSError, ValueError, KeyError, TypeError) as err:  # PrepareError is a RuntimeError: kept apart
            problems.append(f"{source.name}: manifest not written: {err}")
        except PrepareError as err:
            problems.append(str(err))
    if failure is not None:
        raise failure
    if problems:
        raise PrepareError("; ".join(problems))
    return {
        "manifests": manifests,
        "shards_written": {name: len(p["todo"]) for name, p in plans.items()},
        "shards_skipped": {name: len(p["tasks"]) - len(p["todo"]) for name, p in plans.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
