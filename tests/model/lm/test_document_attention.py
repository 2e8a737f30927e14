"""Document masking through FlexAttention equals the dense-mask SDPA path (compiled flex on CPU, forward only)."""

from __future__ import annotations

import pytest
import torch

from model.lm.document_attention import (
    document_block_mask,
    document_mask,
    flex_document_attention,
    resolve_document_attention,
)
from model.lm.transformer import Transformer
from schemas.model_config import ModelConfig


def packed_doc_ids() -> torch.Tensor:
    # 200 positions: not a multiple of FlexAttention's 128-wide blocks; documents cross the block edge; padding.
    first = [0] * 70 + [1] * 90 + [2] * 25 + [-1] * 15
    second = [0] * 130 + [1] * 70
    return torch.tensor([first, second])


def test_auto_picks_flex_on_cuda_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_document_attention("auto", cpu, 64) == "sdpa"
    assert resolve_document_attention("auto", cuda, 64) == "flex"
    assert resolve_document_attention("auto", cuda, 8) == "sdpa"  # Triton's kernel needs 16+ dims per head
    assert resolve_document_attention("flex", cpu, 64) == "flex"
    assert resolve_document_attention("sdpa", cuda, 64) == "sdpa"
    with pytest.raises(ValueError, match="head_dim >= 16, this model's is 8"):
        resolve_document_attention("flex", cuda, 8)


def test_block_mask_skips_blocks_outside_documents() -> None:
    doc_ids = torch.tensor([[0] * 128 + [1] * 128])
    blocks = document_block_mask(doc_ids).to_dense()[0, 0]  # [query block, key block]: 1 where any pair attends
    assert blocks.tolist() == [[1, 0], [0, 1]]  # the second document never reads the first one's block
    causal = document_block_mask(torch.zeros(1, 256, dtype=torch.long)).to_dense()[0, 0]
    assert causal.tolist() == [[1, 0], [1, 1]]


@pytest.mark.parametrize("n_kv_heads", [4, 2])  # plain and grouped-query attention
def test_flex_model_forward_equals_dense_mask(n_kv_heads: int) -> None:
    config = ModelConfig.from_preset("tiny", n_heads=4, n_kv_heads=n_kv_heads)
    model = Transformer.from_config(config).eval()
    doc_ids = packed_doc_ids()
    tokens = torch.randint(0, config.vocab_size, doc_ids.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(tokens, doc_ids=doc_ids)
        model.document_attention = "flex"
        flex = model(tokens, doc_ids=doc_ids)
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-4)
    # The flex path isolates documents too: changing document 0 leaves document 1's logits unchanged.
    changed = tokens.clone()
    changed[:, :70] = (changed[:, :70] + 5) % config.vocab_size
    with torch.no_grad():
        other = model(changed, doc_ids=doc_ids)
    torch.testing.assert_close(other[0, 70:160], flex[0, 70:160], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(other[0, :70], flex[0, :70])


@pytest.mark.slow
def test_flex_inside_compiled_blocks_equals_dense_mask() -> None:
    # The trainer's `compile: true` on CUDA: each block compiled, the block mask an input of every block's graph.
    config = ModelConfig.from_preset("tiny", n_heads=4, n_kv_heads=2)
    model = Transformer.from_config(config).eval()
    doc_ids = packed_doc_ids()
    tokens = torch.randint(0, config.vocab_size, doc_ids.shape, generator=torch.Generator().manual_seed(1))
    other_ids = torch.tensor([[0] * 100 + [1] * 100, [0] * 200])
    with torch.no_grad():
        dense = [model(tokens, doc_ids=ids) for ids in (doc_ids, other_ids)]
        for block in model.layers:
            block.compile()
        model.document_attention = "flex"
        for ids, expected in zip((doc_ids, other_ids), dense, strict=True):  # a new mask reuses the compiled graphs
            torch.testing.assert_close(model(tokens, doc_ids=ids), expected, atol=2e-5, rtol=1e-4)


def test_flex_attention_equals_sdpa_with_dense_mask() -> None:
    doc_ids = packed_doc_ids()
    q, k, v = (torch.randn(2, 4, 200, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad():
        flex = flex_document_attention(q, k, v, document_block_mask(doc_ids), enable_gqa=False)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc_ids))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-4)


def test_flex_on_cpu_with_gradients_is_a_clear_error() -> None:
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        flex_document_attention(q, q, q, document_block_mask(torch.zeros(1, 8, dtype=torch.long)), enable_gqa=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only")
def test_flex_training_gradients_equal_dense_mask_on_cuda() -> None:
    config = ModelConfig.from_preset("tiny", n_heads=4, n_kv_heads=2)
    doc_ids = packed_doc_ids().cuda()
    tokens = torch.randint(0, config.vocab_size, doc_ids.shape, device="cuda")
    grads = {}
    for kernel in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = Transformer.from_config(config).cuda().train()
        model.document_attention = kernel
        model(tokens, doc_ids=doc_ids, loss_mask=doc_ids != -1).loss.backward()
        grads[kernel] = {name: p.grad for name, p in model.named_parameters()}
    for name, grad in grads["sdpa"].items():
        torch.testing.assert_close(grads["flex"][name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_flex_under_autocast_takes_values_dtype() -> None:
    # QK-norm's LayerNorm keeps q and k in fp32 under autocast while v is bf16; flex gets one dtype, as SDPA would.
    config = ModelConfig.from_preset("tiny", n_heads=4, n_kv_heads=2)
    model = Transformer.from_config(config).eval()
    doc_ids = packed_doc_ids()
    tokens = torch.randint(0, config.vocab_size, doc_ids.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dense = model(tokens, doc_ids=doc_ids)
        model.document_attention = "flex"
        flex = model(tokens, doc_ids=doc_ids)
    assert flex.dtype == dense.dtype == torch.bfloat16
    torch.testing.assert_close(flex.float(), dense.float(), atol=0.05, rtol=0.05)
