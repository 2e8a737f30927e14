"""lm-evaluation-harness, run on a `cham convert --to hf` export of a tiny model and on local tasks, scores them as
we do: the same prompts character for character, the same log-likelihoods, the same acc / acc_norm / acc_bytes.

lm-eval lives in its own venv (.venv-lmeval, made by `make install`: its `datasets` must not touch our pins), so it
runs as a subprocess; without that venv the test is skipped, except in CI where it must run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from model.evaluation.benchmarks.lm_eval_harness import LM_EVAL_VENV, write_lm_eval_task
from model.evaluation.benchmarks.text_benchmarks import run_text_benchmark
from model.evaluation.benchmarks.text_tasks import read_task, resolve_task
from model.lm.convert import convert_checkpoint, save_ours
from model.lm.transformer import Transformer
from model.tokenizers.text_tokenizer import load_text_tokenizer
from schemas.model_config import ModelConfig
from tests.conftest import REPO

LM_EVAL_PYTHON = REPO / LM_EVAL_VENV / "bin" / "python"
TASKS = ("arc", "winogrande", "mmlu")  # plain choices, partial scoring, a separate few-shot file with first-n
SHOTS = 2


def lm_eval_python() -> Path:
    if not LM_EVAL_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{LM_EVAL_PYTHON} is missing: `make install` makes it")
        pytest.skip(f"lm-evaluation-harness venv {LM_EVAL_VENV} not installed (`make install`)")
    return LM_EVAL_PYTHON


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizers: dict[str, Path]) -> tuple[Transformer, Path]:
    """A tiny model with weights large enough that the choices' scores differ, and its HF export."""
    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    step = tmp_path_factory.mktemp("run") / "step-00000001"
    save_ours(model.state_dict(), config, step)
    (step / "tokenizers.json").write_text(json.dumps({k: str(v) for k, v in tiny_tokenizers.items()}))
    export = tmp_path_factory.mktemp("hf") / "export"
    convert_checkpoint(step, export, "ours", "hf")
    return model.eval(), export


@pytest.mark.slow
def test_lm_eval_on_our_hf_export_scores_local_tasks_as_we_do(
    tiny_model: tuple[Transformer, Path], tiny_tokenizers: dict[str, Path], tmp_path: Path
) -> None:
    python = lm_eval_python()
    model, export = tiny_model
    tokenizer = load_text_tokenizer(tiny_tokenizers["text"])
    ours, names = {}, []
    for name in TASKS:
        path, fewshot = resolve_task(name)
        task = read_task(path)
        pool = list(read_task(fewshot).docs) if fewshot else None
        names.append(write_lm_eval_task(task, tmp_path / "tasks", pool))
        ours[names[-1]] = run_text_benchmark(model, tokenizer, task, shots=SHOTS, fewshot_pool=pool, batch_size=3)
    out = tmp_path / "lm_eval.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    command = [str(python), "-m", "model.evaluation.benchmarks.lm_eval_harness", str(export), str(tmp_path / "tasks")]
    command += [*names, "--shots", str(SHOTS), "--out", str(out)]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(out.read_text())["tasks"]

    for name in names:
        mine, lm = ours[name], theirs[name]
        assert len(lm["samples"]) == len(mine["samples"]) > SHOTS
        for a, b in zip(mine["samples"], lm["samples"], strict=True):
            assert [list(r) for r in a["requests"]] == b["prompts"]  # the same k-shot prompts, choices, delimiters
            assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
            assert a["greedy"] == b["greedy"]
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert mine["metrics"][metric] == pytest.approx(lm["metrics"][f"{metric},none"], abs=1e-9), (name, metric)
        # The choices are told apart: a test on equal scores would prove nothing.
        assert len({round(x, 3) for s in mine["samples"] for x in s["loglikelihoods"]}) > len(mine["samples"])
