"""fused_lm_loss (chunked output layer + CE + z-loss) against lm_loss on materialised logits, and the model's path."""

from __future__ import annotations

import pytest
import torch

from model.lm.losses import fused_lm_loss, lm_loss
from model.lm.transformer import Transformer
from model.tokenizers.vocabulary import Modality, Vocabulary
from schemas.model_config import ModelConfig
from schemas.vocab import TINY

V = TINY.vocab_size
IMAGE_MASK = Vocabulary(TINY).mask(Modality.IMAGE, Modality.BOI, Modality.EOI)


def _inputs(seed: int = 0, b: int = 3, s: int = 45, d: int = 32, keep: float = 0.7):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64) * 0.5
    # Targets from both modalities, so ce_text and ce_image are both exercised.
    tokens = torch.randint(0, V, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) < keep
    return hidden, weight, tokens, mask


def _both(hidden, weight, tokens, mask, z, chunk, image_mask=IMAGE_MASK):
    """(reference LossOutput, its grads), (fused LossOutput, its grads) for the same inputs."""
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            out = fused_lm_loss(h, w, tokens, mask, z, image_mask, chunk_size=chunk)
        else:
            out = lm_loss(h @ w.t(), tokens, mask, z, image_mask)
        grads = torch.autograd.grad(out.loss, (h, w))
        results.append((out, grads))
    return results


def _assert_same(ref, fused):
    (a, (gha, gwa)), (b, (ghb, gwb)) = ref, fused
    for name in a._fields:
        torch.testing.assert_close(
            getattr(b, name).double(),
            getattr(a, name).double(),
            rtol=1e-5,
            atol=1e-7,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    torch.testing.assert_close(ghb, gha, rtol=1e-5, atol=1e-5 * float(gha.abs().max()))
    torch.testing.assert_close(gwb, gwa, rtol=1e-5, atol=1e-5 * float(gwa.abs().max()))


@pytest.mark.parametrize("vocab_major", [True, False])  # CPU fp32 / fp64's layout, and bf16's and CUDA's
@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])  # 7 and 64 do not divide the supervised count; 4096 > it
def test_fused_equals_lm_loss_values_and_grads(chunk, vocab_major, monkeypatch):
    import model.lm.losses

    monkeypatch.setattr(model.lm.losses, "_vocab_major", lambda compute, device: vocab_major)
    hidden, weight, tokens, mask = _inputs()
    n = int(mask[:, 1:].sum())
    assert n % 7 and n % 64 and n < 4096
    ref, fused = _both(hidden, weight, tokens, mask, z=1e-2, chunk=chunk)
    _assert_same(ref, fused)
    out = fused[0]
    assert out.n_text.item() > 0 and out.n_image.item() > 0
    assert out.z_loss.item() > 0
    torch.testing.assert_close(out.loss.detach(), out.ce + out.z_loss)


def test_fused_with_default_z_loss_and_no_image_mask():
    hidden, weight, tokens, mask = _inputs(seed=1)
    ref, fused = _both(hidden, weight, tokens, mask, z=1e-5, chunk=16, image_mask=None)
    _assert_same(ref, fused)
    assert fused[0].n_image.item() == 0


def test_fused_fp32_matches_within_1e5():
    hidden, weight, tokens, mask = _inputs(seed=2)
    ref, fused = _both(hidden.float(), weight.float(), tokens, mask, z=1e-4, chunk=50)
    _assert_same(ref, fused)


@pytest.mark.parametrize("chunk", [7, 4096])
def test_fused_under_bf16_autocast_follows_the_bf16_logits_path(chunk):
    # The trainer's `precision: bf16`: matmuls in bf16, softmax in fp32; chunking must not change the result beyond
    # fp32 summation order, and the values must track lm_loss on autocast's bf16 logits within bf16 rounding.
    hidden, weight, tokens, mask = _inputs(seed=3)
    hidden, weight = hidden.float(), weight.float()
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                out = fused_lm_loss(h, w, tokens, mask, 1e-4, IMAGE_MASK, chunk_size=chunk)
            else:
                out = lm_loss((h @ w.t()).float(), tokens, mask, 1e-4, IMAGE_MASK)
        results.append((out, torch.autograd.grad(out.loss, (h, w))))
    (ref, (gh_ref, gw_ref)), (got, (gh, gw)) = results
    assert gh.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh, gh_ref, rtol=0, atol=2e-2 * float(gh_ref.abs().max()))
    torch.testing.assert_close(gw, gw_ref, rtol=0, atol=2e-2 * float(gw_ref.abs().max()))
    if chunk == 7:  # the same rows in one chunk: equal up to the fp32 sum of the chunks' bf16 products
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            whole = fused_lm_loss(h, w, tokens, mask, 1e-4, IMAGE_MASK, chunk_size=4096)
        gh_whole, gw_whole = torch.autograd.grad(whole.loss, (h, w))
        torch.testing.assert_close(got.loss, whole.loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gh, gh_whole, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(gw, gw_whole, rtol=1e-2, atol=1e-2 * float(gw_whole.abs().max()))


def test_masked_positions_get_zero_gradient_and_empty_mask_is_zero():
    hidden, weight, tokens, mask = _inputs(seed=3)
    h = hidden.clone().requires_grad_()
    out = fused_lm_loss(h, weight, tokens, mask, 1e-3, IMAGE_MASK, chunk_size=8)
    (grad,) = torch.autograd.grad(out.loss, h)
    unsupervised = torch.ones_like(mask)
    unsupervised[:, :-1] = ~mask[:, 1:]  # position t feeds target t+1; the last position predicts nothing
    assert grad[unsupervised].abs().max().item() == 0.0
    assert grad[~unsupervised].abs().max().item() > 0.0

    w = weight.clone().requires_grad_()
    empty = fused_lm_loss(hidden, w, tokens, torch.zeros_like(mask), 1e-3, IMAGE_MASK)
    (grad_w,) = torch.autograd.grad(empty.loss, w)
    assert empty.loss.item() == 0.0 and empty.n_tokens.item() == 0
    assert grad_w.abs().max().item() == 0.0


def test_fused_under_no_grad_gives_the_values():
    hidden, weight, tokens, mask = _inputs(seed=4)
    with torch.no_grad():
        out = fused_lm_loss(hidden, weight, tokens, mask, 1e-3, IMAGE_MASK, chunk_size=9)
    ref = lm_loss(hidden @ weight.t(), tokens, mask, 1e-3, IMAGE_MASK)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)


def test_bad_shapes_and_chunk_size_are_rejected():
    hidden, weight, tokens, mask = _inputs()
    with pytest.raises(ValueError, match="shape mismatch"):
        fused_lm_loss(hidden[:, :-1], weight, tokens, mask)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_lm_loss(hidden, weight, tokens, mask, chunk_size=0)


def test_transformer_loss_path_equals_logits_path():
    """model(tokens, loss_mask=...) gives lm_loss(model(tokens), ...) and the same parameter gradients."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny").model_copy(update={"n_layers": 2})
    model = Transformer(config).double()
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, config.vocab_size, (2, 40), generator=g)
    mask = torch.rand(2, 40, generator=g) < 0.8
    doc_ids = torch.cat([torch.zeros(2, 25, dtype=torch.long), torch.ones(2, 15, dtype=torch.long)], dim=1)

    ref = lm_loss(model(tokens, doc_ids=doc_ids), tokens, mask, 1e-3, IMAGE_MASK)
    ref.loss.backward()
    ref_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = model(
        tokens, doc_ids=doc_ids, loss_mask=mask, z_loss_weight=1e-3, image_token_mask=IMAGE_MASK, loss_chunk_size=11
    )
    out.loss.backward()
    for name in ref._fields:
        torch.testing.assert_close(getattr(out, name).double(), getattr(ref, name).double(), rtol=1e-5, atol=1e-7)
    for name, p in model.named_parameters():
        expected = ref_grads[name]
        torch.testing.assert_close(
            p.grad,
            expected,
            rtol=1e-5,
            atol=1e-5 * float(expected.abs().max()) + 1e-12,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def test_a_second_backward_through_the_same_loss_is_refused():
    hidden, weight, tokens, mask = _inputs(seed=6)
    h = hidden.clone().requires_grad_()
    out = fused_lm_loss(h, weight, tokens, mask)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()


def test_logit_rows_are_aligned_and_never_a_power_of_two_apart() -> None:
    # MKL's sgemm into [V, chunk] logits slows by up to 30% at a power-of-two row stride (cache-set conflicts).
    from model.lm.losses import _padded_stride

    assert [_padded_stride(c) for c in (1, 7, 8, 9, 16, 1016, 1020, 1024, 2048)] == [
        8,
        8,
        8,
        24,
        24,
        1016,
        1032,
        1032,
        2056,
    ]
