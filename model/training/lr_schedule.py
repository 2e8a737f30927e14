"""Learning-rate schedules: linear warm-up, then exponential decay (pretraining), cosine (SFT) or constant.

Conventions (shared by every kind), with `last = total_steps - 1` the index of the final optimizer step:
- warm-up: `lr(step) = peak * (step + 1) / warmup_steps` for `step < warmup_steps`, so the peak is reached at
  step `warmup_steps - 1` (and step 0 already trains, at `peak / warmup_steps`);
- decay runs over progress `t = (step - d) / (last - d)` in [0, 1], `d = max(warmup_steps - 1, 0)` the peak step,
  so it starts exactly at the peak and ends exactly at `peak * min_lr_ratio` on the last step; steps past the
  end stay there.
- warmup_exponential: `min + (peak - min) * (exp(-k t) - exp(-k)) / (1 - exp(-k))`, k = `EXP_DECAY_RATE`: an
  exponential curve shifted so it reaches the floor (0 by default) exactly, rather than only asymptotically.
- cosine: `min + (peak - min) * (1 + cos(pi t)) / 2`. constant: the peak after warm-up.
"""

from __future__ import annotations

import functools
import math

import torch

from schemas.train_config import ScheduleConfig

# exp(-5) ≈ 0.0067: the un-shifted curve would sit at 0.7% of the peak at the end; shifting removes that remainder.
EXP_DECAY_RATE = 5.0


def lr_factor(step: int, total_steps: int, schedule: ScheduleConfig) -> float:
    """The learning rate at `step` (0-based) as a fraction of the peak."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    warmup = schedule.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if schedule.kind == "constant":
        return 1.0
    floor = schedule.min_lr_ratio
    peak_step = max(warmup - 1, 0)
    last = total_steps - 1
    # A run whose last step is its peak step has nothing to decay over; the last-step value wins.
    t = 1.0 if last <= peak_step else min((step - peak_step) / (last - peak_step), 1.0)
    if schedule.kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule.kind == "warmup_exponential":
        end = math.exp(-EXP_DECAY_RATE)
        shape = (math.exp(-EXP_DECAY_RATE * t) - end) / (1.0 - end)
    else:
        raise ValueError(f"unknown schedule kind {schedule.kind!r}")
    return floor + (1.0 - floor) * shape


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: ScheduleConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) of a `total_steps` run peaking at `peak_lr`."""
    return peak_lr * lr_factor(step, total_steps, schedule)


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, schedule: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over the optimizer's current lrs as peaks; call `.step()` once after each `optimizer.step()`."""
    # A partial rather than a lambda so the scheduler pickles (its state_dict skips plain functions either way).
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, total_steps=total_steps, schedule=schedule)
    )
