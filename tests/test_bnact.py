"""The fused BatchNorm -> ReLU -> dropout kernels give torch's values, gradients and running
statistics, draw dropout masks of the right rate, and step aside where they do not apply."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import bnact, ext
from cnnlab.layers import ConvBlock, ReLU, conv_bn


@pytest.fixture(scope="module", autouse=True)
def built():
    """The kernels compile once per cache (a few seconds the first time); these machines have g++."""
    assert bnact.available()


def channels_last(*shape, dtype=torch.float32, seed=0, loc=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + loc
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def batch_norm(channels, dtype=torch.float32, momentum=0.1, seed=1):
    bn = nn.BatchNorm2d(channels, momentum=momentum).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(channels, generator=g) - 0.5)
    return bn


CASES = [("relu", 0.0), ("relu", 0.3), ("", 0.2), ("", 0.0), ("gelu", 0.0), ("gelu", 0.3)]
REFERENCE_ACTS = {"relu": F.relu, "gelu": F.gelu, "": lambda t: t}
# a few channels; C that does not divide a tile; many tiles in several chunks; C above a tile; 1x2 maps
SHAPES = [(4, 16, 9, 7), (2, 24, 5, 5), (3, 5, 4, 6), (64, 24, 16, 16), (2, 600, 3, 3), (1, 3, 1, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("act,p", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_values_gradients_and_running_stats_match_torch(dtype, act, p, shape, layout):
    """Against F.batch_norm -> relu or gelu -> the kernels' own mask, in float64 from the same inputs."""
    x = channels_last(*shape, dtype=dtype, loc=3.0, scale=2.0)
    x = (x if layout == "channels_last" else x.contiguous()).requires_grad_()
    cl = x.is_contiguous(memory_format=torch.channels_last)  # a tensor can be both: the kernels take it as channels_last
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bn, ref_bn = batch_norm(shape[1], acc), batch_norm(shape[1], torch.float64)
    seed = 987654321
    out = bnact.BatchNormAct.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, bn.eps,
                                   bnact.ACTS[act], p, seed)
    grad = channels_last(*shape, dtype=dtype, seed=5)
    out.backward(grad)  # a channels_last gradient, whatever x's layout

    x64 = x.detach().double().requires_grad_()
    ref = F.batch_norm(x64, ref_bn.running_mean, ref_bn.running_var, ref_bn.weight, ref_bn.bias, True, 0.1, bn.eps)
    ref = REFERENCE_ACTS[act](ref)
    ref = ref * bnact.keep_mask(shape, p, seed, channels_last=cl) / (1 - p)
    ref.backward(grad.double())
    tol = {torch.bfloat16: dict(rtol=2e-2, atol=3e-2), torch.float32: dict(rtol=1e-4, atol=1e-4),
           torch.float64: dict(rtol=1e-10, atol=1e-10)}[dtype]
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(bn.weight.grad.double(), ref_bn.weight.grad, **tol)
    torch.testing.assert_close(bn.bias.grad.double(), ref_bn.bias.grad, **tol)
    torch.testing.assert_close(bn.running_mean.double(), ref_bn.running_mean, **tol)
    torch.testing.assert_close(bn.running_var.double(), ref_bn.running_var, **tol)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_gradcheck_float64(act):
    x = channels_last(2, 3, 4, 5, dtype=torch.float64).requires_grad_()
    bn = batch_norm(3, torch.float64)

    def f(x, w, b):
        return bnact.BatchNormAct.apply(x.contiguous(memory_format=torch.channels_last), w, b, None, None, 0.0, 1e-5,
                                        bnact.ACTS[act], 0.25, 7)

    assert torch.autograd.gradcheck(f, (x, bn.weight, bn.bias))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_follow_torch(momentum):
    fused, plain = batch_norm(8, momentum=momentum), batch_norm(8, momentum=momentum)
    for step in range(3):
        x = channels_last(4, 8, 5, 5, seed=step, loc=step, scale=1 + step)
        bnact.batch_norm_act(x, fused, act="relu", p=0.0)
        plain(x)
    torch.testing.assert_close(fused.running_mean, plain.running_mean)
    torch.testing.assert_close(fused.running_var, plain.running_var)
    assert int(fused.num_batches_tracked) == int(plain.num_batches_tracked) == 3


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_statistics_stay_exact_when_the_mean_dwarfs_the_spread(layout):
    """Shifted sums: a channel at 1000 +- 0.01 (float32) keeps its variance, even when the first
    value is an outlier (a zero-padded corner, say)."""
    x = channels_last(8, 4, 16, 16, loc=1000.0, scale=0.01)
    x[0, :, 0, 0] = 0.0
    x = x if layout == "channels_last" else x.contiguous()
    bn = nn.BatchNorm2d(4, momentum=1.0)  # running statistics = this batch's
    bnact.batch_norm_act(x, bn, act="", p=0.0)
    x64 = x.double()
    torch.testing.assert_close(bn.running_mean.double(), x64.mean((0, 2, 3)), rtol=1e-7, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), x64.var((0, 2, 3)), rtol=1e-4, atol=0)


def test_dropout_masks_have_the_rate_and_are_independent():
    p, n = 0.3, 1 << 20
    shape = (64, 16, 32, 32)
    a, b = bnact.keep_mask(shape, p, 1), bnact.keep_mask(shape, p, 2)
    assert torch.equal(a, bnact.keep_mask(shape, p, 1))  # a seed gives one mask
    sd = (p * (1 - p) / n) ** 0.5
    for m in (a, b):
        assert abs((1 - m.float().mean().item()) - p) < 5 * sd
    both = (~a & ~b).float().mean().item()  # two seeds: dropped together with probability p^2
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    flat = a.permute(0, 2, 3, 1).reshape(-1)  # neighbours in memory (channels, then rows, then blocks)
    for lag in (1, 16, 16 * 16, 16 * 16 * 32):
        joint = (~flat[:-lag] & ~flat[lag:]).float().mean().item()
        assert abs(joint - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5, lag
    assert bnact.keep_mask(shape, 0.0, 1).all()
    nchw = bnact.keep_mask(shape, p, 1, channels_last=False)
    assert abs((1 - nchw.float().mean().item()) - p) < 5 * sd


def block(dropout=0.0, c_in=3, c_out=16, act=nn.ReLU):
    torch.manual_seed(0)
    return conv_bn(c_in, c_out, dropout=dropout, act=act).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("act", [nn.ReLU, nn.GELU])
def test_conv_block_trains_like_its_children_one_by_one(act):
    fused, plain = block(act=act), block(act=act)
    x = channels_last(4, 3, 10, 10).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = fused(x)
    assert type(y.grad_fn).__name__.startswith("BatchNormAct")
    y2 = x2
    for m in plain:  # nn.Sequential's forward: every child in turn
        y2 = m(y2)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    grad = channels_last(4, 16, 10, 10, seed=3)
    y.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(fused[1].running_var, plain[1].running_var)
    assert fused.state_dict().keys() == nn.Sequential(*plain).state_dict().keys()


def test_conv_block_dropout_drops_at_its_rate_and_scales_the_rest():
    fused, plain = block(dropout=0.25), block(dropout=0.25)
    x = channels_last(8, 3, 16, 16)
    y = fused(x)
    plain.eval()
    reference = F.relu(plain[1].train()(plain[0](x)))  # the same BN in training mode, no dropout
    kept = y != 0
    alive = reference != 0
    dropped = (alive & ~kept).sum().item() / alive.sum().item()
    assert abs(dropped - 0.25) < 0.02
    torch.testing.assert_close(y[kept], reference[kept] / 0.75, rtol=1e-5, atol=1e-5)


def test_conv_block_in_eval_mode_and_with_hooks_runs_every_child():
    m = block(dropout=0.1)
    x = channels_last(2, 3, 8, 8)
    seen = []
    handle = m[2].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    y = m(x)
    handle.remove()
    assert seen == [torch.Size([2, 16, 8, 8])]  # the hook saw the ReLU run
    assert not type(y.grad_fn).__name__.startswith("BatchNormAct")
    m.eval()
    torch.testing.assert_close(m(x), F.relu(m[1](m[0](x))))


def test_conv_block_under_bf16_autocast_matches_torch():
    fused, plain = block(), block()
    x = channels_last(4, 3, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
        y2 = x
        for m in plain:
            y2 = m(y2)
    assert y.dtype == y2.dtype == torch.bfloat16
    assert type(y.grad_fn).__name__.startswith("BatchNormAct")
    torch.testing.assert_close(y.float(), y2.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", ["eval", "strided", "float16", "one value per channel", "other act", "compile"])
def test_applies_only_where_the_kernels_cover_the_call(case):
    bn = batch_norm(4)
    x = channels_last(2, 4, 3, 3)
    if case == "eval":
        bn.eval()
    elif case == "strided":
        x = channels_last(2, 4, 3, 6)[..., ::2]
    elif case == "float16":
        x = x.half()
    elif case == "one value per channel":
        x = channels_last(1, 4, 1, 1)
    if case == "other act":
        for act in (nn.GELU(approximate="tanh"), nn.SiLU()):
            seq = ConvBlock(nn.Conv2d(4, 4, 1), bn, act)
            y = seq.to(memory_format=torch.channels_last)(x)
            assert not type(y.grad_fn).__name__.startswith("BatchNormAct")
        return
    if case == "compile":  # tracing with fake tensors would fail on the kernels (they have no meta function)
        seq = ConvBlock(bn, ReLU())
        y = torch.compile(seq, backend="aot_eager")(x)
        torch.testing.assert_close(y, F.relu(F.batch_norm(x, None, None, bn.weight, bn.bias, True)))
        return
    assert not bnact.applies(x, bn)


def test_one_value_per_channel_raises_as_torch_does():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block()(channels_last(1, 3, 1, 1))


def test_a_failed_build_warns_once_and_the_block_falls_back(monkeypatch):
    def no_compiler(source, directory, name):
        raise ext.BuildError("no C++ compiler (c++) found")

    monkeypatch.setattr(ext, "build", no_compiler)
    ext.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="BatchNorm \\+ activation \\+ dropout could not be built"):
            assert not bnact.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = block()(channels_last(2, 3, 6, 6))
        assert not type(y.grad_fn).__name__.startswith("BatchNormAct")
    finally:
        ext.load.cache_clear()


def test_same_seed_same_training_step():
    def step():
        m = block(dropout=0.2)
        torch.manual_seed(42)
        y = m(channels_last(4, 3, 8, 8))
        assert type(y.grad_fn).__name__.startswith("BatchNormAct")
        y.square().mean().backward()
        return y.detach(), m[0].weight.grad

    (y1, g1), (y2, g2) = step(), step()
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


def test_a_dropout_in_eval_mode_drops_nothing():
    m = block(dropout=0.5)
    m[3].eval()  # dropout switched off while the rest trains
    x = channels_last(4, 3, 8, 8)
    y = m(x)
    assert type(y.grad_fn).__name__.startswith("BatchNormAct")
    m.fused = False
    torch.testing.assert_close(y, m(x), rtol=1e-5, atol=1e-5)


def test_backward_keeps_the_forward_layout_under_saved_tensor_hooks():
    """A hook that hands x back in another layout must not change the dropout mask backward uses."""
    x = channels_last(4, 16, 6, 6, dtype=torch.float64).requires_grad_()
    bn = batch_norm(16, torch.float64)
    grads = []
    for hook in (None, lambda t: t.contiguous()):
        x.grad = None
        if hook:
            with torch.autograd.graph.saved_tensors_hooks(hook, lambda t: t):
                out = bnact.BatchNormAct.apply(x, bn.weight, bn.bias, None, None, 0.0, 1e-5, True, 0.5, 11)
        else:
            out = bnact.BatchNormAct.apply(x, bn.weight, bn.bias, None, None, 0.0, 1e-5, True, 0.5, 11)
        out.backward(channels_last(4, 16, 6, 6, dtype=torch.float64, seed=2))
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["affine=False", "track_running_stats=False", "momentum=None"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_batch_norm_options_match_the_modules(kind, layout):
    def make():
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(8, affine=kind != "affine=False", track_running_stats=kind != "track_running_stats=False",
                            momentum=None if kind == "momentum=None" else 0.1)
        return ConvBlock(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn, ReLU())

    fused, plain = make(), make()
    plain.fused = False
    for step in range(2):
        x = channels_last(4, 3, 6, 6, seed=step, loc=step)
        x = x if layout == "channels_last" else x.contiguous()
        y, y2 = fused(x), plain(x)
        assert type(y.grad_fn).__name__.startswith("BatchNormAct")
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
        y.square().sum().backward()
        y2.square().sum().backward()
    torch.testing.assert_close(fused[0].weight.grad, plain[0].weight.grad, rtol=1e-4, atol=1e-4)
    for a, b in zip(fused[1].buffers(), plain[1].buffers()):
        torch.testing.assert_close(a, b)


def test_symbolic_tracing_records_the_modules_one_by_one():
    m = block()  # (cnnlab's Dropout has control flow torch.fx cannot trace, fused or not)
    graph = torch.fx.symbolic_trace(m)
    assert [n.target for n in graph.graph.nodes if n.op == "call_module"][:2] == ["0", "1"]
    x = channels_last(2, 3, 6, 6)
    with torch.no_grad():
        ref = F.relu(F.batch_norm(m[0](x), None, None, m[1].weight, m[1].bias, True))
    torch.testing.assert_close(graph(x), ref)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_gelu_is_within_a_few_ulp_of_the_exact_one(layout):
    """float32: the kernel's GELU of BN's output z against z * Phi(z) in float64 from the same z
    (a wrong erf constant in the 4th digit would show)."""
    x = torch.randn(2, 4, 40, 50, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails: |z| up to ~15
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    cl = layout == "channels_last"
    w, b = torch.ones(4), torch.zeros(4)
    z, mean, invstd = torch.ops.cnnlab_bnact.forward(x, w, b, None, None, 0.0, 0.0, bnact.ACTS[""], 0.0, 0, cl)
    y, _, _ = torch.ops.cnnlab_bnact.forward(x, w, b, None, None, 0.0, 0.0, bnact.ACTS["gelu"], 0.0, 0, cl)
    assert z.abs().max() > 8  # z spans the tails as well
    z64 = z.double()
    exact = z64 * 0.5 * torch.special.erfc(-z64 / 2 ** 0.5)
    assert (y.double() - exact).abs().max() < 6e-7
    assert (y.double() - exact).abs().max() <= (F.gelu(z).double() - exact).abs().max()  # as close as torch's own


def test_gelu_keeps_nan():
    """A NaN gives NaN through the GELU forward and backward (the exp inside clamps it to stay defined)."""
    x = torch.tensor([0.0, 1.0, 2.0, float("nan")]).reshape(1, 1, 2, 2)
    w, b = torch.ones(1), torch.zeros(1)
    y, _, _ = torch.ops.cnnlab_bnact.forward(x, w, b, None, None, 0.0, 0.0, bnact.ACTS["gelu"], 0.0, 0, False)
    assert y.isnan().all()  # a NaN in the batch makes the statistics NaN: every z is NaN
    z = torch.tensor([-0.0, 0.5, -3.0, float("nan")]).reshape(1, 1, 2, 2)  # mean 0, invstd 1: z = x
    gx, _, _ = torch.ops.cnnlab_bnact.backward(torch.ones_like(z), z, w, b, torch.zeros(1), torch.ones(1),
                                                bnact.ACTS["gelu"], 0.0, 0, True, False)
    assert gx.isnan().all()  # the NaN reaches every input gradient through the channel sums
