"""Any Python callable as a model (``[model] name = "file.py:function"``), and models without
``features``/``head``: one-line errors, the checkpoint's record of the file, and the whole CLI
(summary, train, Ctrl-C + --resume, evaluate, report, bench, lr-find) in fresh processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_as_default
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import gradcam, models, runs
from cnnlab.config import load_recipe
from cnnlab.errors import CnnlabError
from cnnlab.layers import Residual
from cnnlab.summary import summarize
from test_train import assert_one_line_error, mnist_ok, run_cli  # noqa: F401 (mnist_ok: a fixture)

ROOT = Path(__file__).resolve().parents[1]

NETS = '''
import torch
from torch import nn


class Add(nn.Module):
    """x + f(x), written the way a user would."""

    def __init__(self, *layers):
        super().__init__()
        self.f = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.f(x)


def build(num_classes, width=8):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.MaxPool2d(2),                                                      # 14
        Add(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()),
        nn.MaxPool2d(2),                                                      # 7
        nn.Conv2d(width, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU(),  # 5
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )


def not_a_module(num_classes):
    return [nn.Linear(4, num_classes)]


def wrong_output(num_classes):
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten())


def raises(num_classes):
    return nn.Sequential(nn.Conv2d(1, num_classes, undefined_name))
'''

TRAINING = '''
[data]
dataset = "mnist"
subset = 2048
val_split = 250
eval_batch_size = 250
batch_size = 128

[optim]
lr = 0.05
nesterov = true

[train]
epochs = 3
threads = 1
dtype = "float32"
quiet = true
'''

DESIGN = '''[model]
name = "small_res"
layers = ["conv 8 p1", "maxpool 2", ["res", "conv 8 p1", "conv 8 p1"], "maxpool 2", "conv 16", "gap",
          "linear classes"]
'''


def write_user_files(root: Path) -> tuple[Path, Path]:
    """``root/nets/my_nets.py`` and ``root/recipes/mine.toml`` (which names it relative to itself)."""
    (root / "nets").mkdir(parents=True)
    (root / "recipes").mkdir()
    nets = root / "nets" / "my_nets.py"
    nets.write_text(NETS)
    recipe = root / "recipes" / "mine.toml"
    recipe.write_text('[model]\nname = "../nets/my_nets.py:build"\nwidth = 8\n' + TRAINING)
    return nets, recipe


RAISING_LINE = 1 + next(i for i, line in enumerate(NETS.splitlines()) if "undefined_name" in line)


# ----------------------------------------------------------------------------- references


def test_reference_is_resolved_against_the_recipe_folder_and_recorded(tmp_path, monkeypatch):
    nets, recipe = write_user_files(tmp_path)
    monkeypatch.chdir(tmp_path / "nets")  # neither the recipe's folder nor the repository
    cfg = load_recipe(recipe)
    assert cfg.model.name == f"{nets.resolve()}:build" and cfg.model.options == {"width": 8}
    assert models.label(cfg.model.name) == "my_nets.py:build"
    model = models.build(cfg.model.name, cfg.model.options, 10, (1, 28, 28))
    assert isinstance(model, nn.Sequential) and model[-1].out_features == 10
    record = models.source(cfg.model.name)
    assert record["path"] == str(nets.resolve()) and len(record["sha256"]) == 64
    assert models.source_changed(record) is None
    nets.write_text(NETS + "\n# a comment\n")
    assert "changed since the checkpoint was saved" in models.source_changed(record)
    assert models.source("mnist_tiny") is None and models.source("design") is None


def test_package_module_reference(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = models.build("mypkg.nets:build", {"width": 4}, 3, (1, 28, 28))
    assert model[0].out_channels == 4 and model[-1].out_features == 3
    assert models.source("mypkg.nets:build")["path"] == str((pkg / "nets.py").resolve())


@pytest.mark.parametrize("name, options, needles", [
    ("nets/missing.py:build", {}, ["no file nets/missing.py in", "relative to the recipe's folder"]),
    ("nets/my_nets.py:buld", {}, ["has no function 'buld'", "its functions: build, not_a_module"]),
    ("nets/my_nets.py:not_a_module", {}, ["not_a_module returned a list, not a torch.nn.Module"]),
    ("nets/my_nets.py:wrong_output", {}, ["gives outputs of shape (2704,)", "not 10 class scores"]),
    ("nets/my_nets.py:raises", {}, [f"raised NameError: name 'undefined_name' is not defined (my_nets.py line "
                                    f"{RAISING_LINE})"]),
    ("nets/my_nets.py:build", {"depth": 3}, ["my_nets.py:build cannot take (num_classes, depth)",
                                             "its parameters are (num_classes, width)"]),
    ("nets/broken.py:build", {}, ["broken.py raised ZeroDivisionError: division by zero (broken.py line 2) "
                                  "while being imported"]),
    ("no_such_package.nets:build", {}, ["no module named 'no_such_package'"]),
    ("nets/my_nets.py:", {}, ["expected 'path/to/file.py:function'"]),
])
def test_bad_references_are_one_line_errors(tmp_path, capsys, name, options, needles):
    write_user_files(tmp_path)
    (tmp_path / "nets" / "broken.py").write_text("import torch\nx = 1 / 0\n")
    extra = "".join(f"{k} = {v}\n" for k, v in options.items())
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'[model]\nname = "{name}"\n{extra}' + TRAINING)
    rc, out, err = run_cli(capsys, "summary", recipe)
    assert_one_line_error(rc, err, *needles)


# ----------------------------------------------------------------------------- plain modules everywhere


def plain_net(residual) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())),
                         nn.Conv2d(4, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


class FunctionalConv(nn.Module):
    """A layer cnnlab cannot follow: a conv called as a function, with a weight of its own."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 1, 5, 5))

    def forward(self, x):
        return F.conv2d(x, self.weight)


class UserAdd(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


def test_receptive_field_is_exact_where_known_and_unknown_otherwise():
    known = summarize(plain_net(Residual), input_shape=(1, 16, 16))
    # conv 3, pool 4 (j2), residual 4+2*2 = 8, conv 12, global pool over the 6x6 map: 12 + 5*2 = 22
    assert known.receptive_field == 22 and all(r.rf is not None for r in known.rows)
    unknown = summarize(plain_net(UserAdd), input_shape=(1, 16, 16))
    assert unknown.receptive_field is None
    rfs = [r.rf for r in unknown.rows]
    assert rfs[:3] == [3, 3, 4] and all(rf is None for rf in rfs[3:])  # from the user's module on: "?"
    text = unknown.to_text()
    assert "Receptive field: ?" in text and " ?  " in text
    assert (unknown.total_params, unknown.macs) == (known.total_params, known.macs)


def test_summary_lists_every_leaf_and_counts_functional_convs():
    model = nn.Sequential(FunctionalConv(), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 24 * 24, 10))
    s = summarize(model, input_shape=(1, 28, 28))
    assert [r.name for r in s.rows] == ["0", "1", "2", "3"] and s.rows[0].params == 100
    assert s.macs == 4 * 24 * 24 * 25 + 4 * 24 * 24 * 10  # the functional conv counts
    assert s.receptive_field is None and s.rows[0].rf is None


def test_gradcam_and_activations_of_a_plain_sequential():
    model = plain_net(UserAdd).eval()
    x = torch.randn(2, 1, 16, 16)
    with gradcam.GradCAM(model, input_shape=(1, 16, 16)) as cam:
        maps = cam(x)
    assert cam.layer == "4" and maps.shape == (2, 16, 16)  # the last layer with a spatial output
    acts = gradcam.activations(model, x[0])
    assert list(acts) == [str(i) for i in range(8)]  # every top-level layer
    assert acts["3"].shape == (1, 4, 8, 8)


def test_protocol_hooks_are_optional():
    model = plain_net(Residual)
    assert models.body(model) is model and models.input_shape(model) is None
    models.init_from_data(model, torch.zeros(1, 1, 16, 16))  # no hook: nothing happens
    models.start_epoch(model, 1)
    zoo = models.create_model("mnist_tiny")
    assert models.body(zoo) is zoo.features and models.input_shape(zoo) == (1, 28, 28)


def test_zoo_rules_are_not_applied_to_other_models(tmp_path):
    nets, _ = write_user_files(tmp_path)
    # width=8 is in range for the zoo; a user's function decides its own rules: 100 is fine here
    model = models.build(f"{nets}:build", {"width": 100}, 10, (1, 28, 28))
    assert model[0].out_channels == 100


# ----------------------------------------------------------------------------- the CLI, fresh processes


def cli(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CNNLAB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "cnnlab.cli", *map(str, args)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def interrupted_run(recipe: Path, out: Path, cwd: Path) -> None:
    """``cnnlab train`` in its own process, Ctrl-C (SIGINT) once the first epoch is saved."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CNNLAB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cnnlab.cli", "train", str(recipe), "--out", str(out)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_default)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"
    assert runs.load_checkpoint(out)["epoch"] < 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["python file", "layer list"])
def test_whole_cli_in_fresh_processes(tmp_path, kind, mnist_ok):
    nets, recipe = write_user_files(tmp_path)
    if kind == "layer list":
        recipe.write_text(DESIGN + TRAINING)
    work = tmp_path / "elsewhere"  # every command runs from a folder that is neither the recipe's nor the repo
    work.mkdir()
    rel = Path("..") / "recipes" / "mine.toml"

    out = cli("summary", rel, cwd=work).stdout
    assert "Total params:" in out and "MACs per image:" in out
    assert ("Receptive field: ?" in out) == (kind == "python file")  # the user's Add is not followed

    interrupted_run(rel, work / "run", work)
    res = cli("train", "--resume", "run", cwd=work)
    result = json.loads((work / "run" / "result.json").read_text())
    assert result["status"] == "done" and result["epochs_run"] == 3 and "run" in res.stdout
    ckpt = runs.load_checkpoint(work / "run")
    if kind == "python file":
        assert ckpt["model_source"]["path"] == str(nets.resolve()) and result["model"] == "my_nets.py:build"
    else:
        assert ckpt["model_source"] is None and ckpt["model_options"]["layers"][2][0] == "res"

    cli("evaluate", "run", cwd=work)
    ev = json.loads((work / "run" / "eval.json").read_text())
    assert ev["accuracy"] > 0.5 and "gradcam.png" in ev["pictures"] and "activations.png" in ev["pictures"]
    cli("report", "run", cwd=work)
    assert (work / "run" / "report.html").stat().st_size > 1000
    cli("bench", rel, "--seeds", "1", "--target", "0.2", "--out", "bench", "--set", "train.epochs=1", cwd=work)
    assert json.loads((work / "bench" / "bench.json").read_text())["runs"][0]["epochs_run"] == 1
    cli("lr-find", rel, "--steps", "12", "--out", "lr", cwd=work)
    assert json.loads((work / "lr" / "lr_find.json").read_text())["suggestion"] > 0


@pytest.mark.slow
def test_changed_file_warns_or_refuses(tmp_path, capsys, mnist_ok, monkeypatch):
    nets, recipe = write_user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "train", recipe, "--out", "run", "--set", "train.epochs=1")
    assert rc == 0, err
    nets.write_text(NETS + "\n# tuned a comment\n")  # same architecture
    rc, _, err = run_cli(capsys, "evaluate", "run")
    assert rc == 0 and err.count("\n") == 1 and "changed since the checkpoint was saved" in err
    assert "weights still fit" in err
    nets.write_text(NETS.replace("nn.Conv2d(width, 16, 3", "nn.Conv2d(width, 24, 3").replace(
        "BatchNorm2d(16)", "BatchNorm2d(24)").replace("nn.Linear(16,", "nn.Linear(24,"))
    rc, _, err = run_cli(capsys, "evaluate", "run")
    assert_one_line_error(rc, err, "my_nets.py changed since the checkpoint was saved",
                          "weights no longer fit", "restore the file")
    rc, _, err = run_cli(capsys, "train", "--resume", "run")
    assert_one_line_error(rc, err, "weights no longer fit")
    nets.unlink()
    rc, _, err = run_cli(capsys, "evaluate", "run")
    assert_one_line_error(rc, err, "my_nets.py: no such file")


def test_build_checks_num_classes_for_every_kind(tmp_path):
    nets, recipe = write_user_files(tmp_path)
    for name, options in ((f"{nets}:build", {}), ("mnist_tiny", {}), ("d", {"layers": ["conv 4", "gap"]})):
        with pytest.raises(CnnlabError, match="num_classes=0 must be a positive integer"):
            models.build(name, options, 0, (1, 28, 28))
