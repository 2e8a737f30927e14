"""Generation speed: our `model.generation.generator.Generator` vs transformers' `generate`, the same weights.

Two measures, at two sizes (the `tiny` preset with its 8x8-code images, and a ~100M body with Chameleon's 65,536-id
vocabulary and 32x32-code images), at batch 1 and batch 4:

* text tokens/s: new text tokens per second of wall time, prompt prefill included;
* seconds per image: wall time of generating one image's `tokens_per_image` codes (prefill included) / batch.

How the comparison is kept fair:

* The same weights: our random model is converted with `model.lm.convert.state_to_hf` into HF's
  `ChameleonForConditionalGeneration` (config from `hf_config_dict`, SDPA attention, a tiny frozen VQ-VAE that never
  runs) in memory; the script checks the two models' prompt logits agree (max |diff| printed) and, for greedy text,
  how many rows generate the same ids.
* The same prompts (random text ids after `<s>`; the batch of 4 has different lengths, so both left-pad), the same
  dtype and device, the same thread count (`torch.set_num_threads`), and the same number of new tokens: HF gets
  `min_new_tokens = max_new_tokens` (its end-of-sequence is suppressed); ours has no such switch, so the script
  checks that every row of ours ran the full length and says so if one did not.
* Text: greedy on both, with Chameleon's repetition penalty 1.2 on both (the same CTRL rule over the context) and the
  same allowed ids (text ids and `</s>`): ours by its text-mode modality mask, HF by a `LogitsProcessor` with that
  mask (on top of HF's own image-token mask in its forward). So both should pick the same ids.
* Images: HF's Chameleon does not generate images (its forward masks every image code), so its image run is
  "generate `tokens_per_image` codes after `<s> prompt BOI`" with a `LogitsProcessor` that allows only image-code
  ids, HF's own image-code mask switched off for that run (that only saves HF work), sampling with temperature 0.7
  and top-p 0.9 (Chameleon's image defaults). Ours runs image mode on the same prompt ending in BOI with
  `guidance=False` and the same sampling settings, so it too samples exactly `tokens_per_image` codes (it then
  appends EOI without sampling). Ours with classifier-free guidance (3 streams per prompt, Chameleon's default) is
  reported for information: HF has no counterpart.
* On CUDA ours decodes one-token steps by replaying a CUDA graph (`model/generation/decode_graph.py`,
  Generator's default there); its text rows also time ours without the graph (`ours_eager`, information).
  `--static-steps off` times ours without graphs throughout.
* Timing: one untimed warm-up call of each (the text calls; on CPU the image calls then run on the warmed models,
  on CUDA they have their own warm-up call, which holds the image shape's graph capture), then
  the two alternate call by call (drift on a shared machine hits both); each figure is the median of `--repeats`
  (`--image-repeats`) calls; on CUDA the device is synchronised before and after each.
  HF runs its default generation path (dynamic KV cache, `logits_to_keep=1`).

Prints a table and the ratios ours / HF (the goal is >= 2x), and writes the figures as JSON to `--json` and to
$OUT/bench_generate.json when $OUT is set. Runs from the repo root with PYTHONPATH=. (no install needed):

    PYTHONPATH=. python bench/bench_generate.py [--quick] [--device cuda] [--dtype bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere without installing the package
    sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402
from transformers import ChameleonConfig, ChameleonForConditionalGeneration, LogitsProcessor  # noqa: E402

from model.generation.generator import Generator, allowed_mask  # noqa: E402
from model.lm.convert import hf_config_dict, state_to_hf  # noqa: E402
from model.lm.transformer import Transformer  # noqa: E402
from model.tokenizers.vocabulary import Modality, Vocabulary  # noqa: E402
from schemas.generate_config import GenerateConfig  # noqa: E402
from schemas.model_config import ModelConfig  # noqa: E402
from schemas.vocab import CHAMELEON, TINY, VocabLayout  # noqa: E402

# The smallest VQ-VAE HF accepts (as in bench_train_step.py): it is never run, only built.
TINY_VQ = {
    "embed_dim": 32,
    "num_embeddings": 16,
    "latent_channels": 32,
    "resolution": 16,
    "base_channels": 32,
    "channel_multiplier": [1],
    "num_res_blocks": 1,
    "attn_resolutions": [],
}
IMAGE_TEMPERATURE, IMAGE_TOP_P, REPETITION_PENALTY = 0.7, 0.9, 1.2


class AllowOnly(LogitsProcessor):
    """-inf outside a fixed set of ids (the same mask ours applies)."""

    def __init__(self, allowed: torch.Tensor):
        self.disallowed = ~allowed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.disallowed.device != scores.device:
            self.disallowed = self.disallowed.to(scores.device)
        return scores.masked_fill(self.disallowed, float("-inf"))


def build_models(cfg: ModelConfig, layout: VocabLayout, device: torch.device, dtype: torch.dtype):
    """Our random model and HF's Chameleon holding the same weights (converted in memory)."""
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    hf_dict = hf_config_dict(cfg, layout, vq_config=TINY_VQ)
    hf_dict.pop("architectures", None)
    hf_config = ChameleonConfig(**hf_dict)
    hf_config._attn_implementation = "sdpa"  # the fused attention kernel ours calls
    hf = ChameleonForConditionalGeneration(hf_config).eval()
    missing, unexpected = hf.load_state_dict(state_to_hf(ours.state_dict(), cfg), strict=False)
    missing = [k for k in missing if not k.startswith("model.vqmodel.")]
    if missing or unexpected:
        raise SystemExit(f"weight conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return ours.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype)


def make_prompts(layout: VocabLayout, lengths: list[int], seed: int, end_with_boi: bool) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    prompts = []
    for n in lengths:
        ids = [0, *rng.integers(layout.first_text_id, layout.vocab_size, n - 1).tolist()]  # <s> + text
        prompts.append([*ids, layout.boi_id] if end_with_boi else ids)
    return prompts


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


class NoImageMask:
    """Switch off HF's in-forward image-code mask (for the image runs, which must sample image codes)."""

    def __init__(self, hf):
        self.mapping = hf.model.vocabulary_mapping

    def __enter__(self):
        self.saved = self.mapping.__dict__.get("image_tokens")
        self.mapping.__dict__["image_tokens"] = []  # shadows the cached_property

    def __exit__(self, *exc):
        if self.saved is None:
            self.mapping.__dict__.pop("image_tokens", None)
        else:
            self.mapping.__dict__["image_tokens"] = self.saved


def run_case(
    label: str, cfg: ModelConfig, layout: VocabLayout, args, device: torch.device, dtype: torch.dtype, config_dir: str
) -> list[dict]:
    vocab = Vocabulary(layout)
    ours_model, hf = build_models(cfg, layout, device, dtype)
    n_params = sum(p.numel() for p in ours_model.parameters())
    tpi = layout.tokens_per_image
    text_tokens = args.text_tokens or (32 if args.quick else 128)
    print(
        f"\n[{label}] dim {cfg.dim}, layers {cfg.n_layers}, heads {cfg.n_heads}/{cfg.n_kv_heads} kv, "
        f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}, {n_params / 1e6:.1f} M params; "
        f"{text_tokens} text tokens, {tpi} codes per image",
        flush=True,
    )
    gen_config = GenerateConfig.model_validate(
        {
            "checkpoint": config_dir,
            "text": {"temperature": 0.0, "repetition_penalty": REPETITION_PENALTY},
            "image": {"temperature": IMAGE_TEMPERATURE, "top_p": IMAGE_TOP_P},
        }
    )
    static = {"auto": None, "on": True, "off": False}[args.static_steps]
    ours_plain = Generator(ours_model, vocab, gen_config, guidance=False, static_steps=static)
    ours_cfg = Generator(ours_model, vocab, gen_config, guidance=True, static_steps=static)
    # On a GPU, ours without the CUDA graph too (information: what the graph is worth).
    ours_eager = Generator(ours_model, vocab, gen_config, guidance=False, static_steps=False)
    text_allowed = allowed_mask(vocab, "text", False, 0, text_tokens)
    image_allowed = vocab.mask(Modality.IMAGE)

    # The two models must be the same function: compare prompt logits once.
    probe = torch.tensor([make_prompts(layout, [24], 99, False)[0]], device=device)
    with torch.no_grad():
        diff = (ours_model(probe).float() - hf(input_ids=probe).logits.float())[..., text_allowed.to(device)]
    max_diff = float(diff.abs().max())
    print(f"  same weights: max |logit ours - HF| over text ids = {max_diff:.2e}")

    def hf_generate(ids, mask, n, processor, sample):
        kwargs = {"do_sample": True, "temperature": IMAGE_TEMPERATURE, "top_p": IMAGE_TOP_P, "top_k": 0}
        if not sample:
            kwargs = {"do_sample": False, "repetition_penalty": REPETITION_PENALTY}
        with torch.no_grad():
            return hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=vocab.pad_id,
                eos_token_id=vocab.eos_id,
                logits_processor=[processor],
                use_cache=True,
                **kwargs,
            )

    rows: list[dict] = []
    for batch in (1, 4):
        lengths = [32, 20, 27, 14][:batch]
        text_prompts = make_prompts(layout, lengths, batch, False)
        image_prompts = make_prompts(layout, lengths, 10 + batch, True)
        t_ids, t_mask = left_pad(text_prompts, vocab.pad_id, device)
        i_ids, i_mask = left_pad(image_prompts, vocab.pad_id, device)
        text_proc, image_proc = AllowOnly(text_allowed), AllowOnly(image_allowed)
        tasks = {
            "text": {
                "ours": lambda p=text_prompts: ours_plain.generate(p, "text", text_tokens, 0),
                "hf": lambda i=t_ids, m=t_mask, q=text_proc: hf_generate(i, m, text_tokens, q, False),
                "ours_eager": lambda p=text_prompts: ours_eager.generate(p, "text", text_tokens, 0),
            },
            "image": {
                "ours": lambda p=image_prompts: ours_plain.generate(p, "image", tpi + 1, 0),
                "hf": lambda i=i_ids, m=i_mask, q=image_proc: hf_generate(i, m, tpi, q, True),
                "ours_cfg": lambda p=image_prompts: ours_cfg.generate(p, "image", tpi + 1, 0),
            },
        }
        if args.cfg == "none" or (args.cfg == "batch1" and batch > 1):
            del tasks["image"]["ours_cfg"]
        if device.type != "cuda" or static is False:  # off CUDA the default path is the eager one already
            del tasks["text"]["ours_eager"]
        for what, fns in tasks.items():
            if what not in args.what.split(","):
                continue
            if what == "text":
                repeats = args.repeats or (2 if args.quick else 3)
            else:
                repeats = args.image_repeats or (2 if cfg.dim < 256 or device.type == "cuda" else 1)
            # Text calls begin with an untimed warm-up round; on CPU the image calls use the models the text calls
            # warmed. On CUDA they warm up too: their new shape means a new CUDA graph capture for ours.
            warmup = 1 if what == "text" or "text" not in args.what or device.type == "cuda" else 0
            times: dict[str, list[float]] = {name: [] for name in fns}
            outs: dict[str, object] = {}
            with NoImageMask(hf) if what == "image" else _null():
                for rep in range(warmup + repeats):
                    for name, fn in fns.items():
                        seconds, outs[name] = timed(fn, device)
                        if rep >= warmup:
                            times[name].append(seconds)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            ours_out = outs["ours"]
            hf_new = outs["hf"][:, -(text_tokens if what == "text" else tpi) :].tolist()
            if what == "text":
                full = all(len(o) == text_tokens for o in ours_out)
                same = sum(o == h for o, h in zip(ours_out, hf_new, strict=True))
                check = f"ours full length: {full}; greedy ids equal to HF's in {same}/{batch} rows"
                rate = {name: batch * text_tokens / s for name, s in med.items()}
                unit = "tok/s"
            else:
                codes_ok = all(len(o) == tpi + 1 and all(4 <= t < vocab.eoi_id for t in o[:tpi]) for o in ours_out)
                hf_ok = all(4 <= t < vocab.eoi_id for row in hf_new for t in row)
                check = f"ours {tpi} codes + EOI per row: {codes_ok}; HF only codes: {hf_ok}"
                rate = {name: s / batch for name, s in med.items()}
                unit = "s/image"
            ratio = rate["ours"] / rate["hf"] if what == "text" else rate["hf"] / rate["ours"]
            row = {
                "config": label,
                "what": what,
                "batch": batch,
                "unit": unit,
                "ours": rate["ours"],
                "hf": rate["hf"],
                "ours_cfg": rate.get("ours_cfg"),
                "ours_eager": rate.get("ours_eager"),
                "ratio": ratio,
                "repeats": repeats,
                "new_tokens": text_tokens if what == "text" else tpi,
                "check": check,
                "max_logit_diff": max_diff,
            }
            rows.append(row)
            cfg_part = f"  ours CFG(3 streams) {rate['ours_cfg']:.4g} {unit}" if "ours_cfg" in rate else ""
            if "ours_eager" in rate:
                cfg_part += f"  ours without CUDA graph {rate['ours_eager']:.4g} {unit}"
            print(
                f"  {what:5s} batch {batch}: ours {rate['ours']:.4g} {unit}  HF {rate['hf']:.4g} {unit}  "
                f"-> ours / HF {ratio:.2f}x{cfg_part}   ({check})",
                flush=True,
            )
    return rows


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def print_table(rows: list[dict]) -> None:
    print("\n| config | measure | batch | ours | HF | ours / HF | ours, CFG 3 streams |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cfg = f"{r['ours_cfg']:.4g}" if r["ours_cfg"] is not None else "-"
        print(
            f"| {r['config']} | {r['what']} ({r['unit']}) | {r['batch']} | {r['ours']:.4g} | {r['hf']:.4g} | "
            f"**{r['ratio']:.2f}x** | {cfg} |"
        )
    ratios = [r["ratio"] for r in rows]
    gmean = float(np.exp(np.mean(np.log(ratios))))
    print(f"\nours / HF: geometric mean {gmean:.2f}x, min {min(ratios):.2f}x (goal >= 2x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config only, short runs (a CPU smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (both models)")
    parser.add_argument("--text-tokens", type=int, default=None, help="new text tokens per call (default 128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measure (median reported)")
    parser.add_argument(
        "--image-repeats",
        type=int,
        default=None,
        help="timed image calls (default 2; 1 for the 100M config on CPU, where one takes ~a minute)",
    )
    parser.add_argument("--what", default="text,image", help="text, image or text,image")
    parser.add_argument(
        "--cfg",
        choices=("all", "batch1", "none"),
        default="all",
        help="which batches also time ours with classifier-free guidance (information only)",
    )
    parser.add_argument("--big-layers", type=int, default=12, help="layers of the ~100M config")
    parser.add_argument("--only", choices=("tiny", "100M"), default=None, help="run one config")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument(
        "--static-steps",
        choices=("auto", "on", "off"),
        default="auto",
        help="ours' fixed-shape decode steps (a CUDA graph on GPU): auto = on CUDA only (Generator's default)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
        f"{device} ({where}), {torch.get_num_threads()} threads, {args.dtype}"
    )
    tiny = ModelConfig.from_preset("tiny", max_seq_len=512)
    # ~100M non-embedding parameters (GPT-2-small widths) with Chameleon's 65,536 ids and 1,024-code images.
    big = ModelConfig(
        dim=768,
        n_layers=args.big_layers,
        n_heads=12,
        n_kv_heads=12,
        ffn_dim=2048,
        vocab_size=65_536,
        max_seq_len=2048,
    )
    cases = [("tiny", tiny, TINY)] + ([] if args.quick else [("100M", big, CHAMELEON)])
    if args.only:
        cases = [c for c in [("tiny", tiny, TINY), ("100M", big, CHAMELEON)] if c[0] == args.only]
    targets = [Path(args.json)] if args.json else []
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / "bench_generate.json")
    rows: list[dict] = []

    def write_json() -> None:
        # After every config, so a run cut short by its time limit still leaves what it measured.
        result = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "device_name": where,
            "threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "quick": args.quick,
            "rows": rows,
        }
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as config_dir:  # GenerateConfig.checkpoint must exist; nothing is read
        for label, cfg, layout in cases:
            rows += run_case(label, cfg, layout, args, device, dtype, config_dir)
            write_json()
    print_table(rows)
    for path in targets:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
