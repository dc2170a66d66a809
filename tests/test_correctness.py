"""The correctness fixes of issue 18: stratified image-folder carving through training, the user's
matplotlib backend left alone, OSError handling and --debug at the CLI, evaluation on the run's
device, and config.toml written for any value a recipe can hold."""

from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import cnnlab
from cnnlab import config, evaluate, summary, train
from cnnlab.cli import main
from cnnlab.errors import CnnlabError

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- image folders through training


def test_training_subset_of_an_image_folder_keeps_every_class(tmp_path, writers):
    """The folder's files come sorted by class: the first 6 of 12 were classes 0 and 1 only."""
    fake = writers.write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=4, layout="single",
                                      mode="L")
    cfg = config.from_dict({"model": {"name": "mnist_tiny"},
                            "data": {"dataset": str(fake.root), "root": str(tmp_path / "cache"), "val_split": 3,
                                     "subset": 6, "batch_size": 2}})
    resolved, ds = train.load_data(cfg)
    assert torch.bincount(ds.test.labels, minlength=3).tolist() == [1, 1, 1]
    assert torch.bincount(ds.train.labels, minlength=3).tolist() == [2, 2, 2]
    assert resolved.data.dataset == str(fake.root.resolve()) and cfg.data.dataset == str(fake.root)


# ----------------------------------------------------------------------------- plots and the user's backend


def test_importing_cnnlab_leaves_the_matplotlib_backend_alone(tmp_path):
    code = ("import matplotlib; before = matplotlib.get_backend(); import cnnlab.plots, cnnlab.report, cnnlab.cli; "
            "from cnnlab import plots; plots.plot_confusion([[1, 0], [0, 1]], ['a', 'b'], 'c.png'); "
            "print(before, matplotlib.get_backend())")
    env = {**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "svg"]  # it was switched to Agg at import
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"  # the pictures are still drawn (Agg canvas)


# ----------------------------------------------------------------------------- OSError and --debug at the CLI


def test_oserror_on_a_user_path_is_one_line(tmp_path, cli, check, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = cli("train", "r" * 300 + ".toml")  # the name is too long for the file system
    check.one_line_error(rc, err, "File name too long", "r" * 300)


def oserror_in_cnnlab(monkeypatch, exc: OSError) -> None:
    def broken():
        raise exc

    monkeypatch.setattr(summary, "models_table", broken)


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file or directory", str(Path(cnnlab.__file__).parent / "zoo.json")),
    OSError(errno.EIO, "Input/output error"),  # names no file at all
])
def test_oserror_inside_cnnlab_is_not_hidden(monkeypatch, exc):
    """A bug that raises OSError on cnnlab's own files (or on none) keeps its traceback."""
    oserror_in_cnnlab(monkeypatch, exc)
    with pytest.raises(OSError) as raised:
        main(["models"])
    assert raised.value is exc


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, cli, check, monkeypatch, how):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "missing.toml"]
    rc, _, err = cli(*argv)
    check.one_line_error(rc, err, "no such file")
    if how == "flag":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("CNNLAB_DEBUG", "1")
    rc, _, err = cli(*argv)
    assert rc == 2
    assert "Traceback (most recent call last)" in err and "load_recipe" in err  # where it was raised
    assert err.strip().splitlines()[-1].startswith("error: recipe missing.toml: no such file")


# ----------------------------------------------------------------------------- evaluation on the run's device


@pytest.mark.parametrize("device,cuda,count,expected", [
    ("auto", False, 0, "cpu"), ("cuda", False, 0, "cpu"), ("cuda:1", False, 0, "cpu"),
    ("cpu", True, 1, "cpu"), ("auto", True, 1, "cuda"), ("cuda", True, 2, "cuda"),
    ("cuda:1", True, 2, "cuda:1"), ("cuda:3", True, 2, "cuda"),
])
def test_run_device(monkeypatch, device, cuda, count, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert evaluate.run_device({"config": {"train": {"device": device}}}) == torch.device(expected)


def test_evaluate_runs_on_the_runs_device(tmp_path, mnist_run):
    """On a GPU machine a run trained on CUDA is evaluated there (it was always the CPU before)."""
    ev = evaluate.evaluate(mnist_run, out_dir=tmp_path)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert ev.summary["device"].startswith(want)
    assert next(ev.model.parameters()).device.type == want
    row = train.runs.read_metrics(mnist_run)[-1]
    assert ev.summary["accuracy"] == pytest.approx(row["val_acc"], abs=1e-6)  # the run's own number, re-measured


# ----------------------------------------------------------------------------- config.toml for any recipe value


def round_trip(options: dict) -> dict:
    cfg = config.Config()
    cfg.model.options = options
    return tomllib.loads(config.to_toml(cfg))["model"]


def test_to_toml_writes_arrays_of_strings_nested_arrays_and_tables():
    options = {"layers": ["conv 32 k3", ["res", ["conv 32", "conv 32"]], "gpool", "linear 10"],
               "names": ["a\"b", "back\\slash", "tab\there", "new\nline", "del\x7f", "bell\x07", "é 😀 中"],
               "grid": [[1, 2], [3.5, -4]], "table": {"a": 1, "b c": ["x"]}, "weird key": True,
               "inf": float("inf")}
    back = round_trip(options)
    assert back == {"name": "mnist_tiny", "max_params": 0, "max_macs": 0, **options}
    assert math.isnan(round_trip({"n": float("nan")})["n"])


@pytest.mark.parametrize("value", [None, object(), {1, 2}, b"bytes", "bad \udcff bytes"])
def test_to_toml_refuses_what_toml_cannot_hold_in_one_line(value):
    cfg = config.Config()
    cfg.model.options = {"odd": value}
    with pytest.raises(CnnlabError) as e:
        config.to_toml(cfg)
    assert "model.odd" in str(e.value) and "\n" not in str(e.value)
