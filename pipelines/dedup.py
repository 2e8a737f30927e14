"""Deduplication of prepared records, without Beam: what a record is compared by, and which records are duplicates.

- Exact: a hash of the record's normalised text (NFKC, case-folded, punctuation dropped, whitespace collapsed) and of
  its images' preprocessed pixels; for an image-text pair, of its image alone (a picture repeated under another
  caption would teach the same image tokens twice).
- Near, text (MinHash with LSH, as FineWeb does with datatrove): word n-gram shingles, `bands x rows` min-hashes under
  seeded permutations; records that share a band are candidates, kept as duplicates only when their estimated
  Jaccard similarity reaches the threshold.
- Near, images (image-text pairs): a 64-bit perceptual hash (DCT of a 32x32 grayscale copy); candidates share one of
  `distance + 1` slices of it (so every pair within the distance shares one), verified by Hamming distance.

Of each group of duplicates the smallest node is kept: an earlier build's record first, then the source listed
first, then the smallest record id. Kept records' entries are saved beside the shards (`INDEX_DIR`) so the next
build compares against them.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import unicodedata
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from model.files import storage
from pipelines.shard_writer import encode_npy
from schemas.prepare_config import DEDUP_INDEX_DIR as INDEX_DIR

DUPLICATE = "duplicate"
SHINGLES = "crc32x2-poly-mix64"  # how shingles are hashed: signatures of another scheme do not compare
DEDUP_STAGE = "dedup"
MAX_COMPARISONS = 64  # per record in one LSH bucket: a boilerplate bucket of thousands stays linear, not quadratic
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise_text(text: str) -> str:
    """What exact and near duplicates are compared on: NFKC, case-folded, punctuation and symbols as spaces, runs of
    whitespace as one space, so copies that differ only in case, punctuation or spacing hash alike."""
    return " ".join(_NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def digest(*parts: bytes) -> bytes:
    """16-byte BLAKE2b of the parts, each length-prefixed so that ("ab", "c") and ("a", "bc") differ."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def pixel_hash(pixels: np.ndarray) -> bytes:
    """Exact hash of an image as the model sees it (the preprocessed size x size x 3 pixels): the same picture in
    another container, with other metadata, or with margins the crop removes hashes alike."""
    array = np.ascontiguousarray(pixels, dtype=np.uint8)
    return digest(repr(array.shape).encode(), array.tobytes())


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


_WORD_HASHES: dict[str, int] = {}  # per process: words repeat across documents (Zipf), hashing them once pays
_WORD_CACHE_LIMIT = 1 << 20
_PRIME64 = np.uint64(0x9E3779B97F4A7C15)


def word_hashes(words: Sequence[str]) -> np.ndarray:
    """A 64-bit hash of each word (two seeded CRC-32s, mixed): the same in every process and on every machine."""
    if len(_WORD_HASHES) > _WORD_CACHE_LIMIT:
        _WORD_HASHES.clear()
    new = [w for w in set(words) if w not in _WORD_HASHES]
    if new:
        encoded = [w.encode() for w in new]
        lo = np.fromiter((zlib.crc32(e) for e in encoded), dtype=np.uint64, count=len(new))
        hi = np.fromiter((zlib.crc32(e, 0x9E3779B9) for e in encoded), dtype=np.uint64, count=len(new))
        _WORD_HASHES.update(zip(new, _mix64((hi << np.uint64(32)) | lo).tolist(), strict=True))
    return np.fromiter((_WORD_HASHES[w] for w in words), dtype=np.uint64, count=len(words))


def shingle_hashes(words: Sequence[str], ngram: int) -> np.ndarray:
    """64-bit hashes of the distinct word n-grams (one shingle of all words when there are fewer than n): a
    polynomial of the n word hashes (so "a b" and "b a" differ), mixed."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    hashes = word_hashes(words)
    n = min(ngram, len(words))
    length = len(words) - n + 1
    combined = hashes[:length].copy()
    for offset in range(1, n):
        combined = combined * _PRIME64 ^ hashes[offset : offset + length]
    return np.unique(_mix64(combined))


@dataclass(frozen=True)
class MinHasher:
    """MinHash signatures and LSH band keys for `bands x rows` seeded permutations of the 64-bit shingle hashes,
    h -> mix64(h xor s_i): mix64 is a bijection, so each seed s_i gives a permutation. (The textbook (a h + b) mod p
    needs 128-bit products; with a and h small enough for uint64 it hardly wraps, and its minima all fall on the
    smallest h: estimates of 0.9 for pairs at 0.5.)"""

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    @cached_property
    def _seeds(self) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(self.seed))
        return rng.integers(0, np.iinfo(np.uint64).max, size=self.bands * self.rows, dtype=np.uint64, endpoint=True)

    @property
    def params(self) -> dict[str, int]:
        """What decides a signature: index entries made with other params are compared exactly only."""
        return {"ngram": self.ngram, "bands": self.bands, "rows": self.rows, "seed": self.seed, "shingles": SHINGLES}

    def signature(self, text: str) -> np.ndarray | None:
        """The uint64 MinHash signature of a text's normalised words; None for a text without words."""
        shingles = shingle_hashes(normalise_text(text).split(), self.ngram)
        if shingles.size == 0:
            return None
        return _mix64(shingles[:, None] ^ self._seeds[None, :]).min(axis=0)

    def band_keys(self, signature: np.ndarray) -> list[bytes]:
        """One key per band: its index and a hash of its rows (records sharing a key are candidates)."""
        rows = np.asarray(signature, dtype=np.uint64).reshape(self.bands, self.rows)
        return [bytes([band]) + digest(row.tobytes())[:8] for band, row in enumerate(rows)]


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """The share of equal MinHash values: an unbiased estimate of the shingle sets' Jaccard similarity."""
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT32 = _dct_matrix(32)


def perceptual_hash(pixels: np.ndarray) -> int:
    """64-bit pHash: grayscale, 32x32 (box filter), 2-D DCT, the 8x8 lowest frequencies against their median (DC
    left out of the median). Re-encoding, slight resizing or recompression change few bits; another photo ~32."""
    gray = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).convert("L")
    small = np.asarray(gray.resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = (_DCT32 @ small @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def hamming(a: int, b: int) -> int:
    """Differing bits of two 64-bit hashes."""
    return (a ^ b).bit_count()


def phash_band_keys(value: int, distance: int) -> list[bytes]:
    """distance + 1 slices of the hash: two hashes within `distance` bits agree on at least one (pigeonhole)."""
    n = distance + 1
    bounds = [64 * i // n for i in range(n + 1)]
    return [
        bytes([band]) + ((value >> lo) & ((1 << (hi - lo)) - 1)).to_bytes(8, "little")
        for band, (lo, hi) in enumerate(itertools.pairwise(bounds))
    ]


class Node(NamedTuple):
    """A record in the dedup graph, ordered as the kept one is chosen: earlier build (0) before this one (1), then the
    source listed first, then read order (`key`, the sample key SOURCE_SHARD_INDEX, zero-padded, unique in a build:
    unlike record ids, `f.jsonl:999` vs `f.jsonl:1000`, it sorts as the records were read)."""

    build: int
    rank: int
    source: str
    key: str
    record_id: str


@dataclass(frozen=True)
class DedupEntry:
    """What a record is compared by: its exact hash, and for sources with dedup on its MinHash signature (texts) or
    perceptual hash (image-text pairs). `shard` is the shard it is written to (for the index)."""

    node: Node
    shard: int
    exact: bytes
    signature: np.ndarray | None = None
    phash: int | None = None


EntryRow = tuple[tuple[int, int, str, str, str], int, bytes, bytes | None, bytes | None]


def entry_row(entry: DedupEntry) -> EntryRow:
    """The entry as plain values (tuples, ints, bytes), which Beam encodes 15x faster than a pickled dataclass: an
    entry crosses a shuffle once per key it is grouped under."""
    signature = None if entry.signature is None else entry.signature.tobytes()
    phash = None if entry.phash is None else entry.phash.to_bytes(8, "little")  # as bytes: Beam's ints are signed
    return tuple(entry.node), entry.shard, entry.exact, signature, phash


def row_entry(row: EntryRow) -> DedupEntry:
    """The entry of `entry_row`'s values."""
    node, shard, exact, signature, phash = row
    array = None if signature is None else np.frombuffer(signature, dtype=np.uint64)
    return DedupEntry(Node(*node), shard, exact, array, None if phash is None else int.from_bytes(phash, "little"))


@dataclass(frozen=True)
class Thresholds:
    """The settings a bucket's candidates are verified with (from PrepareConfig.dedup)."""

    jaccard: float = 0.8
    image_distance: int = 4


def record_entry(
    node: Node,
    shard: int,
    kind: str,
    texts: Iterable[str],
    images: Sequence[np.ndarray],
    near: bool,
    hasher: MinHasher,
) -> DedupEntry:
    """The entry of one prepared record (its cleaned texts and preprocessed images); `near` for sources with dedup
    on. Image-text pairs are compared by their image, every other kind by its text and images."""
    pixel_hashes = [pixel_hash(p) for p in images]
    text = "\n".join(texts)
    if kind == "image_text" and images:
        exact = digest(b"image", *pixel_hashes)
        phash = perceptual_hash(images[0]) if near else None
        return DedupEntry(node, shard, exact, phash=phash)
    exact = digest(b"text", normalise_text(text).encode(), *pixel_hashes)
    return DedupEntry(node, shard, exact, signature=hasher.signature(text) if near else None)


def bucket_keys(entry: DedupEntry, hasher: MinHasher, thresholds: Thresholds) -> list[tuple[str, bytes]]:
    """The keys an entry is grouped under: its exact hash, and its LSH bands (MinHash or perceptual hash)."""
    keys = [("exact", entry.exact)]
    if entry.signature is not None:
        keys += [("minhash", k) for k in hasher.band_keys(entry.signature)]
    if entry.phash is not None:
        keys += [("phash", k) for k in phash_band_keys(entry.phash, thresholds.image_distance)]
    return keys


class Edge(NamedTuple):
    """`duplicate` repeats `original` (a smaller node); `how` says what found it (exact, or near with its score)."""

    duplicate: Node
    original: Node
    how: str


def _match(how: str, a: DedupEntry, b: DedupEntry, thresholds: Thresholds) -> str | None:
    if how == "exact":
        return "exact"
    if how == "minhash":
        score = jaccard_estimate(a.signature, b.signature)
        return f"near, Jaccard {score:.2f}" if score >= thresholds.jaccard else None
    distance = hamming(a.phash, b.phash)
    return f"near, image hash {distance} bits apart" if distance <= thresholds.image_distance else None


def bucket_edges(how: str, entries: Iterable[DedupEntry], thresholds: Thresholds) -> list[Edge]:
    """The verified duplicates among the entries sharing one key: each entry of this build is linked to the first
    smaller entry it matches (earlier builds' entries are never linked to each other: they were decided already)."""
    ordered = sorted(entries, key=lambda e: e.node)
    edges = []
    for n, entry in enumerate(ordered):
        if entry.node.build == 0:
            continue
        for other in ordered[max(0, n - MAX_COMPARISONS) : n]:
            if other.node == entry.node:
                continue
            found = _match(how, entry, other, thresholds)
            if found is not None:
                edges.append(Edge(entry.node, other.node, found))
                break
    return edges


def resolve(edges: Iterable[Edge]) -> dict[Node, tuple[Node, str]]:
    """Duplicates -> (the kept node of their group, how they were found): groups are the connected components of
    the edges (union-find), each kept as its smallest node; only nodes of this build are ever duplicates."""
    parent: dict[Node, Node] = {}
    how: dict[Node, str] = {}

    def find(node: Node) -> Node:
        root = node
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(node, node) != root:  # path compression
            parent[node], node = root, parent[node]
        return root

    # Sorted, so each duplicate's `how` is the same on every runner (edges arrive in any order): exact first.
    for edge in sorted(edges, key=lambda e: (e.duplicate, e.how != "exact", e.original, e.how)):
        how.setdefault(edge.duplicate, edge.how)
        a, b = find(edge.duplicate), find(edge.original)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return {node: (find(node), how[node]) for node in how if node.build == 1 and find(node) != node}


def duplicate_detail(original: Node, how: str) -> str:
    """A duplicate reject's detail: the kept record (source and id) and what found it."""
    earlier = ", kept by an earlier build" if original.build == 0 else ""
    return f"duplicate of {original.source} record {original.record_id} ({how}{earlier})"


def index_folder(output_dir: str | Path, source: str) -> str | Path:
    """`OUTPUT/dedup-index/SOURCE`: one `SHARD.npz` per shard, the entries of its kept records (a URL on a store)."""
    return storage.join(output_dir, INDEX_DIR, source)


def write_index_part(path: str | Path, entries: Sequence[DedupEntry], hasher: MinHasher) -> None:
    """One shard's kept entries as an npz (ids, exact hashes, signatures, perceptual hashes), written atomically."""
    entries = sorted(entries, key=lambda e: e.node)
    n_perm = hasher.bands * hasher.rows
    signatures = np.zeros((len(entries), n_perm), dtype=np.uint64)
    has_signature = np.zeros(len(entries), dtype=bool)
    for i, e in enumerate(entries):
        if e.signature is not None:
            signatures[i], has_signature[i] = e.signature, True
    arrays = {
        "record_id": np.array([e.node.record_id for e in entries], dtype=str),
        "key": np.array([e.node.key for e in entries], dtype=str),
        # uint8 rows, not numpy's S16: fixed-width bytes lose their trailing zero bytes.
        "exact": np.frombuffer(b"".join(e.exact for e in entries), dtype=np.uint8).reshape(len(entries), 16),
        "signature": signatures,
        "has_signature": has_signature,
        "phash": np.array([e.phash or 0 for e in entries], dtype=np.uint64),
        "has_phash": np.array([e.phash is not None for e in entries], dtype=bool),
        "params": np.array(json.dumps(hasher.params, sort_keys=True)),
    }
    buffer = io.BytesIO()
    # An npz written by hand: np.savez stamps each member with the clock, and a part must be byte-identical when
    # its shard is (the same inputs and config on any runner).
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), encode_npy(array))
    storage.write_bytes(path, buffer.getvalue())


def read_index_part(path: str | Path, source: str, hasher: MinHasher) -> list[DedupEntry]:
    """The entries of an index part as earlier-build nodes; signatures of other MinHash params are left out (they
    do not compare), so such entries still catch exact copies."""
    with storage.open_file(path) as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as data:
        same = json.loads(str(data["params"])) == hasher.params
        shard = int(str(path).rsplit("/", 1)[-1].split(".")[0].removeprefix("shard-") or 0)
        out = []
        for i, (record_id, key) in enumerate(zip(data["record_id"], data["key"], strict=True)):
            signature = data["signature"][i] if same and data["has_signature"][i] else None
            phash = int(data["phash"][i]) if data["has_phash"][i] else None
            node = Node(0, 0, source, str(key), str(record_id))
            out.append(DedupEntry(node, shard, data["exact"][i].tobytes(), signature, phash))
    return out


def index_parts(output_dir: str | Path) -> dict[str, list[str | Path]]:
    """Every index part under the output folder (local or on a store), by source folder."""
    root = storage.join(output_dir, INDEX_DIR)
    parts = {}
    for source in storage.list_names(root):
        folder = storage.join(root, source)
        names = [n for n in storage.list_names(folder) if n.startswith("shard-") and n.endswith(".npz")]
        if names:
            parts[source] = [storage.join(folder, n) for n in names]
    return parts
