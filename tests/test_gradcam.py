"""Grad-CAM (issue 5): it points at the evidence, and its hooks never outlive the ``with`` block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.gradcam import GradCAM, activations
from cnnlab.layers import GlobalPool, Net
from cnnlab.models import create_model

SIZE, HALF, PATCH = 16, 8, 5


def hook_count(model: nn.Module) -> int:
    """Every hook of every module (forward, forward-pre, backward, backward-pre)."""
    return sum(len(getattr(m, attr)) for m in model.modules()
               for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


# ----------------------------------------------------------------------------- synthetic localisation task


def patch_images(n: int, gen: torch.Generator, blank_p: float = 0.0):
    """Noise images; most hold one bright 5x5 square inside a random quadrant.

    Class 0 = "a bright square somewhere", class 1 = "noise only". Returns normalised images,
    labels and the quadrant (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of each square.
    """
    x = torch.rand(n, 1, SIZE, SIZE, generator=gen) * 0.5
    quadrant = torch.randint(0, 4, (n,), generator=gen)
    oy = torch.randint(0, HALF - PATCH + 1, (n,), generator=gen)
    ox = torch.randint(0, HALF - PATCH + 1, (n,), generator=gen)
    blank = torch.rand(n, generator=gen) < blank_p
    for i in range(n):
        if not blank[i]:
            qy, qx = divmod(int(quadrant[i]), 2)
            r, c = qy * HALF + int(oy[i]), qx * HALF + int(ox[i])
            x[i, 0, r:r + PATCH, c:c + PATCH] = 1.0
    return (x - 0.3) / 0.3, blank.long(), quadrant


def small_net() -> Net:
    features = nn.Sequential(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()), nn.MaxPool2d(2),
                             nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()))
    return Net(features, nn.Sequential(GlobalPool("avg"), nn.Linear(16, 2)))


@pytest.fixture(scope="module")
def trained_patch_net():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net trains fastest on one thread (the CI machine is shared)
    try:
        return train_patch_net()
    finally:
        torch.set_num_threads(threads)


def train_patch_net() -> Net:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = small_net()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        x, y, _ = patch_images(64, gen, blank_p=0.2)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def quadrant_mass(maps: torch.Tensor) -> torch.Tensor:
    """[N, 4]: the share of each map's mass in each quadrant (same order as ``patch_images``)."""
    quads = maps.reshape(len(maps), 2, HALF, 2, HALF).sum((2, 4)).reshape(len(maps), 4)
    return quads / quads.sum(1, keepdim=True).clamp_min(1e-12)


def test_cam_points_at_the_patch_on_held_out_images(trained_patch_net):
    model = trained_patch_net
    x, y, quadrant = patch_images(200, torch.Generator().manual_seed(123))  # every image holds a square
    pred = model(x).argmax(1)
    assert (pred == 0).float().mean() > 0.95  # the net detects the squares
    with GradCAM(model, input_shape=(1, SIZE, SIZE)) as cam:
        maps = cam(x, pred)
        assert cam.layer == "features.2"  # the last spatial block of model.features
    assert maps.shape == (200, SIZE, SIZE)
    share = quadrant_mass(maps).gather(1, quadrant[:, None])[:, 0]
    assert share.min() > 0.5, f"CAM mass in the square's quadrant: min {share.min():.2f}"
    assert share.mean() > 0.7
    # The map follows the square: the same noise with the square elsewhere moves the peak.
    assert (quadrant_mass(maps).argmax(1) == quadrant).all()


def test_cam_values_and_batch_equals_single(trained_patch_net):
    x, _, _ = patch_images(6, torch.Generator().manual_seed(5))
    with GradCAM(trained_patch_net, input_shape=(1, SIZE, SIZE)) as cam:
        batch = cam(x, [0] * 6)
        singles = torch.cat([cam(x[i:i + 1], [0]) for i in range(6)])
    assert batch.min() >= 0 and batch.max() <= 1
    assert torch.allclose(batch.flatten(1).amax(1), torch.ones(6))  # each map scaled to its own peak
    assert torch.allclose(batch, singles, atol=1e-5)


# ----------------------------------------------------------------------------- real models, inputs, side effects


def test_one_channel_mnist_model_single_and_chw_input():
    torch.manual_seed(0)
    model = create_model("mnist_tiny")
    x = torch.randn(1, 28, 28)
    with GradCAM(model) as cam:
        m3 = cam(x)  # [C, H, W] is taken as one image
        m4 = cam(x[None], classes=3)
    assert m3.shape == (1, 28, 28) and m4.shape == (1, 28, 28)
    assert cam.layer == "features.7"
    assert 0 <= float(m4.min()) and float(m4.max()) <= 1


def test_center_crop_model_maps_onto_the_window_it_sees():
    torch.manual_seed(0)
    model = create_model("mnist_fast")  # looks at the central 24x24 of 28x28
    x = torch.randn(4, 1, 28, 28)
    with GradCAM(model) as cam:
        maps = cam(x)
    assert maps.shape == (4, 28, 28)
    border = torch.ones(28, 28, dtype=torch.bool)
    border[2:26, 2:26] = False
    assert float(maps[:, border].abs().max()) == 0.0  # nothing outside the window
    assert torch.allclose(maps[:, 2:26, 2:26].flatten(1).amax(1), torch.ones(4))  # each map peaks inside it


def test_batch_three_channels_and_named_layer():
    torch.manual_seed(0)
    model = create_model("cifar_sep92k")
    x = torch.randn(3, 3, 32, 32)
    with GradCAM(model, layer="features.3") as cam:
        maps = cam(x, torch.tensor([0, 1, 2]))
    assert cam.layer == "features.3"
    assert maps.shape == (3, 32, 32)


def test_no_side_effects_on_input_params_and_mode():
    torch.manual_seed(0)
    model = create_model("mnist_tiny")
    model.train()
    first = next(model.parameters())
    first.grad = torch.full_like(first, 7.0)  # a gradient a training loop left behind
    bn_before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 1, 28, 28)
    x_before = x.clone()
    with GradCAM(model) as cam:
        cam(x)
    assert torch.equal(x, x_before) and x.grad is None and not x.requires_grad
    assert model.training  # mode restored
    assert torch.equal(first.grad, torch.full_like(first, 7.0))
    assert all(p.grad is None for p in model.parameters() if p is not first)
    for k, v in model.state_dict().items():  # eval mode inside: BN running stats untouched
        assert torch.equal(v, bn_before[k]), k


def test_hooks_released_on_exit_and_on_exceptions():
    model = create_model("mnist_tiny")
    base = hook_count(model)
    with GradCAM(model) as cam:
        assert hook_count(model) == base + 2
        cam(torch.randn(2, 1, 28, 28))
    assert hook_count(model) == base
    with pytest.raises(ValueError, match="boom"):
        with GradCAM(model):
            raise ValueError("boom")
    assert hook_count(model) == base
    with pytest.raises(RuntimeError):  # wrong channel count fails inside the model's forward
        with GradCAM(model) as cam:
            cam(torch.randn(2, 3, 28, 28))
    assert hook_count(model) == base
    acts = activations(model, torch.randn(1, 1, 28, 28))
    assert hook_count(model) == base
    assert list(acts) == [f"features.{i}" for i in range(8)]
    assert acts["features.0"].shape == (1, 16, 26, 26) and acts["features.7"].shape == (1, 16, 6, 6)


def test_unknown_layer_lists_the_valid_spatial_layers():
    model = create_model("mnist_tiny")
    base = hook_count(model)
    with pytest.raises(CnnlabError) as err:
        with GradCAM(model, layer="features.99"):
            pass
    msg = str(err.value)
    assert "features.99" in msg and "features.7" in msg and "features.0.0" in msg
    assert "head" not in msg.split("choose one of:")[1]  # the head's outputs are not spatial
    assert hook_count(model) == base
    with pytest.raises(CnnlabError, match="valid layers: .*features.0"):
        activations(model, torch.randn(1, 1, 28, 28), ["nope"])
