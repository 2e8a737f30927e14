"""Correctness of the CUDA-only code paths, checked on a lent GPU machine in about a minute.

1. The trainer's fused output layer + loss (`model/lm/losses.py`, its CUDA layout) equals `lm_loss` on full logits, in
   fp32 and under bf16 autocast, values and gradients.
2. Document masking through FlexAttention (`model/lm/document_attention.py`): the loss and every parameter's gradient
   of a tiny grouped-query model on packed documents equal those of the dense-mask SDPA path, in fp32, under bf16
   autocast (as the trainer runs on GPUs), and under bf16 autocast with compiled blocks.
3. CUDA-graph decoding (`model/generation/decode_graph.py`): greedy generations in text and mixed mode, with a
   padded prompt and guidance rows, equal the eager decode's, and a second call (the kept graph, replayed) gives the
   same again.
4. FSDP2's mixed precision (`model/training/parallelize.py`): a one-rank FSDP2 model built the trainer's way (meta,
   sharded with `MixedPrecisionPolicy(bf16 params, fp32 reduction)`, materialised, initialised per shard) trains three
   AdamW steps with the losses of the autocast path (the whole fp32 model under bf16 autocast) within bf16 rounding;
   it computes with bf16 weights and keeps fp32 master weights and gradients.

Prints one line per check, writes $OUT/gpu_checks.json when $OUT is set, and exits 1 if any check fails.
`--cpu-smoke` runs the same code on CPU to check the script: FlexAttention forward only (it has no CPU backward), the
fixed-shape decode step run eagerly instead of from a graph, and the loss in CPU's layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from torch import nn

from model.generation.generator import Generator
from model.lm.losses import fused_lm_loss, lm_loss
from model.lm.transformer import Transformer
from model.tokenizers.vocabulary import Vocabulary
from schemas.generate_config import GenerateConfig
from schemas.model_config import ModelConfig
from schemas.vocab import TINY


def packed_doc_ids(device: torch.device) -> torch.Tensor:
    """Two rows of 200 positions: documents crossing FlexAttention's 128-position blocks, and padding (-1)."""
    first = [0] * 70 + [1] * 90 + [2] * 25 + [-1] * 15
    second = [0] * 130 + [1] * 70
    return torch.tensor([first, second], device=device)


def worst_relative_difference(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict:
    """The tensor whose max difference, relative to its own largest value, is largest; NaN or inf count as worst."""
    relative = {}
    for name, value in reference.items():
        diff = (other[name].float() - value.float()).abs().max() / value.float().abs().max().clamp(min=1e-12)
        relative[name] = float(diff) if torch.isfinite(diff) else float("inf")
    worst = max(relative, key=relative.get)
    return {"worst": worst, "max_relative_diff": relative[worst]}


def check_flex_attention(device: torch.device) -> dict:
    """FlexAttention against the dense-mask path: loss and every gradient (CUDA) in fp32, under bf16 autocast, and
    under bf16 autocast with each block compiled (the trainer's `compile: true`)."""
    # head_dim 16 (Triton's minimum); larger weights than the default init, so that a wrong mask shows plainly.
    config = ModelConfig.from_preset("tiny", n_heads=4, n_kv_heads=2, init_std=0.2)
    doc_ids = packed_doc_ids(device)
    tokens = torch.randint(0, config.vocab_size, doc_ids.shape, device=device)
    backward = device.type == "cuda"

    def run(kernel: str, precision: str, compiled: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = Transformer.from_config(config).to(device).train(backward)
        model.document_attention = kernel
        if compiled:
            for block in model.layers:
                block.compile()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
        with torch.set_grad_enabled(backward), autocast:
            if not backward:
                return {"logits": model(tokens, doc_ids=doc_ids)}
            out = model(tokens, doc_ids=doc_ids, loss_mask=doc_ids != -1)
            out.loss.backward()
            return {"loss": out.loss.detach(), **{name: p.grad for name, p in model.named_parameters()}}

    outcome = {"passed": True, "backward": backward}
    reference = {precision: run("sdpa", precision, False) for precision in ("fp32", "bf16")}
    # bf16's tolerance allows its rounding (forward: 0.013 on CPU) and stays far below a wrong mask's (about 1.3).
    for variant, precision, compiled, tolerance in (
        ("fp32", "fp32", False, 1e-3),
        ("bf16", "bf16", False, 0.1),
        ("bf16_compiled", "bf16", True, 0.1),
    ):
        found = worst_relative_difference(reference[precision], run("flex", precision, compiled))
        outcome[variant] = {**found, "tolerance": tolerance}
        outcome["passed"] &= found["max_relative_diff"] <= tolerance
    return outcome


def check_fused_loss(device: torch.device) -> dict:
    """The trainer's fused output layer + loss against `lm_loss` on full logits, fp32 and bf16 autocast."""
    g = torch.Generator(device=device).manual_seed(0)
    vocab_size, dim = 2048, 64
    hidden = torch.randn(3, 300, dim, device=device, generator=g)
    weight = torch.randn(vocab_size, dim, device=device, generator=g) * 0.5
    tokens = torch.randint(0, vocab_size, (3, 300), device=device, generator=g)
    mask = torch.rand(3, 300, device=device, generator=g) < 0.8
    outcome = {"passed": True}
    for precision, tolerance in (("fp32", 1e-4), ("bf16", 3e-2)):
        results = {}
        for path in ("logits", "fused"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                if path == "fused":  # chunks of 100 rows: the last one shorter
                    out = fused_lm_loss(h, w, tokens, mask, 1e-4, None, chunk_size=100)
                else:
                    out = lm_loss((h @ w.t()).float(), tokens, mask, 1e-4, None)
            grad_h, grad_w = torch.autograd.grad(out.loss, (h, w))
            results[path] = {"loss": out.loss.detach(), "grad_hidden": grad_h, "grad_weight": grad_w}
        found = worst_relative_difference(results["logits"], results["fused"])
        outcome[precision] = {**found, "tolerance": tolerance}
        outcome["passed"] &= found["max_relative_diff"] <= tolerance
    return outcome


def tiny_generation_model(device: torch.device, vocab: Vocabulary) -> Transformer:
    """A random tiny model whose output layer favours BOI a little, so that mixed mode starts images."""
    torch.manual_seed(4)
    model = Transformer(ModelConfig.from_preset("tiny", init_std=0.2)).eval()
    head = nn.Linear(model.config.dim, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.output.weight)
        head.bias.zero_()
        head.bias[vocab.boi_id] = 4.0
    model.output = head
    return model.to(device)


def check_graph_decoding(device: torch.device) -> dict:
    """Greedy generations with the graph path (a fixed-shape eager step off CUDA) against the eager decode."""
    vocab = Vocabulary(TINY)
    model = tiny_generation_model(device, vocab)
    g = torch.Generator().manual_seed(5)
    text = [vocab.bos_id, *torch.randint(vocab.first_text_id, vocab.size, (3,), generator=g).tolist()]
    image = vocab.image_block(torch.randint(0, vocab.n_image_codes, (vocab.tokens_per_image,), generator=g)).tolist()
    prompts = [text, [*text, *image, vocab.first_text_id + 7]]  # padding, and an image-only guidance row
    outcome = {"passed": True}
    with TemporaryDirectory() as checkpoint:  # GenerateConfig.checkpoint must exist; nothing is read from it
        config = GenerateConfig.model_validate(
            {"checkpoint": checkpoint, "text": {"temperature": 0.0}, "image": {"temperature": 0.0}}
        )
        # On CUDA the default (None: graphs in eval mode), what users get; on CPU the fixed-shape step forced.
        static = Generator(model, vocab, config, static_steps=None if device.type == "cuda" else True)
        eager = Generator(model, vocab, config, static_steps=False)
        for mode in ("text", "mixed"):
            expected = eager.generate(prompts, mode, 100, 0)
            first, again = static.generate(prompts, mode, 100, 0), static.generate(prompts, mode, 100, 0)
            images = sum(row.count(vocab.boi_id) for row in expected)
            same = first == expected and again == expected
            outcome[mode] = {"equal": same, "images": images}
            outcome["passed"] &= same and (mode == "text" or images > 0)
        # On CUDA a failed capture turns the graph off (with a warning): the comparison would then be eager vs eager.
        outcome["graphed"] = static.static_steps is not False and device.type == "cuda"
        outcome["passed"] &= outcome["graphed"] or device.type != "cuda"
    return outcome


def fsdp_mixed_precision_losses(device: torch.device, config: ModelConfig, path: str) -> dict:
    """Three AdamW steps of one fixed batch: `path` "autocast" (the whole fp32 model under bf16 autocast, as one
    process and DDP train) or "fsdp" (one FSDP2 rank, the trainer's sharded build and bf16 policy, no autocast);
    the losses, and for "fsdp" the dtypes the output layer computed with and the masters and gradients kept."""
    from model.training.parallelize import init_shards, init_templates, materialise, meta_model, precision_plan, shard

    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, config.vocab_size, (4, 256), generator=g).to(device)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    torch.manual_seed(0)
    found: dict = {}
    if path == "fsdp":
        model = meta_model(config)
        templates = init_templates(model)
        # The trainer's policy for bf16 under FSDP2 on CUDA (also on the CPU for the smoke run).
        shard(model, precision_plan("bf16", "cuda", fsdp=True, bf16_supported=True).fsdp_policy)
        materialise(model, device)
        init_shards(templates, config.init_std)

        def record(module: nn.Module, args: tuple) -> None:  # the weight a projection multiplies by
            found["compute_dtype"] = str(module.weight.dtype)

        hook = model.layers[0].attention.wq.register_forward_pre_hook(record)
    else:
        model = Transformer(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=path == "autocast"):
            loss = model(tokens, loss_mask=mask).loss
        loss.backward()
        if path == "fsdp":
            found["grad_dtype"] = str(model.output.weight.grad.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if path == "fsdp":
        hook.remove()
        found["master_dtype"] = str(model.output.weight.dtype)
    return {"losses": losses, **found}


def check_fsdp_mixed_precision(device: torch.device) -> dict:
    """The FSDP2 bf16 policy's losses against the autocast path's (one rank; NCCL on CUDA, gloo for the smoke)."""
    import torch.distributed as dist

    config = ModelConfig.from_preset("tiny", n_heads=4, n_kv_heads=2)
    with TemporaryDirectory() as store:
        started = not dist.is_initialized()
        if started:
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"file://{store}/pg", rank=0, world_size=1)
        try:
            autocast = fsdp_mixed_precision_losses(device, config, "autocast")
            fsdp = fsdp_mixed_precision_losses(device, config, "fsdp")
        finally:
            if started:
                dist.destroy_process_group()
    # bf16 keeps 8 bits of mantissa (relative rounding 0.4%); the residual stream is bf16 under the policy and fp32
    # under autocast. A wrong policy (no update, fp32 compute, a lost reduction) moves the losses far more.
    tolerance = 1e-2
    worst = max(abs(a - b) / abs(a) for a, b in zip(autocast["losses"], fsdp["losses"], strict=True))
    dtypes = {"compute_dtype": "torch.bfloat16", "master_dtype": "torch.float32", "grad_dtype": "torch.float32"}
    passed = worst <= tolerance and all(fsdp.get(key) == value for key, value in dtypes.items())
    passed &= autocast["losses"][-1] < autocast["losses"][0]  # the steps train
    return {"passed": passed, "autocast": autocast, "fsdp": fsdp, "max_relative_diff": worst, "tolerance": tolerance}


CHECKS = {
    "fused_loss": check_fused_loss,
    "graph_decoding": check_graph_decoding,
    "fsdp_mixed_precision": check_fsdp_mixed_precision,
    "flex_attention": check_flex_attention,
}  # cheapest first: flex compiles the longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run on CPU (checks the script)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch (use --cpu-smoke to check the script on CPU)")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    report = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
        "torch": torch.__version__,
    }
    out = os.environ.get("OUT")
    for name, check in CHECKS.items():
        try:
            report[name] = check(device)
        except Exception as error:  # one failing check must not hide the others' results
            report[name] = {"passed": False, "error": f"{type(error).__name__}: {error}"}
        print(f"{name}: {'ok' if report[name]['passed'] else 'FAILED'} {report[name]}", flush=True)
        if out:  # after each check, so a run cut by its time limit keeps what finished
            Path(out, "gpu_checks.json").write_text(json.dumps(report, indent=2))
    sys.exit(0 if all(report[name]["passed"] for name in CHECKS) else 1)


if __name__ == "__main__":
    main()
