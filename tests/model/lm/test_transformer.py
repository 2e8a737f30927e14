"""The transformer: Meta's parameter names, masking, rotary layout, norm orders, KV cache, and that it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.generation.decode_step import decode_linear, decode_step, decode_weights
from model.lm.transformer import Transformer, apply_rotary, document_mask, rotary_angles
from schemas.model_config import ModelConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **overrides)


def model_of(config: ModelConfig) -> Transformer:
    return Transformer.from_config(config).eval()


def jitter_qk_norms(model: Transformer) -> Transformer:
    """QK-norm affines away from 1 / 0 (and different per group), so a mix-up of heads and groups shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "normalization" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def test_grouped_qk_norm_gives_each_run_of_heads_its_groups_affine() -> None:
    config = tiny(qk_norm_groups=2)  # 4 q heads, 2 kv heads: q heads 0-1 and kv head 0 in group 0
    model = jitter_qk_norms(model_of(config))
    attn, hd = model.layers[0].attention, config.head_dim
    assert attn.q_normalization.weight.shape == (2, hd) and attn.k_normalization.bias.shape == (2, hd)
    assert model_of(tiny()).layers[0].attention.q_normalization.weight.shape == (hd,)
    x, positions = torch.randn(2, 6, config.dim), torch.arange(6).expand(2, 6)
    with torch.no_grad():
        q, k, _ = attn.project(x, positions)
        q_raw = attn.wq(x).view(2, 6, 4, hd)
        k_raw = attn.wk(x).view(2, 6, 2, hd)
    for head, group in ((0, 0), (1, 0), (2, 1), (3, 1)):
        norm = attn.q_normalization
        qn = F.layer_norm(q_raw[:, :, head], (hd,), norm.weight[group], norm.bias[group], config.qk_norm_eps)
        expected = reference_rotary(qn[:, :, None], positions, config.rope_theta)[:, :, 0]
        torch.testing.assert_close(q[:, :, head], expected, atol=1e-5, rtol=1e-4)
    for head in (0, 1):
        norm = attn.k_normalization
        kn = F.layer_norm(k_raw[:, :, head], (hd,), norm.weight[head], norm.bias[head], config.qk_norm_eps)
        expected = reference_rotary(kn[:, :, None], positions, config.rope_theta)[:, :, 0]
        torch.testing.assert_close(k[:, :, head], expected, atol=1e-5, rtol=1e-4)
    assert model.num_params() == config.n_params()
    with pytest.raises(ValueError, match="qk_norm_groups 4 must divide n_heads 4 and n_kv_heads 2"):
        tiny(qk_norm_groups=4)


def test_output_shape_and_dtype_follows_parameters() -> None:
    config = tiny()
    model = model_of(config)
    tokens = torch.randint(0, config.vocab_size, (2, 7))
    logits = model(tokens)
    assert logits.shape == (2, 7, config.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert model.to(torch.float64)(tokens).dtype == torch.float64


def test_parameter_names_and_shapes_are_metas() -> None:
    config = tiny()
    hd, kv = config.head_dim, config.n_kv_heads * config.head_dim
    expected = {
        "tok_embeddings.weight": (config.vocab_size, config.dim),
        "norm.weight": (config.dim,),
        "output.weight": (config.vocab_size, config.dim),
    }
    for i in range(config.n_layers):
        p = f"layers.{i}."
        expected |= {
            p + "attention.wq.weight": (config.n_heads * hd, config.dim),
            p + "attention.wk.weight": (kv, config.dim),
            p + "attention.wv.weight": (kv, config.dim),
            p + "attention.wo.weight": (config.dim, config.n_heads * hd),
            p + "attention.q_normalization.weight": (hd,),
            p + "attention.q_normalization.bias": (hd,),
            p + "attention.k_normalization.weight": (hd,),
            p + "attention.k_normalization.bias": (hd,),
            p + "feed_forward.w1.weight": (config.ffn_dim, config.dim),
            p + "feed_forward.w2.weight": (config.dim, config.ffn_dim),
            p + "feed_forward.w3.weight": (config.ffn_dim, config.dim),
            p + "attention_norm.weight": (config.dim,),
            p + "ffn_norm.weight": (config.dim,),
        }
    state = Transformer.from_config(config).state_dict()
    assert config.n_layers == 2
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # GQA: the tiny preset has fewer kv heads than query heads.
    assert kv < config.n_heads * hd


def test_qk_norm_off_removes_its_parameters() -> None:
    names = Transformer.from_config(tiny(qk_norm=False)).state_dict().keys()
    assert not [n for n in names if "normalization" in n]


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": False}, {"swin_norm": True}])
def test_param_count_matches_model_config(overrides: dict) -> None:
    config = tiny(**overrides)
    assert Transformer.from_config(config).num_params() == config.n_params()


def test_initialisation() -> None:
    config = tiny(init_std=0.05)
    model = Transformer.from_config(config)
    assert abs(model.output.weight.std().item() - 0.05) < 0.005
    assert abs(model.layers[0].attention.wq.weight.std().item() - 0.05) < 0.005
    attn = model.layers[1].attention
    assert torch.equal(model.norm.weight, torch.ones(config.dim))
    assert torch.equal(attn.q_normalization.weight, torch.ones(config.head_dim))
    assert torch.equal(attn.k_normalization.bias, torch.zeros(config.head_dim))


def test_causal_later_tokens_do_not_change_earlier_logits() -> None:
    config = tiny()
    model = model_of(config)
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % config.vocab_size
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_document_masking_isolates_documents() -> None:
    config = tiny()
    model = model_of(config)
    doc1, doc2 = torch.randint(0, config.vocab_size, (1, 6)), torch.randint(0, config.vocab_size, (1, 5))
    packed = torch.cat([doc1, doc2, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    doc_ids = torch.tensor([[0] * 6 + [1] * 5 + [-1] * 3])
    positions = torch.tensor([list(range(6)) + list(range(5)) + [0] * 3])
    logits = model(packed, positions=positions, doc_ids=doc_ids)
    assert torch.isfinite(logits).all()  # padding rows included

    alone = model(doc2)  # positions default to 0..4
    torch.testing.assert_close(logits[:, 6:11], alone, atol=1e-5, rtol=1e-5)

    other = packed.clone()
    other[:, :6] = (other[:, :6] + 7) % config.vocab_size
    torch.testing.assert_close(model(other, positions=positions, doc_ids=doc_ids)[:, 6:11], logits[:, 6:11])
    # Without document masking the second document does see the first one.
    assert not torch.allclose(model(packed, positions=positions)[:, 6:11], logits[:, 6:11], atol=1e-4)


def test_document_mask_values() -> None:
    mask = document_mask(torch.tensor([[0, 0, 1, -1, -1]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(mask, expected.bool())


def reference_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Meta/LLaMA apply_rotary_emb: adjacent pairs as complex numbers times exp(i * pos * freq)."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.double()[..., None] * freqs  # [B, S, hd/2]
    rot = torch.polar(torch.ones_like(angles), angles)[:, :, None, :]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)


def rotate_half_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """HF/NeoX layout: dimension i is paired with i + hd/2."""
    hd = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    angles = torch.cat([positions.float()[..., None] * freqs] * 2, dim=-1)[:, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()


def test_rotary_uses_metas_adjacent_pair_layout() -> None:
    x = torch.randn(2, 9, 3, 16)
    positions = torch.tensor([list(range(9)), [4, 5, 6, 0, 1, 2, 3, 100, 2000]])
    cos, sin, _ = rotary_angles(positions, 16, 10_000.0)
    ours = apply_rotary(x, cos, sin)
    torch.testing.assert_close(apply_rotary(x, *rotary_angles(positions, 16, 10_000.0, complex_rotation=True)), ours)
    torch.testing.assert_close(ours, reference_rotary(x, positions, 10_000.0), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, rotate_half_rotary(x, positions, 10_000.0), atol=1e-2)
    torch.testing.assert_close(ours[0, 0], x[0, 0])  # position 0 is the identity
    torch.testing.assert_close(ours.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


def test_qk_norm_is_applied_per_head_before_rotary() -> None:
    config = tiny()
    attn = Transformer.from_config(config).layers[0].attention
    with torch.no_grad():  # non-trivial affine so the order shows
        attn.q_normalization.weight.uniform_(0.5, 1.5)
        attn.q_normalization.bias.uniform_(-0.5, 0.5)
        attn.k_normalization.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 6, config.dim)
    positions = torch.arange(3, 9).expand(2, 6)
    q, k, v = attn.project(x, positions)
    hd = config.head_dim
    assert q.shape == (2, 6, config.n_heads, hd) and k.shape == v.shape == (2, 6, config.n_kv_heads, hd)
    q_raw = attn.wq(x).view(2, 6, config.n_heads, hd)
    k_raw = attn.wk(x).view(2, 6, config.n_kv_heads, hd)
    qn = F.layer_norm(q_raw, (hd,), attn.q_normalization.weight, attn.q_normalization.bias, config.qk_norm_eps)
    kn = F.layer_norm(k_raw, (hd,), attn.k_normalization.weight, attn.k_normalization.bias, config.qk_norm_eps)
    torch.testing.assert_close(q, reference_rotary(qn, positions, config.rope_theta), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k, reference_rotary(kn, positions, config.rope_theta), atol=1e-5, rtol=1e-4)
    # Normalising after the rotation would give something else.
    rotated_first = reference_rotary(q_raw, positions, config.rope_theta)
    after = F.layer_norm(rotated_first, (hd,), attn.q_normalization.weight, attn.q_normalization.bias)
    assert not torch.allclose(q, after, atol=1e-3)


@pytest.mark.parametrize("groups", [1, 2])
def test_qk_norm_eps_is_the_references_1e5_whatever_norm_eps_is(groups: int) -> None:
    # Meta's QK-norm is LayerNorm(head_dim) at its default eps and HF's hard-codes 1e-5; norm_eps is the RMSNorms'.
    config = tiny(norm_eps=1e-6, qk_norm_groups=groups)
    assert config.qk_norm_eps == 1e-5
    model = jitter_qk_norms(model_of(config))
    with torch.no_grad():  # q and k rows of small variance (~1e-5), where the two epsilons give other values
        for layer in model.layers:
            layer.attention.wq.weight.mul_(0.01)
            layer.attention.wk.weight.mul_(0.01)
    attn, hd = model.layers[0].attention, config.head_dim
    x = torch.randn(2, 5, config.dim)
    positions = torch.arange(5).expand(2, 5)
    q, _, _ = attn.project(x, positions)
    q_raw = attn.wq(x).view(2, 5, config.n_heads, hd)
    weight = attn.q_normalization.weight.reshape(groups, hd).repeat_interleave(config.n_heads // groups, 0)
    bias = attn.q_normalization.bias.reshape(groups, hd).repeat_interleave(config.n_heads // groups, 0)
    for eps, same in ((1e-5, True), (1e-6, False)):
        normed = F.layer_norm(q_raw, (hd,), None, None, eps) * weight + bias
        expected = reference_rotary(normed, positions, config.rope_theta)
        assert torch.allclose(q, expected, atol=1e-5, rtol=1e-4) is same, eps
    # The decoding path reads the same eps and gives the forward's hidden states.
    weights = decode_weights(model)
    assert {n.eps for layer in weights.layers for n in (layer.q_norm, layer.k_norm)} == {1e-5}
    assert {layer.attention_norm_eps for layer in weights.layers} == {weights.norm_eps} == {1e-6}
    tokens = torch.randint(0, config.vocab_size, (2, 6))
    cache_a, cache_b = model.make_cache(2, 6), model.make_cache(2, 6)
    with torch.no_grad():
        full = model(tokens, cache=cache_a)
        model(tokens[:, :5], cache=cache_b)
        last = decode_step(weights, tokens[:, 5], torch.full((2,), 5), cache_b, 5)
    torch.testing.assert_close(model.output(last), full[:, 5], atol=1e-5, rtol=1e-5)


def test_swin_norm_changes_block_order() -> None:
    assert ModelConfig.from_preset("34b").swin_norm and not ModelConfig.from_preset("7b").swin_norm
    pre = model_of(tiny())
    swin = model_of(tiny(swin_norm=True))
    with torch.no_grad():  # norm scales away from 1 so both orders are exercised with the same weights
        for p in pre.parameters():
            p.add_(0.1 * torch.randn_like(p))
    swin.load_state_dict(pre.state_dict())
    tokens = torch.randint(0, 2048, (1, 8))
    assert not torch.allclose(pre(tokens), swin(tokens), atol=1e-3)

    # The swin block equals h = x + norm(attn(x)); out = h + norm(ffn(h)) computed by hand.
    block, x = swin.layers[0], torch.randn(1, 8, 64)
    positions = torch.arange(8).expand(1, 8)
    h = x + block.attention_norm(block.attention(x, positions))
    torch.testing.assert_close(block(x, positions), h + block.ffn_norm(block.feed_forward(h)))


def test_kv_cache_decoding_matches_full_forward() -> None:
    config = tiny()
    model = model_of(config)
    tokens = torch.randint(0, config.vocab_size, (2, 13))
    full = model(tokens)
    cache = model.make_cache(batch_size=2, max_len=16)
    with torch.no_grad():
        steps = [model(tokens[:, :5], cache=cache, start_pos=0)]
        steps += [model(tokens[:, p : p + 1], cache=cache, start_pos=p) for p in range(5, 13)]
        incremental = torch.cat(steps, dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-5)

    # A chunk of several tokens after a cached prompt is causal among itself too.
    cache = model.make_cache(batch_size=2, max_len=16)
    with torch.no_grad():
        model(tokens[:, :5], cache=cache)
        chunk = model(tokens[:, 5:13], cache=cache, start_pos=5)
    torch.testing.assert_close(chunk, full[:, 5:13], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="16 positions"):
        model(tokens[:, :5], cache=cache, start_pos=13)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize(("out_features", "in_features"), [(64, 64), (512, 256), (300, 512)])
def test_decode_linear_equals_f_linear(rows: int, out_features: int, in_features: int) -> None:
    # Small weights take F.linear itself; 256-wide and larger take W @ x.T (x doubled for one row).
    x, weight = torch.randn(rows, in_features), torch.randn(out_features, in_features)
    got = decode_linear(x, weight)
    assert got.shape == (rows, out_features) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-4, rtol=1e-5)
    half = decode_linear(x.bfloat16(), weight.bfloat16())  # bf16 keeps F.linear
    torch.testing.assert_close(half, F.linear(x.bfloat16(), weight.bfloat16()), atol=0, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_kv_heads": 4},
        {"swin_norm": True},
        {"qk_norm": False},
        {"qk_norm_groups": 2},
        {"dim": 256, "n_heads": 4, "n_kv_heads": 4},  # wide enough for decode_linear's matrix-matrix path
        {"dim": 256, "n_heads": 4, "n_kv_heads": 4, "qk_norm": False},  # ... straight into the rotation
    ],
)
@pytest.mark.parametrize("rows", [1, 2])
def test_decode_step_equals_forward_with_a_cache(overrides: dict, rows: int) -> None:
    # The lean one-token path (2-D activations, direct F.linear) must be the same function as `forward` with a
    # cache, with GQA or not, either norm order, and with a mask that hides some cached columns of one row.
    config = tiny(**overrides)
    model = jitter_qk_norms(model_of(config))
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    positions = torch.tensor([list(range(12)), [0, 0, 0, *range(9)]])  # row 1: three padding columns first
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    mask = valid[:, None, None, :] & torch.ones(12, 12, dtype=torch.bool).tril()[None, None]
    # One row: decode_linear's single-row path (and no padding); two rows: its batched path, one row padded.
    tokens, positions, valid, mask = tokens[:rows], positions[:rows], valid[:rows], mask[:rows]
    cache_a, cache_b = model.make_cache(rows, 12), model.make_cache(rows, 12)
    with torch.no_grad():
        model(tokens[:, :8], positions[:, :8], cache=cache_a)
        model(tokens[:, :8], positions[:, :8], cache=cache_b)
        for p in range(8, 12):
            rope = rotary_angles(positions[:, p : p + 1], config.head_dim, config.rope_theta)
            h = model.tok_embeddings(tokens[:, p : p + 1])
            for layer in model.layers:
                h = layer(h, positions[:, p : p + 1], mask[:, :, p : p + 1, : p + 1], cache_a, p, rope=rope)
            expected = model.norm(h)[:, 0]
            got = decode_step(decode_weights(model), tokens[:, p], positions[:, p], cache_b, p, valid[:, : p + 1])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache_b.keys[0][:, :, p], cache_a.keys[0][:, :, p])
    with pytest.raises(ValueError, match="12 positions"):
        decode_step(decode_weights(model), tokens[:, 0], positions[:, 0], cache_b, 12)


@pytest.mark.parametrize(
    "overrides", [{}, {"n_kv_heads": 4}, {"swin_norm": True}, {"qk_norm": False}, {"qk_norm_groups": 2}]
)
def test_static_decode_step_equals_decode_step(overrides: dict) -> None:
    # The fixed-shape step a CUDA graph captures: the column read from one buffer, the cache written through a
    # device index, every cache column attended under the validity mask. Same function as decode_step.
    from model.generation.decode_graph import GraphedDecode, static_decode_step

    config = tiny(**overrides)
    model = jitter_qk_norms(model_of(config))
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    positions = torch.tensor([list(range(12)), [0, 0, 0, *range(9)]])
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    valid[0, 9] = False  # a column row 0 does not attend (a dropped token): still attended by itself when new
    weights = decode_weights(model)
    cache_a, cache_b = model.make_cache(2, 12), model.make_cache(2, 12)
    grid = valid.clone()
    grid[:, 8:] = False  # not written yet: the static step must not see them
    column = torch.zeros(4, 2, dtype=torch.long)
    static = GraphedDecode(weights, column, grid, cache_b)  # on the CPU: static_decode_step, eagerly
    with torch.no_grad():
        model(tokens[:, :8], positions[:, :8], cache=cache_a)
        model(tokens[:, :8], positions[:, :8], cache=cache_b)
        for p in range(8, 12):
            grid[:, p] = valid[:, p]
            column.copy_(torch.stack([tokens[:, p], valid[:, p].long(), positions[:, p], torch.full((2,), p)]))
            mask = valid[:, : p + 1].clone()
            mask[:, p] = True
            expected = decode_step(weights, tokens[:, p], positions[:, p], cache_a, p, mask)
            torch.testing.assert_close(static(), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache_b.keys[-1][:, :, : p + 1], cache_a.keys[-1][:, :, : p + 1])
        with pytest.raises(ValueError, match="needs a mask"):
            decode_step(weights, tokens[:, 0], positions[:, 0], cache_b, torch.tensor([3]))
        assert static_decode_step(weights, column, grid, cache_b, torch.arange(12)).shape == (2, config.dim)


def test_decode_step_applies_dropout_like_forward_in_training_mode() -> None:
    # SFT-style dropout: in training mode both paths drop the same activations for the same seed; in eval none.
    config = tiny(dropout=0.5)
    model = Transformer.from_config(config)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    assert decode_weights(model.eval()).dropout == 0.0 and decode_weights(model.train()).dropout == 0.5
    cache_a, cache_b = model.make_cache(2, 9), model.make_cache(2, 9)
    with torch.no_grad():
        model.eval()
        model(tokens[:, :8], cache=cache_a)
        model(tokens[:, :8], cache=cache_b)
        model.train()
        torch.manual_seed(3)
        h = model.tok_embeddings(tokens[:, 8:])
        for layer in model.layers:
            h = layer(h, torch.full((2, 1), 8), None, cache_a, 8)
        expected = model.norm(h)[:, 0]
        torch.manual_seed(3)
        got = decode_step(decode_weights(model), tokens[:, 8], torch.full((2,), 8), cache_b, 8)
        torch.manual_seed(4)
        other = decode_step(decode_weights(model), tokens[:, 8], torch.full((2,), 8), cache_b, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other, expected, atol=1e-3)


def test_decode_step_in_bf16_follows_forward() -> None:
    # bf16 weights take apply_rotary's general form instead of the fp32 in-place complex view.
    config = tiny()
    model = model_of(config).to(torch.bfloat16)
    tokens = torch.randint(0, config.vocab_size, (2, 9))
    cache_a, cache_b = model.make_cache(2, 9), model.make_cache(2, 9)
    with torch.no_grad():
        model(tokens[:, :8], cache=cache_a)
        model(tokens[:, :8], cache=cache_b)
        expected = model(tokens[:, 8:], cache=cache_a, start_pos=8)[:, 0]
        hidden = decode_step(decode_weights(model), tokens[:, 8], torch.full((2,), 8), cache_b, 8)
        got = model.output(hidden)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_tiny_model_overfits_one_batch() -> None:
    config = tiny(n_layers=1)
    model = Transformer.from_config(config).train()
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def loss_now() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1))

    start = loss_now().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_now()
        loss.backward()
        optimizer.step()
    assert loss_now().item() < 0.5 * start


def test_dropout_only_in_training_mode() -> None:
    config = tiny(dropout=0.3)
    model = Transformer.from_config(config)
    tokens = torch.randint(0, config.vocab_size, (2, 10))
    model.eval()
    torch.testing.assert_close(model(tokens), model(tokens), atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))
