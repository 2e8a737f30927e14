"""Multiple-choice scoring throughput: ours (each question's shared prompt run once, its KV cache reused by every
choice) against lm-evaluation-harness on the same exported model, task and hardware, in one run.

A model of the `--preset` shape with random weights (seed 0) and a text tokenizer trained on the sample corpus is
saved in our format and exported with `cham convert --to hf`. The task is HellaSwag-format: `--questions` questions
made from the bundled sample's (each numbered, so none repeats), scored `--shots`-shot (lm-eval's seeded sampler).
Ours: `run_text_benchmark` in this process. lm-eval: `HFLM` handed transformers' Chameleon, in the .venv-lmeval
venv (`make install`), batch size `--lm-eval-batch` requests (default 4 x ours: the same rows per forward pass).
Timed: the scoring itself, tokenisation included (lm-eval: its `loglikelihood` call), after one untimed warm-up
request on each side; both with `--threads` torch threads (default 1: on a shared machine, more threads than
free cores make each op's wall time depend on the neighbours). Wall and process CPU time are both recorded; the
speedup is given for each. The scores are checked equal (acc, acc_norm, acc_bytes).

    PYTHONPATH=. .venv/bin/python bench/bench_text_benchmark.py [--preset proxy-5m] [--questions 64] [--shots 5]
        [--batch 8] [--threads 1] [--no-lm-eval] [--json PATH]

Results go to --json and to $OUT/bench_text_benchmark.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LM_EVAL_PYTHON = REPO / ".venv-lmeval" / "bin" / "python"


def make_export(folder: Path, preset: str, max_seq_len: int) -> tuple[Path, Path]:
    """Tokenizers (text trained on the sample corpus, a tiny VQ), a random `preset` model saved as ours (step folder)
    and its HF export; returns (step folder, export)."""
    import torch

    from model.lm.convert import convert_checkpoint, save_ours
    from model.lm.transformer import Transformer
    from model.tokenizers.image_preprocess import preprocess, to_tensor
    from model.tokenizers.text_tokenizer import expand_inputs, iter_texts, train_text_tokenizer
    from model.tokenizers.vq_checkpoint import save_meta_vqgan
    from model.tokenizers.vq_training import init_codebook_from_latents
    from model.tokenizers.vqgan import VQGAN
    from pipelines.sample_corpus import write_sample_data
    from schemas.model_config import ModelConfig
    from schemas.vocab import TINY
    from schemas.vq_config import VQConfig

    write_sample_data(folder / "sample")
    train_text_tokenizer(iter_texts(expand_inputs([folder / "sample" / "text"])), TINY).save(folder / "text")
    torch.manual_seed(0)
    vqgan = VQGAN(VQConfig.from_preset("tiny")).eval()
    photos = sorted((REPO / "sample" / "images").glob("*.jpg"))[:4]
    init_codebook_from_latents(
        vqgan, to_tensor([preprocess(p, size=64).pixels for p in photos]), torch.Generator().manual_seed(0)
    )
    save_meta_vqgan(vqgan, folder / "vq")
    config = ModelConfig.from_preset(preset, vocab_size=TINY.vocab_size, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    step = folder / "step"
    save_ours(Transformer(config).state_dict(), config, step)
    (step / "tokenizers.json").write_text(json.dumps({"text": str(folder / "text"), "image": str(folder / "vq")}))
    convert_checkpoint(step, folder / "hf", "ours", "hf")
    return step, folder / "hf"


def make_task(path: Path, questions: int) -> Path:
    """`questions` HellaSwag-format questions from the bundled sample's, numbered so that none repeats."""
    sample = REPO / "sample" / "eval" / "text" / "hellaswag.jsonl"
    base = [json.loads(line) for line in sample.read_text().splitlines()]
    rows = []
    for i in range(questions):
        row = dict(base[i % len(base)])
        row["ind"], row["activity_label"] = i, f"{row['activity_label']} {i}"
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="proxy-5m", help="model shape (ModelConfig preset)")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="our batch: questions scored together")
    parser.add_argument("--lm-eval-batch", type=int, default=None, help="lm-eval's batch in requests (4 x --batch)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--no-lm-eval", action="store_true", help="ours only (no .venv-lmeval here)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from model.evaluation.benchmarks.lm_eval_harness import write_lm_eval_task
    from model.evaluation.benchmarks.text_benchmarks import run_text_benchmark
    from model.evaluation.benchmarks.text_tasks import read_task
    from model.generation.inference import load_inference_model

    torch.set_num_threads(args.threads)
    lm_eval_batch = args.lm_eval_batch or 4 * args.batch
    result: dict = {
        "preset": args.preset,
        "questions": args.questions,
        "shots": args.shots,
        "batch": args.batch,
        "lm_eval_batch": lm_eval_batch,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        step, export = make_export(folder, args.preset, args.max_seq_len)
        task = read_task(make_task(folder / "hellaswag_bench.jsonl", args.questions))
        loaded = load_inference_model(step, device="cpu")
        model, tokenizer = loaded.model, loaded.tokenizer.text
        result["params"] = model.num_params()
        run_text_benchmark(model, tokenizer, task, shots=args.shots, limit=1, batch_size=1)  # warm-up, untimed
        started, cpu = time.perf_counter(), time.process_time()
        ours = run_text_benchmark(model, tokenizer, task, shots=args.shots, batch_size=args.batch)
        result["ours_s"], result["ours_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        requests = sum(len(s["requests"]) for s in ours["samples"])
        tokens = sum(len(tokenizer.encode(c + x)) + 1 for s in ours["samples"] for c, x in s["requests"])
        result |= {"requests": requests, "tokens_per_request": tokens / requests, "ours_metrics": ours["metrics"]}
        result["ours_requests_per_s"] = requests / result["ours_s"]
        print(f"{args.preset} ({result['params'] / 1e6:.1f}M params), {args.questions} HellaSwag questions, ")
        print(f"{args.shots}-shot: {requests} requests of {tokens / requests:.0f} tokens on average")
        print(
            f"ours    : {result['ours_s']:7.2f} s  {result['ours_requests_per_s']:7.1f} requests/s  "
            f"(CPU {result['ours_cpu_s']:.2f} s)"
        )
        if not args.no_lm_eval:
            if not LM_EVAL_PYTHON.exists():
                print(f"{LM_EVAL_PYTHON} is missing: `make install` makes it (or pass --no-lm-eval)", file=sys.stderr)
                return 1
            name = write_lm_eval_task(task, folder / "tasks")
            out = folder / "lm_eval.json"
            env = {**os.environ, "PYTHONPATH": str(REPO), "HF_DATASETS_CACHE": str(folder / "datasets")}
            env["OMP_NUM_THREADS"] = str(args.threads)
            command = [str(LM_EVAL_PYTHON), "-m", "model.evaluation.benchmarks.lm_eval_harness", str(export)]
            command += [str(folder / "tasks"), name, "--shots", str(args.shots), "--batch-size", str(lm_eval_batch)]
            command += ["--threads", str(args.threads), "--warmup", "--out", str(out)]
            done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            lm = json.loads(out.read_text())
            metrics = lm["tasks"][name]["metrics"]
            result |= {"lm_eval_s": lm["scoring_seconds"], "lm_eval_cpu_s": lm["scoring_cpu_seconds"]}
            result["lm_eval_metrics"] = metrics
            result["lm_eval_requests_per_s"] = requests / lm["scoring_seconds"]
            result["speedup"] = lm["scoring_seconds"] / result["ours_s"]
            result["speedup_cpu"] = lm["scoring_cpu_seconds"] / result["ours_cpu_s"]
            theirs = lm["tasks"][name]["samples"]
            result["max_abs_loglikelihood_diff"] = max(
                abs(a - b)
                for x, y in zip(ours["samples"], theirs, strict=True)
                for a, b in zip(x["loglikelihoods"], y["loglikelihoods"], strict=True)
            )
            result["same_scores"] = all(
                ours["metrics"][m] == metrics[f"{m},none"] for m in ("acc", "acc_norm", "acc_bytes")
            )
            print(
                f"lm-eval : {result['lm_eval_s']:7.2f} s  {result['lm_eval_requests_per_s']:7.1f} requests/s  "
                f"(CPU {result['lm_eval_cpu_s']:.2f} s)"
            )
            print(f"speedup (lm-eval time / ours): {result['speedup']:.2f}x wall, {result['speedup_cpu']:.2f}x CPU")
            print(
                f"same acc / acc_norm / acc_bytes: {result['same_scores']}; largest log-likelihood difference "
                f"{result['max_abs_loglikelihood_diff']:.2e}"
            )
    text = json.dumps(result, indent=2) + "\n"
    if args.json:
        args.json.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "bench_text_benchmark.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
