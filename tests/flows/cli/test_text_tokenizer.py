"""`cham text-tokenizer train|encode|decode` on the sample text."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from model.tokenizers.text_tokenizer import load_text_tokenizer
from tests.conftest import REPO

runner = CliRunner()


def test_train_encode_decode(tmp_path: Path) -> None:
    out = tmp_path / "tok"
    result = runner.invoke(
        app,
        [
            "text-tokenizer",
            "train",
            "--input",
            str(REPO / "sample/text/*.jsonl"),
            "--vocab-size",
            "2100",
            "--layout",
            "tiny",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2100 ids (1822 text pieces from id 278)" in result.output
    tokenizer = load_text_tokenizer(out)
    assert tokenizer.vocab.size == 2100

    text = "for x in range(10):\n    print(x)"
    result = runner.invoke(app, ["text-tokenizer", "encode", "--tokenizer", str(out), text])
    ids = [int(i) for i in result.output.split()]
    assert ids == tokenizer.encode(text)
    result = runner.invoke(app, ["text-tokenizer", "decode", "--tokenizer", str(out), *map(str, ids)])
    assert result.output == text + "\n"
    result = runner.invoke(app, ["text-tokenizer", "decode", "--tokenizer", str(out), str(tokenizer.vocab.size)])
    assert result.exit_code == 1 and "error: id 2100 is outside this tokenizer's vocabulary" in result.output

    result = runner.invoke(app, ["text-tokenizer", "encode", "--tokenizer", str(out)], input="from stdin")
    assert [int(i) for i in result.output.split()] == tokenizer.encode("from stdin")


def test_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    result = runner.invoke(app, ["text-tokenizer", "train", "--input", str(tmp_path / "none.jsonl"), "--out", "x"])
    assert result.exit_code == 1 and "error: input not found" in result.output
    result = runner.invoke(app, ["text-tokenizer", "encode", "--tokenizer", str(tmp_path), "hi"])
    assert result.exit_code == 1 and "no text tokenizer here" in result.output
    result = runner.invoke(
        app, ["text-tokenizer", "train", "--input", str(REPO / "sample/text"), "--layout", "huge", "--out", "x"]
    )
    assert result.exit_code == 1 and "unknown vocabulary layout 'huge'; allowed: chameleon, tiny" in result.output


def test_training_input_without_text_and_odd_bytes(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('not json\n{"body": "x"}\n')
    (tmp_path / "in" / "b.txt").write_bytes(b"\x00\x01binary" * 50)
    args = ["text-tokenizer", "train", "--input", str(tmp_path / "in"), "--layout", "tiny", "--vocab-size", "2100"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "tok")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "no text to train on in 2 files (field 'text'): 0 documents; skipped: bad_json 1 (first:" in text
    assert "binary 1" in text and "no_text_field 1" in text
    (tmp_path / "file").write_text("x")
    result = runner.invoke(
        app,
        [
            "text-tokenizer",
            "train",
            "--input",
            str(REPO / "sample/text/*.jsonl"),
            "--layout",
            "tiny",
            "--vocab-size",
            "2100",
            "--out",
            str(tmp_path / "file"),
        ],
    )
    assert result.exit_code == 1 and "a file is in the way" in result.output
    result = runner.invoke(
        app,
        [
            "text-tokenizer",
            "train",
            "--input",
            str(REPO / "sample/text/*.jsonl"),
            "--layout",
            "tiny",
            "--vocab-size",
            "2100",
            "--out",
            str(tmp_path / "tok"),
        ],
    )
    assert result.exit_code == 0 and "read 200 documents; skipped: none" in result.output
    stdin = runner.invoke(app, ["text-tokenizer", "encode", "--tokenizer", str(tmp_path / "tok")], input=b"\xff\xfe x")
    assert stdin.exit_code == 1 and "standard input is not UTF-8 text (invalid start byte at byte 0)" in stdin.output
