"""Next-token loss: cross-entropy + z-loss over supervised targets, with a per-modality CE split for logging."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LossOutput(NamedTuple):
    """`loss` is the one to backprop; every other field is a detached 0-d tensor (call `.item()` when logging)."""

    loss: Tensor
    ce: Tensor
    z_loss: Tensor
    n_tokens: Tensor
    ce_text: Tensor
    n_text: Tensor
    ce_image: Tensor
    n_image: Tensor


def _safe_mean(total: Tensor, count: Tensor) -> Tensor:
    # Dividing by max(count, 1) keeps an empty selection at exactly 0 (and its gradient at 0) instead of NaN.
    return total / count.clamp(min=1).to(total.dtype)


def lm_loss(
    logits: Tensor,
    tokens: Tensor,
    loss_mask: Tensor,
    z_loss_weight: float = 1e-5,
    image_token_mask: Tensor | None = None,
) -> LossOutput:
    """Shifted CE + `z_loss_weight * log²Z`, both means over targets where `loss_mask[:, 1:]` is True.

    `image_token_mask` ([V] bool) decides which targets count as image for `ce_image`; without it all are text.
    """
    if logits.shape[:2] != tokens.shape or tokens.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, tokens {tuple(tokens.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    mask = loss_mask[:, 1:].bool()
    targets = tokens[:, 1:][mask]
    # Select supervised rows before upcasting so only they are materialised in fp32 (the full [B,S,V] can be GBs).
    rows = logits[:, :-1][mask].float()
    lse = torch.logsumexp(rows, dim=-1)
    # CE from the same logsumexp the z-loss uses: log-softmax at the target = logit[target] - lse.
    ce_per = lse - rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    n = mask.sum()
    ce = _safe_mean(ce_per.sum(), n)
    z = z_loss_weight * _safe_mean(lse.square().sum(), n)
    loss = ce + z

    with torch.no_grad():
        ce_d = ce_per.detach()
        if image_token_mask is None:
            is_image = torch.zeros_like(targets, dtype=torch.bool)
        else:
            is_image = image_token_mask.to(device=targets.device, dtype=torch.bool)[targets]
        n_image = is_image.sum()
        n_text = n - n_image
        ce_image = _safe_mean(torch.where(is_image, ce_d, 0.0).sum(), n_image)
        ce_text = _safe_mean(torch.where(is_image, 0.0, ce_d).sum(), n_text)

    return LossOutput(
        loss=loss,
        ce=ce.detach(),
        z_loss=z.detach(),
        n_tokens=n,
        ce_text=ce_text,
        n_text=n_text,
        ce_image=ce_image,
        n_image=n_image,
    )
