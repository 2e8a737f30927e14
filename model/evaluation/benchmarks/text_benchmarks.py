"""One text benchmark run end to end: prompts with k shots, scores per question, and lm-eval's metrics.

Multiple choice (as lm-evaluation-harness's `multiple_choice`): `acc` picks the choice of highest summed
log-probability, `acc_norm` divides each by its choice's length in characters and `acc_bytes` by its UTF-8 bytes
(lm-eval's names and definitions). Generation (GSM8K): exact match after the "strict-match" and "flexible-extract"
filters. Each metric comes with lm-eval's standard error of the mean (sample standard deviation / sqrt(n)).

The model sees text only: log-probabilities and greedy choices are over the vocabulary without image codes, as
transformers' Chameleon computes them (it masks image-code logits), so scores match lm-eval run on an HF export.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from model.evaluation.benchmarks.choice_scoring import Encoded, encode_pair, score_requests
from model.evaluation.benchmarks.generative import (
    DEFAULT_MAX_GEN_TOKS,
    exact_match,
    flexible_extract,
    greedy_generate,
    strict_match,
)
from model.evaluation.benchmarks.text_tasks import (
    DEFAULT_FEWSHOT_SEED,
    ChoiceDoc,
    GenerateDoc,
    TextTask,
    choice_requests,
    fewshot_examples,
    prompt_prefix,
)
from model.lm.transformer import Transformer
from model.tokenizers.text_tokenizer import TextTokenizer
from model.tokenizers.vocabulary import Modality


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and lm-eval's `mean_stderr`: sample standard deviation (n - 1) / sqrt(n); 0 for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal maxima, as np.argmax


def choice_metrics(doc: ChoiceDoc, scores: Sequence[tuple[float, bool]]) -> dict[str, Any]:
    """One question's lm-eval metrics from its choices' (log-likelihood, greedy)."""
    lls = [ll for ll, _ in scores]
    # lm-eval divides by the lengths of `doc_to_choice`: for partial scoring those are the option contexts.
    chars = [float(len(c)) for c in doc.choices]
    nbytes = [float(len(c.encode("utf-8"))) for c in doc.choices]
    pred = _argmax(lls)
    pred_norm = _argmax([ll / n for ll, n in zip(lls, chars, strict=True)])
    pred_bytes = _argmax([ll / n for ll, n in zip(lls, nbytes, strict=True)])
    return {
        "acc": float(pred == doc.gold),
        "acc_norm": float(pred_norm == doc.gold),
        "acc_bytes": float(pred_bytes == doc.gold),
        "pred": pred,
        "gold": doc.gold,
        "loglikelihoods": lls,
        "greedy": [g for _, g in scores],
    }


def _summary(per_doc: list[dict[str, Any]], names: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in names:
        mean, stderr = mean_and_stderr([d[name] for d in per_doc])
        out[name], out[f"{name}_stderr"] = mean, stderr
    return out


def run_text_benchmark(
    model: Transformer,
    tokenizer: TextTokenizer,
    task: TextTask,
    shots: int = 0,
    seed: int = DEFAULT_FEWSHOT_SEED,
    limit: int | None = None,
    fewshot_pool: Sequence[ChoiceDoc | GenerateDoc] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = DEFAULT_MAX_GEN_TOKS,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Score `task`'s first `limit` questions with `shots` solved examples each (lm-eval's sampler and `seed`).

    Returns {"task", "format", "shots", "seed", "questions", "metrics", "seconds", "samples"}: `metrics` as lm-eval
    names them (with `_stderr`), `samples` one record per question (prompt, scores or response, its metrics).
    """
    vocab = tokenizer.vocab
    excluded = vocab.mask(Modality.IMAGE).to(model.output.weight.device)
    examples = fewshot_examples(task, shots, fewshot_pool, seed, limit)
    docs = task.docs[: len(examples)]
    started = time.perf_counter()
    samples: list[dict[str, Any]] = []
    if task.kind == "multiple_choice":
        requests = [choice_requests(task, doc, ex) for doc, ex in zip(docs, examples, strict=True)]  # type: ignore[arg-type]
        groups: list[list[Encoded]] = [
            [encode_pair(tokenizer.encode, vocab.bos_id, ctx, cont) for ctx, cont in doc_requests]
            for doc_requests in requests
        ]
        scores = score_requests(model, groups, excluded, batch_size, progress)
        for doc, doc_requests, doc_scores in zip(docs, requests, scores, strict=True):
            record = choice_metrics(doc, doc_scores)  # type: ignore[arg-type]
            samples.append({"requests": [list(r) for r in doc_requests], **record})
        metrics = _summary(samples, ("acc", "acc_norm", "acc_bytes"))
    else:
        text = vocab.mask(Modality.TEXT, Modality.SPECIAL).numpy()

        def decode_text(ids: list[int]) -> str:
            """Text runs decoded by the tokenizer, any other id by its name (<reserved00264>), as HF's decode."""
            parts: list[str] = []
            run: list[int] = []
            for t in ids:
                if text[t]:
                    run.append(t)
                    continue
                parts += [tokenizer.decode(run), vocab.special_name(t)]
                run = []
            return "".join([*parts, tokenizer.decode(run)])

        was_training = model.training
        model.eval()
        try:
            for n, (doc, ex) in enumerate(zip(docs, examples, strict=True), 1):
                prompt = prompt_prefix(task, doc, ex) + doc.query
                ids = [vocab.bos_id, *tokenizer.encode(prompt)]
                response = greedy_generate(
                    model,
                    ids,
                    decode_text,
                    task.until,
                    (vocab.eos_id,),
                    max_new_tokens,
                    excluded,
                )
                target = doc.target  # type: ignore[union-attr]
                strict, flexible = strict_match(response), flexible_extract(response)
                samples.append(
                    {
                        "prompt": prompt,
                        "response": response,
                        "target": target,
                        "strict_answer": strict,
                        "flexible_answer": flexible,
                        "exact_match,strict-match": float(exact_match(strict, target)),
                        "exact_match,flexible-extract": float(exact_match(flexible, target)),
                    }
                )
                if progress is not None:
                    progress(n, len(docs))
        finally:
            model.train(was_training)
        metrics = _summary(samples, ("exact_match,strict-match", "exact_match,flexible-extract"))
    return {
        "task": task.name,
        "format": task.format,
        "file": str(task.path),
        "shots": shots,
        "seed": seed,
        "questions": len(docs),
        "metrics": metrics,
        "seconds": time.perf_counter() - started,
        "samples": samples,
    }
