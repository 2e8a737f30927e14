"""GPU train-step throughput and MFU of our Chameleon `Transformer` at ~1B parameters (bf16 autocast, compiled blocks).

One step = forward under bf16 autocast + the trainer's loss over every next-token target (the output layer fused
with CE + z-loss, `Transformer.forward(..., loss_mask=...)`; `--logits-path` times full logits + plain CE instead)
+ backward + AdamW step (`model.training.optim.make_optimizer`, fused); weights, grads and optimizer state stay fp32,
as in `model/training/trainer.py`. Each
`model.layers[i]` is compiled in place with `torch.compile` (the trainer's `compile: true`). The batch starts at
`--batch` and halves on out-of-memory. Warm-up (compilation included) and the timed loop are both bounded in seconds
so the whole run ends within ~5 minutes.

MFU = tokens/s * (6 N + 12 L d S) / peak, N = parameters that do matmuls (all but the input embedding table),
peak = the device's dense bf16 peak from `model.training.mfu` (989e12 for H100 SXM and H200). Prints the figures and
writes them to $OUT/gpu_train.json when $OUT is set.
`--documents` then times the same step on packed documents (seq/16 to seq/2 tokens each: 256-2,048 at 4,096;
positions restart per document; `doc_ids` masking as the trainer does by default: FlexAttention on CUDA), reported
under "documents" with MFU by the same formula (it counts full causal attention: the figure to compare).
`--cpu-smoke` runs the same code on CPU with a tiny config (fp32, blocks compiled unless `--no-compile`) to check
the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.lm.document_attention import resolve_document_attention
from model.lm.losses import DEFAULT_CHUNK_SIZE
from model.lm.transformer import Transformer
from model.training.mfu import PEAK_FLOPS, device_peak_flops, flops_per_token, matmul_params
from model.training.optim import make_optimizer
from schemas.model_config import ModelConfig
from schemas.train_config import OptimizerConfig


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against token t+1 (in fp32: autocast upcasts cross_entropy)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def main() -> None:
    start_all = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny config on CPU, fp32 (checks the script)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="starting micro-batch; halved on OOM")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps (the first compiles)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget of the timed loop")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--logits-path", action="store_true", help="full logits + plain CE instead of the fused loss")
    parser.add_argument("--documents", action="store_true", help="also time packed documents (document masking)")
    parser.add_argument("--doc-seconds", type=float, default=20.0, help="time budget of the documents' timed loop")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.cpu_smoke:
        device = torch.device("cpu")
        torch.set_num_threads(2)
        cfg = ModelConfig.from_preset("tiny", max_seq_len=128)
        # Compiles too (inductor's CPU backend) unless --no-compile: the GPU run relies on the per-block compile.
        seq, batch, compile_blocks, autocast_dtype = 128, 2, not args.no_compile, None
        args.seconds, args.doc_seconds, args.warmup_steps = min(args.seconds, 5.0), min(args.doc_seconds, 5.0), 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to torch (use --cpu-smoke to check the script on CPU)")
        device = torch.device("cuda")
        # TF32 for any matmul left in fp32 outside autocast (the optimizer's are elementwise anyway).
        torch.backends.cuda.matmul.allow_tf32 = True
        cfg = ModelConfig(
            dim=2048,
            n_layers=args.layers,
            n_heads=16,
            n_kv_heads=16,
            ffn_dim=5632,
            vocab_size=65_536,
            max_seq_len=args.seq,
        )
        seq, batch, compile_blocks, autocast_dtype = args.seq, args.batch, not args.no_compile, torch.bfloat16

    model = Transformer(cfg).to(device)
    model.train()
    if compile_blocks:
        # Blocks differ only in parameters and `layer_id`; room for one graph per block in case dynamo guards on it.
        dynamo_config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # older torch
        setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), 4 * cfg.n_layers))
        for block in model.layers:
            block.compile()  # in place, as the trainer does: parameter names stay Meta's
    optimizer = make_optimizer(model, OptimizerConfig())
    n_params = model.num_params()
    n_matmul = matmul_params(model)
    fpt = flops_per_token(n_matmul, cfg.n_layers, cfg.dim, seq)
    peak = device_peak_flops(device) or PEAK_FLOPS["H100"]  # an unknown GPU is reported against an H100

    def loss_of(tokens: torch.Tensor, docs: dict[str, torch.Tensor]) -> torch.Tensor:
        if args.logits_path:
            return next_token_ce(model(tokens, **docs), tokens)
        mask = torch.ones_like(tokens, dtype=torch.bool)  # what Trainer._step runs: no [B, S, vocab] logits
        return model(tokens, loss_mask=mask, z_loss_weight=1e-5, loss_chunk_size=DEFAULT_CHUNK_SIZE, **docs).loss

    def step(tokens: torch.Tensor, docs: dict[str, torch.Tensor] | None = None) -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = loss_of(tokens, docs or {})
        loss.backward()
        optimizer.step()
        return loss.item()  # .item() synchronises, so wall time per step is the device's time

    def batch_of(b: int) -> torch.Tensor:
        return torch.randint(0, cfg.vocab_size, (b, seq), device=device)

    # Warm-up: compiles, and finds a batch that fits (halving on OOM) before anything is timed.
    warm_start = time.perf_counter()
    while True:
        tokens = batch_of(batch)
        try:
            for _ in range(args.warmup_steps):
                step(tokens)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            optimizer.zero_grad(set_to_none=True)
            del tokens
            torch.cuda.empty_cache()
            print(f"OOM at batch {batch} x {seq}; retrying with {batch // 2}", flush=True)
            batch //= 2
    warmup_s = time.perf_counter() - warm_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    times, loss = timed_steps(lambda: step(tokens), args.seconds, args.max_steps)
    tokens_per_step = batch * seq
    med = statistics.median(times)
    tps = tokens_per_step / med
    result = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
        "config": cfg.model_dump(exclude={"preset"}),
        "params_total": n_params,
        "params_matmul": n_matmul,
        "batch": batch,
        "seq": seq,
        "tokens_per_step": tokens_per_step,
        "compiled_blocks": compile_blocks,
        "precision": "bf16 autocast, fp32 master weights" if autocast_dtype else "fp32",
        "loss_path": "logits + CE" if args.logits_path else "fused output layer + CE + z-loss (the trainer's)",
        "peak_flops": peak,
        "warmup_steps": args.warmup_steps,
        "warmup_s": round(warmup_s, 2),
        "timed_steps": len(times),
        "step_s_median": med,
        "step_s_best": min(times),
        "tokens_per_s": tps,
        "tokens_per_s_best": tokens_per_step / min(times),
        "flops_per_token": fpt,
        "mfu": tps * fpt / peak,
        "mfu_all_params_6N": tps * flops_per_token(n_params, cfg.n_layers, cfg.dim, seq) / peak,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "last_loss": loss,
        "total_s": round(time.perf_counter() - start_all, 2),
    }
    print(
        f"{result['device']}: {n_params / 1e9:.3f}B params ({n_matmul / 1e9:.3f}B matmul), batch {batch} x {seq}, "
        f"compile {compile_blocks}\n"
        f"  warm-up {warmup_s:.1f}s; {len(times)} timed steps, median {med * 1e3:.1f} ms/step\n"
        f"  tokens/s {tps:,.0f}  MFU {result['mfu'] * 100:.1f}% (N = matmul params; "
        f"{result['mfu_all_params_6N'] * 100:.1f}% counting the embedding table)"
    )
    if result["peak_mem_gib"] is not None:
        print(f"  peak memory {result['peak_mem_gib']:.1f} GiB")
    write_result(result)
    if not args.documents:
        return

    # Packed documents: the blocks recompile for the document mask (their warm-up), then the same timed loop.
    docs = packed_documents(batch, seq, device)
    warm_start = time.perf_counter()
    for _ in range(args.warmup_steps):
        step(tokens, docs)
    doc_warmup_s = time.perf_counter() - warm_start
    doc_times, doc_loss = timed_steps(lambda: step(tokens, docs), args.doc_seconds, args.max_steps)
    doc_med = statistics.median(doc_times)
    result["documents"] = {
        "attention": resolve_document_attention(model.document_attention, device, cfg.head_dim),
        "documents_per_sequence": (docs["doc_ids"].amax(dim=1) + 1).float().mean().item(),
        "warmup_s": round(doc_warmup_s, 2),
        "timed_steps": len(doc_times),
        "step_s_median": doc_med,
        "tokens_per_s": tokens_per_step / doc_med,
        "mfu": tokens_per_step / doc_med * fpt / peak,
        "last_loss": doc_loss,
    }
    result["total_s"] = round(time.perf_counter() - start_all, 2)
    d = result["documents"]
    print(
        f"  packed documents ({d['documents_per_sequence']:.1f} per sequence, {d['attention']} attention): "
        f"warm-up {doc_warmup_s:.1f}s; {len(doc_times)} timed steps, median {doc_med * 1e3:.1f} ms/step, "
        f"tokens/s {d['tokens_per_s']:,.0f}  MFU {d['mfu'] * 100:.1f}%"
    )
    write_result(result)


def timed_steps(run_step, seconds: float, max_steps: int) -> tuple[list[float], float]:
    """Wall seconds of each step run within `seconds` (at most `max_steps`), and the last step's loss."""
    times, loss = [], float("nan")
    loop_start = time.perf_counter()
    while len(times) < max_steps and time.perf_counter() - loop_start < seconds:
        t0 = time.perf_counter()
        loss = run_step()
        times.append(time.perf_counter() - t0)
    return times, loss


def packed_documents(batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """doc_ids and positions of sequences packed with documents of seq/16 to seq/2 tokens (the last cut at `seq`)."""
    generator = torch.Generator().manual_seed(0)
    doc_ids, positions = torch.empty(batch, seq, dtype=torch.long), torch.empty(batch, seq, dtype=torch.long)
    for row in range(batch):
        start, doc = 0, 0
        while start < seq:
            length = min(int(torch.randint(seq // 16, seq // 2 + 1, (1,), generator=generator)), seq - start)
            doc_ids[row, start : start + length] = doc
            positions[row, start : start + length] = torch.arange(length)
            start, doc = start + length, doc + 1
    return {"doc_ids": doc_ids.to(device), "positions": positions.to(device)}


def write_result(result: dict) -> None:
    """Write the figures to $OUT/gpu_train.json when $OUT is set (again after each measure, so a cut run keeps some)."""
    out = os.environ.get("OUT")
    if out:
        path = Path(out) / "gpu_train.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"  wrote {path}")


if __name__ == "__main__":
    main()
