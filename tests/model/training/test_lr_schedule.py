"""Learning-rate schedules: warm-up shape, exact end points, cosine midpoint, LambdaLR agreement."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from model.training.lr_schedule import lr_at, make_scheduler
from schemas.train_config import ScheduleConfig

PEAK = 3e-4


def test_warmup_is_linear_and_peaks_at_warmup_steps_minus_one():
    sched = ScheduleConfig(kind="warmup_exponential", warmup_steps=10)
    lrs = [lr_at(s, 100, PEAK, sched) for s in range(10)]
    assert lrs == pytest.approx([PEAK * (s + 1) / 10 for s in range(10)])
    assert lrs[9] == pytest.approx(PEAK)
    assert lr_at(10, 100, PEAK, sched) < PEAK  # decay starts right after the peak step


@pytest.mark.parametrize("kind", ["warmup_exponential", "cosine", "constant"])
def test_every_kind_warms_up_the_same_way(kind):
    sched = ScheduleConfig(kind=kind, warmup_steps=4)
    assert [lr_at(s, 50, PEAK, sched) for s in range(4)] == pytest.approx([PEAK * k / 4 for k in (1, 2, 3, 4)])


def test_warmup_exponential_decreases_to_exactly_zero_at_the_last_step():
    sched = ScheduleConfig(kind="warmup_exponential", warmup_steps=20, min_lr_ratio=0.0)
    total = 200
    lrs = [lr_at(s, total, PEAK, sched) for s in range(total)]
    decay = lrs[19:]
    assert all(a > b for a, b in itertools.pairwise(decay))
    assert lrs[-1] == 0.0
    assert lr_at(total + 5, total, PEAK, sched) == 0.0  # past the end stays at the floor
    # exponential in shape: most of the drop happens early
    assert lrs[19 + (total - 20) // 4] < 0.4 * PEAK


def test_warmup_exponential_ends_at_min_ratio():
    sched = ScheduleConfig(kind="warmup_exponential", warmup_steps=5, min_lr_ratio=0.1)
    lrs = [lr_at(s, 60, PEAK, sched) for s in range(60)]
    assert lrs[-1] == PEAK * 0.1
    assert min(lrs[4:]) == lrs[-1]


def test_no_warmup_starts_at_peak():
    for kind in ("warmup_exponential", "cosine", "constant"):
        assert lr_at(0, 10, PEAK, ScheduleConfig(kind=kind, warmup_steps=0)) == pytest.approx(PEAK)


def test_cosine_end_and_midpoint():
    # SFT default: cosine from the peak, no warm-up.
    sched = ScheduleConfig(kind="cosine", warmup_steps=0, min_lr_ratio=0.2)
    total = 101  # last step 100, midpoint step 50
    assert lr_at(100, total, 1e-5, sched) == 1e-5 * 0.2
    assert lr_at(50, total, 1e-5, sched) == pytest.approx((1e-5 + 1e-5 * 0.2) / 2)
    zero_floor = ScheduleConfig(kind="cosine", warmup_steps=0)
    assert lr_at(100, total, 1e-5, zero_floor) == 0.0


def test_constant_after_warmup():
    sched = ScheduleConfig(kind="constant", warmup_steps=3, min_lr_ratio=0.5)
    assert [lr_at(s, 20, PEAK, sched) for s in range(3, 20)] == [PEAK] * 17


@pytest.mark.parametrize("kind", ["warmup_exponential", "cosine", "constant"])
def test_lambda_lr_matches_lr_at(kind):
    sched = ScheduleConfig(kind=kind, warmup_steps=7, min_lr_ratio=0.05)
    total = 40
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=PEAK)
    scheduler = make_scheduler(opt, total, sched)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        opt.step()
        scheduler.step()
    assert seen == pytest.approx([lr_at(s, total, PEAK, sched) for s in range(total)], rel=1e-12)
    assert math.isclose(seen[6], PEAK)


def test_scheduler_state_dict_round_trip_resumes_lr():
    sched = ScheduleConfig(kind="warmup_exponential", warmup_steps=2)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=PEAK)
    scheduler = make_scheduler(opt, 10, sched)
    for _ in range(5):
        opt.step()
        scheduler.step()
    state = scheduler.state_dict()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    resumed = make_scheduler(opt2, 10, sched)
    resumed.load_state_dict(state)
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(lr_at(6, 10, PEAK, sched))
