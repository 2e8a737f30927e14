"""lm_loss: shifted CE against torch's, masking, z-loss, per-modality split, bf16, empty supervision."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.lm.losses import lm_loss
from model.tokenizers.vocabulary import Modality, Vocabulary
from schemas.vocab import IMAGE_CODE_OFFSET, TINY

V = TINY.vocab_size


def _batch(seed: int = 0, b: int = 2, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, s, V, generator=g) * 3.0
    tokens = torch.randint(0, V, (b, s), generator=g)
    mask = torch.rand(b, s, generator=g) > 0.3
    mask[:, 1] = True  # at least one supervised target per row
    return logits, tokens, mask


def test_ce_matches_torch_cross_entropy_on_supervised_targets():
    logits, tokens, mask = _batch()
    out = lm_loss(logits, tokens, mask, z_loss_weight=0.0)
    sel = mask[:, 1:]
    expected = F.cross_entropy(logits[:, :-1][sel], tokens[:, 1:][sel])
    torch.testing.assert_close(out.ce, expected)
    torch.testing.assert_close(out.loss, expected)
    assert out.n_tokens.item() == int(sel.sum())
    assert out.z_loss.item() == 0.0


def test_unsupervised_positions_do_not_change_the_loss():
    logits, tokens, mask = _batch(seed=1)
    base = lm_loss(logits, tokens, mask)
    # Predictions feeding unsupervised targets, and the last position (predicts nothing), are free to change.
    changed = logits.clone()
    free = torch.zeros_like(mask)
    free[:, :-1] = ~mask[:, 1:]
    free[:, -1] = True
    changed[free] = torch.randn(int(free.sum()), V) * 10
    changed_tokens = tokens.clone()
    changed_tokens[~mask] = 7  # tokens that are not targets only matter as inputs, not to the loss
    changed_tokens[:, 0] = 9
    other = lm_loss(changed, changed_tokens, mask)
    assert other.loss.item() == base.loss.item()
    assert other.z_loss.item() == base.z_loss.item()


def test_z_loss_is_weight_times_mean_squared_logsumexp():
    logits, tokens, mask = _batch(seed=2)
    w = 1e-2
    out = lm_loss(logits, tokens, mask, z_loss_weight=w)
    sel = mask[:, 1:]
    lse = torch.log(torch.exp(logits[:, :-1][sel].double()).sum(-1))
    expected_z = w * (lse**2).mean()
    torch.testing.assert_close(out.z_loss.double(), expected_z, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, out.ce + out.z_loss)
    assert out.z_loss.item() > 0


def test_per_modality_split_uses_image_token_mask():
    vocab = Vocabulary(TINY)
    image_mask = vocab.mask(Modality.IMAGE, Modality.BOI, Modality.EOI)
    logits, _, _ = _batch(seed=3, b=1, s=9)
    text_id = vocab.first_text_id + 5
    image_id = IMAGE_CODE_OFFSET + 3
    # targets (positions 1..8): text, BOI, image, image, EOI, text, text(unsupervised), image(unsupervised)
    tokens = torch.tensor([[text_id, text_id, vocab.boi_id, image_id, image_id, vocab.eoi_id, text_id, text_id, 4]])
    mask = torch.tensor([[False, True, True, True, True, True, True, False, False]])
    out = lm_loss(logits, tokens, mask, image_token_mask=image_mask)
    per = F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none")
    assert (out.n_text.item(), out.n_image.item(), out.n_tokens.item()) == (2, 4, 6)
    torch.testing.assert_close(out.ce_text, per[[0, 5]].mean())
    torch.testing.assert_close(out.ce_image, per[[1, 2, 3, 4]].mean())
    torch.testing.assert_close(out.ce, (2 * out.ce_text + 4 * out.ce_image) / 6)


def test_absent_modality_reports_zero_not_nan():
    logits, tokens, mask = _batch(seed=4)
    out = lm_loss(logits, tokens, mask)  # no image mask: everything is text
    assert out.n_image.item() == 0 and out.ce_image.item() == 0.0
    torch.testing.assert_close(out.ce_text, out.ce)
    only_image = torch.ones(V, dtype=torch.bool)
    out = lm_loss(logits, tokens, mask, image_token_mask=only_image)
    assert out.n_text.item() == 0 and out.ce_text.item() == 0.0
    torch.testing.assert_close(out.ce_image, out.ce)


def test_bf16_logits_close_to_fp32_and_loss_is_fp32():
    logits, tokens, mask = _batch(seed=5)
    ref = lm_loss(logits, tokens, mask)
    out = lm_loss(logits.bfloat16(), tokens, mask)
    assert out.loss.dtype == torch.float32
    # Only the bf16 rounding of the logits themselves differs (~0.4% relative per logit, averaging out).
    assert abs(out.loss.item() - ref.loss.item()) < 2e-2


def test_zero_supervised_tokens_gives_zero_loss_that_backprops():
    logits, tokens, _ = _batch(seed=6)
    logits.requires_grad_(True)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 0] = True  # the first token is never a target, so this still supervises nothing
    out = lm_loss(logits, tokens, mask)
    assert out.loss.item() == 0.0 and out.n_tokens.item() == 0
    assert out.ce_text.item() == 0.0 and out.ce_image.item() == 0.0
    out.loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_gradient_flows_only_to_supervised_rows():
    logits, tokens, mask = _batch(seed=7)
    logits.requires_grad_(True)
    lm_loss(logits, tokens, mask).loss.backward()
    rows_used = torch.zeros_like(mask)
    rows_used[:, :-1] = mask[:, 1:]
    assert torch.all(logits.grad[~rows_used] == 0)
    assert torch.all(logits.grad[rows_used].abs().sum(-1) > 0)


def test_only_loss_carries_grad():
    logits, tokens, mask = _batch(seed=8)
    out = lm_loss(logits.requires_grad_(True), tokens, mask)
    assert out.loss.requires_grad
    assert not any(t.requires_grad for t in out[1:])
