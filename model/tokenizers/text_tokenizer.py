"""Text tokenizers in Chameleon's id space: our SentencePiece BPE, and Meta's released `text_tokenizer.json`.

Our BPE's pieces fill the text range of the vocabulary layout (after specials, image codes and reserved
ids), so the total vocabulary is exactly the layout's size. Byte fallback means no text is ever `<unk>`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import sentencepiece as spm

from model.files.reading import read_json
from model.tokenizers.vocabulary import Modality, Vocabulary, image_code_from_name
from schemas.config_base import ConfigError, expand_paths, validate_config
from schemas.prepare_config import DEFAULT_MAX_RECORD_BYTES, ROW_GROUP_RECORDS
from schemas.source_files import read_bounded_line
from schemas.vocab import (
    BOI_TOKEN,
    CHAMELEON,
    EOI_TOKEN,
    IMAGE_CODE_OFFSET,
    SPECIAL_TOKENS,
    UNK_ID,
    VOCAB_PRESETS,
    VocabLayout,
)

MODEL_FILE = "text_tokenizer.model"
LAYOUT_FILE = "vocab_layout.json"
HF_FILE = "text_tokenizer.json"
# SentencePiece writes spaces as U+2581 and so turns a literal U+2581 back into a space; we send it as bytes.
_SP_SPACE = "\u2581"


class TokenizerError(RuntimeError):
    """A tokenizer that cannot be trained or loaded, with the reason."""


class TextTokenizer(Protocol):
    """What every text tokenizer offers; ids are in the vocabulary's id space."""

    vocab: Vocabulary

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _in_vocabulary(vocab: Vocabulary, token_id: int) -> int:
    """`token_id` as an int, or a ValueError when no id of `vocab` has that number."""
    token_id = int(token_id)
    if not 0 <= token_id < vocab.size:
        raise ValueError(f"id {token_id} is outside this tokenizer's vocabulary (ids 0..{vocab.size - 1})")
    return token_id


class SentencePieceTokenizer:
    """Our SentencePiece BPE: text id = first text id + piece id - 1 (piece 0 is SentencePiece's <unk>)."""

    def __init__(self, model_proto: bytes, layout: VocabLayout):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab = Vocabulary(layout)
        expected = layout.n_text + 1
        if self._sp.get_piece_size() != expected:
            raise TokenizerError(
                f"the SentencePiece model has {self._sp.get_piece_size()} pieces but the layout has room for "
                f"{layout.n_text} text ids (+1 for <unk>): {expected}"
            )
        self._offset = layout.first_text_id - 1
        self._space_bytes = [self._offset + self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SP_SPACE.encode()]

    @classmethod
    def load(cls, directory: str | Path) -> SentencePieceTokenizer:
        """Load a folder written by `save` (or `cham text-tokenizer train`)."""
        directory = Path(directory)
        model, layout = directory / MODEL_FILE, directory / LAYOUT_FILE
        for path in (model, layout):
            if not path.is_file():
                raise TokenizerError(f"{directory} is not a text tokenizer folder: {path.name} is missing")
        try:
            vocab_layout = validate_config(VocabLayout, read_json(layout, TokenizerError), str(layout))
        except ConfigError as err:
            raise TokenizerError(str(err)) from None
        try:
            return cls(model.read_bytes(), vocab_layout)
        except RuntimeError as err:  # SentencePiece's parse error: a damaged or foreign model file
            if isinstance(err, TokenizerError):
                raise
            raise TokenizerError(f"{model}: damaged or not a SentencePiece model") from None

    def save(self, directory: str | Path) -> Path:
        """Write the model and its vocabulary layout into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self._proto)
        (directory / LAYOUT_FILE).write_text(self.vocab.layout.model_dump_json(indent=2))
        return directory

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (e.g. for writing it in another tokenizer format)."""
        return self._proto

    @property
    def fingerprint(self) -> str:
        """Changes whenever any id could change: the model and the layout."""
        digest = hashlib.sha256(self._proto + self.vocab.layout.model_dump_json().encode())
        return digest.hexdigest()[:16]

    def _encode_pieces(self, text: str) -> list[int]:
        if _SP_SPACE not in text:
            return [self._offset + i if i else UNK_ID for i in self._sp.encode(text)]
        ids: list[int] = []
        for n, part in enumerate(text.split(_SP_SPACE)):
            if n:
                ids += self._space_bytes
            ids += [self._offset + i if i else UNK_ID for i in self._sp.encode(part)]
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of one string (no BOS/EOS: the mixed-modal tokenizer adds those)."""
        return self._encode_pieces(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[np.ndarray]:
        """Token ids of many strings as int32 arrays, on `num_threads` threads (-1: all cores)."""
        texts = list(texts)
        out = [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(texts, num_threads=num_threads)]
        for n, (text, ids) in enumerate(zip(texts, out, strict=True)):
            if _SP_SPACE in text:
                out[n] = np.asarray(self._encode_pieces(text), dtype=np.int32)
            else:
                unk = ids == 0
                ids += self._offset
                if unk.any():
                    ids[unk] = UNK_ID
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a run of ids; `<s>`, `<pad>`, `</s>` are skipped, any non-text id is an error."""
        pieces = []
        for token_id in ids:
            token_id = _in_vocabulary(self.vocab, token_id)
            if token_id >= self.vocab.first_text_id:
                pieces.append(token_id - self._offset)
            elif token_id == UNK_ID:
                pieces.append(0)
            elif self.vocab.modality(token_id) != Modality.SPECIAL:
                raise ValueError(f"id {token_id} ({self.vocab.special_name(token_id)}) is not text")
        return self._sp.decode(pieces)

    def piece(self, token_id: int) -> str:
        """The piece (or special name) of one id, for inspection."""
        if token_id >= self.vocab.first_text_id:
            return self._sp.id_to_piece(token_id - self._offset)
        return self.vocab.special_name(token_id)


class HFTextTokenizer:
    """Meta's released `text_tokenizer.json` (a Hugging Face tokenizers BPE), whose ids are already ours."""

    def __init__(self, path: str | Path, image_grid: int = CHAMELEON.image_grid):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # pragma: no cover - the hf extra is installed in dev and CI
            raise TokenizerError("loading text_tokenizer.json needs the hf extra: pip install '.[hf]'") from err
        self.path = Path(path)
        data = read_json(self.path, TokenizerError)
        if not isinstance(data, dict):
            raise TokenizerError(f"{self.path}: not a tokenizers JSON file (expected an object)")
        model_vocab = data.get("model", {}).get("vocab")
        if isinstance(model_vocab, dict):  # BPE, as Meta's: no tokenizer needs building just to read the names
            vocab = {**model_vocab, **{t["content"]: t["id"] for t in data.get("added_tokens", [])}}
        else:
            vocab = Tokenizer.from_str(json.dumps(data)).get_vocab(with_added_tokens=True)
        self.vocab = Vocabulary(_layout_from_names(vocab, self.path, image_grid))
        self._text_start = self.vocab.first_text_id
        # Document text must never become control ids: "</s>" or "<racm3:break>" typed in a document would end it
        # or open an image. Every added token below the text range is made special, and special tokens are then
        # tokenized as plain text.
        for token in data.get("added_tokens", []):
            if token["id"] < self._text_start:
                token["special"] = True
        self._tok = Tokenizer.from_str(json.dumps(data))
        self._tok.encode_special_tokens = True

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[np.ndarray]:
        # tokenizers parallelizes over all cores itself (RAYON_NUM_THREADS caps it).
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [_in_vocabulary(self.vocab, i) for i in ids]
        for token_id in ids:
            if token_id < self._text_start and self.vocab.modality(token_id) != Modality.SPECIAL:
                raise ValueError(f"id {token_id} ({self.vocab.special_name(token_id)}) is not text")
        return self._tok.decode([i for i in ids if i >= self._text_start], skip_special_tokens=False)


def _layout_from_names(vocab: dict[str, int], path: Path, image_grid: int) -> VocabLayout:
    """Derive and check the layout of a Meta-style vocabulary from its token names."""
    for n, name in enumerate(SPECIAL_TOKENS):
        if vocab.get(name) != n:
            raise TokenizerError(f"{path}: expected {name} at id {n}, found id {vocab.get(name)}")
    codes = sorted((i, image_code_from_name(name)) for name, i in vocab.items() if name.startswith("IMGIMG"))
    if not codes or any(i != code + IMAGE_CODE_OFFSET for i, code in codes) or codes[0][1] != 0:
        raise TokenizerError(f"{path}: image tokens (IMGIMG...) must be ids 4.. in code order")
    n_codes = len(codes)
    if vocab.get(EOI_TOKEN) != IMAGE_CODE_OFFSET + n_codes or vocab.get(BOI_TOKEN) != IMAGE_CODE_OFFSET + n_codes + 1:
        raise TokenizerError(f"{path}: expected {EOI_TOKEN} and {BOI_TOKEN} right after the {n_codes} image tokens")
    reserved = [i for name, i in vocab.items() if name.startswith("<reserved")]
    first_text = max(reserved) + 1 if reserved else IMAGE_CODE_OFFSET + n_codes + 2
    n_reserved = first_text - (IMAGE_CODE_OFFSET + n_codes + 2)
    sep_offset = CHAMELEON.sep_offset if n_reserved > CHAMELEON.sep_offset else 0
    # The file does not say how many codes make an image; Chameleon's VQGAN makes a 32x32 grid.
    return VocabLayout(
        vocab_size=max(vocab.values()) + 1,
        image_codes=n_codes,
        image_grid=image_grid,
        n_reserved=max(n_reserved, 1),
        sep_offset=sep_offset,
    )


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """Our tokenizer folder, or Meta's `text_tokenizer.json` (the file or a folder holding it); on a store too
    (`s3://...`: fetched once into this machine's cache)."""
    from model.files.storage import local_copy

    path = local_copy(path, "tokenizers")
    if path.is_dir() and (path / MODEL_FILE).is_file():
        return SentencePieceTokenizer.load(path)
    if path.is_dir() and (path / HF_FILE).is_file():
        return HFTextTokenizer(path / HF_FILE)
    if path.is_file() and path.suffix == ".json":
        return HFTextTokenizer(path)
    raise TokenizerError(f"{path}: no text tokenizer here (expected a folder with {MODEL_FILE} or a {HF_FILE})")


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named by paths, folders and globs, sorted; a pattern matching nothing is a TokenizerError."""
    try:
        return expand_paths([str(i) for i in inputs])
    except FileNotFoundError as err:
        raise TokenizerError(str(err)) from None


@dataclass
class TextReadCounts:
    """What `iter_texts` read, and what it skipped by reason, with the first place each reason was met."""

    documents: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.first.setdefault(reason, where)

    def summary(self) -> str:
        """`N documents; skipped: reason n (first: where), ...`."""
        skipped = ", ".join(f"{reason} {n} (first: {self.first[reason]})" for reason, n in sorted(self.skipped.items()))
        return f"{self.documents} documents; skipped: {skipped or 'none'}"


_TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", "")


def iter_texts(
    files: Iterable[Path],
    text_field: str = "text",
    counts: TextReadCounts | None = None,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> Iterator[str]:
    """The documents of .txt (whole file), .jsonl / .jsonl.gz (`text_field`) and .parquet (column `text_field`)
    files; a UTF-8 byte-order mark is skipped, as the prepare job's reader does. A record or file that holds no
    readable text (bad JSON, no such field, binary, unreadable, unsupported type, over `max_record_bytes`) is
    skipped and counted in `counts`; sizes are checked before anything is decoded."""
    counts = counts if counts is not None else TextReadCounts()
    for path in files:
        for text in _texts_of(path, text_field, counts, max_record_bytes):
            counts.documents += 1
            yield text


def _texts_of(path: Path, text_field: str, counts: TextReadCounts, limit: int) -> Iterator[str]:
    try:
        if path.suffix in (".jsonl", ".json") or path.name.endswith(".jsonl.gz"):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f:
                for n in itertools.count(1):
                    line, size = read_bounded_line(f, limit)
                    if not size:
                        break
                    if line is None:
                        counts.skip("record_too_large", f"{path}:{n} ({size:,} bytes)")
                    elif line.strip():
                        text = line.decode("utf-8-sig" if n == 1 else "utf-8", errors="replace")
                        yield from _text_of_line(text, text_field, counts, f"{path}:{n}")
        elif path.suffix == ".parquet":
            yield from _parquet_texts(path, text_field, counts, limit)
        elif path.suffix in _TEXT_SUFFIXES:
            if path.stat().st_size > limit:
                counts.skip("record_too_large", f"{path} ({path.stat().st_size:,} bytes)")
                return
            data = path.read_bytes()
            invalid = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))  # bytes not UTF-8
            if b"\x00" in data or invalid * 100 > len(data):
                counts.skip("binary", str(path))
            else:
                yield data.decode("utf-8-sig", errors="replace")
        else:
            counts.skip("unsupported_file", str(path))
    except (OSError, EOFError, ValueError) as err:  # a damaged .gz or parquet file; pyarrow's errors are ValueErrors
        counts.skip("file_unreadable", f"{path} ({type(err).__name__})")


def _parquet_texts(path: Path, text_field: str, counts: TextReadCounts, limit: int) -> Iterator[str]:
    """A parquet column's strings, row group by row group; a group whose footer says it is larger than
    ROW_GROUP_RECORDS records of `limit` bytes is skipped unread, a longer string after reading."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        counts.skip("no_text_field", f"{path} (no column {text_field!r})")
        return
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).total_byte_size
        if size > limit * ROW_GROUP_RECORDS:
            counts.skip("record_too_large", f"{path} row group {group} ({size:,} bytes)")
            continue
        for batch in parquet.iter_batches(row_groups=[group], columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and len(text) > limit:  # characters <= bytes: a lower bound
                    counts.skip("record_too_large", f"{path} row group {group} ({len(text):,} characters)")
                elif isinstance(text, str):
                    yield text


def _text_of_line(line: str, text_field: str, counts: TextReadCounts, where: str) -> Iterator[str]:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        counts.skip("bad_json", where)
        return
    if not isinstance(record, dict):
        counts.skip("not_an_object", where)
    elif not isinstance(record.get(text_field), str):
        counts.skip("no_text_field", where)
    else:
        yield record[text_field]


def _training_lines(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece learns from "sentences"; lines of documents keep code's indentation intact.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_text_tokenizer(
    texts: Iterable[str],
    layout: VocabLayout,
    *,
    character_coverage: float = 0.9999,
    max_sentences: int = 10_000_000,
    num_threads: int | None = None,
) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE whose pieces exactly fill the layout's text ids."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=layout.n_text + 1,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",  # whitespace and Unicode kept as written
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            character_coverage=character_coverage,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise TokenizerError(
            f"SentencePiece could not train {layout.n_text} text pieces ({layout.first_text_id} ids of the layout come "
            f"before them): {str(err).rstrip('.')}"
        ) from None
    return SentencePieceTokenizer(model.getvalue(), layout)


def layout_for(vocab_size: int | None, preset: str = "chameleon") -> VocabLayout:
    """The preset's layout with its total vocabulary size changed (text pieces fill the difference)."""
    if preset not in VOCAB_PRESETS:
        raise TokenizerError(f"unknown vocabulary layout {preset!r}; allowed: {', '.join(VOCAB_PRESETS)}")
    base = VOCAB_PRESETS[preset]
    if vocab_size is None:
        return base
    try:
        return validate_config(
            VocabLayout, base.model_dump() | {"vocab_size": vocab_size}, f"--vocab-size {vocab_size}"
        )
    except ConfigError as err:
        raise TokenizerError(str(err)) from None
