"""lm-evaluation-harness on our HF exports: a local task it reads, and the run through its Python API.

transformers registers Chameleon as image-text-to-text, so lm-eval's `--model hf` (AutoModelForCausalLM) does not
find it. `run_lm_eval` loads the export with `ChameleonForConditionalGeneration` and hands it to lm-eval's `HFLM`,
which then tokenises, batches and scores exactly as for any causal LM.

`write_lm_eval_task` writes a task we read (`text_tasks.read_task`) as an lm-eval task: the questions as prompts
already formatted (query, choices, gold; WinoGrande's option contexts and shared continuation; GSM8K's target) in a
jsonl, and a YAML config over them with lm-eval's own few-shot split, sampler, delimiters, filters and metrics. The
same task, shots and seed then give the same prompts in lm-eval as in `cham eval benchmark`.

lm-eval pulls in `datasets` and friends, so it runs from its own venv (`.venv-lmeval`, made by `make install`);
this module imports nothing of ours beyond the standard library and can run there as
`python -m model.evaluation.benchmarks.lm_eval_harness` with the repository on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.evaluation.benchmarks.text_tasks import ChoiceDoc, GenerateDoc, TextTask

LM_EVAL_VENV = ".venv-lmeval"
TASK_PREFIX = "cham_"
CHOICE_METRICS = ("acc", "acc_norm", "acc_bytes")


def _doc_row(doc: ChoiceDoc | GenerateDoc) -> dict[str, Any]:
    row = asdict(doc)
    if "choices" in row:
        row["choices"] = list(row["choices"])
        if row["continuation"] is None:
            del row["continuation"]  # one schema per file: datasets' json loader wants no nulls
    return row


def _write_jsonl(path: Path, docs: list[ChoiceDoc] | list[GenerateDoc] | tuple[Any, ...]) -> None:
    path.write_text("".join(json.dumps(_doc_row(d), ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")


def lm_eval_task_config(task: TextTask, data: Path, fewshot: Path | None) -> dict[str, Any]:
    """lm-eval's task config (a YAML mapping) for the formatted questions in `data` (few-shot pool `fewshot`)."""
    files = {"test": str(data.resolve())}
    if fewshot is not None:
        files["train"] = str(fewshot.resolve())
    config: dict[str, Any] = {
        "task": TASK_PREFIX + task.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test",
        # Without a separate pool the examples come from the questions themselves, the question itself left out.
        "fewshot_split": "train" if fewshot is not None else "test",
        "fewshot_config": {"sampler": "first_n" if task.fewshot_sampler == "first_n" else "default"},
        "description": "description",  # a field of each question (MMLU's subject line, else "")
        "target_delimiter": task.target_delimiter,
        "fewshot_delimiter": task.fewshot_delimiter,
    }
    if task.kind == "generate":
        config |= {
            "output_type": "generate_until",
            "doc_to_text": "query",
            "doc_to_target": "target",
            "generation_kwargs": {"until": list(task.until), "do_sample": False, "temperature": 0.0},
            "metric_list": [
                {
                    "metric": "exact_match",
                    "aggregation": "mean",
                    "higher_is_better": True,
                    "ignore_case": True,
                    "ignore_punctuation": False,
                    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
                }
            ],
            "filter_list": [
                {
                    "name": "strict-match",
                    "filter": [
                        {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                        {"function": "take_first"},
                    ],
                },
                {
                    "name": "flexible-extract",
                    "filter": [
                        {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                        {"function": "take_first"},
                    ],
                },
            ],
        }
    else:
        partial = any(d.continuation is not None for d in task.docs)  # type: ignore[union-attr]
        config |= {
            "output_type": "multiple_choice",
            # Partial scoring: lm-eval takes an integer doc_to_text as the gold context among doc_to_choice.
            "doc_to_text": "gold" if partial else "query",
            "doc_to_choice": "choices",
            "doc_to_target": "continuation" if partial else "gold",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in CHOICE_METRICS],
        }
    return config


def write_lm_eval_task(
    task: TextTask, folder: str | Path, fewshot_pool: list[ChoiceDoc] | list[GenerateDoc] | None = None
) -> str:
    """Write `task` into `folder` as an lm-eval task (jsonl + YAML, for `--include_path`); returns its name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task.name}.jsonl"
    _write_jsonl(data, task.docs)
    fewshot = None
    if fewshot_pool is not None:
        fewshot = folder / f"{task.name}_fewshot.jsonl"
        _write_jsonl(fewshot, fewshot_pool)
    config = lm_eval_task_config(task, data, fewshot)
    # JSON is YAML: lm-eval's loader reads it as the mapping it is.
    (folder / f"{task.name}.yaml").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return config["task"]


def run_lm_eval(
    model_dir: str | Path,
    include_path: str | Path,
    task_names: list[str],
    shots: int = 0,
    seed: int = 1234,
    batch_size: int = 8,
    limit: int | None = None,
    device: str = "cpu",
    threads: int | None = None,
    warmup: bool = False,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` on an HF Chameleon export and local tasks: per task its metrics, each question's
    prompts and log-likelihoods (or response per filter); the seconds the whole run took and `scoring_seconds`, those
    spent in the model's `loglikelihood` and `generate_until` (tokenising, batching, forward passes), and
    `scoring_cpu_seconds`, the process's CPU time in them.

    `warmup` scores one short request first, untimed (the first forward's one-off costs).

    Needs lm_eval, transformers and torch: run it in the lm-eval venv (`main` below)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    if threads is not None:
        torch.set_num_threads(threads)
    model = ChameleonForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, add_bos_token=True)
    if warmup:
        from lm_eval.api.instance import Instance

        lm.loglikelihood([Instance("loglikelihood", {}, ("Question: why?\nAnswer:", " because"), 0)])
    scoring = [0.0, 0.0]
    for method in ("loglikelihood", "generate_until"):
        setattr(lm, method, _timed(getattr(lm, method), scoring))
    started = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=list(task_names),
        num_fewshot=shots,
        fewshot_random_seed=seed,
        limit=limit,
        task_manager=TaskManager(include_path=str(include_path)),
        log_samples=True,
        bootstrap_iters=0,
    )
    seconds = time.perf_counter() - started
    tasks: dict[str, Any] = {}
    for name in task_names:
        samples: dict[int, dict[str, Any]] = {}
        for s in out["samples"][name]:  # one entry per question and filter
            record = samples.setdefault(
                s["doc_id"], {"doc_id": s["doc_id"], "prompts": [list(a) for a in s["arguments"]]}
            )
            responses = s["resps"]
            if responses and isinstance(responses[0][0], list | tuple):  # (log-likelihood, greedy) per choice
                record["loglikelihoods"] = [float(r[0][0]) for r in responses]
                record["greedy"] = [bool(r[0][1]) for r in responses]
            else:
                record["response"] = responses[0][0]
                record.setdefault("filtered", {})[s["filter"]] = s["filtered_resps"][0]
        metrics = {k: v for k, v in out["results"][name].items() if isinstance(v, int | float)}
        tasks[name] = {"metrics": metrics, "samples": [samples[k] for k in sorted(samples)]}
    return {
        "shots": shots,
        "seed": seed,
        "seconds": seconds,
        "scoring_seconds": scoring[0],
        "scoring_cpu_seconds": scoring[1],
        "tasks": tasks,
    }


def _timed(method: Any, total: list[float]) -> Any:
    """`method`, adding the seconds each call takes to total[0] and the process's CPU seconds to total[1]."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        started, cpu = time.perf_counter(), time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - started
            total[1] += time.process_time() - cpu

    return timed


def main(argv: list[str] | None = None) -> int:
    """`python -m model.evaluation.benchmarks.lm_eval_harness EXPORT TASK_DIR TASK... --shots K --out FILE`."""
    parser = argparse.ArgumentParser(description="lm-evaluation-harness on an HF Chameleon export and a local task")
    parser.add_argument("model_dir", help="a `cham convert --to hf` folder")
    parser.add_argument("include_path", help="the folder `cham eval benchmark --lm-eval-task` wrote")
    parser.add_argument("tasks", nargs="+", help="the tasks' names there (cham_<task>)")
    parser.add_argument("--shots", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--warmup", action="store_true", help="score one request first, untimed")
    parser.add_argument("--out", required=True, help="JSON file for the metrics and per-question scores")
    args = parser.parse_args(argv)
    result = run_lm_eval(
        args.model_dir,
        args.include_path,
        args.tasks,
        shots=args.shots,
        seed=args.seed,
        batch_size=args.batch_size,
        limit=args.limit,
        device=args.device,
        threads=args.threads,
        warmup=args.warmup,
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, task in result["tasks"].items():
        print(name, json.dumps(task["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
