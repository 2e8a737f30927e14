"""VQ encode throughput on CPU (images/s) by batch size: channels_last vs contiguous, in one run, with the ratio.

channels_last runs our accurate GroupNorm (model/tokenizers/vqgan.py); the column "before" is channels_last
with PyTorch's own CPU kernel, which is faster but loses precision on flat regions (issue 17), measured alongside for
the record. Random weights (speed does not depend on them). `--quick` keeps it to a few seconds of tiny and one
512 px Chameleon batch. Timings alternate between the two layouts so load from other processes hits both.

    .venv/bin/python bench/bench_vq_encode.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from model.tokenizers.vqgan import VQGAN, GroupNorm
from schemas.vq_config import VQConfig

FULL = {"tiny": ([1, 4, 16], 5), "chameleon": ([1, 2, 4], 1)}  # batch sizes, timed repetitions each
QUICK = {"tiny": ([1, 16], 3), "chameleon": ([1], 1)}


def _time_encode(model: VQGAN, pixels: torch.Tensor) -> float:
    start = time.perf_counter()
    model.encode(pixels)
    return time.perf_counter() - start


@contextlib.contextmanager
def _pytorch_group_norm():
    """GroupNorm as it was before issue 17: PyTorch's kernel in every layout."""
    accurate = GroupNorm.forward
    GroupNorm.forward = lambda self, x: F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
    try:
        yield
    finally:
        GroupNorm.forward = accurate


def _time_before(model: VQGAN, pixels: torch.Tensor) -> float:
    with _pytorch_group_norm():
        return _time_encode(model, pixels)


def bench_preset(preset: str, batches: list[int], reps: int) -> list[tuple[str, int, float, float]]:
    """Rows (preset, batch, contiguous img/s, channels_last img/s); also checks both layouts give the same codes."""
    cfg = VQConfig.from_preset(preset)
    torch.manual_seed(0)
    contiguous = VQGAN(cfg, with_decoder=False).eval()
    fast = VQGAN(cfg, with_decoder=False).eval()
    fast.load_state_dict(contiguous.state_dict())
    fast.channels_last()
    rows = []
    for batch in batches:
        pixels = torch.rand(batch, 3, cfg.resolution, cfg.resolution) * 2 - 1
        # Warm-up (oneDNN builds its kernels per shape and layout) doubles as the check that both give the same
        # codes (a few may differ: near-ties of a random codebook under a different summation order).
        agree = (contiguous.encode(pixels) == fast.encode(pixels)).float().mean().item()
        _time_before(fast, pixels)  # warm-up
        times: dict[str, list[float]] = {"contiguous": [], "channels_last": [], "before": []}
        for _ in range(reps):
            times["contiguous"].append(_time_encode(contiguous, pixels))
            times["channels_last"].append(_time_encode(fast, pixels))
            times["before"].append(_time_before(fast, pixels))
        cont, cl, before = (batch / statistics.median(times[k]) for k in ("contiguous", "channels_last", "before"))
        rows.append((preset, batch, cont, cl))
        print(
            f"{preset:>9} {cfg.resolution:>4}px  batch {batch:>2}: contiguous {cont:8.2f} img/s   "
            f"channels_last {cl:8.2f} img/s   ratio {cl / cont:.2f}x   (before: {before:8.2f} img/s, "
            f"{cl / before:.2f}x of it)   codes agree {agree:.1%}",
            flush=True,
        )
    return rows


def main() -> None:
    """Run the comparison and print one line per (preset, batch) plus the overall ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repetitions")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    print(f"VQ encode, torch {torch.__version__}, {torch.get_num_threads()} threads, inference_mode, fp32")
    rows = [row for preset, (batches, reps) in plan.items() for row in bench_preset(preset, batches, reps)]
    ratios = [cl / cont for _, _, cont, cl in rows]
    geo = statistics.geometric_mean(ratios)
    print(f"channels_last / contiguous throughput: geometric mean {geo:.2f}x over {len(rows)} settings")


if __name__ == "__main__":
    main()
