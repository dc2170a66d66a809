"""The layer notation (``[model] layers``): grammar, shapes, head split, one-line errors, and the
seed networks of ``recipes/designs/`` against their zoo twins."""

from pathlib import Path

import pytest
import torch
from torch import nn

from cnnlab import config, models
from cnnlab.config import load_recipe
from cnnlab.design import WORDS, build_design, parse
from cnnlab.errors import CnnlabError
from cnnlab.layers import CenterCrop, DepthwiseConv2d, Dropout, GlobalPool, Mul, Residual, SeparableConv2d
from cnnlab.summary import recipe_model, summarize
from test_train import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
DESIGNS = ROOT / "recipes" / "designs"
TWINS = {"mnist_tiny": "mnist_tiny", "mnist_8k": "mnist_8k", "cifar_sep92k": "cifar_sep92k",
         "cifar_dw56k": "cifar_dw56k", "resnet9": "resnet9", "resnet_custom": "resnet_custom"}


def design(layers, shape=(1, 28, 28), num_classes=10, **options):
    return build_design(layers, num_classes, shape, **options)


def out_shape(model, shape):
    with torch.no_grad():
        return tuple(model.eval()(torch.zeros(2, *shape)).shape[1:])


# ----------------------------------------------------------------------------- the seed nets


@pytest.mark.parametrize("recipe, zoo", sorted(TWINS.items()))
def test_design_counts_like_its_zoo_twin(recipe, zoo):
    cfg = load_recipe(DESIGNS / f"{recipe}.toml")
    model, s = recipe_model(cfg)
    twin = summarize(zoo)
    assert (s.total_params, s.trainable_params, s.non_trainable_params) == \
        (twin.total_params, twin.trainable_params, twin.non_trainable_params)
    assert s.output_shape == twin.output_shape == (10,)
    assert s.macs == twin.macs > 0
    assert s.receptive_field == twin.receptive_field
    # the same training: every other table equals the zoo recipe's
    zoo_cfg = config.to_dict(load_recipe(ROOT / "recipes" / f"{zoo}.toml"))
    mine = config.to_dict(cfg)
    assert {k: v for k, v in mine.items() if k != "model"} == {k: v for k, v in zoo_cfg.items() if k != "model"}
    assert "layers" in cfg.model.options and cfg.model.name not in models.MODELS


def test_every_recipe_in_designs_is_checked():
    assert {p.stem for p in DESIGNS.glob("*.toml")} == set(TWINS) | {"mnist_res7k"}


def test_the_readme_example_is_under_8k_parameters():
    cfg = load_recipe(DESIGNS / "mnist_res7k.toml")
    _, s = recipe_model(cfg)
    assert (s.total_params, s.trainable_params, s.receptive_field, s.macs) == (7_840, 7_664, 36, 1_051_032)
    assert cfg.model.max_params == 8000


def test_design_trains_a_step_and_splits_features_and_head():
    cfg = load_recipe(DESIGNS / "resnet9.toml")
    model = models.build(cfg.model.name, cfg.model.options, 10, (3, 32, 32))
    assert isinstance(model.features[3], Residual) and isinstance(model.head[0], nn.Flatten)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(x).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 8 and all(b.momentum == 0.9 for b in bns)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.head(model.features(x)), model(x))


# ----------------------------------------------------------------------------- grammar


def test_parse_reads_number_settings_and_switches():
    layer = parse("conv 32 k5 p2 s2 d3 g4 bias plain", "1")
    assert (layer.word, layer.value, layer.settings, layer.switches) == \
        ("conv", 32.0, {"k": 5, "p": 2, "s": 2, "d": 3, "g": 4}, {"bias", "plain"})
    assert parse("dropout 0.25", "2").value == 0.25
    assert parse("linear classes", "3").value == "classes"
    assert parse("dw", "4").value is None  # multiplier 1


def test_conv_settings_reach_the_module():
    model = design(["conv 8 k5 p2 s2 d1 g1 bias plain", "flatten"], shape=(2, 9, 9))
    conv = model.features[0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (5, 5) and conv.padding == (2, 2)
    assert conv.stride == (2, 2) and conv.bias is not None
    assert out_shape(model, (2, 9, 9)) == (8 * 5 * 5,)
    dil = design(["conv 4 k3 d2 g2 p2", "flatten"], shape=(2, 8, 8)).features[0]
    assert dil[0].dilation == (2, 2) and dil[0].groups == 2 and dil[0].bias is None
    assert [type(m) for m in dil] == [nn.Conv2d, nn.BatchNorm2d, type(dil[2])]  # conv-BN-ReLU, no dropout at 0


def test_blocks_of_each_word():
    layers = ["crop 24", "s2d 2", "conv 8 p1", "dw 16 p1", "sep 16 p1", "trans 8", "maxpool 2 ceil",
              ["res", "conv 8 p1", "dropout 0.2", "conv 8 p1"], "avgpool 2 s1 p1", "bn", "relu", "gelu",
              "gap", "linear 32", "bn", "dropout 0.1", "linear classes nobias", "scale 0.5"]
    model = design(layers, shape=(1, 28, 28), num_classes=7, dropout=0.05)
    kinds = [type(m) for m in model.modules()]
    for cls in (CenterCrop, nn.PixelUnshuffle, DepthwiseConv2d, SeparableConv2d, Residual, nn.AvgPool2d,
                nn.GELU, GlobalPool, nn.BatchNorm1d, Mul):
        assert cls in kinds, cls
    assert model.features[0].size == 24 and model.features[1].downscale_factor == 2
    assert model.features[3][0].out_channels == 16 and model.features[3][0].groups == 8  # multiplier 2
    assert isinstance(model.features[2][-1], Dropout) and model.features[2][-1].p == 0.05  # [model] dropout
    assert not any(isinstance(m, Dropout) for m in model.features[5])  # never after trans
    assert model.features[6].ceil_mode
    assert isinstance(model.head[0], GlobalPool) and isinstance(model.head[1], nn.Flatten)  # auto flatten
    assert model.head[-2].bias is None and model.head[-2].out_features == 7
    assert out_shape(model, (1, 28, 28)) == (7,)


def test_head_starts_at_global_pool_flatten_or_the_flatten_before_a_linear():
    assert len(design(["conv 4", "gap", "conv classes k1 plain", "flatten"]).head) == 3
    assert len(design(["conv 4", "flatten", "linear 10"]).head) == 2
    model = design(["conv 4 k28", "linear 10"])  # 1x1 map: linear flattens it, the head starts there
    assert [type(m) for m in model.head] == [nn.Flatten, nn.Linear]
    assert len(design(["conv 10 k28 plain"]).head) == 0  # no head (output [N, 10, 1, 1], refused by training)


def test_bn_settings_and_dropout_come_from_the_model_table():
    model = design(["conv 4", "sep 4", "gap", "linear 10", "bn"], dropout=0.3, bn_eps=1e-3, bn_momentum=0.01)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    assert sum(isinstance(m, Dropout) and m.p == 0.3 for m in model.modules()) == 2


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("layers, needles", [
    (["conv 16", "convv 32"], ["layer 2 'convv 32'", "unknown layer 'convv'", "did you mean 'conv'",
                               "valid layers: conv, dw, sep, trans, maxpool"]),
    (["conv"], ["layer 1 'conv'", "missing the channels", "'conv 32 k3 p1'"]),
    (["conv 16 q3"], ["layer 1 'conv 16 q3'", "unexpected 'q3'", "kN (kernel)", "bias, plain"]),
    (["conv 16 k3 k5"], ["unexpected 'k5'"]),
    (["conv 16.5"], ["whole number from 1 to 65536"]),
    (["conv 1e9"], ["whole number from 1 to 65536"]),
    (["dropout 1e400"], ["[0, 1)"]),
    (["conv 8 p3"], ["padding p3 reaches past the kernel (at most p2; 'same' is p1)"]),
    (["conv 64 p1", "flatten", "linear 65536"], ["layer 3 'linear 65536': would hold 3,288,334,336 weights"]),
    (["conv 16 k0"], ["layer 1 'conv 16 k0': the kernel must be >= 1"]),
    (["maxpool 2 s0"], ["the stride must be >= 1"]),
    (["maxpool 2 k3"], ["unexpected 'k3'", "sN (stride), pN (padding), ceil"]),
    (["dropout 1.5"], ["layer 1 'dropout 1.5'", "[0, 1)"]),
    (["relu 3"], ["unexpected '3'", "relu takes nothing more"]),
    (["conv 8", "maxpool 2", "conv 8", "maxpool 2", "maxpool 2", "conv 32 k3", "gap", "linear 10"],
     ["layer 6 'conv 32 k3': gets 2x2 and would output 0x0", "pad it (p1)"]),
    (["conv 8", ["res", "conv 16 p1"], "gap", "linear 10"],
     ["layer 2 'res'", "turns 8x26x26 into 16x26x26", "last layer give 8 channels"]),
    (["conv 8", ["res", "conv 8"], "gap", "linear 10"], ["turns 8x26x26 into 8x24x24", "pad its convs"]),
    (["conv 8", ["res", "conv 8 p1", "cnv 8"]], ["layer 2.2 'cnv 8'", "unknown layer"]),
    (["conv 8", ["conv 8"]], ["layer 2: a nested list is a residual block", '"res"']),
    (["conv 8", "res"], ["nested list"]),
    (["conv 8", "dw 12"], ["multiple of its 8 input channels", "'dw 16'"]),
    (["conv 8 g3"], ["groups g3 must divide"]),
    (["conv 8", "linear 10"], ["gets a 8x26x26 map", "'flatten' or 'gap'"]),
    (["flatten", "conv 8"], ["layer 2 'conv 8'", "needs a C x H x W map", "before 'flatten'"]),
    (["s2d 3"], ["28x28", "does not divide", "'crop 27'"]),
    (["crop 32"], ["smaller than the 32x32 window", "at most 28"]),
    ([5], ["layer 1: expected a string"]),
    ([], ["non-empty list"]),
])
def test_bad_layers_are_one_line_errors_at_the_cli(tmp_path, capsys, layers, needles):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'[model]\nname = "mine"\nlayers = {config.toml_value(layers, "layers")}\n')
    rc, out, err = run_cli(capsys, "summary", recipe)
    assert_one_line_error(rc, err, *needles)
    assert out == ""


def test_budgets_and_design_keys_are_one_line_errors(tmp_path, capsys):
    recipe = DESIGNS / "mnist_tiny.toml"
    rc, _, err = run_cli(capsys, "summary", recipe, "--set", "model.max_params=13000")
    assert_one_line_error(rc, err, "tiny_layers has 13,840 parameters, over [model] max_params = 13,000")
    rc, _, err = run_cli(capsys, "summary", recipe, "--set", "model.max_macs=1000000")
    assert_one_line_error(rc, err, "needs 2,687,200 MACs per 1x28x28 image, over [model] max_macs = 1,000,000")
    rc, _, err = run_cli(capsys, "summary", recipe, "--set", "model.width=2")
    assert_one_line_error(rc, err, "unknown [model] key 'width' for a layer design", "layers, dropout, bn_eps")
    rc, _, err = run_cli(capsys, "summary", recipe, "--set", "model.name=mnist_8k")
    assert_one_line_error(rc, err, "'mnist_8k' names a zoo model", "drop layers")
    rc, out, _ = run_cli(capsys, "summary", recipe, "--set", "model.max_params=13840", "--set", "max_macs=2687200")
    assert rc == 0 and "Total params: 13,840" in out and "Receptive field: 32" in out


def test_over_budget_fails_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    from cnnlab import train as train_mod

    def no_data(*a, **k):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(train_mod, "load_dataset", no_data)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", DESIGNS / "resnet9.toml", "--out", out, "--set", "model.max_params=1000000")
    assert_one_line_error(rc, err, "6,577,600 parameters, over [model] max_params = 1,000,000")
    assert not out.exists()


def test_layers_without_a_name_get_the_label_design(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nlayers = ["conv 8", "gap", "linear classes"]\n')
    cfg = load_recipe(recipe)
    assert cfg.model.name == "design" and cfg.model.options == {"layers": ["conv 8", "gap", "linear classes"]}
    assert config.from_dict(config.to_dict(cfg)) == cfg  # round trip through a run's config.toml
    assert set(WORDS) >= {"conv", "dw", "sep", "trans", "res", "s2d", "crop", "gap", "linear"}


def test_throughput_of_a_design_recipe():
    from cnnlab import bench

    cfg = load_recipe(DESIGNS / "mnist_8k.toml")
    rows = bench.throughput([cfg], batch_size=8, steps=1, settings=(("float32", False),), log=lambda *a: None)
    assert [(r["model"], r["batch_size"]) for r in rows] == [("8k_layers", 8)]
    assert rows[0]["macs_per_image"] == summarize("mnist_8k").macs and rows[0]["images_per_s"] > 0


# ----------------------------------------------------------------------------- any input: a net or one line


def _layer_lists():
    from hypothesis import strategies as st

    token = st.one_of(st.integers(0, 40).map(str), st.sampled_from(
        ["classes", "0.5", "1e-3", "1e99", "bias", "plain", "ceil", "nobias", "k0", "s0", "d0", "p9", "x"]),
        st.tuples(st.sampled_from("kpsdg"), st.integers(0, 9)).map(lambda t: f"{t[0]}{t[1]}"), st.text(max_size=4))
    entry = st.tuples(st.sampled_from(sorted(WORDS) + ["zzz"]), st.lists(token, max_size=4)).map(
        lambda t: " ".join([t[0], *t[1]]))
    layers = st.recursive(entry, lambda inner: st.lists(inner, max_size=4).map(lambda items: ["res", *items]),
                          max_leaves=8)
    return st.lists(layers, max_size=8)


def test_any_layer_list_builds_a_net_that_runs_or_is_one_line_error():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_layer_lists(), st.sampled_from([(1, 28, 28), (3, 32, 32), (1, 4, 4)]))
    def check(layers, shape):
        try:
            net = build_design(layers, 10, shape)
        except CnnlabError as e:
            assert "\n" not in str(e) and str(e).startswith(("layer ", "[model]"))
            return
        with torch.no_grad():
            assert net.eval()(torch.zeros(2, *shape)).shape[0] == 2

    check()


def test_mnist_speedrun_recipe_learns_real_mnist_from_its_hard_images(tmp_path):
    """The speed recipe (a layer list: crop 20, space-to-depth, 16-32 channels, then 96 and a linear layer)
    on 20,000 real MNIST images for 3 of its epochs: one over every image, then two over the hardest
    10%; its own optimizer, schedule, bf16, TTA, and one evaluation, after the last epoch."""
    from cnnlab.train import train
    cfg = load_recipe(ROOT / "recipes" / "mnist_speedrun.toml",
                      ["train.epochs=3", "data.subset=20000", "train.threads=1", "train.quiet=true"])
    _, summary = recipe_model(cfg)
    assert (summary.trainable_params, summary.receptive_field) == (57_130, 36)
    res = train(cfg, tmp_path / "speedrun")
    assert [r["images"] for r in res.history] == [78 * 256, 7 * 256, 7 * 256]
    assert [r["test_acc"] is not None for r in res.history] == [False, False, True]
    assert res.result["eval_split"] == "test" and res.history[-1]["tta"] is True
    assert res.result["final_test_acc"] >= 0.98, res.result["final_test_acc"]
