"""The building blocks' fast paths compute exactly what the plain PyTorch layers compute."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.layers import CenterCrop, DepthwiseConv2d, Net, ReLU, Residual, conv_bn


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("c_in,c_out,padding", [(4, 8, 1), (3, 9, 0), (5, 5, 1)])
def test_depthwise_matches_grouped_conv_values_and_gradients(channels_last, c_in, c_out, padding):
    torch.manual_seed(0)
    conv = DepthwiseConv2d(c_in, c_out, 3, padding=padding)
    x = torch.randn(2, c_in, 7, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = conv.weight.detach().clone().requires_grad_(True)
    x.requires_grad_(True)

    out = conv(x)
    ref = F.conv2d(x_ref, w_ref, padding=padding, groups=c_in)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-6)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(conv.weight.grad, w_ref.grad, atol=1e-5)


def test_depthwise_refuses_a_multiplier_that_is_not_whole():
    with pytest.raises(ValueError, match="not a multiple"):
        DepthwiseConv2d(4, 6)


def test_conv_bn_picks_depthwise_only_for_groups_equal_to_inputs():
    assert isinstance(conv_bn(8, 16, groups=8)[0], DepthwiseConv2d)
    assert type(conv_bn(8, 16)[0]) is nn.Conv2d
    assert type(conv_bn(8, 16, groups=2)[0]) is nn.Conv2d


def test_relu_in_place_while_training_only_with_torch_gradients():
    torch.manual_seed(0)
    relu = ReLU()
    a = torch.randn(3, 4, requires_grad=True)
    h = a * 2  # a non-leaf, as a BatchNorm output is
    out = relu.train()(h)
    assert out.data_ptr() == h.data_ptr()  # overwritten in place
    out.sum().backward()
    assert torch.equal(a.grad, 2 * (a.detach() > 0).float())

    x = torch.randn(3, 4)
    kept = x.clone()
    y = relu.eval()(x)
    assert torch.equal(x, kept)  # eval mode leaves its input alone (hooks keep pre-ReLU values)
    assert torch.equal(y, x.clamp_min(0))


def test_center_crop_keeps_the_central_window_as_a_view():
    x = torch.arange(2 * 3 * 28 * 28, dtype=torch.float32).reshape(2, 3, 28, 28)
    out = CenterCrop(24)(x)
    assert out.shape == (2, 3, 24, 24)
    assert torch.equal(out, x[:, :, 2:26, 2:26])
    assert out.data_ptr() == x[:, :, 2:, 2:].data_ptr()  # no copy
    assert torch.equal(CenterCrop(5)(torch.zeros(1, 1, 8, 8).index_fill_(3, torch.tensor([1]), 1))[0, 0, :, 0],
                       torch.ones(5))  # odd margins: the extra pixel goes to the right / bottom
    with pytest.raises(CnnlabError, match="smaller crop"):
        CenterCrop(24)(torch.zeros(1, 1, 20, 20))


def _plain_relus(model: nn.Module) -> nn.Module:
    for name, child in model.named_children():
        if isinstance(child, ReLU):
            setattr(model, name, nn.ReLU())
        else:
            _plain_relus(child)
    return model


def test_models_with_in_place_relus_train_exactly_as_with_plain_ones():
    """A train step through conv_bn blocks and a residual block: same loss and gradients."""
    torch.manual_seed(0)
    features = nn.Sequential(conv_bn(3, 8), Residual(nn.Sequential(conv_bn(8, 8), conv_bn(8, 8))),
                             conv_bn(8, 16, groups=8), nn.MaxPool2d(2))
    fast = Net(features, nn.Sequential(nn.Flatten(), nn.Linear(16 * 3 * 3, 4)))
    plain = _plain_relus(copy.deepcopy(fast))
    assert any(isinstance(m, ReLU) for m in fast.modules()) and not any(isinstance(m, ReLU) for m in plain.modules())
    x = torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (5,))
    losses = []
    for model in (fast, plain):
        loss = F.cross_entropy(model.train()(x), y)
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1])
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_build_kernels_builds_what_the_layers_call(monkeypatch):
    from cnnlab import bnact, dwconv, layers
    calls = []
    monkeypatch.setattr(bnact, "available", lambda: calls.append("bnact") or True)
    monkeypatch.setattr(dwconv, "available", lambda: calls.append("dwconv") or True)
    layers.build_kernels(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), channels_last=True)
    layers.build_kernels(conv_bn(1, 4, act=None), channels_last=True)  # no BatchNorm -> activation pair
    assert calls == []
    block, dw = conv_bn(1, 4), DepthwiseConv2d(4, 8, padding=1)
    layers.build_kernels(nn.Sequential(block, dw), channels_last=True)
    assert calls == ["bnact", "dwconv"]
    calls.clear()
    layers.build_kernels(nn.Sequential(block, dw), channels_last=False)  # the depthwise kernel needs NHWC
    assert calls == ["bnact"]
    calls.clear()
    block.fused = False
    layers.build_kernels(nn.Sequential(block, DepthwiseConv2d(4, 8, k=5, padding=2)), channels_last=True)
    layers.build_kernels(DepthwiseConv2d(4, 8, stride=3), channels_last=True)  # the kernels take stride 1 or 2
    assert calls == []


@pytest.mark.parametrize("cached", [True, False])
def test_build_kernels_says_when_it_compiles(monkeypatch, cached):
    from cnnlab import bnact, layers
    monkeypatch.setattr(bnact, "cached", lambda: cached)
    monkeypatch.setattr(bnact, "available", lambda: True)
    said = []
    layers.build_kernels(conv_bn(1, 4), channels_last=True, log=said.append)
    assert len(said) == (0 if cached else 1)
    assert all("compiling" in s for s in said)


def test_a_kernel_is_cached_once_built(monkeypatch, tmp_path):
    """``cached`` looks for the build's library in the folder ``load`` builds into."""
    from cnnlab import ext
    monkeypatch.setenv("CNNLAB_EXT_DIR", str(tmp_path))
    assert not ext.cached("cnnlab_bnact", "bnact.cpp")
    _, directory = ext.kernel_file("cnnlab_bnact", "bnact.cpp")
    directory.mkdir(parents=True)
    (directory / "cnnlab_bnact.so").write_bytes(b"")
    assert ext.cached("cnnlab_bnact", "bnact.cpp")
    assert not ext.cached("cnnlab_dwconv", "dwconv.cpp")
