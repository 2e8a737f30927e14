"""Planning a stage of a mixture, without Beam: how many tokens each source gives (largest remainder), which of
its samples (faces drawn `face_weight` times as often, repetitions bounded), and in what order (greedy max-deficit
interleave, so every prefix of the stage keeps the target shares within one sample per source).

Everything is deterministic from the seed and the inputs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class MixPlanError(ValueError):
    """A mixture that cannot be built as specified (e.g. a budget needing more repetitions than allowed)."""


@dataclass(frozen=True)
class SampleRef:
    """One sample of a prepared source: where it is and what the plan needs to know about it."""

    shard: int
    key: str
    n_tokens: int
    has_face: bool
    category: str = ""  # SFT samples: their category, for category weights
    n_images: int = 0  # its image blocks (BOI, codes, EOI), for the stage's text : image proportion


@dataclass(frozen=True)
class SourcePlan:
    """What one source contributes to a stage."""

    name: str
    target_tokens: int
    samples: list[SampleRef]  # in draw order, repeats included
    next_draw: int = 0  # position in the source's endless draw order where a later stage goes on

    @property
    def realized_tokens(self) -> int:
        return sum(s.n_tokens for s in self.samples)


def apportion(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split `total` integer units in proportion to `weights` by largest remainder (ties broken by name)."""
    weight_sum = sum(weights.values())
    if weight_sum <= 0 or any(w < 0 for w in weights.values()):
        raise MixPlanError(f"weights must be >= 0 with a positive sum, got {dict(weights)}")
    quotas = {name: total * w / weight_sum for name, w in weights.items()}
    shares = {name: math.floor(q) for name, q in quotas.items()}
    left = total - sum(shares.values())
    for name in sorted(quotas, key=lambda n: (-(quotas[n] - shares[n]), n))[:left]:
        shares[name] += 1
    return shares


def _rng(seed: int, *parts: object) -> np.random.Generator:
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def weighted_pool(samples: Sequence[SampleRef], face_weight: float, rng: np.random.Generator) -> list[int]:
    """Indices of `samples` with each face sample present `face_weight` times (fractions by seeded coin flips)."""
    pool: list[int] = []
    whole, frac = int(face_weight), face_weight - int(face_weight)
    for i, sample in enumerate(samples):
        copies = (whole + (rng.random() < frac)) if sample.has_face else 1
        pool += [i] * copies
    return pool


def draw_source(
    name: str,
    samples: Sequence[SampleRef],
    target_tokens: int,
    face_weight: float,
    max_repetitions: float,
    seed: int,
    start: int = 0,
) -> SourcePlan:
    """Samples of one source, in draw order, until `target_tokens` are reached (the last one may overshoot).

    The draw order is endless: pass after pass over the source, each a fresh shuffle of the face-weighted pool, so
    faces come `face_weight` times as often. A stage draws from position `start` on, where the previous stage that
    used the source stopped, so a later stage sees the samples an earlier one left out before any repeat. More than
    `max_repetitions` passes' worth of tokens in one stage is an error naming the shortfall.
    """
    available = sum(s.n_tokens for s in samples)
    if target_tokens <= 0:
        return SourcePlan(name, target_tokens, [], start)
    if available == 0:
        raise MixPlanError(f"source {name!r} has no tokens, but the stage needs {target_tokens:,} from it")
    # Repetitions are tokens drawn over the source's own tokens (faces, drawn more often, repeat sooner).
    allowed = int(max_repetitions * available)
    if target_tokens > allowed:
        raise MixPlanError(
            f"source {name!r} needs {target_tokens:,} tokens but {max_repetitions:g} repetitions of its "
            f"{available:,} tokens give {allowed:,}: {target_tokens - allowed:,} tokens missing; add data, lower "
            f"its weight or raise max_repetitions"
        )
    pool = weighted_pool(samples, face_weight, _rng(seed, name, "pool"))
    if not any(samples[i].n_tokens for i in pool):  # face_weight < 1 can drop every (face) sample
        raise MixPlanError(f"source {name!r}: face_weight {face_weight:g} left no samples to draw from")
    drawn: list[SampleRef] = []
    tokens, position, epoch, order = 0, start, -1, np.empty(0, dtype=np.int64)
    while tokens < target_tokens:
        pass_number, j = divmod(position, len(pool))
        if pass_number != epoch:
            epoch, order = pass_number, _rng(seed, name, "epoch", pass_number).permutation(len(pool))
        sample = samples[pool[order[j]]]
        drawn.append(sample)
        tokens += sample.n_tokens
        position += 1
    return SourcePlan(name, target_tokens, drawn, position)


def interleave(counts: Mapping[str, int]) -> list[str]:
    """An order of sources with `counts[s]` slots each where every prefix stays within one of the exact shares.

    Tijdeman's chairman-assignment rule: among the sources whose next slot is open at step n ((taken_s + c) / share_s
    <= n), take the one whose next slot is due first ((taken_s + 1 - c) / share_s), with c = 1 / (2k - 2) for k
    sources; every prefix then deviates from share_s x n by at most 1 - c. (A plain greedy max-deficit can exceed 1
    with more than two sources.)
    """
    names = sorted(n for n, c in counts.items() if c > 0)
    total = sum(counts[n] for n in names)
    if total == 0:
        return []
    shares = np.array([counts[n] / total for n in names])
    c = 1 / (2 * len(names) - 2) if len(names) > 1 else 0.0
    remaining = np.array([counts[n] for n in names])
    taken = np.zeros(len(names))
    order = []
    for step in range(1, total + 1):
        open_now = ((taken + c) / shares <= step + 1e-9) & (remaining > 0)
        due = np.where(open_now if open_now.any() else remaining > 0, (taken + 1 - c) / shares, np.inf)
        pick = int(np.argmin(due))  # the first (by name) on ties: deterministic
        taken[pick] += 1
        remaining[pick] -= 1
        order.append(names[pick])
    return order


def image_tokens(sample: SampleRef, image_block: int) -> int:
    """Tokens of the sample's image blocks (BOI + codes + EOI each), never more than its tokens."""
    return min(sample.n_tokens, sample.n_images * image_block)


def image_share(samples: Sequence[SampleRef], image_block: int, face_weight: float = 1.0) -> float | None:
    """The share of image tokens in `samples` drawn as the planner draws them (faces `face_weight` times as often);
    None when they hold no tokens."""
    weight = [face_weight if s.has_face else 1.0 for s in samples]
    tokens = sum(w * s.n_tokens for w, s in zip(weight, samples, strict=True))
    if tokens <= 0:
        return None
    return sum(w * image_tokens(s, image_block) for w, s in zip(weight, samples, strict=True)) / tokens


def hold_image_share(weights: Mapping[str, float], shares: Mapping[str, float], target: float) -> dict[str, float]:
    """Weights whose token-weighted image share is `target`: the sources with more image tokens than the target
    scaled by one factor, those with fewer by another (relative weights within each group kept), the total weight
    unchanged. A MixPlanError when every weighted source is on the same side of the target (unattainable)."""
    tolerance = 1e-12
    rich = {n: w for n, w in weights.items() if w > 0 and shares[n] > target + tolerance}
    poor = {n: w for n, w in weights.items() if w > 0 and shares[n] < target - tolerance}
    if not rich and not poor:
        return dict(weights)
    if not rich or not poor:
        side = "above" if rich else "below"
        listed = ", ".join(f"{n} {shares[n]:.1%}" for n, w in sorted(weights.items()) if w > 0)
        raise MixPlanError(
            f"an image share of {target:.1%} is unattainable: every source's image share is {side} it ({listed}); "
            f"add a source with {'fewer' if rich else 'more'} image tokens than that"
        )
    excess = sum(w * (shares[n] - target) for n, w in rich.items())
    deficit = sum(w * (target - shares[n]) for n, w in poor.items())
    w_rich, w_poor = sum(rich.values()), sum(poor.values())
    a = (w_rich + w_poor) / (w_rich + w_poor * excess / deficit)  # a * excess == b * deficit, same total
    b = a * excess / deficit
    return {n: w * a if n in rich else w * b if n in poor else w for n, w in weights.items()}


def plan_stage(
    sources: Mapping[str, Sequence[SampleRef]],
    weights: Mapping[str, float],
    stage_tokens: int,
    face_weight: float,
    max_repetitions: Mapping[str, float],
    seed: int,
    starts: Mapping[str, int] | None = None,
) -> tuple[dict[str, SourcePlan], list[tuple[str, SampleRef]]]:
    """Per-source plans and the stage's interleaved sequence of (source, sample); `starts` are where earlier
    stages left each source's draw order (see `draw_source`)."""
    missing = sorted(set(weights) - set(sources))
    if missing:
        raise MixPlanError(f"no samples were read for sources {missing}")
    targets = apportion(stage_tokens, weights)
    plans = {
        name: draw_source(
            name, sources[name], targets[name], face_weight, max_repetitions[name], seed, (starts or {}).get(name, 0)
        )
        for name in sorted(weights)
    }
    order = interleave({name: len(p.samples) for name, p in plans.items()})
    cursors = dict.fromkeys(plans, 0)
    sequence = []
    for name in order:
        sequence.append((name, plans[name].samples[cursors[name]]))
        cursors[name] += 1
    return plans, sequence
