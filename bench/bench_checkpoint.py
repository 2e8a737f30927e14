"""Checkpoint save and load: time and peak host memory per rank, sharded (sync and async) against today's gathered
save, for the same FSDP2 model with AdamW state, in one run.

The model is built as the trainer builds it under FSDP2 (meta device, `fully_shard` per block and the root, each
rank's shards materialised and initialised from seed 0) over 2 gloo ranks on this machine, and given AdamW state by
one optimizer step (the gradient of every parameter: 1% of its value). Then, per variant:

- `gathered_save`: `gathered_states` on every rank, then `save_checkpoint` of the full states on rank 0 (the
  trainer's `checkpoint.format: full` under FSDP2);
- `sharded_save`: `ShardedCheckpointer.save`, every rank writing its shards (`format: sharded`);
- `async_save`: the same with `async_save`: `blocked` is the time until `save()` returns (training waits that long),
  `whole` until `wait()` returns on rank 0 (the folder renamed into place);
- `gathered_load`: `load_checkpoint(..., sharded=True)` of the gathered folder into a model and optimizer built from
  another seed: every rank reads the full files and keeps its shards;
- `sharded_load`: `load_checkpoint` of the sharded folder (which calls `load_sharded_states`): every rank reads its
  shards only.

Each variant runs in 2 fresh processes, after the same operation on a tiny model (first-use costs: imports, thread
pools, the gloo groups). Time: from a barrier to the barrier after the operation (a save's group time is rank 0's
write). Memory: the operation's peak resident size per rank (VmHWM, model.training.cpu_memory), its high-water mark
reset just before (/proc/self/clear_refs "5"), with glibc returning blocks over 128 KB on free
(MALLOC_MMAP_THRESHOLD_) so that the resident size follows what is live. `before` is the resident size at the
reset (model, optimizer state, runtime); `+` the growth over it. Loads read files the save just wrote (the page
cache): they measure deserialising and resharding, not the disk. Every load's model and optimizer shards are
hashed and compared with the saved ones (equal bit for bit). Repeats interleave the variants; medians are reported.

    PYTHONPATH=. .venv/bin/python bench/bench_checkpoint.py [--quick] [--repeats 3]
        [--dim 768 --layers 12 --ffn 2048 --vocab 32768] [--dir TMPDIR] [--json PATH]

Results go to --json and to $OUT/bench_checkpoint.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ["gathered_save", "sharded_save", "async_save", "gathered_load", "sharded_load"]
# The folder each variant writes (saves) or reads (loads) under the run's directory.
FOLDERS = {
    "gathered_save": "gathered",
    "sharded_save": "sharded",
    "async_save": "async",
    "gathered_load": "gathered",
    "sharded_load": "sharded",
}
STEP = 1
WORLD = 2
MiB = 2**20


def model_config(dim: int, layers: int, ffn: int, vocab: int):
    from schemas.model_config import ModelConfig

    heads = max(1, dim // 64)
    return ModelConfig(
        dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads, ffn_dim=ffn, vocab_size=vocab, max_seq_len=1024
    )


# --- in each rank's process ---------------------------------------------------------------------------------------


def die_with_parent(parent: int) -> None:
    """Be killed when the benchmark's process dies, however it dies (a rank left waiting in a gloo collective would
    otherwise wait for its timeout)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took
        os._exit(1)


def sharded_model(config, seed: int, with_state: bool):
    """The FSDP2 model of `config` initialised under `seed`, and its AdamW (stepped once when `with_state`)."""
    import torch

    from model.training.optim import make_optimizer
    from model.training.parallelize import init_shards, init_templates, materialise, meta_model, shard
    from schemas.train_config import OptimizerConfig

    torch.manual_seed(seed)
    model = meta_model(config)
    templates = init_templates(model)
    shard(model, None)
    materialise(model, torch.device("cpu"))
    init_shards(templates, config.init_std)
    optimizer = make_optimizer(model, OptimizerConfig())
    if with_state:
        for param in model.parameters():
            param.grad = param.detach() * 0.01
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def _local_bytes(tensor) -> memoryview:
    """This rank's part of `tensor` (a DTensor's local shard), as bytes to hash without a copy."""
    import torch
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return memoryview(local.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def state_digest(model, optimizer) -> str:
    """sha256 of this rank's model shards and optimizer state, in parameter order."""
    import torch

    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(_local_bytes(param))
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in sorted(optimizer.state.get(param, {}).items()):
                if isinstance(value, torch.Tensor):
                    digest.update(key.encode())
                    digest.update(_local_bytes(value))
    return digest.hexdigest()


def state_bytes(model, optimizer) -> int:
    """Bytes of this rank's model shards and optimizer state."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    total = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(local(v).numel() * local(v).element_size() for v in state.values() if hasattr(v, "numel"))
    return total


def resident_bytes() -> int:
    """This process's resident size now (VmRSS)."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Start the peak resident size (VmHWM) afresh from the resident size now; False where Linux does not allow it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc: hand freed heap back before the mark is taken
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def save(variant: str, root: Path, model, optimizer, checkpointer=None) -> dict[str, float]:
    """One save of `variant` into `root`, by every rank; its times in seconds from a common start."""
    import torch.distributed as dist

    from model.training.checkpointing import TrainState, gathered_states, save_checkpoint
    from model.training.sharded_checkpoint import ShardedCheckpointer

    state = TrainState(STEP)
    dist.barrier()
    start = time.perf_counter()
    times = {}
    if variant == "gathered_save":
        model_state, optimizer_state = gathered_states(model, optimizer)
        if dist.get_rank() == 0:
            save_checkpoint(root, state, model_state, optimizer_state, keep_last=1)
        del model_state, optimizer_state
    elif variant == "sharded_save":
        ShardedCheckpointer(root, keep_last=1).save(state, model, optimizer, None)
    else:
        checkpointer.save(state, model, optimizer, None)
        times["blocked_s"] = time.perf_counter() - start
        checkpointer.wait()
        times["whole_s"] = time.perf_counter() - start
    dist.barrier()
    times["seconds"] = time.perf_counter() - start
    return times


def load(folder: Path, model, optimizer) -> dict[str, float]:
    """Load step folder `folder` (either form) into the sharded model and optimizer, by every rank."""
    import torch.distributed as dist

    from model.training.checkpointing import load_checkpoint

    dist.barrier()
    start = time.perf_counter()
    load_checkpoint(folder, model, optimizer, restore_rng=False, sharded=True)
    dist.barrier()
    return {"seconds": time.perf_counter() - start}


def checkpointer_for(variant: str, root: Path):
    """The async variant's checkpointer (its gloo group is made here, outside the timed save); None otherwise."""
    from model.training.sharded_checkpoint import ShardedCheckpointer

    return ShardedCheckpointer(root, keep_last=1, async_save=True) if variant == "async_save" else None


def run_variant(config, variant: str, root: Path, seed: int) -> dict:
    """`variant` on `config`'s model under `root`: this rank's times, memory and state digest."""
    from model.training.checkpointing import checkpoint_dir

    folder = root / FOLDERS[variant]
    if variant.endswith("_save"):
        model, optimizer = sharded_model(config, seed, with_state=True)
        checkpointer = checkpointer_for(variant, folder)
        reset = reset_peak()
        rss_before = resident_bytes()
        times = save(variant, folder, model, optimizer, checkpointer)
    else:
        # Another seed and no optimizer state: a load that changed nothing would not match the saved digest.
        model, optimizer = sharded_model(config, seed + 1, with_state=False)
        reset = reset_peak()
        rss_before = resident_bytes()
        times = load(checkpoint_dir(folder, STEP), model, optimizer)
    from model.training.cpu_memory import peak_resident_bytes

    peak = peak_resident_bytes()
    return {
        **times,
        "rss_before": rss_before,
        "peak": peak,
        "peak_since_reset": reset,
        "state_bytes": state_bytes(model, optimizer),
        "digest": state_digest(model, optimizer),
    }


def warm_up(variant: str, scratch: Path, seed: int) -> None:
    """The variant's operation on a tiny model (a load saves its folder first): what a process does once is done."""
    import torch.distributed as dist

    from schemas.model_config import ModelConfig

    tiny = ModelConfig.from_preset("tiny")
    save_variant = variant if variant.endswith("_save") else variant.replace("_load", "_save")
    model, optimizer = sharded_model(tiny, seed, with_state=True)
    save(save_variant, scratch / FOLDERS[variant], model, optimizer, checkpointer_for(save_variant, scratch / "async"))
    if variant.endswith("_load"):
        from model.training.checkpointing import checkpoint_dir

        load(checkpoint_dir(scratch / FOLDERS[variant], STEP), *sharded_model(tiny, seed + 1, with_state=False))
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(scratch)
    dist.barrier()


def rank_main(rank: int, spec: dict) -> None:
    """One rank of one variant: join the gloo group, warm up, measure, write the result as JSON."""
    die_with_parent(spec["parent"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(spec["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        root = Path(spec["root"])
        warm_up(spec["variant"], root / f"warm-up-{spec['variant']}", spec["seed"])
        config = model_config(spec["dim"], spec["layers"], spec["ffn"], spec["vocab"])
        result = run_variant(config, spec["variant"], root, spec["seed"])
        Path(spec["results"], f"{spec['variant']}-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


# --- in the benchmark's process ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(variant: str, args: argparse.Namespace, root: Path, results: Path) -> list[dict]:
    """Run `variant` on 2 fresh rank processes; their results, rank 0 first."""
    import torch.multiprocessing as mp

    spec = {
        "variant": variant,
        "parent": os.getpid(),
        "port": free_port(),
        "root": str(root),
        "results": str(results),
        "seed": 0,
        "threads": args.threads,
        **{key: getattr(args, key) for key in ("dim", "layers", "ffn", "vocab")},
    }
    mp.start_processes(rank_main, args=(spec,), nprocs=WORLD, join=True, start_method="spawn")
    return [json.loads((results / f"{variant}-{rank}.json").read_text()) for rank in range(WORLD)]


def folder_files(folder: Path) -> dict[str, int]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def summarise(variant: str, runs: list[list[dict]]) -> dict:
    """A variant's medians over its repeats: group seconds (async: blocked on the slowest rank, whole on rank 0),
    and per rank the resident size before, the peak, and the growth."""
    row: dict = {"variant": variant, "repeats": len(runs)}
    row["seconds"] = statistics.median(max(r["seconds"] for r in ranks) for ranks in runs)
    row["times_s"] = [round(max(r["seconds"] for r in ranks), 3) for ranks in runs]
    if variant == "async_save":
        row["blocked_s"] = statistics.median(max(r["blocked_s"] for r in ranks) for ranks in runs)
        row["whole_s"] = statistics.median(ranks[0]["whole_s"] for ranks in runs)
    row["ranks"] = []
    for rank in range(WORLD):
        row["ranks"].append(
            {
                "rank": rank,
                "rss_before": int(statistics.median(ranks[rank]["rss_before"] for ranks in runs)),
                "peak": int(statistics.median(ranks[rank]["peak"] for ranks in runs)),
                "growth": int(statistics.median(ranks[rank]["peak"] - ranks[rank]["rss_before"] for ranks in runs)),
                "peak_since_reset": all(ranks[rank]["peak_since_reset"] for ranks in runs),
                "state_bytes": runs[-1][rank]["state_bytes"],
                "digests": sorted({ranks[rank]["digest"] for ranks in runs}),
            }
        )
    return row


def ratios(rows: dict[str, dict]) -> dict[str, float]:
    """Sharded against gathered: save time, async blocked and whole time, load time, rank 0's peak and growth."""

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else float("nan")

    gathered, sharded, background = rows["gathered_save"], rows["sharded_save"], rows["async_save"]
    full_load, sharded_load = rows["gathered_load"], rows["sharded_load"]
    return {
        "save_s sharded/gathered": ratio(sharded["seconds"], gathered["seconds"]),
        "blocked_s async/gathered": ratio(background["blocked_s"], gathered["seconds"]),
        "whole_s async/gathered": ratio(background["whole_s"], gathered["seconds"]),
        "load_s sharded/gathered": ratio(sharded_load["seconds"], full_load["seconds"]),
        "save rank0 peak sharded/gathered": ratio(sharded["ranks"][0]["peak"], gathered["ranks"][0]["peak"]),
        "save rank0 peak async/gathered": ratio(background["ranks"][0]["peak"], gathered["ranks"][0]["peak"]),
        "save rank0 growth sharded/gathered": ratio(sharded["ranks"][0]["growth"], gathered["ranks"][0]["growth"]),
        "save rank0 growth async/gathered": ratio(background["ranks"][0]["growth"], gathered["ranks"][0]["growth"]),
        "load rank0 peak sharded/gathered": ratio(sharded_load["ranks"][0]["peak"], full_load["ranks"][0]["peak"]),
        "load rank0 growth sharded/gathered": ratio(
            sharded_load["ranks"][0]["growth"], full_load["ranks"][0]["growth"]
        ),
    }


def print_table(rows: dict[str, dict], result_ratios: dict[str, float]) -> None:
    header = f"{'variant':<14} {'s':>7} {'blocked s':>9}"
    for rank in range(WORLD):
        header += f" {f'r{rank} before':>10} {f'r{rank} peak':>8} {f'r{rank} +':>7}"
    print(header + "   (MiB)")
    for row in rows.values():
        line = f"{row['variant']:<14} {row.get('whole_s', row['seconds']):>7.2f} "
        line += f"{row['blocked_s']:>9.2f}" if "blocked_s" in row else f"{'':>9}"
        for rank in row["ranks"]:
            line += f" {rank['rss_before'] / MiB:>10.0f} {rank['peak'] / MiB:>8.0f} {rank['growth'] / MiB:>7.0f}"
        print(line)
    print("(async_save's s: until the checkpoint is whole; blocked s: until save() returned)")
    for name, value in result_ratios.items():
        print(f"{name:<36} {value:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ffn", type=int, default=2048, help="SwiGLU width")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant (each in fresh processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (a temporary folder in it)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one repeat (a smoke test)")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.layers, args.ffn, args.vocab, args.repeats = 128, 2, 256, 1024, 1
    # Read by glibc when each rank's process starts: blocks over 128 KB are mapped and unmapped on free, so the
    # resident size follows the live tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    config = model_config(args.dim, args.layers, args.ffn, args.vocab)
    print(
        f"{config.n_params() / 1e6:.1f}M params (dim {config.dim}, {config.n_layers} layers, ffn {config.ffn_dim}, "
        f"vocab {config.vocab_size}) + AdamW state, fp32, FSDP2 over {WORLD} gloo ranks on CPU, "
        f"{args.threads} thread(s) each; {args.repeats} repeat(s), each variant in fresh processes"
    )
    # A SIGTERM ends the run through the `finally` below (the checkpoints are removed); the ranks die with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint-", dir=args.dir))
    try:
        results = work / "results"
        results.mkdir()
        runs: dict[str, list[list[dict]]] = {variant: [] for variant in VARIANTS}
        files: dict[str, dict[str, int]] = {}
        for repeat in range(args.repeats):
            root = work / f"run-{repeat}"
            for variant in VARIANTS:
                runs[variant].append(launch(variant, args, root, results))
                print(f"  repeat {repeat + 1}: {variant} {max(r['seconds'] for r in runs[variant][-1]):.2f} s")
            files = {name: folder_files(root / name / f"step-{STEP:08d}") for name in ("gathered", "sharded", "async")}
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {variant: summarise(variant, runs[variant]) for variant in VARIANTS}
    result_ratios = ratios(rows)
    print_table(rows, result_ratios)
    result = {
        "model": config.model_dump(),
        "n_params": config.n_params(),
        "world_size": WORLD,
        "threads": args.threads,
        "repeats": args.repeats,
        "rows": list(rows.values()),
        "ratios": result_ratios,
        "files": files,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    targets = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "bench_checkpoint.json")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
