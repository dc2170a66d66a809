"""Learning-rate (and momentum) schedules as pure functions of training progress.

``lr_at(sched, optim, step, steps_per_epoch, epochs)`` gives the LR for optimizer step ``step``
(0-based, counted over the whole run) and, for OneCycle with momentum cycling, the momentum.
When a run's epochs differ in length (``train.hard_fraction``), ``steps_per_epoch`` is their mean
(a float): the schedule spans the run's steps, and its epochs are equal shares of them.
Schedules defined per batch (OneCycle, cyclic, piecewise, warmup, Keras ``decay``) move every
step; Keras-style per-epoch ones (inverse, step) hold their value for the whole epoch.
"""

from __future__ import annotations

import math

from cnnlab.config import OptimConfig, ScheduleConfig


def onecycle(frac: float, peak: float, s: ScheduleConfig) -> tuple[float, float]:
    """LR and momentum at ``frac`` of the run: up to ``peak`` at ``pct_start``, then down."""
    start, end = peak / s.div_factor, peak / s.div_factor / s.final_div_factor
    if frac <= s.pct_start:
        u, lo, hi = frac / s.pct_start, start, peak
        m_from, m_to = s.max_momentum, s.base_momentum
    else:
        u, lo, hi = (frac - s.pct_start) / (1 - s.pct_start), peak, end
        m_from, m_to = s.base_momentum, s.max_momentum
    u = min(max(u, 0.0), 1.0)
    w = (1 - math.cos(math.pi * u)) / 2 if s.anneal == "cos" else u
    return lo + (hi - lo) * w, m_from + (m_to - m_from) * w


def triangular(t: float, low: float, high: float, half_cycle: float) -> float:
    """Triangular cyclic LR (Smith's CLR): low -> high over ``half_cycle`` epochs, then back."""
    cycle = math.floor(1 + t / (2 * half_cycle))
    x = abs(t / half_cycle - 2 * cycle + 1)
    return low + (high - low) * max(0.0, 1 - x)


def piecewise(t: float, knots: list, values: list) -> float:
    """Linear interpolation of ``values`` at epoch ``t`` between ``knots`` (held beyond the ends)."""
    if t <= knots[0]:
        return values[0]
    for (k0, v0), (k1, v1) in zip(zip(knots, values), zip(knots[1:], values[1:])):
        if t <= k1:
            return v0 + (v1 - v0) * (t - k0) / (k1 - k0)
    return values[-1]


def lr_at(s: ScheduleConfig, o: OptimConfig, step: int, steps_per_epoch: float,
          epochs: int) -> tuple[float, float | None]:
    t = step / steps_per_epoch  # epochs completed, fractional
    epoch = step // steps_per_epoch
    momentum = None
    if s.name == "constant":
        lr = o.lr
    elif s.name == "onecycle":
        lr, m = onecycle(step / (steps_per_epoch * epochs), o.lr, s)
        momentum = m if s.cycle_momentum else None
    elif s.name == "cyclic":
        lr = triangular(t, s.min_lr, o.lr, s.step_epochs)
    elif s.name == "inverse":
        lr = o.lr / (1 + s.rate * epoch)
    elif s.name == "step":
        lr = o.lr * s.gamma ** (epoch // s.step_size)
    elif s.name == "piecewise":
        lr = o.lr * piecewise(t, s.knots, s.values)
    else:
        raise ValueError(f"unknown schedule {s.name!r}")  # config.validate rejects it earlier
    if s.warmup_epochs > 0 and t < s.warmup_epochs:
        lr *= min(1.0, (step + 1) / (s.warmup_epochs * steps_per_epoch))
    if o.decay:
        lr /= 1 + o.decay * step
    return lr, momentum


def curve(s: ScheduleConfig, o: OptimConfig, steps_per_epoch: int, epochs: int) -> list[float]:
    """The LR of every step of a run (for plots and tests)."""
    return [lr_at(s, o, i, steps_per_epoch, epochs)[0] for i in range(steps_per_epoch * epochs)]
