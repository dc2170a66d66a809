"""Recipes: loading, key/type checks, ``--set`` overrides and the TOML round trip (issue 4)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cnnlab import config
from cnnlab.config import Config, load_recipe
from cnnlab.errors import CnnlabError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(CnnlabError) as e:
        load_recipe(write(tmp_path, text), list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- recipes


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"mnist_tiny.toml", "mnist_seed002.toml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_recipe(path)
    assert isinstance(cfg, Config)
    assert cfg.train.epochs >= 1 and cfg.optim.lr > 0
    again = load_recipe(write(tmp_path, config.to_toml(cfg)))
    assert again == cfg


def test_seed002_recipe_values():
    cfg = load_recipe(RECIPES[0].parent / "mnist_seed002.toml")
    assert (cfg.optim.name, cfg.optim.lr) == ("adam", 0.003)
    assert (cfg.schedule.name, cfg.schedule.rate) == ("inverse", 0.319)
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.train.target) == (20, 128, 0.994)
    assert cfg.model.name == "mnist_tiny" and cfg.model.options == {"dropout": 0.05}


def test_mnist_tiny_recipe_values():
    cfg = load_recipe(RECIPES[0].parent / "mnist_tiny.toml")
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.nesterov, cfg.optim.weight_decay) == ("sgd", 0.2, True, 5e-4)
    assert (cfg.schedule.name, cfg.schedule.pct_start, cfg.schedule.anneal) == ("onecycle", 0.2, "linear")
    assert cfg.data.crop_pad == 2 and cfg.train.epochs == 15 and cfg.train.stop_at_target is False


def test_defaults_when_tables_are_missing(tmp_path):
    assert load_recipe(write(tmp_path, "")) == Config()
    cfg = load_recipe(write(tmp_path, "[optim]\nlr = 0.5\n"))
    assert cfg.optim.lr == 0.5 and cfg.train == config.TrainConfig()


# ----------------------------------------------------------------------------- unknown keys and tables


def test_unknown_key_lists_valid_keys_and_suggests_nearest(tmp_path):
    msg = error_of(tmp_path, "[optim]\nlrr = 0.1\n")
    assert "unknown key optim.lrr" in msg
    assert "did you mean 'lr'" in msg
    for key in ("lr", "momentum", "nesterov", "weight_decay", "label_smoothing"):
        assert key in msg.split("valid keys")[1]


def test_unknown_key_in_train_suggests_epochs(tmp_path):
    msg = error_of(tmp_path, "[train]\nepoch = 3\n")
    assert "unknown key train.epoch" in msg and "did you mean 'epochs'" in msg
    assert "stop_at_target" in msg


def test_unknown_key_without_near_match_lists_keys_only(tmp_path):
    msg = error_of(tmp_path, "[data]\nzzzzqqq = 1\n")
    assert "unknown key data.zzzzqqq" in msg and "did you mean" not in msg
    assert "batch_size" in msg and "crop_pad" in msg


def test_unknown_table(tmp_path):
    msg = error_of(tmp_path, "[optimizer]\nlr = 0.1\n")
    assert "unknown table [optimizer]" in msg and "did you mean 'optim'" in msg
    assert "model, data, optim, schedule, train" in msg


def test_key_that_is_not_a_table(tmp_path):
    msg = error_of(tmp_path, "optim = 3\n")
    assert "optim" in msg and "table" in msg
    msg = error_of(tmp_path, 'model = "resnet9"\n', ["model.scale=0.1"])  # an easy slip for [model]
    assert "'model' must be a table [model]" in msg and "--set model.scale" in msg


def test_model_options_go_to_the_model(tmp_path):
    cfg = load_recipe(write(tmp_path, '[model]\nname = "mnist_8k"\ndropout = 0.1\npool = "max"\n'))
    assert cfg.model.name == "mnist_8k" and cfg.model.options == {"dropout": 0.1, "pool": "max"}


# ----------------------------------------------------------------------------- types and values


@pytest.mark.parametrize("text, needle", [
    ('[optim]\nlr = "fast"\n', "optim.lr = 'fast': expected a number"),
    ("[optim]\nlr = true\n", "optim.lr = True: expected a number"),
    ("[train]\nepochs = 2.5\n", "train.epochs = 2.5: expected an integer"),
    ("[train]\nepochs = 3.0\n", "train.epochs = 3.0: expected an integer"),
    ("[train]\nepochs = true\n", "train.epochs = True: expected an integer"),
    ('[train]\nepochs = "3"\n', "train.epochs = '3': expected an integer"),
    ("[optim]\nnesterov = 1\n", "optim.nesterov = 1: expected true or false"),
    ('[train]\nquiet = "yes"\n', "train.quiet = 'yes': expected true or false"),
    ("[data]\ndataset = 5\n", "data.dataset = 5: expected a string"),
    ("[schedule]\nknots = 3\n", "schedule.knots = 3: expected a list"),
    ('[optim]\nname = "rmsprop"\n', "optim.name = 'rmsprop': expected one of sgd, adam, adamw"),
    ('[schedule]\nname = "cosine"\n', "expected one of constant, onecycle, cyclic, inverse, step, piecewise"),
    ('[train]\ndtype = "fp16"\n', "expected one of float32, bfloat16, float16"),
])
def test_wrong_types_and_choices(tmp_path, text, needle):
    assert needle in error_of(tmp_path, text)


def test_int_is_accepted_for_float_fields(tmp_path):
    cfg = load_recipe(write(tmp_path, "[optim]\nlr = 1\n[schedule]\nrate = 2\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.schedule.rate, float)


@pytest.mark.parametrize("lr", ["0", "0.0", "-0.1"])
def test_lr_must_be_positive(tmp_path, lr):
    msg = error_of(tmp_path, f"[optim]\nlr = {lr}\n")
    assert "optim.lr" in msg and "must be > 0" in msg


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_epochs_must_be_at_least_one(tmp_path, epochs):
    msg = error_of(tmp_path, f"[train]\nepochs = {epochs}\n")
    assert f"train.epochs = {epochs}" in msg and "must be >= 1" in msg


@pytest.mark.parametrize("text, needle", [
    ("[data]\nbatch_size = 0\n", "data.batch_size = 0: must be >= 1"),
    ("[optim]\nlabel_smoothing = 1.0\n", "optim.label_smoothing"),
    ("[train]\nema = 1.0\n", "train.ema"),
    ("[train]\ntarget = 99.4\n", "train.target = 99.4"),
    ("[schedule]\npct_start = 1.0\n", "schedule.pct_start"),
    ('[schedule]\nname = "piecewise"\n', "needs knots and values"),
    ("[schedule]\nknots = [0, 1]\nvalues = [1]\n", "same length"),
    ("[data]\nalternate_flip = true\n", "data.alternate_flip needs data.flip = true"),
    ("[train]\nmicro_batch = -1\n", "train.micro_batch = -1: must be >= 0"),
])
def test_out_of_range_values(tmp_path, text, needle):
    assert needle in error_of(tmp_path, text)


# ----------------------------------------------------------------------------- --set overrides


def test_set_dotted_and_bare_keys(tmp_path):
    r = write(tmp_path, "[optim]\nlr = 0.01\n")
    cfg = load_recipe(r, ["optim.lr=0.1", "epochs=3", "seed = 7", "data.batch_size=32", "momentum=0.5"])
    assert cfg.optim.lr == 0.1 and cfg.train.epochs == 3 and cfg.train.seed == 7
    assert cfg.data.batch_size == 32 and cfg.optim.momentum == 0.5
    assert load_recipe(r, ["lr=2e-3"]).optim.lr == 0.002


def test_set_value_parsing(tmp_path):
    r = write(tmp_path, "")
    cfg = load_recipe(r, [
        "data.flip=true", "train.stop_at_target=false", "data.dataset=fashion-mnist", 'train.device="cpu"',
        "schedule.knots=[0, 5, 24]", "schedule.values=[0, 0.4, 0]", "schedule.name=piecewise",
        "optim.weight_decay=5e-4", "data.subset=1_000", "model.dropout=0.1", "optim.betas=[0.8, 0.99]",
    ])
    assert cfg.data.flip is True and cfg.train.stop_at_target is False
    assert cfg.data.dataset == "fashion-mnist" and cfg.train.device == "cpu"
    assert cfg.schedule.knots == [0, 5, 24] and cfg.schedule.values == [0, 0.4, 0]
    assert cfg.schedule.name == "piecewise"
    assert cfg.optim.weight_decay == 5e-4 and cfg.data.subset == 1000
    assert cfg.model.options == {"dropout": 0.1} and cfg.optim.betas == [0.8, 0.99]


def test_set_overrides_the_recipe_file(tmp_path):
    r = write(tmp_path, "[optim]\nlr = 0.01\nmomentum = 0.9\n[train]\nepochs = 9\n")
    cfg = load_recipe(r, ["lr=0.3", "train.epochs=2"])
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs) == (0.3, 0.9, 2)


def test_set_ambiguous_bare_key(tmp_path):
    with pytest.raises(CnnlabError) as e:
        load_recipe(write(tmp_path, ""), ["name=adam"])
    msg = str(e.value)
    assert "--set name" in msg and "model, optim, schedule" in msg and "table.key" in msg


def test_set_unknown_bare_key(tmp_path):
    with pytest.raises(CnnlabError, match="in no table"):
        load_recipe(write(tmp_path, ""), ["nosuchkey=1"])


def test_set_unknown_dotted_key_and_table(tmp_path):
    with pytest.raises(CnnlabError, match="unknown key optim.lrr.*did you mean 'lr'"):
        load_recipe(write(tmp_path, ""), ["optim.lrr=0.1"])
    with pytest.raises(CnnlabError, match=r"unknown table \[trian\].*did you mean 'train'"):
        load_recipe(write(tmp_path, ""), ["trian.epochs=2"])


def test_set_without_equals(tmp_path):
    with pytest.raises(CnnlabError, match="expected key=value"):
        load_recipe(write(tmp_path, ""), ["optim.lr"])


@pytest.mark.parametrize("item, needle", [
    ("lr=fast", "expected a number"),
    ("epochs=1.5", "expected an integer"),
    ("epochs=true", "expected an integer"),
    ("nesterov=1", "expected true or false"),
    ("lr=0", "must be > 0"),
    ("epochs=0", "must be >= 1"),
])
def test_set_values_are_checked(tmp_path, item, needle):
    with pytest.raises(CnnlabError, match=needle):
        load_recipe(write(tmp_path, ""), [item])


# ----------------------------------------------------------------------------- TOML round trip


def test_to_toml_round_trip_of_a_non_default_config(tmp_path):
    cfg = Config()
    cfg.model.name = "mnist_8k"
    cfg.model.options = {"dropout": 0.1, "pool": "max", "width": 1.5}
    cfg.data = dataclasses.replace(cfg.data, dataset='we "ird" \\ path/ü', root="/tmp/x", val_split=5000, subset=123,
                                   batch_size=64, flip=True, crop_mode="reflect", cutout=8, cutout_p=0.5)
    cfg.optim = dataclasses.replace(cfg.optim, name="adamw", lr=3e-4, eps=1e-8, betas=[0.8, 0.999], decay=1e-6,
                                    decay_bn_and_bias=False, label_smoothing=0.1, grad_clip=1.0, weight_decay=5e-4)
    cfg.schedule = dataclasses.replace(cfg.schedule, name="piecewise", knots=[0, 5, 24], values=[0.0, 0.4, 0.0],
                                       warmup_epochs=0.5, final_div_factor=1e4, anneal="linear", cycle_momentum=False)
    cfg.train = dataclasses.replace(cfg.train, epochs=24, seed=3, dtype="bfloat16", target=0.94, patience=3,
                                    ema=0.999, tta=True, quiet=True, stop_at_target=False, channels_last=True)
    config.validate(cfg)
    text = config.to_toml(cfg)
    again = load_recipe(write(tmp_path, text))
    assert again == cfg
    assert config.to_toml(again) == text
    # every field appears in the written recipe, under its table
    for section, table in config.to_dict(cfg).items():
        assert f"[{section}]" in text
        for key in table:
            assert any(line.startswith(f"{key} = ") for line in text.splitlines()), key


def test_to_toml_round_trip_after_overrides(tmp_path):
    cfg = load_recipe(RECIPES[0].parent / "mnist_tiny.toml", ["lr=0.05", "data.subset=1000", "train.target=0.9"])
    assert load_recipe(write(tmp_path, config.to_toml(cfg))) == cfg


# ----------------------------------------------------------------------------- recipe files


def test_recipe_missing(tmp_path):
    with pytest.raises(CnnlabError, match="no such file"):
        load_recipe(tmp_path / "nope.toml")
    with pytest.raises(CnnlabError, match="no such file"):
        load_recipe(tmp_path)  # a directory is not a recipe


@pytest.mark.parametrize("content", [b"[optim\nlr = 0.1\n", b"lr = = 3\n", b"\xff\xfe\x00binary\x00\x81"])
def test_recipe_not_toml(tmp_path, content):
    p = tmp_path / "bad.toml"
    p.write_bytes(content)
    with pytest.raises(CnnlabError) as e:
        load_recipe(p)
    assert "not valid TOML" in str(e.value) and str(p) in str(e.value)
