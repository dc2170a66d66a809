"""The building blocks' fast paths compute exactly what the plain PyTorch layers compute."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.layers import DepthwiseConv2d, ReLU, conv_bn


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
