"""The LR range test: restores the model and optimizer, stops at divergence, CLI output, seed stability."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnnlab import lr_finder
from cnnlab.cli import main
from cnnlab.config import load_recipe
from cnnlab.errors import CnnlabError

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "mnist_tiny.toml"
# batch 32 keeps 100 steps to a few seconds on one busy CPU core
FAST = ["train.quiet=true", "train.dtype=float32", "train.threads=1", "data.subset=2048", "data.batch_size=32"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def cfg_for(*extra: str):
    return load_recipe(TINY_RECIPE, FAST + list(extra))


def quiet(*args, **kwargs):
    pass


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- pure helpers


def test_exp_lrs_and_ema_smooth():
    lrs = lr_finder.exp_lrs(1e-6, 10.0, 8)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(10.0)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios))  # geometric
    assert lr_finder.ema_smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # bias-corrected
    assert lr_finder.ema_smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 3.0) / 0.75])


def test_suggest_is_the_halfway_level_crossing():
    lrs = [10.0 ** (i / 10 - 6) for i in range(60)]
    smoothed = [2.3] * 10 + [2.3 - 0.15 * i for i in range(1, 14)] + [0.4 + 0.2 * i for i in range(30)]
    # halfway from the start (2.3) to the minimum (0.35) is 1.325: first reached at 2.3 - 7 * 0.15 = 1.25
    assert lr_finder.suggest(lrs, smoothed) == lrs[16]
    # not the minimum, not the steepest point
    assert smoothed.index(min(smoothed)) == 22


# ----------------------------------------------------------------------------- restoring the model and optimizer


def test_restores_model_weights_and_optimizer_state_exactly(monkeypatch):
    seen = {}
    real_setup = lr_finder.setup

    def setup_with_history(cfg, log=print):
        """The real setup, then a few training steps so the optimizer carries momentum buffers."""
        s = real_setup(cfg, log=log)
        gen = torch.Generator().manual_seed(123)
        for _, (x, y) in zip(range(3), s.train_loader.epoch(gen)):
            loss = F.cross_entropy(s.model(x), y)
            s.optimizer.zero_grad()
            loss.backward()
            s.optimizer.step()
        s.optimizer.param_groups[0]["lr"] = 0.0123
        seen.update(s=s, model=copy.deepcopy(s.model.state_dict()), opt=copy.deepcopy(s.optimizer.state_dict()))
        param = next(s.model.parameters())
        s.optimizer.register_step_post_hook(lambda opt, args, kwargs: seen.update(during=param.detach().clone()))
        return s

    monkeypatch.setattr(lr_finder, "setup", setup_with_history)
    res = lr_finder.lr_find(cfg_for(), steps=12, log=quiet)
    assert len(res["losses"]) == 12
    s = seen["s"]
    assert any("momentum_buffer" in st for st in seen["opt"]["state"].values())
    # the weights moved during the test ...
    assert not torch.equal(seen["during"], seen["model"][next(iter(seen["model"]))])
    # ... and are back, bit for bit, afterwards: weights, BatchNorm statistics, optimizer state and LR
    assert same_state(s.model.state_dict(), seen["model"])
    after = s.optimizer.state_dict()
    assert after["param_groups"] == seen["opt"]["param_groups"]
    assert after["param_groups"][0]["lr"] == 0.0123
    assert after["state"].keys() == seen["opt"]["state"].keys()
    for k, st in after["state"].items():
        assert same_state(st, seen["opt"]["state"][k])


def test_model_equals_a_fresh_setup_afterwards(monkeypatch):
    from cnnlab.train import setup

    seen = {}
    real_setup = lr_finder.setup
    monkeypatch.setattr(lr_finder, "setup", lambda cfg, log=print: seen.setdefault("s", real_setup(cfg, log=log)))
    cfg = cfg_for("train.seed=5")
    lr_finder.lr_find(cfg, steps=10, log=quiet)
    fresh = setup(cfg, log=quiet)
    assert same_state(seen["s"].model.state_dict(), fresh.model.state_dict())
    assert seen["s"].optimizer.state_dict()["state"] == {}  # no momentum buffers left over


# ----------------------------------------------------------------------------- divergence


def test_stops_at_divergence():
    steps = 100
    res = lr_finder.lr_find(cfg_for(), start_lr=1e-3, end_lr=1e6, steps=steps, log=quiet)
    n = len(res["losses"])
    assert res["stopped_early"] is True and 10 <= n < steps
    assert len(res["lrs"]) == len(res["smoothed"]) == n
    assert res["lrs"] == pytest.approx(lr_finder.exp_lrs(1e-3, 1e6, steps)[:n])
    assert res["lrs"][-1] < 1e6
    assert all(math.isfinite(v) for v in res["losses"])
    # it stopped because the smoothed loss ran away (4x its minimum) or the next loss was not finite
    ran_away = res["smoothed"][-1] > 4 * min(res["smoothed"])
    assert res["stop_reason"] == ("smoothed loss above 4x its minimum" if ran_away else "non-finite loss")
    assert res["lrs"][0] <= res["suggestion"] <= res["lrs"][-1]


def test_no_early_stop_on_a_gentle_range():
    res = lr_finder.lr_find(cfg_for(), start_lr=1e-5, end_lr=1e-2, steps=12, log=quiet)
    assert res["stopped_early"] is False and len(res["losses"]) == 12


def test_divergence_before_ten_steps_is_an_error():
    with pytest.raises(CnnlabError, match="diverged after \\d+ steps.*start the range lower"):
        lr_finder.lr_find(cfg_for(), start_lr=1e8, end_lr=1e12, steps=50, log=quiet)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(start_lr=1.0, end_lr=0.1), "need 0 < start < end"),
    (dict(start_lr=0.0, end_lr=1.0), "need 0 < start < end"),
    (dict(steps=5), "at least 10 steps"),
])
def test_bad_arguments(kwargs, needle):
    with pytest.raises(CnnlabError, match=needle):
        lr_finder.lr_find(cfg_for(), log=quiet, **kwargs)


# ----------------------------------------------------------------------------- the CLI


def test_cli_lr_find_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / "lrf"
    argv = ["lr-find", str(TINY_RECIPE), "--steps", "15", "--start", "1e-4", "--end", "1", "--out", str(out)]
    for s in FAST:
        argv += ["--set", s]
    with warnings.catch_warnings(record=True) as caught:  # nothing but the result line
        warnings.simplefilter("always")
        rc = main(argv)
    stdout, err = capsys.readouterr()
    assert [str(w.message) for w in caught] == []
    assert rc == 0, err
    assert "Traceback" not in err and "Warning" not in err, err
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "lr_find.json").read_text())
    assert {"lrs", "losses", "smoothed", "suggestion", "stopped_early", "model", "dataset", "seed"} <= set(res)
    assert res["model"] == "mnist_tiny" and res["dataset"] == "mnist"
    assert len(res["lrs"]) == len(res["losses"]) == len(res["smoothed"]) == 15
    assert res["lrs"][0] <= res["suggestion"] <= res["lrs"][-1]
    assert f"suggested lr: {res['suggestion']:.3g}" in stdout and str(out) in stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


@pytest.mark.parametrize("argv, needle", [
    (["lr-find", "missing.toml"], "no such file"),
    (["lr-find", str(TINY_RECIPE), "--steps", "3"], "at least 10 steps"),
    (["lr-find", str(TINY_RECIPE), "--start", "1", "--end", "0.1"], "0 < start < end"),
    (["lr-find", str(TINY_RECIPE), "--set", "optim.lrr=1"], "unknown key optim.lrr"),
])
def test_cli_lr_find_bad_input(tmp_path, capsys, argv, needle):
    rc = main(argv + ["--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in err, err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- seed stability


def test_suggestion_is_stable_across_seeds():
    suggestions = []
    for seed in (0, 1, 2):
        res = lr_finder.lr_find(cfg_for(f"train.seed={seed}"), steps=100, log=quiet)
        suggestions.append(res["suggestion"])
    assert max(suggestions) / min(suggestions) <= 3, suggestions
    # a sensible LR for this SGD recipe (its OneCycle peak is 0.2)
    assert all(1e-3 < s < 2 for s in suggestions), suggestions


NO_BATCHNORM = """
from torch import nn


def net(num_classes=10, dropout=0.0):  # the recipe sets model.dropout
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, num_classes))
"""


def test_lr_find_steps_in_the_recipes_micro_batches(tmp_path):
    """Without BatchNorm, chunks of 12 (12 + 12 + 8) give the whole batch's gradient, so the same
    losses; with BatchNorm (mnist_tiny) each chunk is normalised by itself, so they differ."""
    def losses(*extra):
        return lr_finder.lr_find(cfg_for(*extra), start_lr=1e-4, end_lr=1e-1, steps=12, diverge=1e9, log=quiet)["losses"]

    (tmp_path / "plain.py").write_text(NO_BATCHNORM)
    plain = f"model.name={tmp_path / 'plain.py'}:net"
    assert losses(plain, "train.micro_batch=12") == pytest.approx(losses(plain), rel=1e-5)
    whole = losses()
    chunked = losses("train.micro_batch=8")
    assert all(math.isfinite(v) for v in chunked)
    assert max(abs(a - b) for a, b in zip(chunked, whole)) > 1e-3
