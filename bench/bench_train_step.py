"""Train-step throughput on CPU: our Chameleon `Transformer` vs Hugging Face's `ChameleonForConditionalGeneration`.

One step = forward + cross-entropy over every next-token target + backward + AdamW step (`make_optimizer`, the same
param groups for both), fp32, the same token batch, 2 threads. Both models have the same shape (dim, layers, heads,
kv heads, SwiGLU width, vocab, QK-norm on, RMS eps, rope theta) and random weights.

What is timed for ours: the trainer's loss path, `Transformer.forward(tokens, loss_mask=..., z_loss_weight=1e-5,
image_token_mask=..., loss_chunk_size=TrainConfig's default)`: the output layer fused with CE + z-loss, chunk by chunk,
never materialising the logits (it does slightly more work than HF's plain CE: the z-loss and the text/image split).
`ours-logits` (shown for reference, not in the ratio) is the previous path: full logits, then `lm_loss`.

What is timed for HF: the full `ChameleonForConditionalGeneration.forward(input_ids)` with SDPA attention and
`use_cache=False`, including its in-place masking of image-token logits (a `vocabulary_map` with the same image-code
ids as ours makes that mask realistic); its `.logits` feed the loss (targets are text ids, so the masked columns only
add to the normaliser as exp(-inf) = 0). HF's VQ-VAE is built (tiny `vq_config`) but frozen and never called.

Prints tokens/s (median and best step) for each model and the ratio ours / HF; the project's goal is >= 1.3x.
`--profile` adds a short torch.profiler table per model for the largest config.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import ChameleonConfig, ChameleonForConditionalGeneration
from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig

from model.lm.losses import lm_loss
from model.lm.transformer import Transformer
from model.tokenizers.vocabulary import Modality, Vocabulary
from model.training.optim import make_optimizer
from schemas.model_config import ModelConfig
from schemas.train_config import OptimizerConfig, TrainConfig
from schemas.vocab import CHAMELEON, IMAGE_CODE_OFFSET, TINY, VocabLayout


def image_vocabulary_map(layout: VocabLayout) -> dict[str, int]:
    """HF-style names (`IMGIMG<code in letters A-J>Z`) for our image-code ids, so HF masks the same logit columns."""
    to_letters = str.maketrans("0123456789", "ABCDEFGHIJ")
    names = {
        f"IMGIMG{str(code).translate(to_letters)}Z": IMAGE_CODE_OFFSET + code for code in range(layout.image_codes)
    }
    return {**names, "<image>": layout.boi_id}


def hf_model(cfg: ModelConfig, layout: VocabLayout) -> ChameleonForConditionalGeneration:
    """HF Chameleon of `cfg`'s shape; its VQ-VAE is tiny and frozen (it is never run on text-only batches)."""
    # The smallest VQ-VAE HF accepts: otherwise the default 512px encoder adds ~70M parameters we do not time.
    vq = ChameleonVQVAEConfig(
        embed_dim=32,
        num_embeddings=16,
        latent_channels=32,
        resolution=16,
        base_channels=32,  # GroupNorm(32 groups) needs >= 32 channels
        channel_multiplier=[1],
        num_res_blocks=1,
        attn_resolutions=[],
    )
    config = ChameleonConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        swin_norm=cfg.swin_norm,
        tie_word_embeddings=False,
        vq_config=vq.to_dict(),
        vocabulary_map=image_vocabulary_map(layout),
        initializer_range=cfg.init_std,
    )
    config._attn_implementation = "sdpa"  # the same fused attention kernel ours calls
    model = ChameleonForConditionalGeneration(config)
    model.model.vqmodel.requires_grad_(False)  # make_optimizer skips frozen parameters
    return model


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits against token t+1, over every position (the same for both)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def make_step(model: torch.nn.Module, loss_of, tokens: torch.Tensor, bf16: bool = False):
    """A closure running one full train step and returning its loss (a float: forces the work to finish).

    `bf16`: forward and loss under `torch.autocast("cpu", torch.bfloat16)`, as the trainer's `precision: bf16` runs.
    """
    optimizer = make_optimizer(model, OptimizerConfig())

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(tokens)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def profile(name: str, step, rows: int = 14) -> None:
    """One profiled step (after warm-up), ops sorted by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(f"\n--- profile: {name} (one step, self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def run_case(
    label: str,
    cfg: ModelConfig,
    layout: VocabLayout,
    batch: int,
    seq: int,
    steps: int,
    warmup: int,
    do_profile: bool,
    with_logits_path: bool = False,
    bf16: bool = False,
    block: int = 1,
) -> float:
    """Time ours and HF's train step, interleaved so drift on a shared machine hits both; returns ours / HF."""
    torch.manual_seed(0)
    ours = Transformer(cfg)
    torch.manual_seed(0)
    hf = hf_model(cfg, layout)
    ours.train()
    hf.train()
    g = torch.Generator().manual_seed(1)
    # Text ids only: HF's forward would otherwise look for image placeholders, and its logit mask hits image codes.
    tokens = torch.randint(layout.first_text_id, cfg.vocab_size, (batch, seq), generator=g)

    loss_mask = torch.ones_like(tokens, dtype=torch.bool)
    image_mask = Vocabulary(layout).mask(Modality.IMAGE, Modality.BOI, Modality.EOI)
    chunk = TrainConfig.model_fields["loss_chunk_size"].default

    def ours_loss(t: torch.Tensor) -> torch.Tensor:  # what Trainer._step runs
        return ours(t, loss_mask=loss_mask, z_loss_weight=1e-5, image_token_mask=image_mask, loss_chunk_size=chunk).loss

    steps_by_name = {
        "ours": make_step(ours, ours_loss, tokens, bf16),
        "hf": make_step(hf, lambda t: next_token_ce(hf(input_ids=t, use_cache=False).logits, t), tokens, bf16),
    }
    if with_logits_path:
        torch.manual_seed(0)
        ours_logits = Transformer(cfg).train()
        steps_by_name["ours-logits"] = make_step(
            ours_logits, lambda t: lm_loss(ours_logits(t), t, loss_mask, 1e-5, image_mask).loss, tokens, bf16
        )
    print(
        f"\n[{label}] dim {cfg.dim}, layers {cfg.n_layers}, heads {cfg.n_heads}/{cfg.n_kv_heads} kv, "
        f"ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}; batch {batch} x seq {seq} = {batch * seq} tokens/step"
    )
    print(
        f"  trainable params: ours {trainable_params(ours):,}  hf {trainable_params(hf):,} "
        f"(HF's QK-norm keeps one gain per head; its frozen VQ-VAE excluded)"
    )
    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    losses: dict[str, float] = {}
    # Models alternate in blocks of `block` steps, the first of each block untimed: a step straight after the other
    # model's pays for re-faulting the memory that model just released (~10% at 100M), which no training run sees.
    for _ in range(max(1, steps // block)):
        for name, step in steps_by_name.items():
            if block > 1:
                step()
            for _ in range(block):
                start = time.perf_counter()
                losses[name] = step()
                times[name].append(time.perf_counter() - start)
    tps = {}
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        tps[name] = batch * seq / med
        print(
            f"  {name:11s} median {med * 1e3:9.1f} ms/step  {batch * seq / med:9.0f} tok/s   "
            f"best {best * 1e3:9.1f} ms  {batch * seq / best:9.0f} tok/s   last loss {losses[name]:.3f}"
        )
    best_ratio = min(times["hf"]) / min(times["ours"])
    ratio = tps["ours"] / tps["hf"]
    print(f"  ratio ours / HF: {ratio:.2f}x (median), {best_ratio:.2f}x (best)   goal >= 1.3x")
    if "ours-logits" in tps:
        print(
            f"  (reference) ours-logits / HF: {tps['ours-logits'] / tps['hf']:.2f}x (median); "
            f"ours / ours-logits: {tps['ours'] / tps['ours-logits']:.2f}x"
        )
    if do_profile:
        for name, step in steps_by_name.items():
            profile(f"{label} {name}", step)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny preset only, fewer steps")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10 tiny, 3 big)")
    parser.add_argument("--big-layers", type=int, default=12, help="layers of the ~100M config (fewer = faster run)")
    parser.add_argument("--big-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per model")
    parser.add_argument("--logits-path", action="store_true", help="also time ours with full logits + lm_loss")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: both under CPU bf16 autocast"
    )
    parser.add_argument("--skip-tiny", action="store_true", help="only the ~100M config")
    parser.add_argument("--block", type=int, default=1, help="timed steps per model before switching (+1 untimed)")
    args = parser.parse_args()
    bf16 = args.precision == "bf16"
    # Two threads: the size of the CI / dev machines this runs on, and the same for both models.
    torch.set_num_threads(2)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, AdamW (model.training.optim.make_optimizer)"
    )

    tiny = ModelConfig.from_preset("tiny", max_seq_len=max(512, args.seq))
    if not args.skip_tiny:
        run_case(
            "tiny",
            tiny,
            TINY,
            4,
            args.seq,
            args.steps or (5 if args.quick else 10),
            2,
            args.profile and args.quick,
            args.logits_path,
            bf16,
            args.block,
        )
    if args.quick:
        return
    # ~100M non-embedding parameters (GPT-2-small widths) with Chameleon's full 65,536-id vocabulary.
    big = ModelConfig(
        dim=768,
        n_layers=args.big_layers,
        n_heads=12,
        n_kv_heads=12,
        ffn_dim=2048,
        vocab_size=65_536,
        max_seq_len=max(512, args.seq),
    )
    run_case(
        "100M",
        big,
        CHAMELEON,
        args.big_batch,
        args.seq,
        args.steps or 3,
        2,
        args.profile,
        args.logits_path,
        bf16,
        args.block,
    )


if __name__ == "__main__":
    main()
