"""`cham text-tokenizer train|encode|decode`: thin shells over model/tokenizers/text_tokenizer.py."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.output import console, fail, output_folder

app = typer.Typer(help="Train and use the SentencePiece text tokenizer.", no_args_is_help=True)


@app.command()
def train(
    input: Annotated[list[str], typer.Option("--input", "-i", help="text files, jsonl, parquet, folders or globs")],
    out: Annotated[Path, typer.Option(help="folder to write the tokenizer into")],
    vocab_size: Annotated[int, typer.Option(help="total vocabulary, specials, reserved and image codes included")] = (
        65_536
    ),
    layout: Annotated[str, typer.Option(help="vocabulary layout preset: chameleon or tiny")] = "chameleon",
    text_field: Annotated[str, typer.Option(help="field (jsonl) or column (parquet) holding the text")] = "text",
    character_coverage: Annotated[float, typer.Option(help="share of characters covered by pieces")] = 0.9999,
) -> None:
    """Train a SentencePiece BPE whose pieces fill the layout's text ids exactly."""
    from model.tokenizers.text_tokenizer import (
        TextReadCounts,
        TokenizerError,
        expand_inputs,
        iter_texts,
        layout_for,
        train_text_tokenizer,
    )

    try:
        vocab_layout = layout_for(vocab_size, layout)
        files = expand_inputs(input)
    except TokenizerError as err:
        raise fail(str(err)) from None
    output_folder(out)  # before training, not after it
    counts = TextReadCounts()
    started = time.perf_counter()
    try:
        with console.status(f"training {vocab_layout.n_text} text pieces on {len(files)} files"):
            tokenizer = train_text_tokenizer(
                iter_texts(files, text_field, counts), vocab_layout, character_coverage=character_coverage
            )
    except TokenizerError as err:
        if counts.documents == 0:
            raise fail(
                f"no text to train on in {len(files)} files (field {text_field!r}): {counts.summary()}"
            ) from None
        raise fail(f"{err}; read {counts.summary()}") from None
    tokenizer.save(out)
    console.print(f"read {counts.summary()}")
    console.print(
        f"trained in {time.perf_counter() - started:.1f} s: {vocab_layout.vocab_size} ids "
        f"({vocab_layout.n_text} text pieces from id {vocab_layout.first_text_id}), "
        f"fingerprint {tokenizer.fingerprint}, written to {out}"
    )


@app.command()
def encode(
    tokenizer: Annotated[Path, typer.Option(help="a tokenizer folder or Meta's text_tokenizer.json")],
    text: Annotated[str | None, typer.Argument(help="the text; omit to read standard input")] = None,
) -> None:
    """Print the token ids of a text, space-separated."""
    from model.tokenizers.text_tokenizer import TokenizerError, load_text_tokenizer

    try:
        tok = load_text_tokenizer(tokenizer)
    except TokenizerError as err:
        raise fail(str(err)) from None
    if text is None:
        data = sys.stdin.buffer.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise fail(f"standard input is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # undecodable bytes in a command-line argument
        raise fail(f"the text is not valid Unicode at character {err.start}") from None
    print(" ".join(map(str, tok.encode(text))))


@app.command()
def decode(
    tokenizer: Annotated[Path, typer.Option(help="a tokenizer folder or Meta's text_tokenizer.json")],
    ids: Annotated[list[int], typer.Argument(help="token ids")],
) -> None:
    """Print the text of token ids."""
    from model.tokenizers.text_tokenizer import TokenizerError, load_text_tokenizer

    try:
        tok = load_text_tokenizer(tokenizer)
        text = tok.decode(ids)
    except (TokenizerError, ValueError) as err:
        raise fail(str(err)) from None
    sys.stdout.write(text + "\n")
