"""Log-likelihood of continuations as lm-evaluation-harness computes it, with each question's shared prompt run once.

lm-eval scores every (context, continuation) pair by a forward pass over context + continuation: for a 4-choice
question with a long few-shot prompt that is four passes over nearly the same tokens. Here the choices of one
question share their longest common token prefix, so one row holds that prefix once followed by every choice's own
tokens, under a mask where each choice sees the prefix and itself only and with positions continuing the prefix's:
the attention each token gets is exactly the one it gets in its own full sequence. Several questions run together,
one row each, right-padded.

Tokenisation is lm-eval's `_encode_pair`: trailing whitespace of the context moves to the continuation, the whole
string is encoded, and the continuation's tokens are the whole's after the context's own encoding; both begin with
BOS. Scores are the summed log-probabilities of the continuation tokens and whether each was the argmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from model.lm.transformer import KVCache, Transformer, rotary_angles


@dataclass(frozen=True)
class Encoded:
    """One request's tokens: `tokens` = context ids + continuation ids; the last `n_continuation` are scored."""

    tokens: tuple[int, ...]
    n_continuation: int

    @property
    def n_context(self) -> int:
        return len(self.tokens) - self.n_continuation


def encode_pair(encode: Callable[[str], list[int]], bos_id: int, context: str, continuation: str) -> Encoded:
    """lm-eval's `_encode_pair` with BOS: the continuation's ids are those of the whole string after the context's."""
    if not context:
        raise ValueError("an empty context: lm-eval scores those after its end-of-text token, which we do not")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = [bos_id, *encode(context + continuation)]
    n_context = 1 + len(encode(context))
    if n_context >= len(whole):
        raise ValueError(f"the continuation {continuation!r} adds no token to its context")
    return Encoded(tuple(whole), len(whole) - n_context)


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return n


def shared_prefix_length(group: Sequence[Encoded]) -> int:
    """Tokens a question's requests share and that precede every scored token (at least 1: BOS)."""
    return max(1, min(_common_prefix([r.tokens for r in group]), *(r.n_context for r in group)))


def hidden_states(
    model: Transformer,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache: KVCache | None = None,
    start_pos: int = 0,
) -> torch.Tensor:
    """Final hidden states [B, S, dim] of `tokens` (after the cached ones, given a cache) under an explicit attention
    mask [B, S, start_pos + S], boolean or additive (the model's own forward only builds causal masks); no logits are
    made here."""
    rope = rotary_angles(positions, model.config.head_dim, model.config.rope_theta)
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, positions, mask[:, None], cache, start_pos, rope=rope)
    return model.norm(h)


def _log_probs(model: Transformer, hidden: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
    """log_softmax over the vocabulary of the rows `hidden` [N, dim], in fp32, `excluded` ids given no mass."""
    logits = model.output(hidden).float()
    if excluded is not None:
        logits[:, excluded] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


def pack_group(
    group: Sequence[Encoded], causal: torch.Tensor | None = None
) -> tuple[list[int], list[int], torch.Tensor, list[list[int]]]:
    """One question as one row: its shared prefix once, then each choice's own tokens (all but the last, which
    predicts nothing scored), each choice's positions continuing the prefix's.

    Returns (tokens, positions, mask [L, L]: the prefix causal, each choice's tokens seeing the prefix and their own
    earlier tokens only, and per request the row of each scored token's prediction). `causal`: a lower-triangular
    boolean matrix at least L wide, made once for many groups.
    """
    p = shared_prefix_length(group)
    tokens, positions = list(group[0].tokens[:p]), list(range(p))
    spans = []
    for r in group:
        own = r.tokens[p:-1]
        spans.append((len(tokens), len(own)))
        tokens += own
        positions += range(p, p + len(own))
    n = len(tokens)
    if causal is None or causal.shape[0] < n:
        causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:p, :p] = causal[:p, :p]
    rows = []
    for r, (start, length) in zip(group, spans, strict=True):
        mask[start : start + length, :p] = True
        mask[start : start + length, start : start + length] = causal[:length, :length]
        # Token t of the request is predicted at position t - 1: the prefix's last row, or the choice's own.
        rows.append([p - 1 if t == p else start + (t - 1 - p) for t in range(r.n_context, len(r.tokens))])
    return tokens, positions, mask, rows


def score_batch(
    model: Transformer, groups: Sequence[Sequence[Encoded]], excluded: torch.Tensor | None = None
) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, greedy) of every request of each group, a group being one question's choices, in one
    forward pass: a row per question holding its shared prefix once and every choice's own tokens (`pack_group`).
    Rows are right-padded; padding sees itself only (a fully masked row's NaNs would leak into attention)."""
    device = model.output.weight.device
    longest = max(len(r.tokens) for g in groups for r in g)
    causal = torch.ones(longest, longest, dtype=torch.bool).tril()
    packed = [pack_group(g, causal) for g in groups]
    width = max(len(t) for t, _, _, _ in packed)
    tokens = torch.zeros(len(groups), width, dtype=torch.long)
    positions = torch.zeros(len(groups), width, dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(groups), 1, 1)
    for i, (t, pos, m, _) in enumerate(packed):
        tokens[i, : len(t)] = torch.tensor(t)
        positions[i, : len(t)] = torch.tensor(pos)
        allowed[i, : len(t), : len(t)] = m
    # An additive mask made once, not converted from booleans in every layer.
    dtype = model.output.weight.dtype
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    hidden = hidden_states(model, tokens.to(device), positions.to(device), mask.to(device))
    # Only the rows that predict a scored token go through the output layer (the vocabulary can be 65k wide).
    wanted = sorted({(i, row) for i, (_, _, _, rows) in enumerate(packed) for req in rows for row in req})
    index = {key: n for n, key in enumerate(wanted)}
    picked = hidden[torch.tensor([i for i, _ in wanted]), torch.tensor([row for _, row in wanted])]
    table = _log_probs(model, picked, excluded)
    source, targets, owner, counts = [], [], [], []
    for i, (group, (_, _, _, rows)) in enumerate(zip(groups, packed, strict=True)):
        for r, req_rows in zip(group, rows, strict=True):
            source += [index[(i, row)] for row in req_rows]
            targets += r.tokens[r.n_context :]
            owner += [len(counts)] * len(req_rows)
            counts.append(i)
    source_t, targets_t = torch.tensor(source, device=device), torch.tensor(targets, device=device)
    owner_t = torch.tensor(owner, device=device)
    token_lp = table[source_t, targets_t].double()
    misses = (table.argmax(-1)[source_t] != targets_t).long()
    totals = torch.zeros(len(counts), dtype=torch.float64, device=device).index_add_(0, owner_t, token_lp)
    missed = torch.zeros(len(counts), dtype=torch.long, device=device).index_add_(0, owner_t, misses)
    results: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for j, i in enumerate(counts):
        results[i].append((float(totals[j]), int(missed[j]) == 0))
    return results


def score_requests(
    model: Transformer,
    groups: Sequence[Sequence[Encoded]],
    excluded: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[tuple[float, bool]]]:
    """`score_batch` over all groups, `batch_size` groups at a time, longest prefixes first (less padding).

    A group longer than the model's context is left-truncated as lm-eval does it, each of its requests then run
    on its own (truncated requests share no prefix).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    limit = model.config.max_seq_len + 1  # lm-eval keeps the last max_length + 1 tokens, feeding all but the last
    units: list[tuple[int, int | None, list[Encoded]]] = []  # (group, request or None for all, requests)
    for g, group in enumerate(groups):
        if any(len(r.tokens) > limit for r in group):
            for k, r in enumerate(group):
                cut = r.tokens[-limit:]
                units.append((g, k, [Encoded(cut, min(r.n_continuation, len(cut) - 1))]))
        else:
            units.append((g, None, list(group)))
    order = sorted(range(len(units)), key=lambda u: -max(len(r.tokens) for r in units[u][2]))
    results: list[list[tuple[float, bool] | None]] = [[None] * len(g) for g in groups]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = [units[u] for u in order[start : start + batch_size]]
                scored = score_batch(model, [reqs for _, _, reqs in chunk], excluded)
                for (g, k, _), values in zip(chunk, scored, strict=True):
                    if k is None:
                        results[g] = list(values)
                    else:
                        results[g][k] = values[0]
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
