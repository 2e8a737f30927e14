"""The mix job: prepared sources -> stage shards of packed training sequences, with a manifest of target vs
realized shares. A mixture experiment re-runs only this job, never prepare.

The plan (which samples, in what order) is made in the driver from the sources' sample metadata (mix_plan.py);
Beam then joins the planned occurrences with the samples' tokens, groups them into output shards, packs each
(packing.py) and writes it whole.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import webdataset as wds

from model.files import storage
from model.files.atomic import atomic_path, write_atomic
from model.files.reading import first_line, read_json_object, read_npy
from model.files.run_lock import RunLock, RunLockedError
from model.tokenizers.text_tokenizer import load_text_tokenizer
from model.tokenizers.vocabulary import Modality, Vocabulary
from pipelines.mix_filters import apply_filters, parsed_filters, read_attributes
from pipelines.mix_plan import MixPlanError, SampleRef, SourcePlan, hold_image_share, image_share, plan_stage
from pipelines.packing import PackedSequence, pack_pretraining, pack_sft
from pipelines.prepare_job import MANIFEST
from pipelines.runners import pipeline_options
from pipelines.shard_writer import (
    STATS_SUFFIX,
    TAR_MTIME,
    encode_npy,
    remove_temporaries,
    shard_id_of,
    shard_name,
    shard_samples,
    token_dtype,
)
from schemas import MixtureSpec
from schemas.prepare_config import RunnerConfig

SEQUENCES_PER_SHARD = 512


@dataclass(frozen=True)
class SourceIndex:
    """A prepared source as the planner sees it: its samples' sizes and faces, and its manifest."""

    name: str
    path: str | Path  # a store URL too
    samples: list[SampleRef]
    manifest: dict[str, Any]
    attributes_digest: str | None = None  # of the attributes files, once a filter has read them

    @property
    def tokens(self) -> int:
        return sum(s.n_tokens for s in self.samples)


def read_index(name: str, path: str | Path) -> SourceIndex:
    """Sample metadata of every shard of a prepared source (only the .json members are parsed), on disk or on a store
    (streamed); a damaged manifest or shard, or a shard holding other samples than its manifest lists, is a
    MixPlanError naming the file."""
    manifest_path = storage.join(path, MANIFEST)
    present = set(storage.list_names(path))  # one listing (on a store: one request, not one a shard)
    if MANIFEST not in present:
        raise MixPlanError(f"source {name!r}: {path} is not a prepared source (no {MANIFEST}; run `cham prepare`)")
    manifest = read_json_object(
        manifest_path, ("shards", "tokenizers", "fingerprint"), MixPlanError, "prepared-source manifest"
    )
    samples = []
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and {"shard", "samples"} <= s.keys() for s in shards
    ):
        raise MixPlanError(
            f"{manifest_path}: not a prepared-source manifest (each of its shards needs shard and "
            f"samples); re-run `cham prepare` for source {name!r}"
        )
    for shard in shards:
        tar_path = storage.join(path, f"{shard['shard']}.tar")
        if f"{shard['shard']}.tar" not in present:
            raise MixPlanError(
                f"source {name!r}: {tar_path} is listed in {MANIFEST} but missing; re-run `cham "
                "prepare` for this source"
            )
        samples += _index_shard(name, tar_path, shard_id_of(shard["shard"]), int(shard["samples"]))
    return SourceIndex(name, path, samples, manifest)


def _index_shard(source: str, tar_path: str | Path, shard_id: int, expected: int) -> list[SampleRef]:
    refs, members, key = [], set(), None
    try:
        with storage.open_file(tar_path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                members.add(member.name)
                if member.name.endswith(".json"):
                    key = member.name[: -len(".json")]
                    meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                    refs.append(
                        SampleRef(
                            shard_id,
                            key,
                            int(meta["n_tokens"]),
                            bool(meta["has_face"]),
                            meta.get("category", ""),
                            int(meta.get("n_images", 0)),
                        )
                    )
    except (OSError, tarfile.TarError, EOFError) as err:
        raise MixPlanError(
            f"source {source!r}: {tar_path} is damaged ({err}); re-run `cham prepare` for this source"
        ) from None
    except (ValueError, KeyError, TypeError) as err:  # a member's metadata (JSON or its fields)
        raise MixPlanError(
            f"source {source!r}: {tar_path}: sample {key!r} has damaged metadata ({type(err).__name__}: {err})"
        ) from None
    no_tokens = [r.key for r in refs if f"{r.key}.npy" not in members]
    if no_tokens:
        raise MixPlanError(f"source {source!r}: {tar_path}: sample {no_tokens[0]!r} has no tokens (.npy)")
    if len(refs) != expected:  # a shard rewritten or cut short since prepare: its samples would silently go missing
        raise MixPlanError(
            f"source {source!r}: {tar_path} holds {len(refs)} samples, its {MANIFEST} lists "
            f"{expected}; re-run `cham prepare` for this source"
        )
    return refs


def vocabulary_of(indexes: list[SourceIndex]) -> Vocabulary:
    """The one vocabulary every source was prepared with (sources tokenized differently cannot be mixed)."""
    text = {ix.manifest["tokenizers"]["text_fingerprint"] for ix in indexes}
    image = {ix.manifest["tokenizers"]["image_fingerprint"] for ix in indexes}
    if len(text) != 1 or len(image) != 1:
        names = ", ".join(ix.name for ix in indexes)
        raise MixPlanError(f"sources {names} were prepared with different tokenizers; prepare them with the same ones")
    return load_text_tokenizer(indexes[0].manifest["tokenizers"]["text"]).vocab


def mixture_fingerprint(spec: MixtureSpec, indexes: dict[str, SourceIndex], sequences_per_shard: int) -> str:
    """Changes with the spec (filters included), any input shard, the attribute values a filter read, or the shard
    size (documents are packed within a shard, so it changes the sequences)."""
    inputs = {
        name: [
            ix.manifest["fingerprint"],
            [s["shard"] for s in ix.manifest["shards"]],
            sum(s["tokens"] for s in ix.manifest["shards"]),
            *([ix.attributes_digest] if ix.attributes_digest is not None else []),
        ]
        for name, ix in sorted(indexes.items())
    }
    payload = {"spec": spec.model_dump(mode="json"), "inputs": inputs, "sequences_per_shard": sequences_per_shard}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class StagePlan:
    name: str
    sources: list[str]  # index = the source id stored in the sequences
    plans: dict[str, SourcePlan]
    sequence: list[tuple[str, SampleRef]]
    docs_per_shard: int
    real_source: dict[str, str]  # planned source -> prepared source (they differ for SFT categories)
    weights: dict[str, float]  # planned source -> its weight in the stage
    excluded_too_long: dict[str, int]  # prepared source -> SFT samples longer than seq_len, never drawn
    # prepared source -> per filter: samples and tokens it removed (and of those, without the attribute)
    filtered: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    available: dict[str, list[SampleRef]] = field(default_factory=dict)  # filtered prepared source -> its samples
    given_weights: dict[str, float] = field(default_factory=dict)  # before hold_modality_of adjusted them
    modality: dict[str, Any] = field(default_factory=dict)  # hold_modality_of: held stage, target, planned share


def split_by_category(
    name: str, samples: list[SampleRef], weight: float, category_weights: dict[str, float]
) -> dict[str, tuple[list[SampleRef], float]]:
    """An SFT source as one planned source per weighted category, `NAME/CATEGORY`, sharing its weight."""
    total = sum(category_weights.values())
    out = {}
    for category, w in sorted(category_weights.items()):
        if w > 0:
            out[f"{name}/{category}"] = ([s for s in samples if s.category == category], weight * w / total)
    return out


def filtered_samples(
    src: Any, indexes: dict[str, SourceIndex], cache: dict[tuple[str, tuple[str, ...]], tuple[list, list]]
) -> tuple[list[SampleRef], list[dict[str, Any]]]:
    """A stage source's samples that pass its filters, and what each filter removed (read once per filter set)."""
    index = indexes[src.name]
    if not src.filters:
        return index.samples, []
    if (src.name, src.filters) not in cache:
        parsed = parsed_filters(src.name, index.path, src.filters)
        names = sorted({f.attribute for f in parsed})
        shards = [s["shard"] for s in index.manifest["shards"]]
        values, digest = read_attributes(src.name, index.path, shards, names)
        indexes[src.name] = replace(index, attributes_digest=digest)
        cache[(src.name, src.filters)] = apply_filters(index.samples, parsed, values)
    return cache[(src.name, src.filters)]


def stage_image_share(sequence: list[tuple[str, SampleRef]], image_block: int) -> float:
    """The share of image tokens among a planned stage's tokens."""
    tokens = sum(ref.n_tokens for _, ref in sequence)
    return sum(min(ref.n_tokens, ref.n_images * image_block) for _, ref in sequence) / max(1, tokens)


# Re-plans of a stage whose text : image proportion is held: each corrects the weights by the image shares the
# previous plan actually drew (a draw is whole samples), and the closest plan is kept.
HOLD_ROUNDS = 4


def _plan_held_stage(
    spec: MixtureSpec,
    stage_name: str,
    planned: dict[str, tuple[list[SampleRef], float]],
    reps: dict[str, float],
    starts: dict[str, int],
    target: float,
) -> tuple[dict[str, SourcePlan], list, dict[str, float], float]:
    """Plans of a stage whose weights are adjusted (mix_plan.hold_image_share) so that its image share is `target`."""
    block = spec.image_block_len
    given = {name: weight for name, (_, weight) in planned.items()}
    shares = {}
    for name, (samples, _) in planned.items():
        share = image_share(samples, block, spec.face_weight)
        shares[name] = share if share is not None else target  # no tokens: it cannot move the proportion
    best = None
    for _ in range(HOLD_ROUNDS):
        try:
            weights = hold_image_share(given, shares, target)
        except MixPlanError as err:
            raise MixPlanError(f"stage {stage_name!r} cannot hold the text : image proportion: {err}") from None
        plans, sequence = plan_stage(
            {name: samples for name, (samples, _) in planned.items()},
            weights,
            spec.stage_tokens(stage_name),
            spec.face_weight,
            reps,
            spec.seed,
            starts,
        )
        realized = stage_image_share(sequence, block)
        if best is None or abs(realized - target) < abs(best[3] - target):
            best = (plans, sequence, weights, realized)
        for name, plan in plans.items():  # what this plan drew, for the next round's correction
            drawn = image_share(plan.samples, block)
            if drawn is not None:
                shares[name] = drawn
    assert best is not None
    return best


def plan_mixture(
    spec: MixtureSpec, sequences_per_shard: int = SEQUENCES_PER_SHARD
) -> tuple[dict[str, StagePlan], dict]:
    """Plans of every stage, and the indexes of every source (read once even when stages share a source)."""
    indexes: dict[str, SourceIndex] = {}
    stages: dict[str, StagePlan] = {}
    shares: dict[str, float] = {}  # stage -> its planned image share
    filter_cache: dict[tuple[str, tuple[str, ...]], tuple[list, list]] = {}
    # Per planned source and filters: where the last stage that drew from that pool stopped.
    next_draw: dict[tuple[str, tuple[str, ...]], int] = {}
    for stage_name in spec.stages:
        sources = spec.sources_of(stage_name)
        for src in sources:
            if src.name not in indexes:
                indexes[src.name] = read_index(src.name, src.path)
        planned: dict[str, tuple[list[SampleRef], float]] = {}
        real, reps, excluded, filtered, pool_of, available = {}, {}, {}, {}, {}, {}
        category_weights = spec.stages[stage_name].category_weights
        for src in sources:
            samples, removed = filtered_samples(src, indexes, filter_cache)
            if removed:
                filtered[src.name] = removed
                available[src.name] = samples
            if spec.stages[stage_name].sft:  # an SFT sample longer than a sequence cannot be packed: not drawn
                fitting = [s for s in samples if s.n_tokens <= spec.seq_len]
                excluded[src.name], samples = len(samples) - len(fitting), fitting
            parts = (
                {src.name: (samples, src.weight)}
                if category_weights is None
                else split_by_category(src.name, samples, src.weight, category_weights)
            )
            for name, part in parts.items():
                planned[name], real[name], reps[name] = part, src.name, src.max_repetitions
                pool_of[name] = (name, src.filters)
        starts = {name: next_draw.get(pool, 0) for name, pool in pool_of.items()}
        given = {name: weight for name, (_, weight) in planned.items()}
        held = spec.stages[stage_name].hold_modality_of
        modality: dict[str, Any] = {}
        if held is not None:
            target = shares[held]
            plans, sequence, weights, realized = _plan_held_stage(spec, stage_name, planned, reps, starts, target)
            modality = {"held_from": held, "target_image_share": target, "planned_image_share": realized}
        else:
            plans, sequence = plan_stage(
                {name: samples for name, (samples, _) in planned.items()},
                given,
                spec.stage_tokens(stage_name),
                spec.face_weight,
                reps,
                spec.seed,
                starts,
            )
            weights = given
        shares[stage_name] = stage_image_share(sequence, spec.image_block_len)
        next_draw.update({pool_of[name]: plan.next_draw for name, plan in plans.items()})
        mean_tokens = max(1.0, sum(r.n_tokens for _, r in sequence) / max(1, len(sequence)))
        docs_per_shard = max(1, round(sequences_per_shard * spec.seq_len / mean_tokens))
        stages[stage_name] = StagePlan(
            stage_name,
            sorted(plans),
            plans,
            sequence,
            docs_per_shard,
            real,
            weights,
            excluded,
            filtered=filtered,
            available=available,
            given_weights=given,
            modality=modality,
        )
    return stages, indexes


# --- Beam -------------------------------------------------------------------------------------------------------


def _read_samples(item: tuple[str, str, int]) -> Iterator[tuple[tuple[str, int, str], tuple[np.ndarray, int]]]:
    """(source, folder, shard id) -> ((source, shard, key), (tokens, n_prompt_tokens)) for each sample."""
    source, folder, shard_id = item
    path = storage.join(folder, f"{shard_name(shard_id)}.tar")
    for sample in shard_samples(path):
        try:
            meta = json.loads(sample["json"])
            tokens = read_npy(sample["npy"], "tokens")
            n_prompt = int(meta.get("n_prompt_tokens", 0))
        except (ValueError, KeyError, TypeError) as err:
            raise MixPlanError(
                f"source {source!r}: {path}: sample {sample['__key__']!r} is damaged "
                f"({type(err).__name__}: {first_line(err)}); re-run `cham prepare` for this "
                f"source"
            ) from None
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise MixPlanError(
                f"source {source!r}: {path}: sample {sample['__key__']!r} has tokens of "
                f"{tokens.dtype} {tokens.shape}, expected a vector of integers"
            )
        yield (source, shard_id, sample["__key__"]), (tokens, n_prompt)


def _place(element: tuple[Any, dict[str, Iterable[Any]]]) -> Iterator[tuple[tuple[str, int], tuple]]:
    """Each planned occurrence of a sample, with its tokens, keyed by its output shard."""
    (source, _, _), groups = element
    samples = list(groups["sample"])  # Beam may hand a lazy iterable, whose truth says nothing
    if not samples:
        raise MixPlanError(f"a planned sample of {source!r} was not found in its shard: {element[0]}")
    (tokens, n_prompt), *_ = samples
    for stage, position, shard, source_id in groups["occurrence"]:
        yield (stage, shard), (position, source_id, tokens, n_prompt)


class PackAndWrite(beam.DoFn):
    """((stage, shard), occurrences) -> the stage shard packed and written whole; yields its stats."""

    def __init__(self, out_dir: str, spec: MixtureSpec, vocab_size: int, layout_json: str, fingerprint: str):
        self.out_dir, self.spec, self.vocab_size = out_dir, spec, vocab_size
        self.layout_json, self.fingerprint = layout_json, fingerprint

    def setup(self) -> None:
        from schemas.vocab import VocabLayout

        self.vocab = Vocabulary(VocabLayout.model_validate_json(self.layout_json))

    def process(self, element: tuple[tuple[str, int], Iterable[tuple]]) -> Iterator[dict[str, Any]]:
        (stage, shard_id), occurrences = element
        occurrences = sorted(occurrences, key=lambda o: o[0])
        spec, vocab = self.spec, self.vocab
        if spec.stages[stage].sft:
            samples = [(sid, tokens, n_prompt) for _, sid, tokens, n_prompt in occurrences]
            sequences, too_long = pack_sft(samples, spec.seq_len, vocab.pad_id, seed=spec.seed + shard_id)
        else:
            docs = ((sid, tokens) for _, sid, tokens, _ in occurrences)
            sequences = list(pack_pretraining(docs, spec.seq_len, vocab.boi_id, vocab.eoi_id, vocab.pad_id))
            too_long = []
        dropped: dict[str, int] = defaultdict(int)
        for position in too_long:
            dropped[str(occurrences[position][1])] += 1
        yield write_stage_shard(
            storage.join(self.out_dir, stage),
            shard_id,
            stage,
            sequences,
            vocab,
            self.vocab_size,
            self.fingerprint,
            dropped=dict(dropped),
        )


def write_stage_shard(
    folder: str | Path,
    shard_id: int,
    stage: str,
    sequences: list[PackedSequence],
    vocab: Vocabulary,
    vocab_size: int,
    fingerprint: str,
    dropped: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Sequences -> shard-NNNNN.tar + stats, last. Members per sequence: tokens.npy [seq_len], docs.npy
    [3, n_docs] (start, length, source id of each document piece), and mask.npy when any token is not a target. On a
    store, both are written to a local temporary folder, then each is put whole (one PUT), the stats last."""
    if storage.is_url(folder):
        with tempfile.TemporaryDirectory(prefix="cham-stage-shard-") as tmp:
            stats = write_stage_shard(Path(tmp), shard_id, stage, sequences, vocab, vocab_size, fingerprint, dropped)
            for suffix in (".tar", STATS_SUFFIX):  # the stats file last: the shard's completeness marker
                name = f"{shard_name(shard_id)}{suffix}"
                storage.upload(Path(tmp) / name, storage.join(folder, name))
        return stats
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = shard_name(shard_id)
    dtype = token_dtype(vocab_size)
    by_source: dict[int, dict[str, int]] = defaultdict(lambda: {"tokens": 0, "image_tokens": 0, "supervised": 0})
    with atomic_path(folder / f"{name}.tar") as tmp, wds.TarWriter(str(tmp), mtime=TAR_MTIME) as sink:
        for n, seq in enumerate(sequences):
            member = {
                "__key__": f"{stage}_{shard_id:05d}_{n:06d}",
                "tokens.npy": encode_npy(seq.tokens.astype(dtype)),
                "docs.npy": encode_npy(np.stack([seq.doc_starts, seq.doc_lengths(), seq.doc_sources]).astype(np.int32)),
            }
            if not seq.loss_mask.all():
                member["mask.npy"] = encode_npy(seq.loss_mask.astype(np.uint8))
            sink.write(member)
            modality = vocab.modalities(seq.tokens[: seq.n_real])
            is_image = np.isin(modality, [Modality.IMAGE, Modality.BOI, Modality.EOI])
            for start, length, source in zip(seq.doc_starts, seq.doc_lengths(), seq.doc_sources, strict=True):
                counts = by_source[int(source)]
                counts["tokens"] += int(length)
                counts["image_tokens"] += int(is_image[start : start + length].sum())
                counts["supervised"] += int(seq.loss_mask[start : start + length].sum())
    stats = {
        "shard": name,
        "fingerprint": fingerprint,
        "sequences": len(sequences),
        "tokens": int(sum(s.n_real for s in sequences)),
        "padding": int(sum(len(s.tokens) - s.n_real for s in sequences)),
        "by_source": {str(k): v for k, v in sorted(by_source.items())},
        "dropped_too_long": dropped or {},
    }
    write_atomic(folder / f"{name}{STATS_SUFFIX}", json.dumps(stats, indent=2, sort_keys=True))  # last: complete
    return stats


def stage_manifest(
    spec: MixtureSpec,
    stage: StagePlan,
    indexes: dict[str, SourceIndex],
    folder: str | Path,
    fingerprint: str,
    vocab: Vocabulary,
) -> dict[str, Any]:
    """Target vs realized tokens by source and by modality, faces, repetitions; written as manifest.json (last: on a
    store, the stage is whole once its manifest is there)."""
    # By shard number, not name: shard-100000 sorts before shard-10001 as text.
    names = [n for n in storage.list_names(folder) if n.startswith("shard-") and n.endswith(STATS_SUFFIX)]
    stats_files = sorted(names, key=lambda n: shard_id_of(n) or 0)
    shards = [json.loads(storage.read_text(storage.join(folder, n))) for n in stats_files]
    weights = stage.weights
    total_weight = sum(weights.values())
    totals = {
        "tokens": sum(s["tokens"] for s in shards),
        "padding": sum(s["padding"] for s in shards),
        "sequences": sum(s["sequences"] for s in shards),
    }
    realized: dict[str, dict[str, int]] = defaultdict(lambda: {"tokens": 0, "image_tokens": 0, "supervised": 0})
    for shard in shards:
        for source_id, counts in shard["by_source"].items():
            for k, v in counts.items():
                realized[stage.sources[int(source_id)]][k] += v
    image_tokens = sum(r["image_tokens"] for r in realized.values())
    sources = {}
    for name in stage.sources:
        plan, index = stage.plans[name], indexes[stage.real_source[name]]
        pool = stage.available.get(stage.real_source[name], index.samples)  # after the source's filters
        drawn = plan.samples
        face_draws = sum(s.has_face for s in drawn)
        sources[name] = {
            "weight": weights[name],
            **({"given_weight": stage.given_weights[name]} if stage.modality else {}),
            "target_share": weights[name] / total_weight,
            "target_tokens": plan.target_tokens,
            "planned_tokens": plan.realized_tokens,
            "realized_tokens": realized[name]["tokens"],
            "realized_share": realized[name]["tokens"] / max(1, totals["tokens"]),
            "image_tokens": realized[name]["image_tokens"],
            "samples": len(drawn),
            "dropped_too_long": sum(s["dropped_too_long"].get(str(stage.sources.index(name)), 0) for s in shards),
            "available_tokens": sum(s.n_tokens for s in pool),
            "repetitions": plan.realized_tokens / max(1, sum(s.n_tokens for s in pool)),
            "face_share_drawn": face_draws / max(1, len(drawn)),
            "face_share_source": sum(s.has_face for s in pool) / max(1, len(pool)),
        }
    manifest = {
        "stage": stage.name,
        "fingerprint": fingerprint,
        "seq_len": spec.seq_len,
        "sft": spec.stages[stage.name].sft,
        "target_tokens": spec.stage_tokens(stage.name),
        **totals,
        "modality": {
            "text_tokens": totals["tokens"] - image_tokens,
            "image_tokens": image_tokens,
            "image_share": image_tokens / max(1, totals["tokens"]),
            **stage.modality,  # hold_modality_of: held_from, target_image_share, planned_image_share
        },
        # Per filtered prepared source, per filter in order: samples and tokens removed, and of those how many
        # lacked the attribute (excluded).
        "filters": stage.filtered,
        "sources": sources,
        "source_ids": stage.sources,
        "vocab_layout": vocab.layout.model_dump(),
        "excluded_too_long": stage.excluded_too_long,
        # The tokenizers travel with the data, so a model trained on it can be prompted and its output decoded.
        "tokenizers": next(iter(indexes.values())).manifest["tokenizers"],
        "shards": [{k: s[k] for k in ("shard", "sequences", "tokens", "padding")} for s in shards],
    }
    storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2))
    return manifest


def run_mix(
    spec: MixtureSpec,
    out: str | Path,
    runner: RunnerConfig | None = None,
    sequences_per_shard: int = SEQUENCES_PER_SHARD,
) -> dict[str, Any]:
    """Plan every stage, write its shards with Beam, and return the stage manifests.

    Sources and `out` may be on an object store (URLs): the planner reads the sources' manifests, attributes and
    shard metadata there (streamed), the workers read the shards and put the stage shards there themselves (each
    whole, its stats last), and each stage's manifest.json is written last: a stage on the store is whole once its
    manifest is there. Nothing goes through this machine's disk but one shard at a time.

    One job writes an output at a time: a second one fails at once (MixPlanError naming the first's pid), from a lock
    on `out/.lock` (on this machine's mirror of an output on a store: there, a lock of this machine only)."""
    lock = RunLock(storage.local_mirror(out, "mix-logs"), "mix job", "output", "mix into another --out")
    try:
        lock.acquire()
    except RunLockedError as err:
        raise MixPlanError(str(err)) from None
    try:
        return _run_mix(spec, out, runner, sequences_per_shard)
    finally:
        lock.release()


def _run_mix(
    spec: MixtureSpec, out: str | Path, runner: RunnerConfig | None, sequences_per_shard: int
) -> dict[str, Any]:
    started = time.perf_counter()
    stages, indexes = plan_mixture(spec, sequences_per_shard)
    vocab = vocabulary_of(list(indexes.values()))
    if vocab.tokens_per_image != spec.tokens_per_image:
        raise MixPlanError(
            f"tokens_per_image {spec.tokens_per_image} does not match the sources' "
            f"{vocab.tokens_per_image} codes per image"
        )
    fingerprint = mixture_fingerprint(spec, indexes, sequences_per_shard)
    for stage in stages:  # outputs of an earlier mix are replaced whole, its manifest first
        folder = storage.join(out, stage)
        old = [n for n in storage.list_names(folder) if n == MANIFEST or n.startswith("shard-")]
        for name in sorted(old, key=lambda n: n != MANIFEST):
            storage.remove(storage.join(folder, name))
        remove_temporaries(folder)  # and what a killed mix was writing
    occurrences = []
    needed: set[tuple[str, str, int]] = set()
    for stage in stages.values():
        ids = {name: i for i, name in enumerate(stage.sources)}
        for position, (source, ref) in enumerate(stage.sequence):
            shard = position // stage.docs_per_shard
            real = stage.real_source[source]
            occurrences.append(((real, ref.shard, ref.key), (stage.name, position, shard, ids[source])))
            needed.add((real, str(indexes[real].path), ref.shard))
    pipeline = beam.Pipeline(options=pipeline_options(runner or RunnerConfig()))
    occ = pipeline | "occurrences" >> beam.Create(occurrences)
    samples = (
        pipeline
        | "input shards" >> beam.Create(sorted(needed))
        | "spread" >> beam.Reshuffle()
        | "read" >> beam.FlatMap(_read_samples)
    )
    writer = PackAndWrite(str(out), spec, vocab.size, vocab.layout.model_dump_json(), fingerprint)
    _ = (
        {"occurrence": occ, "sample": samples}
        | "join" >> beam.CoGroupByKey()
        | "place" >> beam.FlatMap(_place)
        | "by shard" >> beam.GroupByKey()
        | "pack+write" >> beam.ParDo(writer)
        | "count" >> beam.combiners.Count.Globally()  # one final leaf (Beam's DaskRunner computes only the last)
    )
    result = pipeline.run()
    try:
        result.wait_until_finish()
    finally:
        client = getattr(result, "client", None)
        if client is not None:
            client.close()
    manifests = {
        name: stage_manifest(spec, stage, indexes, storage.join(out, name), fingerprint, vocab)
        for name, stage in stages.items()
    }
    return {
        "manifests": manifests,
        "fingerprint": fingerprint,
        "out": str(out),
        "seconds": round(time.perf_counter() - started, 2),
    }
