"""Sampling one decoding step: guidance, repetition penalty, temperature, top-p and each row's own draw.

A step's rows that share one allowed set are sampled together (`sample_group`), over the allowed ids only: logits
of other ids would be -inf under the modality mask anyway. Draws are made on the CPU with one generator per prompt,
so a seed gives the same ids on any device and in any batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import torch


def guided_logits(full: torch.Tensor, img: torch.Tensor, unc: torch.Tensor, s_txt: float, s_img: float) -> torch.Tensor:
    """Meta's InstructPix2Pix-style guidance: u + s_img * (img - u) + s_txt * (full - img)."""
    return unc + s_img * (img - unc) + s_txt * (full - img)


class SeenIds:
    """The text ids a prompt has seen, for the repetition penalty (applied to those ids only, not all V)."""

    def __init__(self, ids: Iterable[int]):
        self.ids = set(ids)
        self._buffer = np.array(sorted(self.ids), dtype=np.int64)  # numpy: an append is no torch op per token
        self._count = len(self.ids)

    def add(self, token: int) -> None:
        if token in self.ids:
            return
        self.ids.add(token)
        if self._count == len(self._buffer):  # grow by doubling: appends stay amortised O(1)
            self._buffer = np.concatenate([self._buffer, np.empty(max(16, self._count), dtype=np.int64)])
        self._buffer[self._count] = token
        self._count += 1

    def array(self) -> np.ndarray:
        """The seen ids (each once, in no particular order)."""
        return self._buffer[: self._count]


def penalize_seen(scores: torch.Tensor, allowed_ids: torch.Tensor, seen: Sequence[SeenIds], penalty: float) -> None:
    """Meta's (CTRL's) repetition penalty, in place: in row r of scores [R, len(allowed_ids)], the logits of the ids
    `seen[r]` holds are divided by `penalty` when positive and multiplied when negative. `allowed_ids` (ascending)
    are the ids of the columns; seen ids that are not among them are left alone (they cannot be sampled)."""
    if not seen or penalty == 1.0:
        return
    flat = _seen_places(allowed_ids.numpy(), [s.array() for s in seen])
    if len(flat):
        flat = torch.from_numpy(flat)
        scores_flat = scores.view(-1)
        vals = scores_flat.index_select(0, flat)
        scores_flat.index_copy_(0, flat, torch.where(vals > 0, vals / penalty, vals * penalty))


def _seen_places(allowed: np.ndarray, seen: list[np.ndarray]) -> np.ndarray:
    """Flat indices into [rows, len(allowed)] of each row's seen ids among the (ascending) allowed ids, all rows in
    one search; seen ids that are not allowed here are left out."""
    ids = np.concatenate(seen)
    rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
    where = np.searchsorted(allowed, ids).clip(max=len(allowed) - 1)
    hit = allowed[where] == ids
    return where[hit] + rows[hit] * len(allowed)


def top_p_drop(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Bool [.., N]: the ids of probabilities [.., N] outside the smallest set of most likely ids whose probability
    reaches `top_p` (the most likely id always stays)."""
    ranked, order = probs.sort(dim=-1, descending=True)
    # Drop an id when the ids ranked above it already reach top_p.
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, (ranked.cumsum(-1) - ranked) >= top_p)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Index per row of unnormalised probabilities [R, N] by inverse CDF, one uniform number from each row's own
    generator: a row's draw does not depend on the other rows of the batch."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError("cannot sample: the model's logits are not finite (NaN or inf weights or activations?)")
    uniform = torch.cat([torch.rand(1, generator=g) for g in generators])[:, None]
    # right=True: the first id whose cumulative mass exceeds u·total, never an id of zero probability.
    return torch.searchsorted(cdf, uniform * total, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


def sample_rows(
    scores: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One index per row of scores [R, N]: argmax when temperature is 0, else temperature, top-p and a draw; all
    rows at once. The draw is made in id order, whatever the top-p sort did."""
    if temperature == 0:
        return scores.argmax(-1)
    probs = (scores.float() / temperature).softmax(-1)
    if top_p < 1.0:
        probs = probs.masked_fill(top_p_drop(probs, top_p), 0.0)
    return draw(probs, generators)


@lru_cache(maxsize=256)
def _row_index(rows: tuple[int, ...]) -> torch.Tensor:
    """A cached index tensor: the same few row lists recur every decoding step."""
    return torch.tensor(rows)


def sample_group(
    logits: torch.Tensor,
    rows: list[int],
    columns: torch.Tensor | None,
    allowed_ids: torch.Tensor,
    temperature: float,
    top_p: float,
    generators: Sequence[torch.Generator | None],
    guidance: tuple | None = None,
    seen: Sequence[SeenIds] = (),
    penalty: float = 1.0,
) -> list[int]:
    """Ids for `rows` of a step's logits that share one allowed set: guidance, penalty and sampling over the allowed
    ids only (the same as sampling the full rows with every other id masked), every row at once.

    `columns`: where the allowed ids (`allowed_ids`, ascending) are among the logits' columns (None: all of them,
    in order). `guidance` = (b, s_txt, s_img): row r is guided by rows r + b (image-only) and r + 2b (unconditional).
    """
    index = _row_index(tuple(rows))
    take = (lambda r: logits[r]) if columns is None else (lambda r: logits[r[:, None], columns[None, :]])
    scores = take(index)  # a copy: the penalty below may write into it
    if guidance is not None:
        b, s_txt, s_img = guidance
        scores = guided_logits(scores, take(index + b), take(index + 2 * b), s_txt, s_img)
    penalize_seen(scores, allowed_ids, seen, penalty)
    picked = sample_rows(scores, temperature, top_p, generators)
    return allowed_ids[picked].tolist()
