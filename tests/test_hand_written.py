"""Tests for hand-written code that had none (issue 18): ``layers.Dropout``, fp16 with a GradScaler,
gradient clipping, EMA across a resume, ``train.compile = true``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cnnlab import config, runs
from cnnlab.layers import Dropout
from cnnlab.train import Interrupted, ema_update, grad_scaler, optimizer_step, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.quiet=true", "train.threads=1", 'train.dtype="float32"', "train.target=0", "data.subset=512",
        "data.val_split=250", "data.eval_batch_size=250", "data.batch_size=128", "train.epochs=2"]
N = 1_000_000
# the drop rate over N elements: the binomial standard deviation is at most 0.0005, and p is
# resolved to 1/65536; 0.003 is six standard deviations
RATE_TOLERANCE = 0.003


def tiny(*extra: str) -> config.Config:
    return config.load_recipe(ROOT / "recipes" / "mnist_tiny.toml", TINY + list(extra))


# ----------------------------------------------------------------------------- Dropout


def dropped(p: float, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return Dropout(p).train()(x)


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5, 0.9])
def test_dropout_rate_and_scaling(p):
    x = torch.ones(N)
    out = dropped(p, x)
    zero = out == 0
    assert abs(zero.float().mean().item() - p) < RATE_TOLERANCE
    assert torch.all(out[~zero] == 1 / (1 - p))  # the kept ones scaled by exactly 1/(1-p)
    assert abs(out.mean().item() - 1) < RATE_TOLERANCE / (1 - p)  # so the mean is kept
    normal = torch.randn(N, generator=torch.Generator().manual_seed(1)) + 3
    assert abs(dropped(p, normal).mean().item() - normal.mean().item()) < 0.02 / (1 - p) ** 0.5


def test_dropout_is_the_identity_in_eval_mode_and_for_p_zero():
    x = torch.randn(4, 8, 5, 5)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_dropout_same_generator_state_same_mask():
    x = torch.randn(64, 16, 7, 7)
    assert torch.equal(dropped(0.3, x, seed=5), dropped(0.3, x, seed=5))
    assert not torch.equal(dropped(0.3, x, seed=5), dropped(0.3, x, seed=6))
    d = Dropout(0.3).train()
    state = torch.get_rng_state()
    a = d(x)
    torch.set_rng_state(state)
    assert torch.equal(a, d(x))


def test_dropout_channels_last_follows_memory_order():
    """A channels_last input gets the mask in its own memory order: the same draws as the NHWC
    tensor that holds the same memory, and a channels_last output."""
    x = torch.randn(8, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    out = dropped(0.4, x, seed=3)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == x.shape
    nhwc = dropped(0.4, x.permute(0, 2, 3, 1).contiguous(), seed=3)
    assert torch.equal(out.permute(0, 2, 3, 1), nhwc)
    assert torch.allclose(out, torch.where(out == 0, 0.0, x / 0.6)) and abs((out == 0).float().mean() - 0.4) < 0.01


@pytest.mark.parametrize("view", ["transposed", "strided", "expanded"])
def test_dropout_non_contiguous_input(view):
    base = torch.randn(8, 16, 24, 24)
    x = {"transposed": base.transpose(2, 3), "strided": base[:, ::2, :, ::3],
         "expanded": base[:1].expand(8, -1, -1, -1)}[view]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out = dropped(0.25, x, seed=2)
    assert out.shape == x.shape
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / 0.75) and abs((~kept).float().mean() - 0.25) < 0.01
    assert torch.equal(out, dropped(0.25, x.contiguous(), seed=2))  # as its contiguous copy


def test_dropout_gradient_is_the_mask_times_the_scale():
    x = torch.randn(32, 8, 6, 6, requires_grad=True)
    out = dropped(0.5, x, seed=4)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float() * 2.0)


# ----------------------------------------------------------------------------- fp16, GradScaler, grad_clip


def one_step(grad_clip: float = 0.0, dtype=torch.float32, scale_loss: float = 1.0, scaler=None):
    """One SGD step (lr 1, no momentum) of a small linear model; returns (parameter change, scaler)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 5)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = scaler or grad_scaler(torch.device("cpu"), dtype)
    loss = model(torch.randn(16, 20)).pow(2).mean() * scale_loss
    scaler.scale(loss).backward()
    optimizer_step(model, opt, scaler, grad_clip)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]), scaler


def test_grad_clip_limits_the_step_to_the_clip_norm_in_the_same_direction():
    free, _ = one_step()
    clipped, _ = one_step(grad_clip=0.1)
    assert free.norm() > 0.5  # the unclipped step is much longer
    assert clipped.norm() == pytest.approx(0.1, rel=1e-4)
    assert torch.allclose(clipped / clipped.norm(), free / free.norm(), atol=1e-5)
    assert torch.equal(one_step(grad_clip=100.0)[0], free)  # a norm under the clip is left alone


def test_fp16_scaler_unscales_before_clipping_and_skips_steps_with_inf():
    scaler = grad_scaler(torch.device("cpu"), torch.float16)
    assert scaler.is_enabled() and not grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()
    free, _ = one_step()
    scaled, scaler = one_step(scaler=scaler)
    assert torch.allclose(scaled, free, atol=1e-6)  # the 65536x loss scale is taken off before the step
    clipped, _ = one_step(grad_clip=0.1, scaler=grad_scaler(torch.device("cpu"), torch.float16))
    assert clipped.norm() == pytest.approx(0.1, rel=1e-4)  # clipped after unscaling, not at 65536x
    scale = scaler.get_scale()
    skipped, scaler = one_step(scale_loss=float("inf"), scaler=scaler)
    assert torch.all(skipped == 0) and scaler.get_scale() == scale / 2  # inf gradients: no step, smaller scale


def test_fp16_run_checkpoints_its_scaler_and_resumes_exactly(tmp_path, interrupt_at_epoch, check):
    cfg = tiny('train.dtype="float16"', "train.epochs=3")
    full = train(cfg, tmp_path / "full")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in full.history)
    ckpt = runs.load_checkpoint(tmp_path / "full", "last")
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0
    disarm = interrupt_at_epoch(3)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut")
    disarm()
    resumed = train(None, tmp_path / "cut", resume=True)
    assert check.untimed(resumed.history) == check.untimed(full.history)
    assert runs.load_checkpoint(tmp_path / "cut", "last")["scaler"] == ckpt["scaler"]


# ----------------------------------------------------------------------------- EMA


def test_ema_update_rule():
    torch.manual_seed(0)
    model, ema = torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4)
    model(torch.randn(8, 4))  # moves the running statistics
    with torch.no_grad():
        model.weight.add_(1.0)
    expected = 0.9 * ema.weight.detach() + 0.1 * model.weight.detach()
    ema_update(ema, model, 0.9)
    assert torch.allclose(ema.weight, expected)
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers are copied, not averaged


def test_ema_continues_exactly_across_a_resume(tmp_path, interrupt_at_epoch):
    cfg = tiny("train.ema=0.95", "train.epochs=3")
    full = train(cfg, tmp_path / "full")
    disarm = interrupt_at_epoch(2)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut")
    disarm()
    assert runs.load_checkpoint(tmp_path / "cut", "last")["ema_state_dict"] is not None
    resumed = train(None, tmp_path / "cut", resume=True)
    a, b = runs.load_checkpoint(tmp_path / "full"), runs.load_checkpoint(tmp_path / "cut")
    assert all(torch.equal(a["ema_state_dict"][k], b["ema_state_dict"][k]) for k in a["ema_state_dict"])
    assert [r["val_acc"] for r in resumed.history] == [r["val_acc"] for r in full.history]  # measured on the EMA


# ----------------------------------------------------------------------------- compile


def test_compiled_run_trains_like_the_eager_one_and_saves_plain_weights(tmp_path):
    """``train.compile = true`` (TorchInductor: slow to compile on a CPU, so one short run). No
    dropout: eager training draws its masks in the fused BatchNorm kernel (``cnnlab.bnact``), which
    the compiled model does not use, so the masks would differ. The three BatchNorm implementations
    (torch's modules, the fused kernel, Inductor's) round differently; after these 4 steps at LR 0.2
    the epoch's training loss differed by 7e-5 (modules vs fused) and 1.3e-4 (compiled vs fused),
    relative: the test allows 5e-4."""
    eager = train(tiny("train.epochs=1", "model.dropout=0"), None)
    compiled = train(tiny("train.epochs=1", "model.dropout=0", "train.compile=true"), tmp_path / "run")
    (e,), (c,) = eager.history, compiled.history
    assert c["train_loss"] == pytest.approx(e["train_loss"], rel=5e-4)
    assert c["val_loss"] == pytest.approx(e["val_loss"], rel=5e-4)
    ckpt = runs.load_checkpoint(tmp_path / "run", "last")
    assert not any(k.startswith("_orig_mod.") for k in ckpt["state_dict"])  # the module's own names
    assert ckpt["config"]["train"]["compile"] is True
    runs.model_from_checkpoint(ckpt)  # loads into a plain model
