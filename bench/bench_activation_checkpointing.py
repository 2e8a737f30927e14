"""Memory saved and time paid by activation checkpointing: one forward + backward per mode (none, full,
every_k_blocks, selective) of the same model on the same batch, each in a fresh process, with the ratio against none.

The step is the trainer's: `Transformer.forward(tokens, doc_ids=..., loss_mask=...)` (document masking on, the fused
output layer + loss), then `loss.backward()`, fp32, gradients freed before each step. Checkpointing is applied with
`apply_activation_checkpointing` (then `block.compile()` with --compile).

Memory, per mode:
- CPU, `live`: the bytes of tensors alive at the step's worst moment: the weights plus the peak of the running sum of
  torch.profiler's allocation records over the step (exact, no allocator slack; gradients included).
- CPU, `rss`: the growth of the process's peak resident size (VmHWM, model.training.cpu_memory) over its resident size
  before the first step, taken after a warm-up step of a tiny model under the same mode. The child runs with
  MALLOC_MMAP_THRESHOLD_=131072, so glibc maps every block over 128 KB afresh and unmaps it on free: the resident
  size follows the live tensors (plus what the first step of this size loads or grows).
- CUDA: `torch.cuda.max_memory_allocated` over the step (`live`), and max_memory_reserved (`rss` column).
Time: the median of --repeats steps per mode after a warm-up step, in one process holding the four models, the
modes taking turns step by step so that all see the same load (no profiler).

    PYTHONPATH=. .venv/bin/python bench/bench_activation_checkpointing.py [--quick] [--device cuda] [--compile]
        [--dim 512 --layers 8 --seq 1024 --batch 2] [--json PATH]

Results go to --json and to $OUT/bench_activation_checkpointing.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ["none", "full", "every_k_blocks", "selective"]
REPO = Path(__file__).resolve().parents[1]
MiB = 2**20


def model_config(args: argparse.Namespace):
    from schemas.model_config import ModelConfig

    heads = max(1, args.dim // 64)
    return ModelConfig(
        dim=args.dim,
        n_layers=args.layers,
        n_heads=heads,
        n_kv_heads=heads,
        ffn_dim=args.ffn or (8 * args.dim // 3 + 63) // 64 * 64,
        vocab_size=args.vocab,
        max_seq_len=args.seq,
    )


class Setup:
    """A mode's model (same weights for every mode: seed 0) and the fixed batch, on the device."""

    def __init__(self, args: argparse.Namespace, mode: str):
        import torch

        from model.lm.transformer import Transformer
        from model.training.activation_checkpointing import apply_activation_checkpointing
        from schemas.train_config import ActivationCheckpointConfig

        self.device = torch.device(args.device)
        torch.manual_seed(0)
        config = model_config(args)
        self.model = Transformer(config).to(self.device)
        checkpointing = ActivationCheckpointConfig(mode=mode, every_k=args.every_k)
        self.blocks = apply_activation_checkpointing(self.model, checkpointing)
        if args.compile:
            for block in self.model.layers:
                block.compile()
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=generator)
        documents = (torch.arange(args.seq) // max(1, args.seq // 3)).expand(args.batch, args.seq).contiguous()
        self.tokens, self.doc_ids = tokens.to(self.device), documents.to(self.device)
        self.loss_mask = torch.ones(args.batch, args.seq, device=self.device)

    def step(self) -> float:
        """One forward + backward from freed gradients; its seconds."""
        import torch

        self.model.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.model(self.tokens, doc_ids=self.doc_ids, loss_mask=self.loss_mask).loss.backward()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def warm_up(mode: str, device) -> None:
    """One step of a tiny model under the same mode: the kernels', libraries' and thread pools' first use (and
    checkpointing's) is not the step's memory."""
    import torch

    from model.lm.transformer import Transformer
    from model.training.activation_checkpointing import apply_activation_checkpointing
    from schemas.model_config import ModelConfig
    from schemas.train_config import ActivationCheckpointConfig

    tiny = Transformer(ModelConfig.from_preset("tiny")).to(device)
    apply_activation_checkpointing(tiny, ActivationCheckpointConfig(mode=mode))
    tokens = torch.randint(0, tiny.config.vocab_size, (2, 64), device=device)
    doc_ids = (torch.arange(64, device=device) // 20).expand(2, 64)
    tiny(tokens, doc_ids=doc_ids, loss_mask=torch.ones(2, 64, device=device)).loss.backward()


def probe_memory(args: argparse.Namespace, mode: str) -> dict:
    """One mode's peak memory, measured in this (fresh) process."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from model.training.cpu_memory import peak_resident_bytes

    torch.set_num_threads(args.threads)
    setup = Setup(args, mode)
    weights = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    if args.compile:
        setup.step()  # compiles: the compiler's memory is not the step's
    warm_up(mode, setup.device)
    base_rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if setup.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup.step()
    if setup.device.type == "cuda":
        live, held = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    else:
        held = peak_resident_bytes() - base_rss
        setup.model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
            setup.model(setup.tokens, doc_ids=setup.doc_ids, loss_mask=setup.loss_mask).loss.backward()
        records = [e for e in profiled.profiler.kineto_results.events() if e.name() == "[memory]"]
        running = peak = 0
        for record in sorted(records, key=lambda e: e.start_ns()):
            running += record.nbytes()
            peak = max(peak, running)
        live = weights + peak
    return {"mode": mode, "blocks": setup.blocks, "live_bytes": live, "rss_bytes": held, "weights_bytes": weights}


def probe_times(args: argparse.Namespace) -> dict[str, list[float]]:
    """Every mode's step times, in one process, the modes taking turns step by step: all see the same load."""
    import torch

    torch.set_num_threads(args.threads)
    setups = {mode: Setup(args, mode) for mode in MODES}
    for setup in setups.values():
        setup.step()  # warm-up (and compile)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, setup in setups.items():
            times[mode].append(setup.step())
    return times


def run_probe(what: str, argv: list[str]):
    """A probe's JSON from a fresh process (for memory: nothing another mode allocated counts)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "131072"}
    command = [sys.executable, __file__, *argv, "--probe", what]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"probe {what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=0, help="SwiGLU width (default: 8/3 dim rounded up to 64)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--every-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="block.compile() after checkpointing")
    parser.add_argument("--quick", action="store_true", help="a small model and one timed step (a smoke test)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    # internal: measure one mode's memory, or every mode's step times, and print them as JSON
    parser.add_argument("--probe", choices=[*MODES, "times"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.dim, args.layers, args.vocab, args.seq, args.batch, args.repeats = 128, 4, 2048, 256, 2, 1
    if args.probe:
        print(json.dumps(probe_times(args) if args.probe == "times" else probe_memory(args, args.probe)))
        return
    argv = [
        *("--dim", str(args.dim), "--layers", str(args.layers), "--ffn", str(args.ffn), "--vocab", str(args.vocab)),
        *("--seq", str(args.seq), "--batch", str(args.batch), "--every-k", str(args.every_k)),
        *("--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device),
        *(["--compile"] if args.compile else []),
    ]
    config = model_config(args)
    print(
        f"{config.n_params() / 1e6:.1f}M params (dim {config.dim}, {config.n_layers} layers, ffn {config.ffn_dim}, "
        f"vocab {config.vocab_size}), batch {args.batch} x seq {args.seq}, fp32, {args.device}, "
        f"{args.threads} threads{', compiled' if args.compile else ''}; one forward + backward per mode"
    )
    ratio = f"{'x none':>7}"
    print(f"{'mode':<16} {'blocks':>6} {'live MiB':>9} {ratio} {'rss MiB':>8} {ratio} {'step s':>7} {ratio}")
    rows = [run_probe(mode, argv) for mode in MODES]
    times = run_probe("times", argv)
    none = rows[0]
    for row in rows:
        row["times_s"] = [round(t, 3) for t in times[row["mode"]]]
        row["step_s"] = statistics.median(times[row["mode"]])
        row["live_ratio"] = round(row["live_bytes"] / none["live_bytes"], 3)
        row["rss_ratio"] = round(row["rss_bytes"] / none["rss_bytes"], 3)
        row["time_ratio"] = round(row["step_s"] / none["step_s"], 3)
        print(
            f"{row['mode']:<16} {row['blocks']:>6} {row['live_bytes'] / MiB:>9.0f} {row['live_ratio']:>7.2f} "
            f"{row['rss_bytes'] / MiB:>8.0f} {row['rss_ratio']:>7.2f} {row['step_s']:>7.2f} {row['time_ratio']:>7.2f}"
        )
    print(f"weights: {none['weights_bytes'] / MiB:.0f} MiB (in live; gradients add as much)")
    result = {
        "model": config.model_dump(),
        "batch": args.batch,
        "seq": args.seq,
        "device": args.device,
        "threads": args.threads,
        "compile": args.compile,
        "every_k": args.every_k,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    targets = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "bench_activation_checkpointing.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
