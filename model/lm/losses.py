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

    ce_text, n_text, ce_image, n_image = _split_by_modality(ce_per, targets, n, image_token_mask)

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


def _split_by_modality(ce_per: Tensor, targets: Tensor, n: Tensor, image_token_mask: Tensor | None):
    """(ce_text, n_text, ce_image, n_image) of detached per-target CE, split by the target's modality."""
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
    return ce_text, n_text, ce_image, n_image


DEFAULT_CHUNK_SIZE = 1024


def _padded_stride(columns: int) -> int:
    """`columns` rounded up to an odd multiple of 8: aligned rows, and never a power of two (cache-set conflicts)."""
    stride = -(-columns // 8) * 8
    return stride + 8 if (stride // 8) % 2 == 0 else stride


def _vocab_major(compute: torch.dtype, device: torch.device) -> bool:
    """Whether the fused loss holds its logits vocab-major: fp32 (or fp64) on CPU (see `_LinearCrossEntropy`)."""
    return compute in (torch.float32, torch.float64) and device.type == "cpu"


def _logit_views(buffer: Tensor, vocab: int, n: int, vocab_major: bool) -> tuple[Tensor, Tensor]:
    """(padded, logits) over the flat `buffer`: `logits` is a [vocab, n] view; `padded` the [vocab, >= n] region.

    Vocab-major: rows of `_padded_stride(n)` elements, `logits` their first n columns. Row-major: `logits` is the
    transpose of a contiguous [n, vocab] block, and `padded` is `logits` itself.
    """
    if vocab_major:
        padded = buffer[: vocab * _padded_stride(n)].view(vocab, -1)
        return padded, padded[:, :n]
    logits = buffer[: n * vocab].view(n, vocab).t()
    return logits, logits


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE + z·lse², divided by `denom`, of the logits `hidden @ weight.T`, a chunk of rows at a time.

    Forward never holds more than one [chunk, V] block of logits. When gradients are needed they are computed in the
    forward pass too, chunk by chunk, while the block is at hand (the d loss / d logits of a row is
    (softmax · (1 + 2z·lse) - onehot(target)) / denom): grad_hidden rows are written once, grad_weight accumulates
    over chunks. Backward then only scales both by the incoming scalar gradient, so the output layer costs the same
    three matmuls as the unfused path, without the [N, V] logits, their softmax and their gradient in memory.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, z_loss_weight: float, denom: Tensor, chunk_size: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        n_rows, device = hidden.shape[0], hidden.device
        want_grad_h, want_grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_grad = want_grad_h or want_grad_w
        # Under autocast the matmuls run in its dtype (as the unfused output layer would); the softmax is fp32.
        autocast = torch.is_autocast_enabled(device.type)
        compute = torch.get_autocast_dtype(device.type) if autocast else hidden.dtype
        lse = torch.empty(n_rows, dtype=torch.float32, device=device)
        ce_per = torch.empty(n_rows, dtype=torch.float32, device=device)
        grad_hidden = torch.empty_like(hidden) if want_grad_h else None
        grad_weight = None  # fp32; the first chunk's product initialises it (no zero fill of a [V, D] buffer)
        scale = 1.0 / denom.to(torch.float32)
        with torch.autocast(device.type, enabled=False):
            w = weight.to(compute)
            vocab = w.shape[0]
            # fp32 on CPU: logits are held vocab-major, [V, chunk], in a buffer whose row stride is an odd multiple of
            # 8 floats. MKL then runs all three products at full sgemm speed (2 threads, V = 65,536: 190-200 GFLOP/s,
            # where `h @ W.T` into [chunk, 65,536] rows ran at 145-150, and a power-of-two stride such as 1,024 at
            # 135-180). Elsewhere (bf16, CUDA) the block is row-major, [chunk, V], where reductions over the vocabulary
            # are faster and the products run as fast. The code sees a [V, chunk] view either way. The buffers are
            # reused by every chunk: a fresh block costs its page faults again each time. `low` holds the
            # compute-dtype logits and d_logits when that is not fp32 (bf16 autocast).
            vocab_major = _vocab_major(compute, device)
            first = min(chunk_size, n_rows)
            size = vocab * (_padded_stride(first) if vocab_major else first)
            block = torch.empty(size, dtype=torch.float32, device=device)
            # Elementwise work runs over whole padded rows (contiguous: several times faster than over the strided
            # view); the padding columns are zeroed once so they only ever hold finite values.
            _logit_views(block, vocab, first, vocab_major)[0][:, first:].zero_()
            low = None if compute == torch.float32 else torch.empty_like(block, dtype=compute)
            low_grad_w = None  # [V, D] in the compute dtype, reused: one chunk's contribution before the fp32 sum
            for start in range(0, n_rows, chunk_size):
                end = min(start + chunk_size, n_rows)
                n = end - start
                h, t = hidden[start:end].to(compute), targets[start:end]
                padded, logits = _logit_views(block, vocab, n, vocab_major)  # logits: [V, chunk], fp32
                if low is None:
                    torch.mm(w, h.t(), out=logits)
                else:
                    low_padded, low_logits = _logit_views(low, vocab, n, vocab_major)
                    logits.copy_(torch.mm(w, h.t(), out=low_logits))
                target_logit = logits.gather(0, t[None, :]).squeeze(0)
                col_max = padded.amax(dim=0, keepdim=True)
                padded.sub_(col_max).exp_()  # in place: exp(logit - max)
                sum_exp = padded.sum(dim=0, keepdim=True)
                padded_lse = sum_exp.log() + col_max  # [1, stride]
                chunk_lse = padded_lse[0, :n]
                lse[start:end] = chunk_lse
                ce_per[start:end] = chunk_lse - target_logit
                if not want_grad:
                    continue
                # d loss / d logits, in place over the exp block: softmax·(1 + 2z·lse)/denom, minus onehot/denom.
                padded.mul_((1.0 + 2.0 * z_loss_weight * padded_lse) * scale / sum_exp)
                logits.scatter_add_(0, t[None, :], (-scale).expand(1, n))
                d_logits = logits if low is None else low_padded.copy_(padded)[:, :n]
                if want_grad_h and low is None:
                    torch.mm(d_logits.t(), w, out=grad_hidden[start:end])
                elif want_grad_h:
                    grad_hidden[start:end] = d_logits.t() @ w  # the bf16 product, kept in hidden's dtype
                if not want_grad_w:
                    continue
                if low is None:
                    if grad_weight is None:
                        grad_weight = torch.mm(d_logits, h)
                    else:
                        grad_weight.addmm_(d_logits, h)
                else:
                    if low_grad_w is None:
                        low_grad_w = torch.empty_like(w)
                    torch.mm(d_logits, h, out=low_grad_w)
                    if grad_weight is None:
                        grad_weight = low_grad_w.float()
                    else:
                        grad_weight.add_(low_grad_w)
        if want_grad_w and grad_weight is None:  # no supervised rows
            grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = (ce_per.sum() + z_loss_weight * lse.square().sum()) * scale
        if want_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if want_grad_w else None)
        ctx.mark_non_differentiable(ce_per, lse)
        return loss, ce_per, lse

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_ce: Tensor, _grad_lse: Tensor):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("fused_lm_loss: backward through the same loss twice (retain_graph) is not supported")
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: the buffers are this Function's own, and a second backward is refused above.
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def fused_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    loss_mask: Tensor,
    z_loss_weight: float = 1e-5,
    image_token_mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> LossOutput:
    """`lm_loss(hidden @ weight.T, tokens, loss_mask, ...)` without ever materialising the [B, S, V] logits.

    `hidden` [B, S, D] are the final (normed) hidden states, `weight` [V, D] the output layer. The supervised rows
    are processed `chunk_size` at a time (see `_LinearCrossEntropy`); the result, its gradients and the text/image
    split equal `lm_loss`'s up to float summation order.
    """
    if hidden.shape[:2] != tokens.shape or tokens.shape != loss_mask.shape:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, tokens {tuple(tokens.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    mask = loss_mask[:, 1:].bool()
    targets = tokens[:, 1:][mask]
    rows = hidden[:, :-1][mask]  # [N, D]: only supervised positions reach the output layer
    n = mask.sum()
    loss, ce_per, lse = _LinearCrossEntropy.apply(
        rows, weight, targets, float(z_loss_weight), n.clamp(min=1), int(chunk_size)
    )
    with torch.no_grad():
        ce = _safe_mean(ce_per.sum(), n)
        z = z_loss_weight * _safe_mean(lse.square().sum(), n)
    ce_text, n_text, ce_image, n_image = _split_by_modality(ce_per, targets, n, image_token_mask)
    return LossOutput(
        loss=loss, ce=ce, z_loss=z, n_tokens=n, ce_text=ce_text, n_text=n_text, ce_image=ce_image, n_image=n_image
    )
