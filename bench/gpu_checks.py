"""Correctness of the two CUDA-only code paths, checked on a lent GPU machine in about a minute.

1. Document masking through FlexAttention (`model/document_attention.py`): the loss and every parameter's gradient
   of a tiny grouped-query model on packed documents equal those of the dense-mask SDPA path (fp32).
2. CUDA-graph decoding (`model/decode_graph.py`): greedy generations in text and mixed mode, with a padded prompt and
   guidance rows, equal the eager decode's, and a second call (the kept graph, replayed) gives the same again.

Prints one line per check, writes $OUT/gpu_checks.json when $OUT is set, and exits 1 if any check fails.
`--cpu-smoke` runs the same code on CPU to check the script: FlexAttention forward only (it has no CPU backward), and
the fixed-shape decode step run eagerly instead of from a graph.
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

from model.generation import Generator
from model.transformer import Transformer
from model.vocabulary import Vocabulary
from schemas.generate_config import GenerateConfig
from schemas.model_config import ModelConfig
from schemas.vocab import TINY


def packed_doc_ids(device: torch.device) -> torch.Tensor:
    """Two rows of 200 positions: documents crossing FlexAttention's 128-position blocks, and padding (-1)."""
    first = [0] * 70 + [1] * 90 + [2] * 25 + [-1] * 15
    second = [0] * 130 + [1] * 70
    return torch.tensor([first, second], device=device)


def check_flex_attention(device: torch.device) -> dict:
    """Max differences between the FlexAttention and dense-mask paths (loss, logits or gradients)."""
    # head_dim 16 (Triton's minimum); larger weights than the default init, so that a wrong mask shows plainly.
    config = ModelConfig.from_preset("tiny", n_heads=4, n_kv_heads=2, init_std=0.2)
    doc_ids = packed_doc_ids(device)
    tokens = torch.randint(0, config.vocab_size, doc_ids.shape, device=device)
    backward = device.type == "cuda"
    results = {}
    for kernel in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = Transformer.from_config(config).to(device).train(backward)
        model.document_attention = kernel
        with torch.set_grad_enabled(backward):
            if backward:
                out = model(tokens, doc_ids=doc_ids, loss_mask=doc_ids != -1)
                out.loss.backward()
                results[kernel] = {"loss": out.loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}
            else:
                results[kernel] = {"logits": model(tokens, doc_ids=doc_ids)}
    # Each tensor's max difference relative to its own largest value.
    relative = {
        name: float((results["flex"][name] - value).abs().max() / value.abs().max().clamp(min=1e-12))
        for name, value in results["sdpa"].items()
    }
    worst = max(relative, key=relative.get)
    return {"passed": relative[worst] <= 1e-3, "backward": backward, "max_relative_diff": relative[worst],
            "worst": worst}  # fmt: skip


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
        outcome["graphed"] = static.static_steps is not False and device.type == "cuda"  # capture failed: False
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="run on CPU (checks the script)")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch (use --cpu-smoke to check the script on CPU)")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
              "torch": torch.__version__}  # fmt: skip
    for name, check in (("flex_attention", check_flex_attention), ("graph_decoding", check_graph_decoding)):
        try:
            report[name] = check(device)
        except Exception as error:  # one failing check must not hide the other's result
            report[name] = {"passed": False, "error": f"{type(error).__name__}: {error}"}
        print(f"{name}: {'ok' if report[name]['passed'] else 'FAILED'} {report[name]}", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_checks.json").write_text(json.dumps(report, indent=2))
    sys.exit(0 if all(report[name]["passed"] for name in ("flex_attention", "graph_decoding")) else 1)


if __name__ == "__main__":
    main()
