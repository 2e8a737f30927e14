"""Caption metrics as coco-caption (pycocoevalcap) computes them: CIDEr-D and corpus BLEU-1..4.

Both take, per image, the reference captions and one candidate caption, tokenised as coco-caption does
(`caption_tokenizer.tokenize_caption`) unless `tokenize=False` says they are already token strings. Values are on
coco-caption's scale (CIDEr-D about 0 to 10, usually below 2; papers print it x100). Checked against pycocoevalcap 1.2
on the same inputs: tests/model/evaluation/benchmarks/fixtures/reference.json.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

from model.evaluation.benchmarks.caption_tokenizer import tokenize_caption

K = TypeVar("K", bound=Hashable)
Ngrams = Counter[tuple[str, ...]]
_TINY, _SMALL = 1e-15, 1e-9  # coco-caption's BLEU smoothing: a zero count scores 0 without dividing by zero


def ngram_counts(sentence: str, n: int = 4) -> Ngrams:
    """Counts of every 1..n-gram of a space-separated token string."""
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _prepare(
    references: Mapping[K, Sequence[str]], candidates: Mapping[K, str], tokenize: bool
) -> tuple[list[K], dict[K, list[str]], dict[K, str]]:
    keys = list(references)
    if set(keys) != set(candidates):
        missing, extra = set(keys) - set(candidates), set(candidates) - set(keys)
        raise ValueError(
            f"candidates and references are for different images ({len(missing)} without a candidate, e.g. "
            f"{sorted(map(str, missing))[:3]}; {len(extra)} without references, e.g. {sorted(map(str, extra))[:3]})"
        )
    empty = [k for k in keys if not references[k]]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption, e.g. {empty[0]!r}")
    prep = tokenize_caption if tokenize else str
    refs = {k: [prep(r) for r in references[k]] for k in keys}
    return keys, refs, {k: prep(candidates[k]) for k in keys}


def _tf_idf(counts: Ngrams, df: Counter, log_images: float, n: int) -> tuple[list[dict], list[float], int]:
    """Per n-gram order: the tf-idf vector and its norm; and the length coco-caption's penalty uses.

    That length counts the bigrams (coco-caption's `if n == 1` tests the 0-based order), i.e. words - 1.
    """
    vectors: list[dict] = [{} for _ in range(n)]
    norms = [0.0] * n
    for gram, tf in counts.items():
        weight = tf * (log_images - math.log(max(1.0, df[gram])))  # unseen n-grams: document frequency 1
        vectors[len(gram) - 1][gram] = weight
        norms[len(gram) - 1] += weight * weight
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vectors, [math.sqrt(x) for x in norms], length


def cider_d(
    references: Mapping[K, Sequence[str]],
    candidates: Mapping[K, str],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> tuple[float, dict[K, float]]:
    """CIDEr-D over a corpus and per image: tf-idf n-gram vectors (idf from the references of all the images),
    candidate weights clipped at the reference's, cosine per order 1..n times a Gaussian length penalty, averaged over
    orders and references, x10. Returns (corpus mean, {image: score})."""
    keys, refs, cands = _prepare(references, candidates, tokenize)
    ref_counts = {k: [ngram_counts(r, n) for r in refs[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        df.update({gram for counts in ref_counts[k] for gram in counts})
    log_images = math.log(len(keys))
    scores: dict[K, float] = {}
    for k in keys:
        vec, norm, length = _tf_idf(ngram_counts(cands[k], n), df, log_images, n)
        total = [0.0] * n
        for counts in ref_counts[k]:
            vec_ref, norm_ref, length_ref = _tf_idf(counts, df, log_images, n)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for order in range(n):
                dot = sum(
                    min(w, vec_ref[order].get(g, 0.0)) * vec_ref[order].get(g, 0.0) for g, w in vec[order].items()
                )
                if norm[order] != 0 and norm_ref[order] != 0:
                    dot /= norm[order] * norm_ref[order]
                total[order] += dot * penalty
        scores[k] = sum(total) / n / len(refs[k]) * 10.0
    return sum(scores.values()) / len(scores), scores


def _bleu_from(correct: Sequence[float], guess: Sequence[float], test_len: float, ref_len: float) -> list[float]:
    """BLEU-1..n from clipped matches and candidate n-gram counts, with the brevity penalty."""
    out, product = [], 1.0
    for k, (c, g) in enumerate(zip(correct, guess, strict=True)):
        product *= (c + _TINY) / (g + _SMALL)
        out.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        out = [b * math.exp(1 - 1 / ratio) for b in out]
    return out


def bleu(
    references: Mapping[K, Sequence[str]], candidates: Mapping[K, str], n: int = 4, tokenize: bool = True
) -> tuple[list[float], dict[K, list[float]]]:
    """Corpus BLEU-1..n as coco-caption's scorer: clipped n-gram matches and candidate n-grams summed over the corpus,
    the reference length of each image the one closest to its candidate's (the shorter on a tie), one brevity penalty
    for the corpus. Returns (corpus [BLEU-1..n], {image: [BLEU-1..n]})."""
    keys, refs, cands = _prepare(references, candidates, tokenize)
    correct, guess = [0] * n, [0] * n
    test_total = ref_total = 0
    per_image: dict[K, list[float]] = {}
    for k in keys:
        max_ref: Counter = Counter()
        for r in refs[k]:
            max_ref |= ngram_counts(r, n)  # the most times each n-gram occurs in one reference
        words = cands[k].split()
        test_len = len(words)
        ref_len = min((abs(len(r.split()) - test_len), len(r.split())) for r in refs[k])[1]
        got = [0] * n
        for gram, count in ngram_counts(cands[k], n).items():
            got[len(gram) - 1] += min(count, max_ref[gram])
        tried = [max(0, test_len - order) for order in range(n)]
        per_image[k] = _bleu_from(got, tried, test_len, ref_len)
        correct = [a + b for a, b in zip(correct, got, strict=True)]
        guess = [a + b for a, b in zip(guess, tried, strict=True)]
        test_total, ref_total = test_total + test_len, ref_total + ref_len
    return _bleu_from(correct, guess, test_total, ref_total), per_image


def score_captions(
    references: Mapping[K, Sequence[str]], candidates: Mapping[K, str], tokenize: bool = True
) -> dict[str, Any]:
    """CIDEr-D and BLEU-1..4 of a corpus, with the per-image CIDEr-D and BLEU-4."""
    cider, cider_each = cider_d(references, candidates, tokenize=tokenize)
    bleus, bleu_each = bleu(references, candidates, tokenize=tokenize)
    return {
        "cider": cider,
        "bleu_4": bleus[3],
        "bleu": bleus,
        "per_image": {k: {"cider": cider_each[k], "bleu_4": bleu_each[k][3]} for k in cider_each},
    }
