"""The 2x2 max-pool kernels give F.max_pool2d's values and gradients (ties, NaN, odd sizes, both
layouts, three dtypes), and layers.MaxPool2d steps aside where they do not apply."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import ext, maxpool
from cnnlab.layers import MaxPool2d


@pytest.fixture(scope="module", autouse=True)
def built():
    assert maxpool.available()


def make(shape, dtype, channels_last, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if ties:  # few distinct values (zeros of both signs among them): many windows hold their maximum twice or more
        x = (torch.randint(0, 3, shape, generator=g) - 1).double() * torch.randint(0, 2, shape, generator=g).mul(2).sub(1)
    x = x.to(dtype)
    if channels_last:  # channels_last strides, also for C = 1 (where .contiguous(channels_last) gives NCHW's)
        n, c, h, w = shape
        return torch.empty_strided(shape, (h * w * c, 1, w * c, c), dtype=dtype).copy_(x)
    return x.contiguous()


def bits(t):
    """The tensor's bit patterns, so -0.0 and 0.0 differ."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def both(x, grad_seed=1):
    """(out, grad_x) of the kernel and of F.max_pool2d for the same input and output gradient."""
    results = []
    for fn in (maxpool.max_pool2x2, lambda t: F.max_pool2d(t, 2)):
        xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        out = fn(xi)
        g = torch.Generator().manual_seed(grad_seed)
        go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        out.backward(go)
        results.append((out, xi.grad))
    return results


# even; odd H and W (a row and a column left over); C of 1, 3, 600; 2x2 and 3x3 maps; many rows;
# NCHW rows of several 64-column chunks
SHAPES = [(2, 16, 8, 8), (3, 5, 7, 9), (2, 1, 6, 4), (1, 3, 2, 2), (1, 2, 3, 3), (2, 600, 4, 6), (8, 24, 26, 26),
          (1, 2, 4, 260), (1, 1, 3, 131)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_values_and_gradients_match_torch(shape, dtype, channels_last, ties):
    x = make(shape, dtype, channels_last, ties=ties)
    (out, gx), (ref_out, ref_gx) = both(x)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert torch.equal(bits(out), bits(ref_out))  # a maximum is one of the inputs: exact, zero signs included
    assert torch.equal(bits(gx), bits(ref_gx))  # the same winner in every window: exact
    assert out.stride() == ref_out.stride() and gx.stride() == ref_gx.stride()  # torch's layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [True, False])
def test_nan_and_infinities_as_in_torch(dtype, channels_last):
    x = make((2, 4, 6, 6), dtype, channels_last)
    x[0, 0, 2:4, 2:4] = float("-inf")  # a window of -inf only
    x[0, 0, 0, 0] = float("inf")
    x[0, 1, 0, 1] = float("nan")  # second place of a window
    x[1, 2, 3, 3] = float("nan")  # last place
    x[1, 3, 4, 4] = float("nan")  # first place, the rest of that window larger
    x[1, 3, 4, 5], x[1, 3, 5, 4], x[1, 3, 5, 5] = 5.0, 6.0, 7.0
    (out, gx), (ref_out, ref_gx) = both(x)
    assert torch.equal(out.isnan(), ref_out.isnan()) and out.isnan().sum() == 3
    assert torch.equal(out.nan_to_num(), ref_out.nan_to_num())
    assert torch.equal(gx, ref_gx)


def test_gradcheck_float64():
    for cl in (True, False):
        x = make((2, 3, 5, 6), torch.float64, cl).requires_grad_()
        assert torch.autograd.gradcheck(maxpool.max_pool2x2, (x,))


def test_module_uses_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = maxpool.max_pool2x2
    monkeypatch.setattr(maxpool, "max_pool2x2", lambda t: calls.append(t.shape) or real(t))
    x = make((2, 8, 6, 6), torch.float32, True).requires_grad_()
    pool = MaxPool2d(2)
    pool(x)
    assert len(calls) == 1
    with torch.no_grad():  # no gradient needed: torch's pool, which keeps no indices
        pool(x)
    pool(x.detach())
    MaxPool2d(3)(x)  # another window
    MaxPool2d(2, stride=1)(x)
    MaxPool2d(2, padding=1)(x)
    MaxPool2d(2, ceil_mode=True)(make((2, 8, 7, 7), torch.float32, True).requires_grad_())  # ceil adds a window
    assert len(calls) == 1
    MaxPool2d(2, ceil_mode=True)(x)  # ceil_mode with even sizes changes nothing
    assert len(calls) == 2
    with torch.inference_mode():
        pool(x)
    assert len(calls) == 2
    pool.fast = False
    pool(x)
    assert len(calls) == 2
    out = torch.compile(MaxPool2d(2), backend="eager")(x)  # compiled: torch's op, traceable
    assert len(calls) == 2 and torch.equal(out, F.max_pool2d(x, 2))


def test_module_matches_nn_maxpool_in_a_network():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 4, 3), nn.Flatten())
    ours = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), MaxPool2d(2), nn.Conv2d(8, 4, 3), nn.Flatten())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    for net in (ref, ours):
        net.to(memory_format=torch.channels_last)
        net(x).square().sum().backward()
    for p, q in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_a_failed_build_falls_back_with_one_warning(monkeypatch):
    def fail(*args, **kwargs):
        raise ext.BuildError("no compiler")

    monkeypatch.setattr(ext, "build", fail)
    ext.load.cache_clear()
    try:
        x = make((2, 4, 6, 6), torch.float32, True).requires_grad_()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = MaxPool2d(2)(x)
            MaxPool2d(2)(x)
        assert torch.equal(out, F.max_pool2d(x, 2))
        assert [str(w.message) for w in caught if "max-pool" in str(w.message)] == [
            "cnnlab: the fast max-pool could not be built (no compiler); using torch's slower kernel"]
    finally:
        ext.load.cache_clear()
