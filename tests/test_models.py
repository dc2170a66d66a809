"""Registry-wide model checks (batch of 2, CPU, no training)."""

import pytest
import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.layers import SeparableConv2d
from cnnlab.models import MODELS, create_model, list_models
from cnnlab.summary import count_params


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_forward_backward_split_and_budget(name):
    torch.manual_seed(0)
    spec = MODELS[name]
    model = create_model(name)
    x = torch.randn(2, *spec.input_shape)
    if hasattr(model, "init_from_data"):
        model.init_from_data(x)
    model.train()
    logits = model(x)
    assert logits.shape == (2, spec.num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.head(model.features(x)), model(x))
    n = sum(p.numel() for p in model.parameters())
    low, high = spec.budget
    assert low <= n <= high, f"{name}: {n} params outside budget {spec.budget}"


def test_list_models_and_num_classes():
    assert list_models() == sorted(MODELS)
    assert {"mnist_tiny", "mnist_8k", "cifar_sep92k", "cifar_dw56k", "resnet9", "resnet_custom", "airbench94"} <= set(MODELS)
    model = create_model("mnist_tiny", num_classes=3).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)


def test_mnist_param_limits_in_keras_convention_too():
    assert count_params(create_model("mnist_tiny"))[0] < 15_000
    assert count_params(create_model("mnist_8k"))[0] < 8_000


def test_cifar_sep92k_exact_keras_counts():
    model = create_model("cifar_sep92k")
    assert count_params(model) == (92_901, 91_237, 1_664)
    seps = [m for m in model.modules() if isinstance(m, SeparableConv2d)]
    assert len(seps) == 6
    assert all(s.depthwise.bias is None and s.pointwise.bias is not None for s in seps)


def test_resnet9_exact_keras_counts_and_momentum():
    model = create_model("resnet9")
    assert count_params(model) == (6_577_600, 6_573_120, 4_480)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 8 and all(b.momentum == pytest.approx(0.9) and b.eps == 1e-5 for b in bns)
    assert all(m.bias is None for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    scaled = create_model("resnet9", scale=0.125).eval()
    scaled.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scaled(x), 0.125 * model.eval()(x), atol=1e-5)


def test_cifar_dw56k_head_sees_5x5():
    model = create_model("cifar_dw56k").eval()
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 32, 5, 5)
    assert 50_000 <= count_params(model)[0] <= 60_000


@pytest.mark.parametrize("downsample", ["maxpool", "strided", "dilated"])
def test_resnet_custom_downsample_variants(downsample):
    model = create_model("resnet_custom", downsample=downsample).eval()
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)


def test_airbench_whitening_bias_trains_for_its_epochs_only():
    model = create_model("airbench94", whiten_bias_epochs=2)
    bias = model.features[0].bias
    states = []
    for epoch in (1, 2, 3, 9, 2):  # the last: a run resumed earlier trains it again
        model.start_epoch(epoch)
        states.append(bias.requires_grad)
    assert states == [True, True, False, False, True]
    assert create_model("airbench94").whiten_bias_epochs == 3  # airbench's default
    with pytest.raises(CnnlabError, match="whiten_bias_epochs"):
        create_model("airbench94", whiten_bias_epochs=1.5)


def test_airbench_whitening_frozen_and_whitens():
    torch.manual_seed(0)
    # correlated neighbouring pixels, so the raw 2x2 patches are far from white
    images = nn.functional.avg_pool2d(torch.randn(64, 3, 34, 34), 3, stride=1)
    images = (images - images.mean()) / images.std()
    model = create_model("airbench94")
    conv = model.features[0]

    def second_moment(out):
        y = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
        return y.T @ y / y.shape[0]

    with torch.no_grad():
        before = second_moment(conv(images) - conv.bias.view(1, -1, 1, 1))
    assert (before - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5
    model.init_from_data(images)
    assert not conv.weight.requires_grad
    assert torch.equal(conv.weight[12:], -conv.weight[:12])
    with torch.no_grad():
        after = second_moment(conv(images))
    assert (after - torch.eye(12, dtype=torch.float64)).abs().max() < 0.05
    total, trainable, non_trainable = count_params(model)
    assert non_trainable == 288 + 1152 + 2304  # whitening weight + frozen BN weights + BN running stats
    assert trainable + non_trainable == total
    with pytest.raises(CnnlabError, match="init_from_data"):
        model.init_from_data(torch.randn(4, 1, 32, 32))


def test_unknown_model_suggests_nearest():
    with pytest.raises(CnnlabError, match="resnet9"):
        create_model("resnet8")
    with pytest.raises(CnnlabError, match="mnist_tiny"):
        create_model("mnist_tinny")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(CnnlabError, match=r"'depth'.*dropout, pool, width"):
        create_model("mnist_tiny", depth=3)


@pytest.mark.parametrize("options", [dict(width=0), dict(width=5), dict(dropout=1.0), dict(dropout=-0.1),
                                     dict(pool="sum")])
def test_bad_option_values(options):
    with pytest.raises(CnnlabError, match=next(iter(options))):
        create_model("mnist_tiny", **options)


def test_bad_option_values_other_models():
    with pytest.raises(CnnlabError, match="dropout_lin"):
        create_model("cifar_sep92k", dropout_lin=1.5)
    with pytest.raises(CnnlabError, match="downsample"):
        create_model("resnet_custom", downsample="avgpool")
    with pytest.raises(CnnlabError, match="scale"):
        create_model("resnet9", scale=0)
    with pytest.raises(CnnlabError, match="num_classes"):
        create_model("resnet9", num_classes=0)


@pytest.mark.parametrize("crop", [10, 13, 30, 24.0])
def test_mnist_fast_refuses_crops_it_cannot_run(crop):
    with pytest.raises(CnnlabError, match="even number of pixels from 12 to 28"):
        create_model("mnist_fast", crop=crop)


@pytest.mark.parametrize("crop", [12, 20, 28])
def test_mnist_fast_runs_at_every_crop_it_accepts(crop):
    assert create_model("mnist_fast", crop=crop).eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_width_changes_size():
    small = sum(p.numel() for p in create_model("mnist_tiny", width=0.5).parameters())
    big = sum(p.numel() for p in create_model("mnist_tiny", width=2).parameters())
    assert small < 13_600 < big


def test_airbench_convs_start_as_identity():
    """airbench's implicit residual: each group conv's first c_in filters pass their input through."""
    model = create_model("airbench94")
    convs = [m for m in model.features.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 6
    for conv in convs:
        x = torch.randn(2, conv.in_channels, 6, 6)
        y = nn.functional.conv2d(x, conv.weight, padding=1)
        k = min(conv.in_channels, conv.out_channels)
        assert torch.allclose(y[:, :k], x[:, :k], atol=1e-6)
        if conv.out_channels > k:  # the other filters keep their random init
            assert conv.weight[k:].abs().sum() > 0


def test_resnet9_page_whitening_frozen_bn_scales_and_a_training_step():
    torch.manual_seed(0)
    images = nn.functional.avg_pool2d(torch.randn(32, 3, 34, 34), 3, stride=1)
    images = (images - images.mean()) / images.std()
    model = create_model("resnet9_page")
    conv = model.features[0]
    assert conv.out_channels == 2 * 27 and conv.kernel_size == (3, 3)
    model.init_from_data(images)
    assert torch.equal(conv.weight[27:], -conv.weight[:27])
    with torch.no_grad():
        y = conv(images)[:, :27].permute(0, 2, 3, 1)[:, 1:-1, 1:-1].reshape(-1, 27).double()  # inner pixels: no padding
    assert ((y.T @ y / y.shape[0]) - torch.eye(27, dtype=torch.float64)).abs().max() < 0.1
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 8 and not any(bn.weight.requires_grad for bn in bns)
    model.train()
    out = model(images)
    assert out.shape == (32, 10)
    nn.functional.cross_entropy(out, torch.randint(0, 10, (32,))).backward()
    assert all(bn.weight.grad is None and bn.bias.grad.abs().sum() > 0 for bn in bns)
    assert conv.weight.grad is None and conv.bias.grad is not None
    assert torch.equal(bns[0].weight, torch.ones(64))  # frozen at 1
