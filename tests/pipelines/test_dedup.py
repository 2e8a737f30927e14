"""Deduplication: the plain functions (normalisation, MinHash/LSH, perceptual hash, grouping, the index) and the
prepare job's dedup stage on real Beam (FnApiRunner) within and across sources and across builds."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from model.tokenizers.image_preprocess import preprocess
from pipelines.dedup import (
    DedupEntry,
    Edge,
    MinHasher,
    Node,
    Thresholds,
    bucket_edges,
    bucket_keys,
    duplicate_detail,
    entry_row,
    hamming,
    jaccard_estimate,
    normalise_text,
    perceptual_hash,
    phash_band_keys,
    read_index_part,
    record_entry,
    resolve,
    row_entry,
    write_index_part,
)
from pipelines.prepare_job import run_prepare, source_fingerprint
from pipelines.shard_writer import read_shard
from schemas import PrepareConfig, validate_config

REPO = Path(__file__).resolve().parents[2]
PHOTOS = sorted((REPO / "sample" / "images").glob("*.jpg"))
HASHER = MinHasher()
WORDS = [f"w{n}" for n in range(2000)]


def document(seed: int, n_words: int = 200) -> str:
    """A document of random words: two seeds share almost no 5-gram."""
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words)) + "."


def paraphrase(text: str, changes: int = 3) -> str:
    """The text with `changes` words replaced, far apart (a few words changed, as a light edit does)."""
    words = text.split()
    for n in range(changes):
        words[20 + n * 60] = "changed"
    return " ".join(words)


def reencoded(photo: Path, scale: float = 0.9, quality: int = 60) -> bytes:
    """The photo resized slightly and saved again as a lower-quality JPEG."""
    image = Image.open(photo).convert("RGB")
    image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def node(build: int, rank: int, record_id: str, source: str = "s") -> Node:
    return Node(build, rank, source, key=f"{source}_{record_id}", record_id=record_id)


def test_normalised_text_ignores_case_punctuation_and_spacing() -> None:
    assert normalise_text("  Hello,   WORLD!!\n It's\tme ") == "hello world it s me"
    assert normalise_text("Ｆｕｌｌ width") == "full width"  # NFKC
    assert normalise_text("hello world") != normalise_text("hello word")


def test_exact_entries_of_texts_and_images() -> None:
    a = record_entry(node(1, 0, "a"), 0, "text", ["The cat sat."], [], False, HASHER)
    b = record_entry(node(1, 0, "b"), 0, "text", ["the  CAT sat"], [], False, HASHER)
    c = record_entry(node(1, 0, "c"), 0, "text", ["The cat stood."], [], False, HASHER)
    assert a.exact == b.exact != c.exact and a.signature is None  # exact only: no signature computed
    pixels = preprocess(PHOTOS[0], size=64).pixels
    other = preprocess(PHOTOS[1], size=64).pixels
    pair = record_entry(node(1, 0, "p"), 0, "image_text", ["a caption"], [pixels], True, HASHER)
    recaptioned = record_entry(node(1, 0, "q"), 0, "image_text", ["another caption"], [pixels.copy()], True, HASHER)
    different = record_entry(node(1, 0, "r"), 0, "image_text", ["a caption"], [other], True, HASHER)
    assert pair.exact == recaptioned.exact != different.exact  # an image-text pair is compared by its image
    assert pair.phash == recaptioned.phash is not None and pair.signature is None
    doc = record_entry(node(1, 0, "d"), 0, "interleaved", ["a caption"], [pixels], True, HASHER)
    assert doc.exact not in (pair.exact, a.exact) and doc.signature is not None


def test_minhash_is_deterministic_and_finds_a_paraphrase() -> None:
    text = document(1)
    signature = HASHER.signature(text)
    assert signature.shape == (112,) and signature.dtype == np.uint64
    assert np.array_equal(signature, MinHasher().signature(text))  # the same permutations in every process
    assert not np.array_equal(signature, MinHasher(seed=2).signature(text))
    near = HASHER.signature(paraphrase(text))
    assert jaccard_estimate(signature, near) >= 0.8
    assert set(HASHER.band_keys(signature)) & set(HASHER.band_keys(near))  # a candidate pair ...
    far = HASHER.signature(document(2))
    assert jaccard_estimate(signature, far) < 0.1  # ... and a distinct document is not
    assert not set(HASHER.band_keys(signature)) & set(HASHER.band_keys(far))
    assert HASHER.signature(" ,.; ") is None  # no words, nothing to compare


def _true_jaccard(a: str, b: str) -> float:
    grams = [set(zip(*[normalise_text(t).split()[i:] for i in range(5)], strict=False)) for t in (a, b)]
    return len(grams[0] & grams[1]) / len(grams[0] | grams[1])


def test_no_false_positive_on_the_sample_corpus(sample_data) -> None:
    """The pairs of sample texts the signatures put at Jaccard >= 0.8 are the corpus's one exact copy and two
    overlapping excerpts of one page (true 5-gram Jaccard 0.85); the 20,000 other pairs, overlapping excerpts at
    0.3-0.77 among them, are not (the estimate's noise is about 0.04 with 112 permutations)."""
    raw = sample_data[0]
    texts = {}
    for path in sorted((raw / "text").glob("*.jsonl")):
        for n, line in enumerate(path.read_text().splitlines()):
            texts[f"{path.name}:{n}"] = json.loads(line)["text"]
    for n, text in enumerate(pq.read_table(raw / "text" / "code-00000.parquet").column("text").to_pylist()):
        texts[f"code#{n}"] = text
    names = list(texts)
    matrix = np.stack([HASHER.signature(texts[k]) for k in names])
    found = []
    for i in range(len(names)):
        equal = (matrix[i + 1 :] == matrix[i]).mean(axis=1)
        found += [(names[i], names[i + 1 + j]) for j in np.flatnonzero(equal >= 0.8)]
    assert found == [("prose-00000.jsonl:34", "prose-00001.jsonl:46"), ("prose-00000.jsonl:49", "prose-00001.jsonl:15")]
    assert [round(_true_jaccard(texts[a], texts[b]), 2) for a, b in found] == [1.0, 0.85]


def test_perceptual_hash_finds_a_reencoded_photo_and_keeps_different_ones() -> None:
    hashes = [perceptual_hash(preprocess(p, size=64).pixels) for p in PHOTOS]
    assert min(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) > 10  # different photos stay apart
    for photo, value in zip(PHOTOS[:6], hashes, strict=False):
        again = perceptual_hash(preprocess(reencoded(photo), size=64).pixels)
        assert hamming(value, again) <= 4, photo.name
        assert set(phash_band_keys(value, 4)) & set(phash_band_keys(again, 4))


def test_phash_bands_catch_every_pair_within_the_distance() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        value = int(rng.integers(0, 1 << 63)) * 2 + 1
        flipped = value
        for bit in rng.choice(64, size=4, replace=False):
            flipped ^= 1 << int(bit)
        assert set(phash_band_keys(value, 4)) & set(phash_band_keys(flipped, 4))


def test_groups_keep_their_smallest_node_and_never_reject_an_earlier_build() -> None:
    sig = HASHER.signature(document(3))
    earlier = DedupEntry(node(0, 0, "x", "old"), 0, b"e" * 16, sig)
    a = DedupEntry(node(1, 0, "a"), 0, b"a" * 16, sig)
    b = DedupEntry(node(1, 1, "b", "t"), 0, b"b" * 16, sig)
    edges = bucket_edges("minhash", [b, a], Thresholds())
    assert edges == [Edge(b.node, a.node, "near, Jaccard 1.00")]
    assert bucket_edges("minhash", [earlier, DedupEntry(node(0, 0, "y", "old"), 0, b"f" * 16, sig)], Thresholds()) == []
    # A chain b -> a -> earlier: both of this build are duplicates of the earlier build's record.
    decided = resolve([*edges, *bucket_edges("minhash", [a, earlier], Thresholds())])
    assert decided == {a.node: (earlier.node, "near, Jaccard 1.00"), b.node: (earlier.node, "near, Jaccard 1.00")}
    # What found a duplicate does not depend on the order edges arrive in (runners differ): exact first.
    both = [Edge(b.node, a.node, "near, Jaccard 1.00"), Edge(b.node, a.node, "exact")]
    assert resolve(both) == resolve(both[::-1]) == {b.node: (a.node, "exact")}
    assert duplicate_detail(earlier.node, "exact") == "duplicate of old record x (exact, kept by an earlier build)"
    far = DedupEntry(node(1, 2, "c"), 0, b"c" * 16, HASHER.signature(document(4)))
    assert bucket_edges("minhash", [a, far], Thresholds()) == []  # a shared band alone is not a duplicate
    keys = bucket_keys(a, HASHER, Thresholds())
    assert keys[0] == ("exact", a.exact) and len(keys) == 1 + 14


def test_index_part_round_trip(tmp_path: Path) -> None:
    sig = HASHER.signature(document(5))
    entries = [
        DedupEntry(node(1, 0, "a"), 3, b"\x01" * 15 + b"\x00", sig),  # a trailing zero byte survives
        DedupEntry(node(1, 0, "b"), 3, b"\x02" * 16, None, 12345),
    ]
    path = tmp_path / "s" / "shard-00003.npz"
    write_index_part(path, entries, HASHER)
    back = read_index_part(path, "s", HASHER)
    assert [(e.node, e.shard, e.exact, e.phash) for e in back] == [
        (node(0, 0, "a"), 3, b"\x01" * 15 + b"\x00", None),
        (node(0, 0, "b"), 3, b"\x02" * 16, 12345),
    ]
    assert np.array_equal(back[0].signature, sig) and back[1].signature is None
    other = read_index_part(path, "s", MinHasher(seed=9))
    assert other[0].signature is None and other[0].exact == entries[0].exact  # other params: exact copies only
    assert not list(tmp_path.rglob("*.tmp"))
    for entry in [*entries, DedupEntry(node(1, 2, "c"), 0, b"\x03" * 16, None, (1 << 64) - 1)]:  # through Beam
        back = row_entry(entry_row(entry))
        assert (back.node, back.shard, back.exact, back.phash) == (entry.node, entry.shard, entry.exact, entry.phash)
        assert (back.signature is None) == (entry.signature is None)
        assert entry.signature is None or np.array_equal(back.signature, entry.signature)
    again = tmp_path / "again.npz"
    write_index_part(again, entries[::-1], HASHER)
    assert again.read_bytes() == path.read_bytes()  # sorted, and no clock in it:
    assert {i.date_time for i in zipfile.ZipFile(path).infolist()} == {(1980, 1, 1, 0, 0, 0)}


# --- the config -----------------------------------------------------------------------------------------------------

TOKENIZER_FPS = {"text": "t" * 16, "image": "i" * 16}


def _config(dedup: dict | None = None, modes: tuple[str | None, ...] = (None, None)) -> PrepareConfig:
    sources = []
    for n, mode in enumerate(modes):
        source = {"name": f"s{n}", "kind": "text", "format": "jsonl", "paths": [f"/raw/{n}.jsonl"]}
        sources.append(source | ({"dedup": mode} if mode else {}))
    data = {"output_dir": "/out", "tokenizers": {"text": "/t", "image": "/i"}, "sources": sources}
    return validate_config(PrepareConfig, data | ({"dedup": dedup} if dedup else {}), check_paths=False)


def _fps(config: PrepareConfig) -> list[str]:
    return [source_fingerprint(config, s, TOKENIZER_FPS) for s in config.sources]


def test_dedup_settings_change_the_fingerprints_of_the_sources_they_apply_to() -> None:
    off, exact, on = (_fps(_config(modes=(m, None)))[0] for m in ("off", "exact", "on"))
    assert off == _fps(_config())[0]  # off is the default: configs from before dedup keep their fingerprints
    assert len({off, exact, on}) == 3
    base = _fps(_config(modes=("on", "exact")))
    changed = _fps(_config({"jaccard": 0.7}, modes=("on", "exact")))
    assert changed[0] != base[0] and changed[1] == base[1]  # thresholds count for sources with dedup on only
    assert _config(modes=("on", None)).sources[1].model_dump(mode="json").get("dedup") is None  # only when set


def test_the_index_folder_name_is_reserved() -> None:
    with pytest.raises(ValueError, match="reserved for the dedup index"):
        validate_config(
            PrepareConfig,
            {
                "output_dir": "/out",
                "tokenizers": {"text": "/t", "image": "/i"},
                "sources": [{"name": "dedup-index", "kind": "text", "format": "jsonl", "paths": ["/x.jsonl"]}],
            },
            check_paths=False,
        )


# --- the prepare job ------------------------------------------------------------------------------------------------


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _ids(path: Path) -> list[str]:
    """Record ids of a jsonl file's lines, as the reader names them (file:byte offset)."""
    offsets, at = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        offsets.append(f"{path.name}:{at}")
        at += len(line)
    return offsets


def _results(out: Path, source: str) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(record ids written, {rejected record id: (reason, detail)}) of a source's shards."""
    kept, rejected = [], {}
    for tar in sorted((out / source).glob("shard-*.tar")):
        kept += [s["meta"]["record_id"] for s in read_shard(tar)]
    for part in sorted((out / source).glob("shard-*.rejects.parquet")):
        rejected |= {r["record_id"]: (r["reason"], r["detail"]) for r in pq.read_table(part).to_pylist()}
    return sorted(kept), rejected


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    raw = tmp_path_factory.mktemp("dedup-raw")
    docs = [document(100 + n) for n in range(8)]
    files = {
        # web: 0..3 distinct, then an exact copy of 0 (other case and spacing) and a paraphrase of 1
        "web": _jsonl(raw / "web" / "a.jsonl", [*docs[:4], "  " + docs[0].upper(), paraphrase(docs[1])]),
        # more (on): an exact copy of web's 2, a paraphrase of web's 3, a distinct document
        "more": _jsonl(raw / "more" / "a.jsonl", [docs[2], paraphrase(docs[3]), docs[4]]),
        # exact-only: a paraphrase of 4 (kept: near copies are not looked for) and a copy of 5 twice
        "strict": _jsonl(raw / "strict" / "a.jsonl", [paraphrase(docs[4]), docs[5], docs[5]]),
        # off: a copy of web's 0, twice (both kept)
        "loose": _jsonl(raw / "loose" / "a.jsonl", [docs[0], docs[0]]),
    }
    rows = [
        {"jpg": PHOTOS[0].read_bytes(), "caption": "first photo"},
        {"jpg": PHOTOS[1].read_bytes(), "caption": "second photo"},
        {"jpg": reencoded(PHOTOS[0]), "caption": "the first photo again, smaller"},
        {"jpg": PHOTOS[2].read_bytes(), "caption": "third photo"},
    ]
    (raw / "photos").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), raw / "photos" / "pairs.parquet")
    files["photos"] = raw / "photos" / "pairs.parquet"
    files["docs"] = docs  # type: ignore[assignment]
    return files


def _prepare_config(corpus: dict, out: Path, tokenizers: dict[str, Path], web_paths: list[Path]) -> PrepareConfig:
    def source(name: str, mode: str, paths: list[Path], kind: str = "text", fmt: str = "jsonl") -> dict:
        return {"name": name, "kind": kind, "format": fmt, "paths": [str(p) for p in paths], "dedup": mode}

    data = {
        "output_dir": str(out),
        "image_size": 64,
        "samples_per_shard": 40,
        "detect_faces": False,
        "tokenizers": {k: str(v) for k, v in tokenizers.items()},
        "sources": [
            source("web", "on", web_paths),
            source("more", "on", [corpus["more"]]),
            source("strict", "exact", [corpus["strict"]]),
            source("loose", "off", [corpus["loose"]]),
            source("photos", "on", [corpus["photos"]], "image_text", "parquet"),
        ],
    }
    return validate_config(PrepareConfig, data)


@pytest.fixture(scope="module")
def deduplicated(corpus, tmp_path_factory, tiny_tokenizers) -> tuple[PrepareConfig, dict]:
    out = tmp_path_factory.mktemp("dedup-out")
    config = _prepare_config(corpus, out, tiny_tokenizers, [corpus["web"]])
    return config, run_prepare(config)


def test_duplicates_within_and_across_sources_are_rejected_naming_the_kept_record(corpus, deduplicated) -> None:
    config, result = deduplicated
    out = Path(config.output_dir)
    web, more, strict, loose = (_ids(corpus[n]) for n in ("web", "more", "strict", "loose"))
    kept, rejected = _results(out, "web")
    assert kept == sorted(web[:4])
    assert rejected == {
        web[4]: ("duplicate", f"duplicate of web record {web[0]} (exact)"),
        web[5]: ("duplicate", rejected[web[5]][1]),
    }
    assert rejected[web[5]][1].startswith(f"duplicate of web record {web[1]} (near, Jaccard 0.")
    kept, rejected = _results(out, "more")
    assert kept == [more[2]]  # across sources: web is listed first, its records are kept
    assert rejected[more[0]] == ("duplicate", f"duplicate of web record {web[2]} (exact)")
    assert rejected[more[1]][1].startswith(f"duplicate of web record {web[3]} (near, Jaccard")
    kept, rejected = _results(out, "strict")  # exact only: the paraphrase of more's record is kept
    assert kept == sorted(strict[:2]) and rejected == {
        strict[2]: ("duplicate", f"duplicate of strict record {strict[1]} (exact)")
    }
    assert _results(out, "loose") == (sorted(loose), {})  # off: nothing compared, nothing rejected
    kept, rejected = _results(out, "photos")
    photo_ids = [f"pairs.parquet#{n}" for n in range(4)]
    assert kept == sorted([photo_ids[0], photo_ids[1], photo_ids[3]])  # different photos kept
    assert list(rejected) == [photo_ids[2]]
    assert rejected[photo_ids[2]][1].startswith(f"duplicate of photos record {photo_ids[0]} (near, image hash")
    totals = {n: m["totals"] for n, m in result["manifests"].items()}
    for name, t in totals.items():  # every record is accounted for, duplicates included
        assert t["records_in"] == t["samples"] + t["rejects"], name
    assert {n: t["rejects_by_reason"] for n, t in totals.items()} == {
        "web": {"duplicate": 2},
        "more": {"duplicate": 2},
        "strict": {"duplicate": 1},
        "loose": {},
        "photos": {"duplicate": 1},
    }
    assert result["manifests"]["web"]["dedup"] == {"mode": "on"} | config.dedup.model_dump(mode="json")
    assert result["manifests"]["loose"]["dedup"] == {"mode": "off"}
    index = out / "dedup-index"
    assert sorted(p.relative_to(index).as_posix() for p in index.rglob("*.npz")) == [
        "more/shard-00000.npz",
        "photos/shard-00000.npz",
        "strict/shard-00000.npz",
        "web/shard-00000.npz",
    ]


def test_a_later_build_rejects_what_an_earlier_one_kept(corpus, tmp_path: Path, tiny_tokenizers) -> None:
    docs, raw, out = corpus["docs"], tmp_path / "web", tmp_path / "out"
    first = _jsonl(raw / "a.jsonl", docs[:4])
    config = validate_config(
        PrepareConfig,
        {
            "output_dir": str(out),
            "image_size": 64,
            "tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()},
            "sources": [{"name": "web", "kind": "text", "format": "jsonl", "paths": [str(raw)], "dedup": "on"}],
        },
    )
    run_prepare(config)
    before = {p: p.read_bytes() for p in out.rglob("shard-*") if p.is_file()}
    # The next night's file repeats records 1 and 2 (one as a paraphrase) and brings a new one.
    new = _jsonl(raw / "b.jsonl", [paraphrase(docs[1], 2), docs[2], docs[7]])
    result = run_prepare(config)
    assert result["shards_written"] == {"web": 1} and result["shards_skipped"] == {"web": 1}
    a, b = _ids(first), _ids(new)
    kept, rejected = _results(out, "web")
    assert kept == sorted([*a, b[2]])
    assert rejected[b[1]] == ("duplicate", f"duplicate of web record {a[2]} (exact, kept by an earlier build)")
    assert rejected[b[0]][1].startswith(f"duplicate of web record {a[1]} (near, Jaccard")
    assert rejected[b[0]][1].endswith(", kept by an earlier build)") and len(rejected) == 2
    assert all(p.read_bytes() == data for p, data in before.items())  # the earlier shard is untouched
    assert [p.name for p in sorted((out / "dedup-index" / "web").iterdir())] == ["shard-00000.npz", "shard-00001.npz"]
    # Reset (docs/prepare.md): without the index, a redone shard is compared with nothing earlier.
    shutil.rmtree(out / "dedup-index")
    (out / "web" / "shard-00001.stats.json").unlink()
    run_prepare(config)
    kept, rejected = _results(out, "web")
    assert kept == sorted([*a, *b]) and rejected == {}


def test_the_local_runner_rejects_the_same_records(corpus, tmp_path: Path, tiny_tokenizers) -> None:
    """Worker processes (DirectRunner) get the embedded runner's rejects, detail for detail, and identical shards."""
    docs = corpus["docs"]
    web = _jsonl(tmp_path / "web" / "a.jsonl", [*docs[:4], docs[0].upper(), paraphrase(docs[1])])
    more = _jsonl(tmp_path / "more" / "b.jsonl", [docs[2], paraphrase(docs[3]), docs[4]])
    outs = {}
    for runner in ({"kind": "embedded"}, {"kind": "local", "workers": 2}):
        out = tmp_path / runner["kind"]
        sources = [
            {"name": name, "kind": "text", "format": "jsonl", "paths": [str(path)], "dedup": "on"}
            for name, path in (("web", web), ("more", more))
        ]
        data = {"output_dir": str(out), "image_size": 64, "runner": runner, "sources": sources}
        run_prepare(
            validate_config(PrepareConfig, data | {"tokenizers": {k: str(v) for k, v in tiny_tokenizers.items()}})
        )
        outs[runner["kind"]] = {name: _results(out, name) for name in ("web", "more")}
    assert outs["local"] == outs["embedded"]
    assert sorted(outs["local"]["more"][1]) == _ids(more)[:2]  # both duplicates of web's records rejected
    embedded, local = tmp_path / "embedded", tmp_path / "local"
    for path in sorted(embedded.rglob("shard-*")):
        assert path.read_bytes() == (local / path.relative_to(embedded)).read_bytes(), path
