"""Activation checkpointing: which blocks each mode checkpoints, Meta's parameter names kept, the loss and every
gradient bit-equal to the model without it (fp32, document masking, dropout 0 and SFT's 0.05), eager and compiled;
the activations are really dropped (full) or the matmuls really kept (selective); and under FSDP2 on 2 gloo ranks."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.lm.transformer import Transformer
from model.training import activation_checkpointing
from model.training.activation_checkpointing import apply_activation_checkpointing, checkpointed_blocks
from schemas.model_config import ModelConfig
from schemas.train_config import ActivationCheckpointConfig
from tests.model.training.activation_checkpointing_fsdp_worker import fixed_batch, model_config

REPO = Path(__file__).resolve().parents[3]
MODES = ["none", "full", "every_k_blocks", "selective"]


def tiny(n_layers: int = 4, dropout: float = 0.0) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", n_layers=n_layers, dropout=dropout))


def step(model: Transformer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and every parameter's gradient of one forward + backward on four packed rows (three documents each)."""
    tokens, doc_ids = fixed_batch(model.config.vocab_size)
    torch.manual_seed(1)  # the dropout masks' seed: the same for every model compared
    loss = model(tokens, doc_ids=doc_ids, loss_mask=torch.ones_like(tokens, dtype=torch.float)).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_same_step(got: tuple, expected: tuple) -> None:
    assert torch.equal(got[0], expected[0])
    assert got[1].keys() == expected[1].keys()
    unequal = [name for name, grad in got[1].items() if not torch.equal(grad, expected[1][name])]
    assert not unequal, unequal


def checkpointed(mode: str, model: Transformer, every_k: int = 2) -> Transformer:
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=mode, every_k=every_k))
    return model


@pytest.mark.parametrize(
    ("mode", "every_k", "blocks"),
    [
        ("none", 2, []),
        ("full", 2, [0, 1, 2, 3, 4]),
        ("every_k_blocks", 2, [0, 2, 4]),
        ("every_k_blocks", 3, [0, 3]),
        ("every_k_blocks", 9, [0]),
        ("selective", 2, [0, 1, 2, 3, 4]),
    ],
)
def test_each_mode_checkpoints_its_blocks_and_keeps_the_names(mode: str, every_k: int, blocks: list[int]) -> None:
    model = tiny(n_layers=5)
    keys = list(model.state_dict())
    config = ActivationCheckpointConfig(mode=mode, every_k=every_k)
    assert checkpointed_blocks(5, config) == blocks
    assert apply_activation_checkpointing(model, config) == len(blocks)
    assert [i for i, block in enumerate(model.layers) if "forward" in vars(block)] == blocks
    assert list(model.state_dict()) == keys  # Meta's names: checkpoints and conversion rely on them
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in tiny(5).named_parameters()]


def test_checkpointing_twice_is_refused() -> None:
    model = checkpointed("full", tiny())
    with pytest.raises(ValueError, match="block 0 is already activation-checkpointed"):
        apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="selective"))


def test_a_copy_checkpoints_its_own_blocks() -> None:
    model = checkpointed("full", tiny())
    twin = copy.deepcopy(model)
    assert all(block.forward.__self__ is block for block in twin.layers)
    assert_same_step(step(twin), step(model))


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize("mode", MODES)
def test_loss_and_gradients_equal_the_model_without_checkpointing(mode: str, dropout: float) -> None:
    # With dropout the recompute draws the same masks only because the checkpoint restores the RNG state it saved
    # before the forward (preserve_rng_state): without it, full and every_k_blocks gradients differ by ~0.03.
    assert_same_step(step(checkpointed(mode, tiny(dropout=dropout))), step(tiny(dropout=dropout)))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_without_grad_blocks_run_plainly_and_decode_alike(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, plain = checkpointed(mode, tiny()), tiny()
    tokens = fixed_batch(model.config.vocab_size)[0][:1, :10]

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("a checkpoint without grad: nothing to recompute, only overhead")

    monkeypatch.setattr(activation_checkpointing, "checkpoint", no_checkpoint)
    with torch.no_grad():
        assert torch.equal(model(tokens), plain(tokens))
    for grad_mode in (torch.no_grad, torch.inference_mode):  # decoding: a KV cache filled in two calls
        with grad_mode():
            cache, plain_cache = model.make_cache(1, 16), plain.make_cache(1, 16)
            for start, stop in ((0, 6), (6, 10)):
                got = model(tokens[:, start:stop], cache=cache, start_pos=start)
                assert torch.equal(got, plain(tokens[:, start:stop], cache=plain_cache, start_pos=start))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run while it is active (the backward pass included)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def backward_ops(model: Transformer) -> dict[str, int]:
    tokens, doc_ids = fixed_batch(model.config.vocab_size)
    loss = model(tokens, doc_ids=doc_ids, loss_mask=torch.ones_like(tokens, dtype=torch.float)).loss
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_full_recomputes_every_op_and_selective_all_but_the_matmuls() -> None:
    plain, full, selective = (backward_ops(checkpointed(mode, tiny())) for mode in ("none", "full", "selective"))
    # A block's recompute stops at the last tensor its backward needs (non-reentrant early stop): w2's input, so
    # six of its seven matmuls are rerun (wq, wk, wv, wo, w1, w3), not w2's.
    n_layers, matmuls_recomputed = 4, 6
    assert "silu" not in plain and "_scaled_dot_product_flash_attention_for_cpu" not in plain
    assert full["silu"] == selective["silu"] == n_layers  # SwiGLU's activation: recomputed by both
    assert full["mm"] == plain["mm"] + n_layers * matmuls_recomputed
    assert full["_scaled_dot_product_flash_attention_for_cpu"] == n_layers
    assert selective["mm"] == plain["mm"]  # kept from the forward, not recomputed
    assert "_scaled_dot_product_flash_attention_for_cpu" not in selective


def saved_bytes(model: Transformer) -> tuple[int, tuple]:
    """Bytes of the tensors autograd keeps for the backward outside checkpointed regions (the activations a
    checkpoint drops are not among them), and the step's loss and gradients."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step(model)
    return sum(saved), result


def test_checkpointed_blocks_keep_fewer_activations() -> None:
    plain, every_other, full = (
        saved_bytes(checkpointed(mode, tiny()))[0] for mode in ("none", "every_k_blocks", "full")
    )
    assert plain > every_other > full


def compiled(model: Transformer) -> Transformer:
    for block in model.layers:
        block.compile()  # after checkpointing: the trainer's order
    return model


@pytest.mark.slow
def test_compiled_gradients_equal_and_activations_are_dropped() -> None:
    # SFT's dropout: the compiled recompute draws the same masks too. Compiling costs ~10 s per mode on 2 cores.
    torch._dynamo.reset()
    plain_bytes, plain = saved_bytes(compiled(tiny(n_layers=2, dropout=0.05)))
    for mode in ("full", "selective"):  # every_k_blocks mixes the two kinds of block checked here
        mode_bytes, result = saved_bytes(compiled(checkpointed(mode, tiny(n_layers=2, dropout=0.05))))
        assert_same_step(result, plain)
        if mode != "selective":  # selective's kept matmuls are saved by the compiled graph too
            assert mode_bytes < plain_bytes, mode


@pytest.mark.slow
def test_under_fsdp2_on_two_ranks_gradients_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "grads.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tests.model.training.activation_checkpointing_fsdp_worker",
        str(out),
        "none",
        "full",
        "selective",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(out, weights_only=True)
    assert [results[mode]["checkpointed"] for mode in ("none", "full", "selective")] == [0, 3, 3]
    sharded = (results["none"]["loss"], results["none"]["grads"])
    for mode in ("full", "selective"):  # the same shards and reductions: bit-equal to FSDP2 without checkpointing
        assert_same_step((results[mode]["loss"], results[mode]["grads"]), sharded)
    torch.manual_seed(0)
    single = step(Transformer(model_config()))  # the whole batch in one process, no checkpointing
    # FSDP2 averages two half-batch gradients, one process takes the mean over the whole batch: equal to fp32
    # rounding (2.2e-8 measured, gradients up to 0.06).
    torch.testing.assert_close(sharded[0], single[0], rtol=0, atol=1e-6)
    for name, grad in single[1].items():
        torch.testing.assert_close(sharded[1][name], grad, rtol=0, atol=1e-6)
