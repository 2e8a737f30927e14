"""The mixed-modal tokenizer: documents of text and image segments <-> one sequence of ids.

A document is `<s> segments </s>`; an image is BOI, its codes in row-major order, EOI. SFT samples are
`<s> prompt <reserved08706> answer </s>` with the loss on the answer only. The streaming detokenizer takes
ids one at a time and emits text as soon as it is complete and an image when its EOI arrives.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from model.tokenizers.text_tokenizer import TextTokenizer
from model.tokenizers.vocabulary import Modality


class ImageCodec(Protocol):
    """What the mixed-modal tokenizer needs of an image tokenizer (model/tokenizers/image_tokenizer.py provides it)."""

    def encode(self, images: Sequence[Any], mode: str = "crop") -> np.ndarray: ...  # [n, tokens_per_image] codes

    def decode(self, codes: np.ndarray) -> list[np.ndarray]: ...  # uint8 HxWx3 per image


@dataclass(frozen=True, eq=False)
class ImageSegment:
    """An image in a document: its VQ codes (row-major grid) and, once decoded, its pixels."""

    codes: np.ndarray
    pixels: np.ndarray | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageSegment) and np.array_equal(self.codes, other.codes)

    __hash__ = None  # type: ignore[assignment]


Segment = str | ImageSegment


class MixedModalTokenizer:
    """Text through the text tokenizer, images through the image codec, in one vocabulary."""

    def __init__(self, text: TextTokenizer, image: ImageCodec | None = None):
        self.text = text
        self.image = image
        self.vocab = text.vocab

    def _image_codes(self, images: list[Any], mode: str) -> list[np.ndarray]:
        raw = [i for i, im in enumerate(images) if not isinstance(im, ImageSegment)]
        codes: list[np.ndarray | None] = [im.codes if isinstance(im, ImageSegment) else None for im in images]
        if raw:
            if self.image is None:
                raise ValueError("this document has images but the tokenizer has no image tokenizer")
            for i, c in zip(raw, self.image.encode([images[i] for i in raw], mode=mode), strict=True):
                codes[i] = c
        return [np.asarray(c) for c in codes]  # type: ignore[arg-type]

    def encode_segments(self, segments: Sequence[Any], image_mode: str = "crop") -> np.ndarray:
        """Ids of text and image segments, without `<s>` / `</s>`; images are coded in one batch.

        `image_mode` is how raw images are fitted to the tokenizer's square: Chameleon's center "crop", or "pad".
        Consecutive text segments are encoded as given, with nothing put between them: callers join them first
        with the separator their format implies (pipelines/documents.py does for interleaved documents).
        """
        images = [s for s in segments if not isinstance(s, str)]
        image_codes = iter(self._image_codes(images, image_mode))
        texts = [s for s in segments if isinstance(s, str)]
        text_ids = iter(self.text.encode_batch(texts) if texts else [])
        parts = [next(text_ids) if isinstance(s, str) else self.vocab.image_block(next(image_codes)) for s in segments]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)

    def encode(self, segments: Sequence[Any], bos: bool = True, eos: bool = True) -> np.ndarray:
        """A whole document: `<s>` segments `</s>`."""
        body = self.encode_segments(segments)
        head = [self.vocab.bos_id] if bos else []
        tail = [self.vocab.eos_id] if eos else []
        return np.concatenate([head, body, tail]).astype(np.int32)

    def encode_sft(self, prompt: Sequence[Any], answer: Sequence[Any]) -> tuple[np.ndarray, int]:
        """`<s> prompt <sep> answer </s>` and the number of leading tokens excluded from the loss.

        SFT images are padded with white, not cropped, so nothing the prompt refers to is cut off.
        """
        head = np.concatenate([[self.vocab.bos_id], self.encode_segments(prompt, "pad"), [self.vocab.sep_id]])
        answer_ids = self.encode_segments(answer, "pad")
        ids = np.concatenate([head, answer_ids, [self.vocab.eos_id]]).astype(np.int32)
        return ids, len(head)

    def decode(self, ids: Iterable[int], decode_images: bool = True) -> list[Segment]:
        """Segments of a sequence of ids; `<s>`, `</s>`, `<pad>` and the SFT separator end text runs."""
        stream = StreamingDetokenizer(self, decode_images=decode_images)
        segments: list[Segment] = []
        for token_id in ids:
            segments += stream.push(int(token_id))
        segments += stream.finish()
        return _merge_text(segments)

    def stream(self, decode_images: bool = True) -> StreamingDetokenizer:
        """A detokenizer for ids arriving one at a time (generation)."""
        return StreamingDetokenizer(self, decode_images=decode_images)


def _merge_text(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for seg in segments:
        if isinstance(seg, str) and merged and isinstance(merged[-1], str):
            merged[-1] += seg
        elif not (isinstance(seg, str) and seg == ""):
            merged.append(seg)
    return merged


class StreamingDetokenizer:
    """Turns ids into text pieces as soon as they are complete, and images when their EOI arrives."""

    def __init__(self, tokenizer: MixedModalTokenizer, decode_images: bool = True):
        self.tok = tokenizer
        self.vocab = tokenizer.vocab
        self.decode_images = decode_images
        self._text: list[int] = []
        self._codes: list[int] | None = None  # set while inside an image
        self.position = 0

    def _flush_text(self, final: bool) -> list[Segment]:
        if not self._text:
            return []
        text = self.tok.text.decode(self._text)
        # A multi-byte character split across byte pieces decodes to U+FFFD until its last byte arrives.
        if text.endswith("\ufffd") and not final:
            return []
        self._text = []
        return [text] if text else []

    def push(self, token_id: int) -> list[Segment]:
        """Feed one id; return the segments it completes (often none)."""
        self.position += 1
        kind = self.vocab.modality(token_id)
        if self._codes is not None:
            if kind == Modality.IMAGE:
                if len(self._codes) == self.vocab.tokens_per_image:
                    raise ValueError(f"position {self.position}: more than {len(self._codes)} codes in one image")
                self._codes.append(token_id)
                return []
            if kind != Modality.EOI:
                raise ValueError(f"position {self.position}: id {token_id} ({kind.name}) inside an image")
            return [self._finish_image()]
        if kind == Modality.TEXT or token_id == self.vocab.unk_id:
            self._text.append(token_id)
            return self._flush_text(final=False)
        if kind == Modality.BOI:
            out = self._flush_text(final=True)
            self._codes = []
            return out
        if kind in (Modality.IMAGE, Modality.EOI):
            raise ValueError(f"position {self.position}: id {token_id} ({kind.name}) outside an image")
        # <s>, </s>, <pad>, reserved (the SFT separator): end the current text run.
        return self._flush_text(final=True)

    def _finish_image(self) -> ImageSegment:
        codes = self._codes or []
        self._codes = None
        if len(codes) != self.vocab.tokens_per_image:
            raise ValueError(
                f"position {self.position}: an image has {self.vocab.tokens_per_image} codes, got {len(codes)}"
            )
        grid = np.asarray(self.vocab.ids_to_codes(np.asarray(codes, dtype=np.int64)))
        pixels = None
        if self.decode_images and self.tok.image is not None:
            pixels = self.tok.image.decode(grid[None])[0]
        return ImageSegment(codes=grid, pixels=pixels)

    def finish(self) -> list[Segment]:
        """End of the stream: flush pending text; an image without its EOI is an error."""
        if self._codes is not None:
            raise ValueError(f"the ids end inside an image after {len(self._codes)} codes")
        return self._flush_text(final=True)
