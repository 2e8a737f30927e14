"""One prompt in, one response out: encode text and images, sample with the Generator, decode as it streams."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from model.generation.generator import Generator, stream_segments
from model.generation.inference import InferenceModel
from model.tokenizers.mixed_tokenizer import MixedModalTokenizer, Segment
from schemas.generate_config import GenerationMode


class PromptError(ValueError):
    """A prompt that cannot be answered: too long, images without an image tokenizer, no room for an image."""


@dataclass
class Response:
    """What came back for one prompt."""

    segments: list[Segment]
    prompt_tokens: int
    new_tokens: int
    seconds: float


def encode_prompt(tokenizer: MixedModalTokenizer, segments: Sequence[Any], chat: bool) -> list[int]:
    """`<s> segments` for a pretrained model; `<s> segments <sep>` (images padded, as in SFT data) for a chat one."""
    if any(not isinstance(s, str) for s in segments) and tokenizer.image is None:
        raise PromptError("the prompt has images but no image tokenizer was found for this checkpoint")
    for text in (s for s in segments if isinstance(s, str)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # lone surrogates: undecodable bytes on a command line, or JSON "\\ud800"
            raise PromptError(
                f"the prompt's text is not valid Unicode at character {err.start} ({text[err.start]!r}: {err.reason})"
            ) from None
    body = tokenizer.encode_segments(segments, "pad" if chat else "crop").tolist()
    vocab = tokenizer.vocab
    return [vocab.bos_id, *body, *([vocab.sep_id] if chat else [])]


def room_for(loaded: InferenceModel, prompt_len: int, mode: GenerationMode, max_new_tokens: int) -> int:
    """max_new_tokens cut to what the model's context leaves; a PromptError when it leaves too little."""
    room = loaded.config.max_seq_len - prompt_len
    need = loaded.vocab.tokens_per_image + 2 if mode == "image" else 1
    if room < need:
        raise PromptError(
            f"the prompt has {prompt_len} tokens; the model's context of {loaded.config.max_seq_len} "
            f"leaves {max(room, 0)} for the response ({mode} mode needs at least {need})"
        )
    return min(max_new_tokens, room)


def respond_batch(
    loaded: InferenceModel,
    generator: Generator,
    prompts: Sequence[Sequence[Any]],
    mode: GenerationMode,
    max_new_tokens: int,
    seeds: Sequence[int],
    chat: bool | None = None,
) -> list[Response]:
    """Answer several prompts decoded together, each with its own seed: the responses of `respond` one by one, up to
    floating-point rounding (a padded row sums in another order, which can flip a near-tie).

    A prompt whose context leaves fewer than `max_new_tokens` is answered alone (a shared budget would cut the
    others short). Each response's `seconds` is its share of its batch's time.
    """
    chat = loaded.sft if chat is None else chat
    ids = [encode_prompt(loaded.tokenizer, segments, chat) for segments in prompts]
    budgets = [room_for(loaded, len(p), mode, max_new_tokens) for p in ids]
    together = [i for i, budget in enumerate(budgets) if budget == max_new_tokens]
    batches = [together] if together else []
    batches += [[i] for i, budget in enumerate(budgets) if budget < max_new_tokens]
    responses: list[Response | None] = [None] * len(ids)
    for batch in batches:
        started = time.perf_counter()
        new = generator.generate([ids[i] for i in batch], mode, budgets[batch[0]], seeds=[seeds[i] for i in batch])
        share = (time.perf_counter() - started) / len(batch)
        for i, out in zip(batch, new, strict=True):
            segments = list(stream_segments(loaded.tokenizer, iter(out)))
            responses[i] = Response(segments, len(ids[i]), len(out), share)
    return [r for r in responses if r is not None]


def respond(
    loaded: InferenceModel,
    generator: Generator,
    segments: Sequence[Any],
    mode: GenerationMode,
    max_new_tokens: int,
    seed: int,
    chat: bool | None = None,
    on_segment: Callable[[Segment], None] | None = None,
) -> Response:
    """Answer one prompt; `on_segment` sees each text piece and finished image as it is decoded.

    `chat` defaults to whether the checkpoint was fine-tuned (SFT).
    """
    chat = loaded.sft if chat is None else chat
    ids = encode_prompt(loaded.tokenizer, segments, chat)
    budget = room_for(loaded, len(ids), mode, max_new_tokens)
    count = 0

    def counted() -> Iterator[int]:
        nonlocal count
        for token in generator.stream(ids, mode=mode, max_new_tokens=budget, seed=seed):
            count += 1
            yield token

    started = time.perf_counter()
    out: list[Segment] = []
    for segment in stream_segments(loaded.tokenizer, counted()):
        out.append(segment)
        if on_segment is not None:
            on_segment(segment)
    return Response(out, len(ids), count, time.perf_counter() - started)
