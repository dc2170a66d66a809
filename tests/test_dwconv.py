"""cnnlab's depthwise 3x3 kernels give F.conv2d's values and gradients, and step aside where they
do not apply or cannot be built."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from cnnlab import dwconv, ext
from cnnlab.evaluate import autocast
from cnnlab.layers import DepthwiseConv2d


@pytest.fixture(scope="module", autouse=True)
def built():
    """The kernels compile once per cache (a few seconds the first time); these machines have g++."""
    assert dwconv.available()


def channels_last(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last)


def reference(x, weight, stride, padding, grad):
    """Output and gradients of F.conv2d in float64 from the same inputs."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y = F.conv2d(x64, w64, None, stride, padding, 1, x.shape[1])
    y.backward(grad.double())
    return y.detach(), x64.grad, w64.grad


SHAPES = [  # N, C, multiplier, H, W, stride, padding: odd sizes, both strides and paddings, multipliers 1-3,
    (2, 3, 1, 7, 9, 1, 1),  # channel counts below, at and above one 16-float vector
    (2, 4, 2, 8, 7, 1, 0),
    (3, 5, 3, 9, 8, 2, 1),
    (2, 32, 2, 11, 10, 2, 0),
    (2, 17, 1, 5, 6, 2, 1),
    (1, 24, 2, 3, 3, 1, 0),  # a 1x1 output
    (2, 40, 1, 6, 5, 2, 0),
]


@pytest.mark.parametrize("n,c,m,h,w,stride,padding", SHAPES)
def test_float32_values_and_gradients_match_conv2d(n, c, m, h, w, stride, padding):
    x = channels_last(n, c, h, w).requires_grad_()
    weight = torch.randn(c * m, 1, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = dwconv.depthwise_conv3x3(x, weight, stride, padding)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(grad)
    y_ref, gx_ref, gw_ref = reference(x, weight, stride, padding, grad)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), gw_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,c,m,h,w,stride,padding", [(2, 3, 2, 5, 4, 1, 1), (1, 2, 1, 6, 7, 2, 1),
                                                     (2, 2, 3, 5, 6, 2, 0), (1, 18, 1, 4, 5, 1, 0)])
def test_gradcheck_float64(n, c, m, h, w, stride, padding):
    x = channels_last(n, c, h, w, dtype=torch.float64).requires_grad_()
    weight = torch.randn(c * m, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, wt: dwconv.depthwise_conv3x3(x, wt, stride, padding), (x, weight))


@pytest.mark.parametrize("n,c,m,h,w,stride,padding", SHAPES[:4])
def test_bfloat16_within_rounding_of_the_exact_result(n, c, m, h, w, stride, padding):
    """bf16 in, bf16 out, float32 sums: off from the float64 result of the same (rounded) inputs by
    about the output's own rounding (8 bits), as torch's bf16 kernel is."""
    x = channels_last(n, c, h, w, dtype=torch.bfloat16).requires_grad_()
    weight = torch.randn(c * m, 1, 3, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = dwconv.depthwise_conv3x3(x, weight, stride, padding)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    y.backward(grad)
    y_ref, gx_ref, gw_ref = reference(x, weight, stride, padding, grad)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(x.grad.double(), gx_ref, rtol=2 ** -7, atol=2 ** -7)
    torch.testing.assert_close(weight.grad.double(), gw_ref, rtol=1e-4, atol=1e-4)  # summed in float32, not rounded


def test_weight_gradient_is_deterministic():
    x = channels_last(8, 16, 12, 12).requires_grad_()
    weight = torch.randn(32, 1, 3, 3, requires_grad=True)
    grads = []
    for _ in range(2):
        weight.grad = None
        dwconv.depthwise_conv3x3(x, weight, 1, 1).square().sum().backward()
        grads.append(weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_layer_runs_the_fast_kernel_on_channels_last_and_torch_on_nchw():
    torch.manual_seed(0)
    conv = DepthwiseConv2d(6, 12, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.bias.normal_()
    x = channels_last(2, 6, 9, 7)
    fast = conv(x.requires_grad_())
    plain = conv(x.detach().contiguous().requires_grad_())
    assert "DepthwiseConv3x3" in type(fast.grad_fn.next_functions[0][0]).__name__  # the bias add, then the kernel
    assert "DepthwiseConv3x3" not in type(plain.grad_fn).__name__
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    conv.fast = False
    assert "DepthwiseConv3x3" not in type(conv(x).grad_fn).__name__


def test_layer_under_bf16_autocast_matches_torch():
    torch.manual_seed(0)
    conv = DepthwiseConv2d(16, 32, 3, padding=1)
    x = channels_last(4, 16, 10, 10)
    with autocast(torch.device("cpu"), torch.bfloat16):
        fast = conv(x)
        conv.fast = False
        plain = conv(x)
    assert fast.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), plain.float(), rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("case", ["nchw", "5x5", "dilation", "stride 3", "padding 2", "float16", "not depthwise",
                                  "other channels"])
def test_applies_only_where_the_kernels_cover_the_call(case):
    x, weight = channels_last(2, 4, 8, 8), torch.randn(8, 1, 3, 3)
    stride, padding, dilation = (1, 1), (1, 1), (1, 1)
    groups = 4
    assert dwconv.applies(x, weight, stride, padding, dilation, groups)
    if case == "nchw":
        x = x.contiguous()
    elif case == "5x5":
        weight = torch.randn(8, 1, 5, 5)
    elif case == "dilation":
        dilation = (2, 2)
    elif case == "stride 3":
        stride = (3, 3)
    elif case == "padding 2":
        padding = (2, 2)
    elif case == "float16":
        x = x.half()
    elif case == "not depthwise":
        weight = torch.randn(8, 2, 3, 3)
    elif case == "other channels":  # 2 channels into a layer made for 4: torch's kernel raises the error
        groups = 2
    assert not dwconv.applies(x, weight, stride, padding, dilation, groups)


def test_layer_given_the_wrong_channel_count_raises_as_torch_does():
    conv = DepthwiseConv2d(8, 16, 3, padding=1)
    with pytest.raises(RuntimeError, match="channels"):
        conv(channels_last(2, 4, 6, 6))


def test_a_failed_build_warns_once_and_the_layer_falls_back(monkeypatch):
    def no_compiler(source, directory, name):
        raise ext.BuildError("no C++ compiler (c++) found")

    monkeypatch.setattr(ext, "build", no_compiler)
    ext.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="depthwise convolution could not be built.*no C\\+\\+ compiler"):
            assert not dwconv.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second call is answered from the cache, silently
            assert not dwconv.available()
            conv = DepthwiseConv2d(4, 8, 3, padding=1)
            x = channels_last(2, 4, 6, 6)
            y = conv(x)
        assert "DepthwiseConv3x3" not in type(y.grad_fn).__name__
        torch.testing.assert_close(y, F.conv2d(x, conv.weight, None, 1, 1, 1, 4), rtol=1e-5, atol=1e-5)
    finally:
        ext.load.cache_clear()


def test_layer_works_under_torch_compile():
    """Inside torch.compile the layer takes torch's kernel (the compiler does not know the op)."""
    torch.manual_seed(0)
    conv = DepthwiseConv2d(4, 8, 3, padding=1)
    x = channels_last(2, 4, 6, 6).requires_grad_()
    compiled = torch.compile(conv, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref = conv(x)
    ref.sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
