"""Generative text benchmarks: greedy answers scored by exact match, as lm-evaluation-harness scores GSM8K.

The answer is generated greedily (text ids only) until an `until` string appears or end-of-sequence, and cut at the
first `until` string, as lm-eval's `generate_until` does. Two of lm-eval's GSM8K filters pick the answer out of it:
"strict-match" (the number after "#### ") and "flexible-extract" (the last number anywhere); exact match then
compares it with the reference after removing commas, "$", everything up to "#### " and a final period, ignoring
case.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from model.evaluation.benchmarks.choice_scoring import hidden_states
from model.lm.transformer import Transformer

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default max_gen_toks
INVALID = "[invalid]"  # lm-eval's RegexFilter fallback
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORED = (",", "\\$", "(?s).*#### ", "\\.$")  # GSM8K's regexes_to_ignore, applied to answer and reference


def extract(response: str, pattern: re.Pattern[str], group_select: int) -> str:
    """lm-eval's RegexFilter: the `group_select`-th match (its first non-empty group), stripped; else INVALID."""
    found = pattern.findall(response)
    if not found:
        return INVALID
    match = found[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def strict_match(response: str) -> str:
    """GSM8K's "strict-match" answer: the number after "#### "."""
    return extract(response, STRICT, 0)


def flexible_extract(response: str) -> str:
    """GSM8K's "flexible-extract" answer: the last number in the response."""
    return extract(response, FLEXIBLE, -1)


def exact_match(prediction: str, reference: str, ignore: Sequence[str] = IGNORED, ignore_case: bool = True) -> bool:
    """lm-eval's exact_match: equal after removing every `ignore` regex from both (and lowercasing)."""
    for pattern in ignore:
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    return prediction == reference


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of each stop string in turn, as lm-eval cuts generations."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def greedy_generate(
    model: Transformer,
    prompt: Sequence[int],
    decode: Callable[[list[int]], str],
    until: Sequence[str] = (),
    stop_ids: Sequence[int] = (),
    max_new_tokens: int = DEFAULT_MAX_GEN_TOKS,
    excluded: torch.Tensor | None = None,
) -> str:
    """The greedy continuation of `prompt` (ids, BOS included), decoded and cut at the first `until` string.

    Stops at a `stop_ids` token, once an `until` string appears, or after `max_new_tokens`; `excluded` ids (image
    codes) are never chosen. A prompt longer than the context keeps its last tokens, as lm-eval does.
    """
    keep = model.config.max_seq_len - max_new_tokens
    if keep <= 0:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in a {model.config.max_seq_len} context")
    prompt = list(prompt)[-keep:]
    device = model.output.weight.device
    n = len(prompt)
    cache = model.make_cache(1, n + max_new_tokens)
    tokens = torch.tensor([prompt], device=device)
    positions = torch.arange(n, device=device)[None]
    mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None]
    generated: list[int] = []
    with torch.inference_mode():
        hidden = hidden_states(model, tokens, positions, mask, cache, 0)[:, -1]
        for step in range(max_new_tokens):
            logits = model.output(hidden).float()[0]
            if excluded is not None:
                logits[excluded] = float("-inf")
            token = int(logits.argmax())
            if token in stop_ids:
                break
            generated.append(token)
            if until and any(stop in decode(generated) for stop in until):
                break
            if step + 1 == max_new_tokens:
                break
            pos = n + step
            one = torch.tensor([[token]], device=device)
            key_mask = torch.ones(1, 1, pos + 1, dtype=torch.bool, device=device)
            hidden = hidden_states(model, one, torch.tensor([[pos]], device=device), key_mask, cache, pos)[:, -1]
    return cut_at(decode(generated), until)
