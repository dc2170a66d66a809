"""Summary: Keras-convention counts, MACs, receptive fields, errors, hook hygiene."""

import pytest
import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.layers import Residual
from cnnlab.models import MODELS, create_model
from cnnlab.summary import models_table, receptive_fields, summarize


def conv(c_in=1, c_out=1, **kw):
    return nn.Conv2d(c_in, c_out, 3, padding=kw.pop("padding", 1), **kw)


def rf_of(model, shape=(1, 16, 16)):
    return summarize(model, input_shape=shape).receptive_field


def test_rf_plain_stacks():
    assert rf_of(nn.Sequential(conv(), conv())) == 5
    assert rf_of(nn.Sequential(conv(), conv(), conv())) == 7
    assert rf_of(nn.Sequential(conv(), nn.MaxPool2d(2), conv())) == 8  # 3, pool -> 4 (jump 2), +2*2
    assert rf_of(nn.Sequential(conv(dilation=2, padding=2))) == 5
    assert rf_of(nn.Sequential(conv(stride=2), conv())) == 7  # 3, then jump 2: 3 + 2*2


def test_rf_residual_and_global_pool():
    # conv (3), residual branch of two convs (3+2+2 = 7) wins over identity (3)
    assert rf_of(nn.Sequential(conv(), Residual(nn.Sequential(conv(), conv())))) == 7
    # global pooling covers the whole 8x8 map: 3 + (8-1)*1 = 10
    assert rf_of(nn.Sequential(conv(), nn.AdaptiveAvgPool2d(1)), (1, 8, 8)) == 10


def test_rf_resnet9_and_mnist_tiny():
    # resnet9: prep 3; conv 5; pool 6 (j2); residual 10, 14 -> 14; conv 18; pool 20 (j4); conv 28;
    # pool 32 (j8); residual 48, 64 -> 64; MaxPool(4): 64 + 3*8 = 88.
    assert summarize("resnet9").receptive_field == 88
    # mnist_tiny: conv 3, conv 5, pool 6 (j2), 1x1 6, convs 10, 14, 18, 22 (padded, 6x6 map),
    # GAP over 6x6: 22 + 5*2 = 32.
    assert summarize("mnist_tiny").receptive_field == 32


def test_exact_keras_totals_in_text():
    text = summarize("resnet9").to_text()
    assert "Total params: 6,577,600" in text
    assert "Trainable params: 6,573,120" in text
    assert "Non-trainable params: 4,480" in text
    assert "MACs per image: " in text
    s = summarize("cifar_sep92k")
    assert (s.total_params, s.trainable_params, s.non_trainable_params) == (92_901, 91_237, 1_664)


def test_macs_and_rows_small_net():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    s = summarize(model, input_shape=(2, 5, 5))
    assert s.macs == 4 * 5 * 5 * 2 * 9 + 100 * 3
    assert [r.type for r in s.rows] == ["Conv2d", "Flatten", "Linear"]
    assert s.rows[0].output_shape == (4, 5, 5) and s.rows[0].params == 4 * 2 * 9 + 4
    assert s.rows[2].rf == 3 + 4  # Flatten feeds the whole 5x5 map to the Linear


def test_wrong_input_shape_names_layer():
    with pytest.raises(CnnlabError, match=r"features\.0\.0.*expects 3 input channels but got 1"):
        summarize("resnet9", input_shape=(1, 28, 28))
    with pytest.raises(CnnlabError, match=r"layer 'features\.\d+\.0' \(Conv2d\) got a 2x2 map"):
        summarize("mnist_tiny", input_shape=(1, 8, 8))
    with pytest.raises(CnnlabError, match="input_shape"):
        summarize("resnet9", input_shape=(32, 32))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_summary_leaves_no_hooks_and_keeps_mode():
    model = create_model("mnist_8k")
    model.train()
    summarize(model, input_shape=(1, 28, 28))
    assert _hook_count(model) == 0 and model.training
    with pytest.raises(CnnlabError):
        summarize(model, input_shape=(3, 28, 28))
    assert _hook_count(model) == 0 and model.training


def test_models_table_lists_every_model():
    table = models_table()
    for name, spec in MODELS.items():
        assert name in table and spec.source in table
    assert "6,577,600" in table and "92,901" in table


@pytest.mark.parametrize("name", sorted(MODELS))
def test_macs_match_torch_flop_counter(name):
    """Cross-check with an independent counter: torch's own FlopCounterMode counts 2 FLOPs per MAC
    of every convolution and matrix multiply in one forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    s = summarize(name)
    model = create_model(name).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *s.input_shape))
    assert counter.get_total_flops() == 2 * s.macs
    assert s.macs > 0


def test_rf_space_to_depth():
    # PixelUnshuffle(2) is a 2x2 window with stride 2 (RF 2, jump 2); a 3x3 conv after it adds 2*2 -> 6
    net = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4, 4, 3))
    rfs = receptive_fields(net)
    assert rfs[net[0]] == (2, 2) and rfs[net[1]] == (6, 2)
