"""make_optimizer parameter groups on the tiny transformer; clip_and_check's norm and non-finite guard."""

from __future__ import annotations

import math

import pytest
import torch

from model.lm.transformer import Transformer
from model.training.optim import clip_and_check, make_optimizer
from schemas.model_config import ModelConfig
from schemas.train_config import OptimizerConfig


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny"))


def test_defaults_follow_the_recipe(model):
    opt = make_optimizer(model, OptimizerConfig())
    for group in opt.param_groups:
        assert group["betas"] == (0.9, 0.95)
        assert group["eps"] == 1e-5
        assert group["lr"] == 1e-4
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_decay_on_matrices_only_and_every_param_in_exactly_one_group(model):
    opt = make_optimizer(model, OptimizerConfig(weight_decay=0.05))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert not decayed & not_decayed
    all_params = dict(model.named_parameters())
    assert decayed | not_decayed == {id(p) for p in all_params.values()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(all_params)
    for name, p in all_params.items():
        is_norm_or_bias = "norm" in name or name.endswith(".bias")
        assert (id(p) in decayed) == (not is_norm_or_bias), name
        assert (id(p) in decayed) == (p.ndim >= 2), name  # here every matrix is a Linear or Embedding weight
    # the layers the brief names explicitly
    assert id(all_params["tok_embeddings.weight"]) in decayed
    assert id(all_params["output.weight"]) in decayed
    assert id(all_params["layers.0.attention.q_normalization.bias"]) in not_decayed
    assert id(all_params["layers.1.attention.k_normalization.weight"]) in not_decayed
    assert id(all_params["norm.weight"]) in not_decayed


def test_grouped_qk_norm_gains_are_not_decayed_though_2d():
    model = Transformer(ModelConfig.from_preset("tiny", qk_norm_groups=2))
    opt = make_optimizer(model, OptimizerConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    gain = model.layers[0].attention.q_normalization.weight
    assert gain.ndim == 2 and id(gain) not in decayed
    assert {n for n, p in model.named_parameters() if id(p) in decayed} == {
        n for n, p in model.named_parameters() if "norm" not in n and not n.endswith(".bias")
    }


def _fill_grads(model, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * scale


def test_clip_and_check_returns_true_pre_clip_norm_and_clips(model):
    _fill_grads(model, scale=0.1)
    expected = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    assert expected > 1.0
    norm, finite = clip_and_check(model, max_norm=1.0)
    assert finite
    assert norm == pytest.approx(expected, rel=1e-5)
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    assert after == pytest.approx(1.0, rel=1e-4)


def test_clip_and_check_leaves_small_grads_alone(model):
    _fill_grads(model, seed=1, scale=1e-4)
    before = [p.grad.clone() for p in model.parameters()]
    norm, finite = clip_and_check(model, max_norm=1.0)
    assert finite and norm < 1.0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_clip_and_check_flags_non_finite(model, bad):
    _fill_grads(model, seed=2)
    next(iter(model.parameters())).grad[0, 0] = bad
    norm, finite = clip_and_check(model, max_norm=1.0)
    assert not finite
    assert not math.isfinite(norm)


def test_step_with_groups_decays_only_matrices():
    lin = torch.nn.Linear(4, 4)  # weight (decayed) and bias (not)
    opt = make_optimizer(lin, OptimizerConfig(lr=0.1, weight_decay=0.5))
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad = torch.zeros_like(lin.weight)
    lin.bias.grad = torch.zeros_like(lin.bias)
    opt.step()
    # zero gradient: only decoupled weight decay moves anything (w <- w * (1 - lr * wd))
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.1 * 0.5))
    torch.testing.assert_close(lin.bias.detach(), b0)


def test_fused_adamw_on_plain_tensors_matches_the_foreach_update():
    # make_optimizer picks torch's fused kernel for plain CPU tensors; over a few steps it must give the foreach
    # implementation's parameters (to float rounding), decay groups included.
    torch.manual_seed(0)
    fused_model = Transformer(ModelConfig.from_preset("tiny"))
    reference = Transformer(ModelConfig.from_preset("tiny"))
    reference.load_state_dict(fused_model.state_dict())
    config = OptimizerConfig(lr=1e-2)
    fused = make_optimizer(fused_model, config)
    assert all(group["fused"] for group in fused.param_groups)
    from model.training.optim import param_groups

    foreach = torch.optim.AdamW(
        param_groups(reference, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps, foreach=True
    )
    tokens = torch.randint(0, 2048, (2, 16))
    for _ in range(3):
        for model, opt in ((fused_model, fused), (reference, foreach)):
            opt.zero_grad()
            model(tokens).float().logsumexp(-1).mean().backward()
            opt.step()
    for (name, a), b in zip(fused_model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
