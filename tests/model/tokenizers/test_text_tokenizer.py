"""SentencePiece BPE trained on the sample text, in Chameleon's id space; Meta-style tokenizer.json loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.tokenizers.text_tokenizer import (
    HFTextTokenizer,
    SentencePieceTokenizer,
    TextReadCounts,
    TokenizerError,
    expand_inputs,
    iter_texts,
    layout_for,
    load_text_tokenizer,
    train_text_tokenizer,
)
from model.tokenizers.vocabulary import Modality, image_token_name
from schemas.vocab import TINY, reserved_token
from tests.conftest import REPO

SAMPLE_TEXT = REPO / "sample" / "text" / "docs.jsonl"


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(iter_texts([SAMPLE_TEXT]))


@pytest.fixture(scope="module")
def tokenizer(docs: list[str]) -> SentencePieceTokenizer:
    return train_text_tokenizer(docs, TINY)


def test_vocabulary_is_exactly_the_layout(tokenizer: SentencePieceTokenizer, docs: list[str]) -> None:
    ids = np.concatenate(tokenizer.encode_batch(docs))
    assert ids.min() >= TINY.first_text_id and ids.max() < TINY.vocab_size
    assert (tokenizer.vocab.modalities(ids) == Modality.TEXT).all()
    # Most of the text range is actually used on the corpus it was trained on.
    assert len(np.unique(ids)) > 0.5 * TINY.n_text


def test_round_trip_on_every_sample_document(tokenizer: SentencePieceTokenizer, docs: list[str]) -> None:
    for doc in docs:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_decode_inverts_encode_for_any_string(text: str) -> None:
    tokenizer = _shared_tokenizer()
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab.unk_id not in ids  # byte fallback: never <unk>


_CACHE: dict[str, SentencePieceTokenizer] = {}


def _shared_tokenizer() -> SentencePieceTokenizer:
    # Hypothesis forbids function-scoped fixtures; train once per module.
    if "tok" not in _CACHE:
        _CACHE["tok"] = train_text_tokenizer(iter_texts([SAMPLE_TEXT]), TINY)
    return _CACHE["tok"]


def test_digits_split_and_whitespace_kept(tokenizer: SentencePieceTokenizer) -> None:
    assert [tokenizer.decode([i]) for i in tokenizer.encode("2024")] == ["2", "0", "2", "4"]
    for text in ["def f(x):\n    return x\n", "a  b", "a b", "\t\tx", "x   \n\n  y", "\u2581", "a\u2581b"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("a  b") != tokenizer.encode("a b")


def test_batch_encode_equals_single_encode(tokenizer: SentencePieceTokenizer, docs: list[str]) -> None:
    texts = [*docs[:50], "x\u2581y", "", "\x00"]
    for one, many in zip(texts, tokenizer.encode_batch(texts, num_threads=2), strict=True):
        assert many.dtype == np.int32
        assert many.tolist() == tokenizer.encode(one)


def test_save_load_and_fingerprint(tokenizer: SentencePieceTokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path / "tok")
    loaded = load_text_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.fingerprint == tokenizer.fingerprint
    assert loaded.encode("Hello, world!") == tokenizer.encode("Hello, world!")
    other_layout = layout_for(2_100, "tiny")
    retrained = train_text_tokenizer(list(iter_texts([SAMPLE_TEXT])), other_layout)
    assert retrained.fingerprint != tokenizer.fingerprint
    assert retrained.vocab.size == 2_100


def test_decode_refuses_image_ids_and_skips_specials(tokenizer: SentencePieceTokenizer) -> None:
    ids = tokenizer.encode("cat")
    assert tokenizer.decode([0, *ids, 2]) == "cat"
    with pytest.raises(ValueError, match=r"id 4 \(IMGIMGAZ\) is not text"):
        tokenizer.decode([4, *ids])
    for outside in (tokenizer.vocab.size, -1):
        with pytest.raises(ValueError, match=rf"id {outside} is outside this tokenizer's vocabulary \(ids 0..2047\)"):
            tokenizer.decode([*ids, outside])


def test_vocab_too_large_for_the_text_fails_clearly() -> None:
    with pytest.raises(TokenizerError, match="could not train 65258 text pieces"):
        train_text_tokenizer(["just a few words"] * 10, layout_for(65_536, "tiny"))


def test_bad_tokenizer_paths(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no text tokenizer here"):
        load_text_tokenizer(tmp_path)
    (tmp_path / "text_tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"vocab_layout\.json is missing"):
        load_text_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="input not found"):
        expand_inputs([str(tmp_path / "*.jsonl")])


def test_inputs_from_jsonl_parquet_and_txt(sample_data, tmp_path: Path) -> None:
    out, _ = sample_data
    (tmp_path / "a.txt").write_text("plain text file\nsecond line")
    files = expand_inputs([str(out / "text"), str(tmp_path / "*.txt")])
    assert [f.suffix for f in files] == [".parquet", ".jsonl", ".jsonl", ".txt"]
    texts = list(iter_texts(files))
    assert len(texts) == 200 + 1 and texts[-1] == "plain text file\nsecond line"


def _meta_style_tokenizer_json(path: Path) -> Path:
    """A small tokenizer.json laid out like Meta's: specials, IMGIMG codes, <eoss>, <racm3:break>, reserved, BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>", *(image_token_name(c) for c in range(256)), "<eoss>", "<racm3:break>"]
    specials += [reserved_token(i) for i in range(262, 278)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(iter_texts([SAMPLE_TEXT]), trainer)
    tok.save(str(path))
    return path


def test_meta_style_tokenizer_json_behind_the_same_interface(tmp_path: Path) -> None:
    hf = load_text_tokenizer(_meta_style_tokenizer_json(tmp_path / "text_tokenizer.json"))
    assert isinstance(hf, HFTextTokenizer)
    assert (hf.vocab.eoi_id, hf.vocab.boi_id, hf.vocab.first_text_id) == (260, 261, 278)
    text = "Lists are mutable sequences.\n  x = [1, 2]"
    ids = hf.encode(text)
    assert min(ids) >= 278 and hf.decode(ids) == text
    assert [a.tolist() for a in hf.encode_batch([text, "ok"])] == [ids, hf.encode("ok")]
    with pytest.raises(ValueError, match="is not text"):
        hf.decode([hf.vocab.boi_id, *ids])
    with pytest.raises(ValueError, match=f"id {hf.vocab.size} is outside"):
        hf.decode([*ids, hf.vocab.size])


def test_meta_style_tokenizer_keeps_control_token_names_in_text_as_text(tmp_path: Path) -> None:
    hf = load_text_tokenizer(_meta_style_tokenizer_json(tmp_path / "text_tokenizer.json"))
    text = "quoting <racm3:break> then </s> and <pad> and " + image_token_name(3) + " and <reserved00270>"
    for ids in (hf.encode(text), hf.encode_batch([text])[0].tolist()):
        assert min(ids) >= hf.vocab.first_text_id  # no BOI, EOS, pad, image code or reserved id from typed text
        assert hf.decode(ids) == text


def test_tokenizer_json_with_wrong_layout_is_refused(tmp_path: Path) -> None:
    path = _meta_style_tokenizer_json(tmp_path / "t.json")
    data = json.loads(path.read_text())
    for token in data["added_tokens"]:
        if token["content"] == "<eoss>":
            token["content"] = "<eoi>"
    data["model"]["vocab"]["<eoi>"] = data["model"]["vocab"].pop("<eoss>")
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="expected <eoss> and <racm3:break> right after the 256 image tokens"):
        HFTextTokenizer(path)


def test_unreadable_records_and_files_are_skipped_and_counted(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text('[1, 2]\n{"text": 5}\nnot json\n{"text": "good one"}\n\n{"body": "x"}\n')
    (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 4)  # binary: NULs and invalid UTF-8
    (tmp_path / "c.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp_path / "d.csv").write_text("text\nhello\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    (tmp_path / "f.txt").write_text("caf\u00e9 text \ufffd\n")  # a real U+FFFD is text, not a sign of binary
    (tmp_path / "g.txt").write_bytes(b"latin-1 caf\xe9" + b" plain" * 20)  # one invalid byte in 130: kept
    counts = TextReadCounts()
    texts = list(iter_texts(sorted(tmp_path.iterdir()), counts=counts))
    assert texts == ["good one", "caf\u00e9 text \ufffd\n", "latin-1 caf\ufffd" + " plain" * 20]
    assert counts.documents == 3
    assert counts.skipped == {
        "not_an_object": 1,
        "no_text_field": 3,
        "bad_json": 1,
        "binary": 1,
        "file_unreadable": 1,
        "unsupported_file": 1,
    }
    assert counts.first["bad_json"] == f"{tmp_path / 'a.jsonl'}:3"
    assert counts.first["file_unreadable"] == f"{tmp_path / 'c.jsonl.gz'} (BadGzipFile)"
    assert "3 documents; skipped: bad_json 1 (first: " in counts.summary()


def test_damaged_tokenizer_files_and_bad_sizes_are_one_line(tokenizer: SentencePieceTokenizer, tmp_path: Path) -> None:
    folder = tokenizer.save(tmp_path / "tok")
    model = (folder / "text_tokenizer.model").read_bytes()
    (folder / "text_tokenizer.model").write_bytes(model[:300])
    with pytest.raises(TokenizerError, match=r"text_tokenizer\.model: damaged or not a SentencePiece model"):
        load_text_tokenizer(folder)
    (folder / "text_tokenizer.model").write_bytes(model)
    (folder / "vocab_layout.json").write_text('{"vocab_size": "many"}')
    with pytest.raises(TokenizerError, match=r"vocab_layout\.json: vocab_size: Input should be a valid integer"):
        load_text_tokenizer(folder)
    (folder / "vocab_layout.json").write_text('{"vocab_size": ')
    with pytest.raises(TokenizerError, match=r"vocab_layout\.json: not valid JSON"):
        load_text_tokenizer(folder)
    with pytest.raises(TokenizerError, match=r"^--vocab-size 279: vocab_size 279 leaves 1 text ids"):
        layout_for(279, "tiny")
    with pytest.raises(TokenizerError, match=r"^--vocab-size -5: vocab_size: Input should be greater than 0"):
        layout_for(-5, "tiny")


def test_training_inputs_walk_link_loops_once_and_count_dangling_links(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("first")
    (data / "sub" / "b.txt").write_text("second")
    (data / "sub" / "loop").symlink_to(data, target_is_directory=True)  # a cycle: glob.glob lists files again per level
    (data / "sub" / "gone.txt").symlink_to(tmp_path / "deleted.txt")
    for patterns in ([f"{data}/**/*.txt"], [str(data)], [str(data), f"{data}/sub/loop/a.txt"]):
        files = expand_inputs(patterns)
        counts = TextReadCounts()
        assert sorted(iter_texts(files, counts=counts)) == ["first", "second"], patterns
        assert dict(counts.skipped) == {"file_unreadable": 1} and "gone.txt" in counts.first["file_unreadable"]


def test_training_inputs_skip_records_over_the_size_limit_unread(tmp_path: Path) -> None:
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    huge = json.dumps({"text": "x" * 5000})
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(f'{{"text": "short"}}\n{huge}\n{{"text": "after"}}\n')
    (tmp_path / "b.txt").write_text("y" * 2000)
    (tmp_path / "c.txt").write_text("small file")
    pq.write_table(pa.table({"text": ["row", "z" * 3000]}), tmp_path / "d.parquet")
    counts = TextReadCounts()
    texts = list(iter_texts(expand_inputs([str(tmp_path)]), counts=counts, max_record_bytes=1024))
    assert texts == ["short", "after", "small file", "row"]
    assert dict(counts.skipped) == {"record_too_large": 3}
    assert counts.first["record_too_large"].endswith("a.jsonl.gz:2 (5,013 bytes)")
