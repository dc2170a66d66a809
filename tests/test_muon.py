"""Muon (cnnlab.muon): the orthogonalisation, its steps, its split of a model, resume, the recipe key."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import runs
from cnnlab import train as train_mod
from cnnlab.config import load_recipe
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.muon import Muon, for_model, hidden_matrices, orthogonalize

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (128, 576), (10, 10), (256, 9)])
def test_newton_schulz_moves_singular_values_near_one(shape):
    """Five quintic steps put the singular values of a random matrix (between 0.03 and 40
    before) in about [0.7, 1.2] (the published iteration promises roughly [0.5, 1.5]) and keep
    the direction of U V^T. (Singular values below ~1e-3 of the Frobenius norm would need more steps.)"""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    before = torch.linalg.svdvals(g)
    assert not ((before > 0.5) & (before < 1.5)).all()  # not near 1 to begin with
    o = orthogonalize(g, steps=5)
    assert o.shape == g.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.5
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    assert float((o * polar).sum() / (o.norm() * polar.norm())) > 0.95


def test_newton_schulz_ignores_the_gradient_scale():
    g = torch.randn(20, 30, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(orthogonalize(g), orthogonalize(1000 * g), rtol=1e-4, atol=1e-5)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
                                    nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x):
        return self.layers(x)


def muon_config(**changes):
    o = load_recipe(ROOT / "recipes" / "mnist_tiny.toml", ["optim.name=muon"]).optim
    for k, v in changes.items():
        setattr(o, k, v)
    return o


def toy_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    return x, (x[:, :1] * x[:, 1:2]).sin() + 0.5 * x[:, 2:3]


def test_steps_decrease_the_loss_of_a_toy_problem():
    torch.manual_seed(0)
    model = Mlp()
    opt = train_mod.build_optimizer(model, muon_config(lr=0.05, muon_lr=0.02))
    x, y = toy_data()
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_model_split_hidden_matrices_muon_the_rest_sgd():
    """airbench94_muon's split: every conv kernel but the frozen whitening conv takes Muon; the head,
    the biases and BatchNorm take SGD with the recipe's groups (BatchNorm at bias_lr_scale)."""
    model = create_model("airbench94")
    cfg = load_recipe(ROOT / "recipes" / "airbench94.toml", ["optim.name=muon", "optim.muon_lr=0.24"])
    opt = train_mod.build_optimizer(model, cfg.optim)
    assert isinstance(opt, Muon)
    muon_groups = [g for g in opt.param_groups if g["muon"]]
    assert len(muon_groups) == 1
    convs = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)][1:]
    assert {id(p) for p in muon_groups[0]["params"]} == {id(p) for p in convs}
    assert muon_groups[0]["lr_scale"] == pytest.approx(0.24 / cfg.optim.lr)
    head = model.head[1].weight
    sgd = [g for g in opt.param_groups if not g["muon"] and any(p is head for p in g["params"])]
    assert len(sgd) == 1 and sgd[0]["lr_scale"] == 1.0
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    # cifar_dw56k: its first conv and its output conv stay SGD
    dw = create_model("cifar_dw56k")
    matrices = [p for p in dw.parameters() if p.ndim >= 2]
    assert [id(p) for p in hidden_matrices(dw)] == [id(p) for p in matrices[1:-1]]


def test_sgd_groups_step_exactly_as_torch_sgd():
    torch.manual_seed(0)
    a = Mlp()
    b = copy.deepcopy(a)
    vectors = lambda m: [p for p in m.parameters() if p.ndim == 1]  # noqa: E731
    opt = Muon([{"params": vectors(a), "weight_decay": 1e-3}], lr=0.1, momentum=0.9, nesterov=True)
    ref = torch.optim.SGD(vectors(b), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = toy_data()
    for _ in range(3):
        for model, o in ((a, opt), (b, ref)):
            o.zero_grad()
            F.mse_loss(model(x), y).backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_update_follows_the_published_rule():
    """One step from zero momentum: w - lr * max(1, r/c)^0.5 * NS(g + m g) (nesterov); with
    normalize the weight is first rescaled to norm sqrt(r)."""
    torch.manual_seed(0)
    for normalize in (False, True):
        w = nn.Parameter(torch.randn(12, 3, 3, 3))
        w0 = w.detach().clone()
        w.grad = torch.randn_like(w)
        opt = Muon([{"params": [w], "muon": True}], lr=0.1, muon_momentum=0.6, ns_steps=3, normalize=normalize)
        opt.step()
        start = w0 * (12 ** 0.5 / w0.norm()) if normalize else w0
        expected = start - 0.1 * orthogonalize((w.grad * 1.6).reshape(12, -1), 3).reshape(w.shape)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-5, atol=1e-6)
    tall = nn.Parameter(torch.zeros(64, 1, 3, 3))  # a depthwise kernel: 64 x 9, scaled by sqrt(64 / 9)
    tall.grad = torch.randn_like(tall)
    Muon([{"params": [tall], "muon": True}], lr=1.0, muon_nesterov=False).step()
    ns = orthogonalize(tall.grad.reshape(64, 9)).reshape(tall.shape)
    torch.testing.assert_close(tall.detach(), -(64 / 9) ** 0.5 * ns, rtol=1e-5, atol=1e-6)


def test_channels_last_weights_take_the_same_steps():
    """A conv kernel stored channels_last (a model moved to channels_last) steps as its contiguous
    copy does, and stays channels_last."""
    torch.manual_seed(0)
    plain = nn.Parameter(torch.randn(16, 8, 3, 3))
    cl = nn.Parameter(plain.detach().clone().contiguous(memory_format=torch.channels_last))
    grads = [torch.randn(16, 8, 3, 3) for _ in range(3)]
    for w in (plain, cl):
        opt = Muon([{"params": [w], "muon": True}], lr=0.05, normalize=True)
        for g in grads:
            w.grad = g.contiguous(memory_format=torch.channels_last) if w is cl else g
            opt.step()
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()
    torch.testing.assert_close(plain, cl, rtol=1e-6, atol=1e-7)


def run_steps(model, opt, steps, seed):
    x, y = toy_data()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        opt.zero_grad()
        F.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()


def test_state_dict_resume_is_exact():
    torch.manual_seed(0)
    o = muon_config(lr=0.05, muon_lr=0.02, momentum=0.9, nesterov=True)
    full = Mlp()
    start = copy.deepcopy(full.state_dict())
    opt = train_mod.build_optimizer(full, o)
    run_steps(full, opt, 5, seed=1)
    run_steps(full, opt, 5, seed=2)

    first = Mlp()
    first.load_state_dict(start)
    opt1 = train_mod.build_optimizer(first, o)
    run_steps(first, opt1, 5, seed=1)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed = Mlp()
    resumed.load_state_dict(saved["model"])
    opt2 = train_mod.build_optimizer(resumed, o)
    train_mod.load_optimizer_state(opt2, saved["opt"])
    run_steps(resumed, opt2, 5, seed=2)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_recipe_keys_are_checked():
    with pytest.raises(CnnlabError, match="optim.ns_steps = 0"):
        load_recipe(ROOT / "recipes" / "mnist_tiny.toml", ["optim.name=muon", "optim.ns_steps=0"])
    with pytest.raises(CnnlabError, match="optim.muon_momentum"):
        load_recipe(ROOT / "recipes" / "mnist_tiny.toml", ["optim.name=muon", "optim.muon_momentum=1.0"])
    with pytest.raises(CnnlabError, match="muon"):
        load_recipe(ROOT / "recipes" / "mnist_tiny.toml", ["optim.name=mun"])


def test_schedule_scales_muon_lr_with_the_base_lr():
    model = Mlp()
    opt = train_mod.build_optimizer(model, muon_config(lr=0.1, muon_lr=0.02))
    train_mod.set_lr(opt, 0.05, 0.8)  # half the base LR, a cycled momentum
    muon_group = next(g for g in opt.param_groups if g["muon"])
    assert muon_group["lr"] == pytest.approx(0.01)
    assert muon_group["muon_momentum"] == 0.95  # the cycle moves the SGD groups' momentum only
    assert all(g["momentum"] == 0.8 for g in opt.param_groups if not g["muon"])


def test_a_recipe_trains_with_muon(tmp_path):
    """optim.name = "muon" through the training loop on real MNIST (512 images, 2 epochs)."""
    cfg = load_recipe(ROOT / "recipes" / "mnist_tiny.toml", [
        "optim.name=muon", "optim.lr=0.05", "optim.muon_lr=0.02", "schedule.name=constant", "train.epochs=2",
        "train.quiet=true", "train.dtype=float32", "train.threads=1", "data.subset=512", "data.val_split=250",
        "data.eval_batch_size=250", "data.batch_size=128", "train.target=0"])
    res = train_mod.train(cfg, tmp_path / "run")
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    saved = runs.load_checkpoint(tmp_path / "run")["optimizer"]
    kinds = [g["muon"] for g in saved["param_groups"]]
    assert kinds[0] and not all(kinds)
    assert all("momentum_buffer" in s for s in saved["state"].values())
