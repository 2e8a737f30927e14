"""CIDEr-D, BLEU and the caption tokenizer against pycocoevalcap's outputs on the same inputs (fixtures/reference.json,
written by fixtures/make_reference.py), and on values worked by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from model.evaluation.benchmarks.caption_tokenizer import tokenize_caption
from model.evaluation.benchmarks.captioning_metrics import bleu, cider_d, ngram_counts, score_captions

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parents[3] / "sample" / "eval"
REFERENCE = json.loads((HERE / "fixtures" / "reference.json").read_text())["captioning"]


@pytest.mark.parametrize("case", REFERENCE["tokenizer"], ids=lambda c: c["raw"][:30])
def test_tokenizer_matches_the_java_ptb_tokenizer(case: dict) -> None:
    assert tokenize_caption(case["raw"]) == case["tokenized"]


def test_tokenizer_rules_on_known_sentences() -> None:
    assert tokenize_caption("A man's dog doesn't like (the) cat.") == "a man 's dog does n't like -lrb- the -rrb- cat"
    assert (
        tokenize_caption("U.S. flag, 3,000 people at 5:30 p.m.; cannot")
        == "u.s. flag 3,000 people at 5:30 p.m. can not"
    )
    assert tokenize_caption('"Quoted" words -- and... end!') == "quoted words and end"


def test_scorers_match_pycocoevalcap_on_pretokenised_cases() -> None:
    ref = REFERENCE["pretokenized"]
    references = {k: v[1] for k, v in ref["cases"].items()}
    candidates = {k: v[0] for k, v in ref["cases"].items()}
    cider, per_image = cider_d(references, candidates, tokenize=False)
    assert cider == pytest.approx(ref["cider"], rel=1e-12)
    assert per_image == pytest.approx(ref["cider_per_image"], rel=1e-12, abs=1e-15)
    corpus, bleu_each = bleu(references, candidates, tokenize=False)
    assert corpus == pytest.approx(ref["bleu"], rel=1e-12)
    assert {k: v[3] for k, v in bleu_each.items()} == pytest.approx(ref["bleu4_per_image"], rel=1e-9, abs=1e-15)


def sample_captions() -> tuple[dict[str, list[str]], dict[str, str]]:
    annotations = json.loads((SAMPLE / "coco_captions.json").read_text())["annotations"]
    references: dict[str, list[str]] = {}
    for a in annotations:
        references.setdefault(str(a["image_id"]), []).append(a["caption"])
    results = json.loads((SAMPLE / "coco_results_example.json").read_text())
    return references, {str(r["image_id"]): r["caption"] for r in results}


def test_raw_captions_score_as_pycocoevalcap_with_its_java_tokenizer() -> None:
    ref = REFERENCE["sample"]
    scores = score_captions(*sample_captions())
    assert scores["cider"] == pytest.approx(ref["cider"], rel=1e-12)
    assert scores["bleu"] == pytest.approx(ref["bleu"], rel=1e-12)
    assert scores["bleu_4"] == scores["bleu"][3]
    assert {k: v["cider"] for k, v in scores["per_image"].items()} == pytest.approx(ref["cider_per_image"], rel=1e-12)
    assert {k: v["bleu_4"] for k, v in scores["per_image"].items()} == pytest.approx(ref["bleu4_per_image"], rel=1e-9)


def test_cider_d_worked_by_hand() -> None:
    # Two images, one reference each. Image x: candidate = reference = "a b" (1 bigram, penalty 1). Unigrams "a" and
    # "b" occur in x's reference only (df 1, idf log 2), so the unigram cosine is 1, and so is the bigram one; the
    # 3- and 4-gram vectors are empty (cosine 0). Score = (1 + 1 + 0 + 0) / 4 * 10 = 5.
    # Image y: candidate "c c" vs reference "c d": the candidate's unigram weight 2*log2 is clipped at the reference's
    # log2; unigram cosine = (log2 * log2) / (2 log2 * sqrt(2) log2) = 1/(2 sqrt 2); bigram "c c" is not in the
    # reference (0); lengths are equal. Score = 1/(2 sqrt 2) / 4 * 10.
    cider, per_image = cider_d({"x": ["a b"], "y": ["c d"]}, {"x": "a b", "y": "c c"}, tokenize=False)
    assert per_image["x"] == pytest.approx(5.0)
    assert per_image["y"] == pytest.approx(10 / (8 * math.sqrt(2)))
    assert cider == pytest.approx((per_image["x"] + per_image["y"]) / 2)


def test_cider_d_length_penalty_and_clipping() -> None:
    refs = {"x": ["a cat on a mat"], "y": ["a dog in the park"]}
    _, exact = cider_d(refs, {"x": "a cat on a mat", "y": "a dog in the park"}, tokenize=False)
    _, repeated = cider_d(refs, {"x": "cat cat cat cat cat", "y": "a dog in the park"}, tokenize=False)
    _, longer = cider_d(refs, {"x": "a cat on a mat " + "on a mat " * 4, "y": "a dog in the park"}, tokenize=False)
    assert exact["x"] > longer["x"] > 0 and repeated["x"] < exact["x"]
    # 12 more bigrams: the Gaussian penalty exp(-12^2 / 72) bounds the score
    assert longer["x"] <= exact["x"] * math.exp(-(12**2) / (2 * 6.0**2)) + 1e-12


def test_bleu_worked_by_hand() -> None:
    # Candidate "the cat sat" vs reference "the cat sat on the mat": precisions 1 (3 unigrams, 2 bigrams, 1 trigram,
    # no 4-gram), brevity penalty exp(1 - 6/3) = e^-1; BLEU-1 = e^-1, BLEU-3 = e^-1 (geometric mean of ones).
    corpus, _ = bleu({"x": ["the cat sat on the mat"]}, {"x": "the cat sat"}, tokenize=False)
    assert corpus[0] == pytest.approx(math.exp(-1), rel=1e-8)
    assert corpus[2] == pytest.approx(math.exp(-1), rel=1e-8)
    # no 4-gram to match: coco-caption's smoothing makes the precision 1e-15 / 1e-9, not 0
    assert corpus[3] == pytest.approx(math.exp(-1) * (1e-6) ** 0.25, rel=1e-6)
    assert ngram_counts("a a b")[("a",)] == 2 and ngram_counts("a a b")[("a", "b")] == 1


def test_mismatched_images_are_an_error() -> None:
    with pytest.raises(ValueError, match="different images"):
        cider_d({"x": ["a b"]}, {"y": "a b"})
    with pytest.raises(ValueError, match="no reference caption"):
        bleu({"x": []}, {"x": "a b"})
