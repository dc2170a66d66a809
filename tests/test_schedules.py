"""LR (and momentum) schedules against their formulas (issue 4)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cnnlab import schedules
from cnnlab.config import OptimConfig, ScheduleConfig, load_recipe
from cnnlab.schedules import curve, lr_at

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def approx(x, rel=1e-12, abs=1e-15):
    return pytest.approx(x, rel=rel, abs=abs)


def momenta(s, o, spe, epochs):
    return [lr_at(s, o, i, spe, epochs)[1] for i in range(spe * epochs)]


# ----------------------------------------------------------------------------- constant


def test_constant():
    o = OptimConfig(lr=0.05)
    c = curve(ScheduleConfig(), o, 7, 3)
    assert len(c) == 21 and all(v == 0.05 for v in c)
    assert all(m is None for m in momenta(ScheduleConfig(), o, 7, 3))


# ----------------------------------------------------------------------------- OneCycle


def onecycle_expected(step, total, peak, s):
    """OneCycle written out independently: start -> peak over pct_start, then -> end."""
    start = peak / s.div_factor
    end = start / s.final_div_factor
    up = s.pct_start * total
    shape = (lambda u: (1 - math.cos(math.pi * u)) / 2) if s.anneal == "cos" else (lambda u: u)
    if step <= up:
        w = shape(step / up)
        return start + (peak - start) * w, s.max_momentum + (s.base_momentum - s.max_momentum) * w
    w = shape((step - up) / (total - up))
    return peak + (end - peak) * w, s.base_momentum + (s.max_momentum - s.base_momentum) * w


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("spe, epochs, pct", [(10, 10, 0.25), (10, 10, 0.3), (7, 5, 0.2), (469, 15, 0.2), (10, 3, 0.5)])
def test_onecycle_peak_start_end_and_formula(anneal, spe, epochs, pct):
    peak = 0.2
    s = ScheduleConfig(name="onecycle", pct_start=pct, div_factor=20.0, final_div_factor=200.0, anneal=anneal)
    o = OptimConfig(lr=peak)
    total = spe * epochs
    lrs = curve(s, o, spe, epochs)
    assert len(lrs) == total
    peak_step = round(pct * total)
    assert lrs.index(max(lrs)) == peak_step
    assert max(lrs) == approx(peak)
    assert lrs[0] == approx(peak / 20.0)  # start: lr / div_factor
    end = peak / 20.0 / 200.0  # lr / div_factor / final_div_factor
    assert schedules.onecycle(1.0, peak, s)[0] == approx(end)
    assert lr_at(s, o, total, spe, epochs)[0] == approx(end)  # one past the last step: exactly the end
    assert end < lrs[-1] < peak / 20.0 or anneal == "linear"
    assert end < lrs[-1] < max(lrs)
    for i in range(total):
        lr, m = lr_at(s, o, i, spe, epochs)
        want_lr, want_m = onecycle_expected(i, total, peak, s)
        assert lr == approx(want_lr, rel=1e-9) and m == approx(want_m, rel=1e-9), i
    # rises monotonically to the peak, then falls monotonically
    assert all(a < b for a, b in zip(lrs[:peak_step], lrs[1:peak_step + 1]))
    assert all(a > b for a, b in zip(lrs[peak_step:-1], lrs[peak_step + 1:]))


def test_onecycle_peak_at_rounded_step_when_not_integral():
    s = ScheduleConfig(name="onecycle", pct_start=0.25)
    for total in (97, 99, 101, 203, 4687):  # pct_start * total is x.25 or x.75 (x.5 is a tie)
        lrs = curve(s, OptimConfig(lr=1.0), total, 1)
        assert lrs.index(max(lrs)) == round(0.25 * total), total


def test_onecycle_cos_vs_linear_shapes():
    spe, epochs, peak = 10, 10, 1.0
    cos = ScheduleConfig(name="onecycle", pct_start=0.4, div_factor=10.0, final_div_factor=100.0, anneal="cos")
    lin = ScheduleConfig(name="onecycle", pct_start=0.4, div_factor=10.0, final_div_factor=100.0, anneal="linear")
    o = OptimConfig(lr=peak)
    c, l_ = curve(cos, o, spe, epochs), curve(lin, o, spe, epochs)
    start = 0.1
    # quarter of the way up: linear is 1/4 of the way, cosine only (1 - cos(pi/4)) / 2 = 14.6 %
    assert l_[10] == approx(start + (peak - start) * 0.25)
    assert c[10] == approx(start + (peak - start) * (1 - math.cos(math.pi / 4)) / 2)
    assert c[10] < l_[10]
    # halfway up both are at the midpoint; three quarters up cosine is ahead
    assert c[20] == approx(l_[20]) and c[20] == approx((start + peak) / 2)
    assert c[30] > l_[30]
    # linear: constant step sizes within each phase; cosine: small near the ends, largest in the middle
    up = [b - a for a, b in zip(l_[:40], l_[1:41])]
    down = [b - a for a, b in zip(l_[40:-1], l_[41:])]
    assert max(up) == approx(min(up), rel=1e-9) and max(down) == approx(min(down), rel=1e-9)
    cup = [b - a for a, b in zip(c[:40], c[1:41])]
    assert cup[0] < cup[19] and cup[-1] < cup[19]
    assert cup[19] == approx(max(cup))


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_onecycle_momentum_cycles_inversely(anneal):
    spe, epochs = 10, 10
    s = ScheduleConfig(name="onecycle", pct_start=0.3, anneal=anneal, base_momentum=0.85, max_momentum=0.95)
    o = OptimConfig(lr=0.1)
    lrs, ms = curve(s, o, spe, epochs), momenta(s, o, spe, epochs)
    assert ms[0] == approx(0.95)
    assert min(ms) == approx(0.85) and ms.index(min(ms)) == lrs.index(max(lrs)) == 30
    assert schedules.onecycle(1.0, 0.1, s)[1] == approx(0.95)
    # strictly inverse: whenever the LR goes up, momentum goes down and vice versa
    for i in range(len(lrs) - 1):
        assert (lrs[i + 1] - lrs[i]) * (ms[i + 1] - ms[i]) < 0, i
    # and linearly related within each phase: momentum = max - (max - base) * (lr - start) / (peak - start)
    start = 0.1 / s.div_factor
    for i in range(31):
        assert ms[i] == approx(0.95 - 0.1 * (lrs[i] - start) / (0.1 - start), rel=1e-9)


def test_onecycle_without_momentum_cycling():
    s = ScheduleConfig(name="onecycle", cycle_momentum=False)
    assert all(m is None for m in momenta(s, OptimConfig(lr=0.1), 5, 4))


# ----------------------------------------------------------------------------- Keras decay and inverse


@pytest.mark.parametrize("decay", [1e-3, 1e-6, 0.05])
def test_keras_decay(decay):
    o = OptimConfig(lr=0.01, decay=decay)
    s = ScheduleConfig()
    for step in (0, 1, 2, 10, 99, 468, 469, 5000):
        assert lr_at(s, o, step, 469, 20)[0] == approx(0.01 / (1 + decay * step))
    lrs = curve(s, o, 10, 3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # moves every step, not per epoch


def test_keras_decay_applies_on_top_of_a_schedule():
    o = OptimConfig(lr=0.003, decay=1e-4)
    s = ScheduleConfig(name="inverse", rate=0.319)
    for step in (0, 5, 10, 25, 49):
        epoch = step // 10
        assert lr_at(s, o, step, 10, 5)[0] == approx(0.003 / (1 + 0.319 * epoch) / (1 + 1e-4 * step))


# The seed's Keras log (LearningRateScheduler 0.003 / (1 + 0.319 * epoch), epochs 1..20 as printed).
SEED002_LOG = {1: 0.003, 2: 0.0022744503, 3: 0.0018315018, 20: 0.000424869}


def test_seed002_inverse_schedule_reproduces_the_seed_log():
    cfg = load_recipe(RECIPES / "mnist_seed002.toml")
    spe = 60000 // 128  # drop_last: 468 full batches
    epochs = cfg.train.epochs
    lrs = curve(cfg.schedule, cfg.optim, spe, epochs)
    per_epoch = []
    for e in range(epochs):
        within = lrs[e * spe:(e + 1) * spe]
        assert len(set(within)) == 1, f"lr changes within epoch {e + 1}"  # held for the whole epoch
        per_epoch.append(within[0])
        assert within[0] == approx(0.003 / (1 + 0.319 * e))
    for epoch, logged in SEED002_LOG.items():
        digits = len(repr(logged).split(".")[1])
        assert round(per_epoch[epoch - 1], digits) == logged, epoch
    assert all(a > b for a, b in zip(per_epoch, per_epoch[1:]))
    assert all(m is None for m in momenta(cfg.schedule, cfg.optim, 5, 2))


# ----------------------------------------------------------------------------- cyclic (CLR)


@pytest.mark.parametrize("step_epochs", [2.0, 1.5])
def test_cyclic_triangle(step_epochs):
    spe = 10
    low, high = 0.001, 0.006
    s = ScheduleConfig(name="cyclic", min_lr=low, step_epochs=step_epochs)
    o = OptimConfig(lr=high)
    epochs = 8
    lrs = curve(s, o, spe, epochs)
    half = int(step_epochs * spe)  # steps in a half cycle
    assert lrs[0] == approx(low)
    assert lrs[half] == approx(high)
    assert lrs[2 * half] == approx(low)
    assert lrs[3 * half] == approx(high)
    assert max(lrs) == approx(high) and min(lrs) == approx(low)
    for i, lr in enumerate(lrs):
        pos = (i % (2 * half)) / half  # 0..2 within a cycle
        want = low + (high - low) * (pos if pos <= 1 else 2 - pos)
        assert lr == approx(want, rel=1e-9), i
    # linear between the corners: constant differences on each side
    rise = [b - a for a, b in zip(lrs[:half], lrs[1:half + 1])]
    fall = [b - a for a, b in zip(lrs[half:2 * half], lrs[half + 1:2 * half + 1])]
    assert all(d == approx((high - low) / half, rel=1e-9) for d in rise)
    assert all(d == approx(-(high - low) / half, rel=1e-9) for d in fall)


# ----------------------------------------------------------------------------- step


def test_step_schedule():
    spe = 5
    s = ScheduleConfig(name="step", step_size=3, gamma=0.5)
    o = OptimConfig(lr=0.1)
    lrs = curve(s, o, spe, 10)
    for i, lr in enumerate(lrs):
        epoch = i // spe
        assert lr == approx(0.1 * 0.5 ** (epoch // 3)), i
    assert lrs[0] == lrs[3 * spe - 1] == approx(0.1)
    assert lrs[3 * spe] == approx(0.05) and lrs[6 * spe] == approx(0.025) and lrs[9 * spe] == approx(0.0125)


# ----------------------------------------------------------------------------- piecewise (DavidNet)


def test_piecewise_davidnet():
    spe, epochs, peak = 10, 24, 0.4
    s = ScheduleConfig(name="piecewise", knots=[0, 5, 24], values=[0, 0.4, 0])
    o = OptimConfig(lr=1.0)  # values are relative to optim.lr
    lrs = curve(s, o, spe, epochs)
    assert lrs[0] == 0.0
    assert lrs[50] == approx(peak) and max(lrs) == approx(peak) and lrs.index(max(lrs)) == 50
    assert lrs[25] == approx(0.2)
    assert lrs[145] == approx(0.2)  # epoch 14.5, halfway down
    for i, lr in enumerate(lrs):
        t = i / spe
        want = peak * t / 5 if t <= 5 else peak * (24 - t) / 19
        assert lr == approx(want, rel=1e-9, abs=1e-12), i
    assert lr_at(s, o, 24 * spe, spe, epochs)[0] == approx(0.0)
    assert lr_at(s, o, 30 * spe, spe, epochs)[0] == approx(0.0)  # held beyond the last knot
    # scaled by optim.lr
    assert curve(s, OptimConfig(lr=0.5), spe, epochs)[50] == approx(0.2)


def test_piecewise_holds_before_the_first_knot():
    s = ScheduleConfig(name="piecewise", knots=[2, 4], values=[0.5, 1.0])
    o = OptimConfig(lr=0.1)
    assert lr_at(s, o, 0, 10, 6)[0] == approx(0.05)
    assert lr_at(s, o, 30, 10, 6)[0] == approx(0.075)
    assert lr_at(s, o, 55, 10, 6)[0] == approx(0.1)


# ----------------------------------------------------------------------------- warmup


@pytest.mark.parametrize("warmup", [2.0, 0.5])
def test_linear_warmup(warmup):
    spe = 10
    s = ScheduleConfig(warmup_epochs=warmup)
    o = OptimConfig(lr=0.1)
    lrs = curve(s, o, spe, 4)
    n = int(warmup * spe)
    for i in range(n):
        assert lrs[i] == approx(0.1 * (i + 1) / n), i
    assert lrs[n - 1] == approx(0.1)
    assert all(v == approx(0.1) for v in lrs[n:])
    assert all(a < b for a, b in zip(lrs[:n], lrs[1:n]))


def test_warmup_of_a_fraction_of_a_step_never_overshoots():
    """0.25 epochs of 10 steps = 2.5 steps: the third step is still in warmup and must not exceed the LR."""
    lrs = curve(ScheduleConfig(warmup_epochs=0.25), OptimConfig(lr=0.1), 10, 1)
    assert lrs[:3] == [approx(0.1 / 2.5), approx(0.2 / 2.5), approx(0.1)]
    assert max(lrs) == approx(0.1)


def test_warmup_multiplies_the_schedule():
    s = ScheduleConfig(name="step", step_size=1, gamma=0.5, warmup_epochs=2)
    o = OptimConfig(lr=0.1)
    # epoch 1 (0-based) of a per-epoch step schedule, half way through warmup
    assert lr_at(s, o, 14, 10, 4)[0] == approx(0.1 * 0.5 * 15 / 20)
    assert lr_at(s, o, 20, 10, 4)[0] == approx(0.1 * 0.25)
