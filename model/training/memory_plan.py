"""Per-rank memory of a training run before it is launched: arithmetic on the TrainConfig, no torch.

The figures follow what the trainer allocates. Parameters are fp32 master weights (sharded over the ranks under FSDP2)
plus, in bf16, the copies the matmuls run on: FSDP2's MixedPrecisionPolicy all-gathers bf16 blocks (the root's
embeddings and output layer stay gathered through forward and backward, two blocks are in flight with prefetch);
under DDP or one process, autocast keeps a bf16 copy of every matmul weight for the backward. Gradients are fp32
(sharded under FSDP2; DDP adds its bucket copy). AdamW keeps two fp32 moments (model/training/optim.py), and its
foreach form (FSDP2's DTensors) makes one more temporary of their size in the step.

Activations are what autograd keeps for the backward, counted op by op from model/lm/transformer.py: the block's
input read in fp32 by the RMSNorm (plus its normalised output and the scaled one the projections keep), q and k
before and after QK-norm (fp32 into rotary's complex multiply), the rotated q, k and v (GQA repeats k and v to every
head before SDPA), SDPA's output and log-sum-exp, the heads merged for wo, the FFN norm, and SwiGLU's four [T, ffn]
tensors. Document masking on SDPA (CPU, or `document_attention: sdpa`) adds the dense [B, 1, S, S] boolean mask once
and, per layer, the float mask SDPA converts it to; FlexAttention (CUDA's default) keeps only a small block mask.
Activation checkpointing keeps a block's input instead of its activations and recomputes one block at a time in the
backward; `selective` keeps the matmul outputs and recomputes the rest.

The fused loss (model/lm/losses.py) holds one [loss_chunk_size, vocab] fp32 block of logits (and a bf16 one under
mixed precision), the supervised rows and their gradient, and the output layer's gradient from the forward on.

The parts do not all live at once: the peak is the largest of the forward's end (activations and the loss's saved
gradients), the backward (activations freed block by block as the gradients arrive) and the optimizer step
(gradients and the AdamW temporaries), each on top of the weights and moments that stay. Checked against measured
peaks on CPU in tests/model/training/test_memory_plan.py.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from schemas.model_config import ModelConfig
from schemas.train_config import TrainConfig

GiB = 1024**3
# Left out of the GPU's memory for the CUDA context, NCCL's buffers and the caching allocator's fragmentation.
GPU_ALLOWANCE_FRACTION = 0.10
GPU_ALLOWANCE_MIN = 3 * GiB

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Bytes of "80GB", "80G", "141 GB", "24GiB" or a plain number of bytes. GB and GiB are both read as GiB, as GPU
    makers print them (an "80GB" H100 has 80 GiB); a ValueError names the text otherwise."""
    found = _SIZE.match(text)
    if not found:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB, 24GiB)")
    number, unit = float(found.group(1)), (found.group(2) or "b").lower()
    return int(number * (1 if unit == "b" else 1024 ** ("kmgt".index(unit[0]) + 1)))


def gpu_allowance(gpu_memory: int) -> int:
    """The bytes of a GPU left out of the plan: 10% of it, at least 3 GiB."""
    return max(GPU_ALLOWANCE_MIN, int(gpu_memory * GPU_ALLOWANCE_FRACTION))


@dataclass(frozen=True)
class BlockActivations:
    """Bytes one transformer block keeps for its backward, for one micro-batch: all of them (`full`), the matmul
    outputs that selective checkpointing keeps (`matmul`), and the block's input (what full checkpointing keeps)."""

    full: int
    matmul: int
    block_input: int


@dataclass(frozen=True)
class MemoryPlan:
    """Per-rank bytes of one training run; `rows()` for a table. `peak` is the largest moment (see the module)."""

    preset: str
    n_params: int
    world_size: int
    parallelism: str
    precision: str
    checkpointing: str
    seq_len: int
    micro_batch_size: int
    accumulation: int
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    fused_loss: int
    transient: int
    peak: int
    checkpoint_host: int
    checkpoint_host_note: str
    gpu_memory: int | None
    allowance: int

    @property
    def usable(self) -> int | None:
        """GPU bytes the plan may use: the GPU's memory less the allowance."""
        return None if self.gpu_memory is None else self.gpu_memory - self.allowance

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits in the usable memory; None when no GPU memory was given."""
        return None if self.usable is None else self.peak <= self.usable

    def rows(self) -> list[tuple[str, int, str]]:
        """(part, bytes per rank, what it is) for each part and the peak."""
        shard = f"1/{self.world_size} of " if self.parallelism == "fsdp" else ""
        rows = [
            ("parameters", self.parameters, f"{shard}fp32 weights" + (" + bf16 copies" if self.bf16 else "")),
            ("gradients", self.gradients, f"{shard}fp32" + (" + DDP buckets" if self.parallelism == "ddp" else "")),
            ("optimizer state", self.optimizer, f"AdamW: {shard}2 fp32 moments"),
            (
                "activations",
                self.activations,
                f"per micro-batch of {self.micro_batch_size} x {self.seq_len}, checkpointing: {self.checkpointing}",
            ),
            ("fused loss", self.fused_loss, "a loss_chunk_size x vocab block, the rows and their gradient"),
            (
                "transient",
                self.transient,
                "the largest of: backward workspace and recomputed block, FSDP's unsharded "
                "gradients, AdamW's temporaries",
            ),
            ("peak", self.peak, "the largest moment: forward end, backward or optimizer step"),
        ]
        if self.gpu_memory is not None:
            rows.append(("allowance", self.allowance, "CUDA context, NCCL, fragmentation"))
            rows.append(("GPU memory", self.gpu_memory, "fits" if self.fits else "does not fit"))
        rows.append(("checkpoint (host)", self.checkpoint_host, self.checkpoint_host_note))
        return rows

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"

    def verdict(self) -> str:
        """One line: fits or not, with the peak against the usable memory."""
        what = (
            f"{self.preset} ({self.n_params / 1e9:.2f}B parameters) on {self.world_size} ranks, {self.parallelism}, "
            f"{self.precision}, checkpointing {self.checkpointing}: peak {self.peak / GiB:.1f} GiB per rank"
        )
        if self.usable is None:
            return what
        verb = "fits" if self.fits else "does not fit"
        return f"{what} {verb} in {self.usable / GiB:.1f} GiB ({self.gpu_memory / GiB:.0f} GiB less the allowance)"


def block_params(model: ModelConfig) -> int:
    """Parameters of one transformer block."""
    kv_dim = model.n_kv_heads * model.head_dim
    qk = 4 * model.head_dim * model.qk_norm_groups if model.qk_norm else 0
    return 2 * model.dim * model.dim + 2 * model.dim * kv_dim + 3 * model.dim * model.ffn_dim + 2 * model.dim + qk


def block_activations(
    model: ModelConfig, tokens: int, act_bytes: int, residual_bytes: int | None = None
) -> BlockActivations:
    """What one block keeps for its backward for `tokens` (batch x sequence) positions; activations in `act_bytes`
    (4: fp32, 2: bf16), the norms' internals in fp32 as the code computes them. The residual stream, which a
    checkpointed block keeps, is in `residual_bytes` (default `act_bytes`; fp32 under autocast)."""
    d, f, h = model.dim, model.ffn_dim, model.n_heads
    kv = model.n_kv_heads * model.head_dim
    gqa = model.n_kv_heads < model.n_heads
    e = act_bytes
    norm = 4 * d + 2 * e * d  # RMSNorm: its fp32 input, the normalised rows; then the scaled output the matmuls keep
    attention = 0
    if model.qk_norm:
        attention += e * (d + kv) + 8 * (h + model.n_kv_heads)  # LayerNorm inputs, means and inverse deviations
        if model.qk_norm_groups > 1:
            attention += e * (d + kv)  # the normalised heads kept by the per-group affine
    attention += 8 * model.head_dim  # rotary's complex rotations of q and k (their inputs need not be kept)
    attention += e * d + (2 * e * d if gqa else 2 * e * kv)  # SDPA's q, and k and v (repeated to every head: GQA)
    attention += e * d + 4 * h  # SDPA's output (wo reads it as a view) and log-sum-exp
    ffn = 4 * e * f  # w1 x, silu(w1 x), w3 x, their product
    full = tokens * (2 * norm + attention + ffn)
    # Selective: the block's input and the matmul outputs (q, k, v, SDPA's output, wo's input, w1 x, w3 x, the product)
    matmul = tokens * e * (d + d + 2 * kv + d + d + 3 * f)
    return BlockActivations(full=full, matmul=matmul, block_input=tokens * (residual_bytes or e) * d)


def planned_seq_len(config: TrainConfig) -> int | None:
    """The run's sequence length as the trainer will take it: config.seq_len, else the stage's (its manifest.json),
    else None (the plan then takes the model's max_seq_len)."""
    if config.seq_len is not None:
        return config.seq_len
    try:  # model.files.reading would import torch, which planning does without
        manifest = Path(config.first_stage_data()) / "manifest.json"
        value = json.loads(manifest.read_text(encoding="utf-8")).get("seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def _resolve(config: TrainConfig, world_size: int, device: str) -> tuple[str, str]:
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    parallelism = "single" if world_size == 1 else ("fsdp" if config.parallelism == "fsdp" else "ddp")
    return parallelism, precision


def plan_memory(
    config: TrainConfig,
    world_size: int,
    *,
    seq_len: int | None = None,
    device: str = "cuda",
    gpu_memory: int | None = None,
) -> MemoryPlan:
    """The per-rank memory of training `config` on `world_size` ranks (nproc_per_node x nnodes).

    `seq_len` defaults to config.seq_len, else the model's max_seq_len; `device` ("cuda" or "cpu") resolves
    `precision: auto` and `document_attention: auto` as the trainer does; `gpu_memory` (bytes) adds the allowance
    and the verdict.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    model = config.model
    parallelism, precision = _resolve(config, world_size, device)
    bf16 = precision == "bf16"
    e = 2 if bf16 else 4
    s = seq_len or config.seq_len or model.max_seq_len
    b = config.micro_batch_size
    tokens = b * s
    per_step = b * world_size
    accumulation = max(1, config.global_batch_size // per_step)
    n = model.n_params()
    p_block = block_params(model)
    vd = model.vocab_size * model.dim
    root = 2 * vd + model.dim  # embeddings, output layer and the final norm
    matmul_weights = model.n_layers * (_attn_params(model) + 3 * model.dim * model.ffn_dim)
    shard = world_size if parallelism == "fsdp" else 1

    # Parameters: fp32 masters, plus what the compute reads.
    parameters = math.ceil(4 * n / shard)
    if parallelism == "fsdp":
        parameters += e * (root + 2 * p_block)  # gathered root (kept through the backward) and two blocks in flight
    elif bf16:
        parameters += 2 * matmul_weights  # autocast's bf16 copies of the blocks' matmul weights, kept for backward
    gradients = math.ceil(4 * n / shard)
    buckets = 4 * n if parallelism == "ddp" else 0  # DDP's bucket copy of every gradient (gradient_as_bucket_view off)
    gradients += buckets
    optimizer = math.ceil(8 * n / shard)

    # Activations under the chosen checkpointing.
    # Autocast (one process, DDP) keeps the residual stream in fp32; FSDP2's bf16 policy runs it in bf16.
    block = block_activations(model, tokens, e, 4 if parallelism != "fsdp" else e)
    mode, k = config.activation_checkpointing.mode, config.activation_checkpointing.every_k
    layers = model.n_layers
    if mode == "full":
        kept, recompute = layers * block.block_input, block.full
    elif mode == "every_k_blocks":
        checkpointed = -(-layers // k)
        kept = checkpointed * block.block_input + (layers - checkpointed) * block.full
        recompute = block.full
    elif mode == "selective":
        kept, recompute = layers * block.matmul, block.full - block.matmul
    else:
        kept, recompute = layers * block.full, 0
    kernel = config.document_attention
    if kernel == "auto":
        kernel = "flex" if device == "cuda" and model.head_dim >= 16 else "sdpa"
    mask = 0
    if config.document_masking and kernel == "sdpa":
        # The boolean [B, 1, S, S] mask once; SDPA turns it into a float mask of the activations' dtype per layer.
        mask = b * s * s + (layers + 1) * b * s * s * e
    rope = 2 * 4 * tokens * model.head_dim // 2
    edges = tokens * (e * model.dim + 4 * model.dim + 2 * e * model.dim)  # embeddings out, final norm
    activations = kept + mask + rope + edges
    checkpoint_name = mode if mode != "every_k_blocks" else f"every {k} blocks"

    # The fused loss: supervised rows [N, dim] and their gradient, one chunk of logits (vocab-major, padded on CPU).
    rows = b * (s - 1)
    chunk = min(config.loss_chunk_size, rows)
    stride = -(-chunk // 8) * 8  # fp32 on CPU: rows padded to an odd multiple of 8 (losses._padded_stride)
    stride = (stride + 8 if (stride // 8) % 2 == 0 else stride) if device == "cpu" and not bf16 else chunk
    fused_loss = 2 * rows * model.dim * e + 8 * rows + 4 * model.vocab_size * stride
    if not bf16:
        fused_loss += 4 * vd  # the output layer's gradient, computed in the forward
    else:
        # bf16 logits, one chunk's bf16 weight gradient and their fp32 sum; then the bf16 weight's own bf16 gradient
        # (FSDP2's policy) or the fp32 weight cast to bf16 (autocast is off inside the loss).
        fused_loss += 2 * model.vocab_size * chunk + 2 * vd + 4 * vd + 2 * vd

    # Backward workspace: one block's activation gradients (fp32 norms) and its recomputation under checkpointing;
    # under FSDP2 a block's unsharded gradients before their fp32 reduce-scatter, and the root's at the very end.
    workspace = tokens * (3 * e * model.ffn_dim + 4 * 4 * model.dim) + recompute
    block_scatter = (e + 4) * p_block if parallelism == "fsdp" else 0
    root_scatter = (e + 4) * root if parallelism == "fsdp" else 0
    step_temp = math.ceil(4 * n / shard) if parallelism == "fsdp" else 0  # foreach AdamW: sqrt of the 2nd moments

    master = math.ceil(4 * n / shard)
    own_grads = gradients - buckets
    static = master + optimizer + buckets  # what every moment holds: weights, moments, DDP's buckets
    compute_copies = parameters - master
    carried = own_grads if accumulation > 1 else 0  # later micro-batches run with the gradients already there
    forward_end = static + compute_copies + carried + activations + fused_loss
    # Backward: the blocks' activations are freed as their gradients arrive (the larger of the two at either end),
    # besides the output layer's gradient (from the forward) and the supervised rows' gradient.
    block_grads = own_grads - math.ceil(4 * 2 * vd / shard)
    backward = static + compute_copies + max(activations, block_grads + activations // layers) + workspace
    backward += block_scatter + math.ceil(4 * vd / shard) + 2 * rows * model.dim * e
    backward_end = static + compute_copies + own_grads + root_scatter
    step = static + own_grads + step_temp
    peak = max(forward_end, backward, backward_end, step)
    transient = max(workspace + block_scatter, root_scatter, step_temp)

    host, note = checkpoint_host_memory(config, parallelism, device, n, shard, 4 * max(vd, model.dim * model.ffn_dim))

    allowance = gpu_allowance(gpu_memory) if gpu_memory is not None else 0
    return MemoryPlan(
        preset=model.preset or "custom",
        n_params=n,
        world_size=world_size,
        parallelism=parallelism,
        precision=precision,
        checkpointing=checkpoint_name,
        seq_len=s,
        micro_batch_size=b,
        accumulation=accumulation,
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        fused_loss=fused_loss,
        transient=transient,
        peak=peak,
        checkpoint_host=host,
        checkpoint_host_note=note,
        gpu_memory=gpu_memory,
        allowance=allowance,
    )


def checkpoint_host_memory(
    config: TrainConfig, parallelism: str, device: str, n_params: int, shard: int, largest_tensor: int
) -> tuple[int, str]:
    """Host memory (bytes) one rank needs to save a checkpoint in the run's format, and why: a sharded save writes this
    rank's shards (a background one first copies them all to the host), a full one gathers on rank 0."""
    checkpoint = config.checkpoint
    sharded = checkpoint.format == "sharded" or (checkpoint.format == "auto" and parallelism == "fsdp")
    states = 12 * n_params  # fp32 weights and AdamW's two moments
    if sharded and checkpoint.async_save:
        what = "its shard of" if shard > 1 else "all"
        return math.ceil(states / shard), f"each rank stages {what} the fp32 weights and moments (async save)"
    if sharded:
        if device != "cuda":
            return 0, "each rank writes its shards from host memory"
        return math.ceil(largest_tensor / shard), "each rank copies one tensor shard at a time to the host"
    if parallelism == "fsdp":
        return states, "rank 0 gathers full fp32 weights and moments (cpu_offload)"
    if device == "cuda":
        return largest_tensor, "rank 0 copies one tensor at a time to the host"
    return 0, "the states are already in host memory"


def _attn_params(model: ModelConfig) -> int:
    kv_dim = model.n_kv_heads * model.head_dim
    return 2 * model.dim * model.dim + 2 * model.dim * kv_dim
