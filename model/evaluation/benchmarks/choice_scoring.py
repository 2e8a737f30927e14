"""Log-likelihood of continuations as lm-evaluation-harness computes it, with each question's shared prompt run once.

lm-eval scores every (context, continuation) pair by a forward pass over context + continuation: for a 4-choice
question with a long few-shot prompt that is four passes over nearly the same tokens. Here the choices of one
question share their longest common token prefix: it runs once per question and its keys and values are copied to
one cache row per choice, after which only each choice's own tokens run. Several questions run together: prefixes
left-padded to one length (padding masked out of attention), then every choice's suffix right-padded.

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
    cache: KVCache,
    start_pos: int,
) -> torch.Tensor:
    """Final hidden states [B, S, dim] of `tokens` after the cached ones, with an explicit attention mask
    [B, 1, S, start_pos + S] (the model's own forward only builds causal masks); no logits are made here."""
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


def score_batch(
    model: Transformer, groups: Sequence[Sequence[Encoded]], excluded: torch.Tensor | None = None
) -> list[list[tuple[float, bool]]]:
    """(log-likelihood, greedy) of every request of each group, a group being one question's choices, in one pass
    over the groups' shared prefixes and one over their choices' remaining tokens."""
    device = model.output.weight.device
    shared = [shared_prefix_length(g) for g in groups]
    width = max(shared)
    n_groups = len(groups)
    # Prefixes left-padded to `width`: real tokens see real tokens causally; padding sees only itself (never a
    # fully masked row, whose NaNs would leak through attention's weights-times-values).
    tokens = torch.zeros(n_groups, width, dtype=torch.long)
    positions = torch.zeros(n_groups, width, dtype=torch.long)
    real = torch.zeros(n_groups, width, dtype=torch.bool)
    for i, (group, p) in enumerate(zip(groups, shared, strict=True)):
        tokens[i, width - p :] = torch.tensor(group[0].tokens[:p])
        positions[i, width - p :] = torch.arange(p)
        real[i, width - p :] = True
    suffixes = [(i, r, r.tokens[p:-1]) for i, (g, p) in enumerate(zip(groups, shared, strict=True)) for r in g]
    longest = max(len(s) for _, _, s in suffixes)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool)[None]
    cache = model.make_cache(n_groups, width + longest)
    hidden = hidden_states(model, tokens.to(device), positions.to(device), mask.to(device), cache, 0)
    last = _log_probs(model, hidden[:, -1], excluded)  # predicts each group's first token after its prefix

    suffix_lp = None
    index: dict[tuple[int, int], int] = {}
    if longest:
        n_rows = len(suffixes)
        rows = torch.tensor([i for i, _, _ in suffixes], device=device)
        row_cache = model.make_cache(n_rows, width + longest)
        for layer in range(len(model.layers)):
            row_cache.keys[layer][:, :, :width] = cache.keys[layer][rows, :, :width]
            row_cache.values[layer][:, :, :width] = cache.values[layer][rows, :, :width]
        s_tokens = torch.zeros(n_rows, longest, dtype=torch.long)
        for j, (_, _, s) in enumerate(suffixes):
            s_tokens[j, : len(s)] = torch.tensor(s, dtype=torch.long)
        starts = torch.tensor([shared[i] for i, _, _ in suffixes])
        s_positions = starts[:, None] + torch.arange(longest)[None]
        prefix_keys = real[rows.cpu()][:, None, :].expand(n_rows, longest, width)
        s_mask = torch.cat(
            [prefix_keys, torch.ones(longest, longest, dtype=torch.bool).tril().expand(n_rows, -1, -1)], 2
        )
        s_hidden = hidden_states(
            model, s_tokens.to(device), s_positions.to(device), s_mask.to(device), row_cache, width
        )
        # Only the rows that predict a scored token go through the output layer (the vocabulary can be 65k wide).
        wanted = [(j, k) for j, (i, r, s) in enumerate(suffixes) for k in range(r.n_context - 1 - shared[i], len(s))]
        wanted = [(j, k) for j, k in wanted if k >= 0]
        index = {jk: n for n, jk in enumerate(wanted)}
        if wanted:
            picked = s_hidden[torch.tensor([j for j, _ in wanted]), torch.tensor([k for _, k in wanted])]
            suffix_lp = _log_probs(model, picked, excluded)

    # Every scored token, the log-prob row that predicts it (a prefix's last row or a suffix row) and its request.
    table = last if suffix_lp is None else torch.cat([last, suffix_lp])
    source, targets, owner = [], [], []
    for j, (i, r, _) in enumerate(suffixes):
        p = shared[i]
        for position in range(r.n_context - 1, len(r.tokens) - 1):  # position t predicts token t + 1
            source.append(i if position == p - 1 else n_groups + index[(j, position - p)])
            targets.append(r.tokens[position + 1])
            owner.append(j)
    source_t, targets_t = torch.tensor(source, device=device), torch.tensor(targets, device=device)
    owner_t = torch.tensor(owner, device=device)
    token_lp = table[source_t, targets_t].double()
    misses = (table.argmax(-1)[source_t] != targets_t).long()
    totals = torch.zeros(len(suffixes), dtype=torch.float64, device=device).index_add_(0, owner_t, token_lp)
    missed = torch.zeros(len(suffixes), dtype=torch.long, device=device).index_add_(0, owner_t, misses)
    results: list[list[tuple[float, bool]]] = [[] for _ in groups]
    for j, (i, _, _) in enumerate(suffixes):
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
