"""The training loop, run directories, resume, stops and bad input (issue 4).

Everything trains ``mnist_tiny`` on real MNIST (the cached copy under ``$CNNLAB_DATA``). Apart from
the one accuracy test, runs use a few hundred training images and hold out the last 250 training
images as the evaluation split, so an epoch takes about a second even on a busy 2-core machine.
Training uses one CPU thread: deterministic, and much faster than two when the cores are shared.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cnnlab import config, layers, runs
from cnnlab import train as train_mod
from cnnlab.augment import Loader
from cnnlab.cli import main
from cnnlab.config import load_recipe
from cnnlab.data import load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import loss_and_accuracy, predict
from cnnlab.models import create_model
from cnnlab.summary import summarize
from cnnlab.train import Interrupted, train
from conftest import assert_one_line_error, sigint_as_default, snapshot

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TINY_RECIPE = ROOT / "recipes" / "mnist_tiny.toml"
SEED002_RECIPE = ROOT / "recipes" / "mnist_seed002.toml"
FAST = ["train.quiet=true", "train.dtype=float32", "train.threads=1"]
# 512 training images (4 steps of 128), the last 250 training images as the evaluation split
VAL = 250
TINY = FAST + ["data.subset=512", f"data.val_split={VAL}", f"data.eval_batch_size={VAL}", "data.batch_size=128",
               "train.epochs=2", "train.target=0"]
# for tests whose accuracies are faked: 2 steps of 64 images per epoch
MINI = ["data.subset=128", "data.batch_size=64"]
METRIC_KEYS = {"epoch", "lr", "train_loss", "train_acc", "images", "val_loss", "val_acc", "tta", "epoch_seconds", "train_seconds",
               "wall_seconds"}
RESULT_KEYS = {"model", "dataset", "params", "epochs_run", "final_val_acc", "best_val_acc", "train_seconds",
               "wall_seconds", "eval_split", "selected_on", "target",
               "time_to_target_s", "seed", "device", "dtype", "torch_version", "git_commit", "status"}


@pytest.fixture(scope="module")
def mnist_ok():
    """The real MNIST cache must be there (CNNLAB_DATA); fail loudly rather than skip."""
    ds = load_dataset("mnist", acquire=False, log=lambda *a: None)
    assert len(ds.train) == 60000 and len(ds.test) == 10000
    return ds


def tiny(*extra: str, recipe: Path = TINY_RECIPE) -> config.Config:
    return load_recipe(recipe, TINY + list(extra))


def evaluate_checkpoint(ckpt: dict, split, tta: bool = False, use_ema: bool = True) -> tuple[float, float]:
    model = runs.model_from_checkpoint(ckpt, use_ema=use_ema)
    d = ckpt["dataset"]
    loader = Loader(split.images, split.labels, VAL, d["mean"], d["std"])
    return loss_and_accuracy(*predict(model, loader, tta))


def val_split_of(n: int = VAL):
    return load_dataset("mnist", val_split=n, acquire=False, log=lambda *a: None).test


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- a real run and its directory


def test_short_mnist_run_exceeds_97_percent_and_writes_a_complete_run_dir(tmp_path, mnist_ok):
    # 6000 images, 2 epochs of OneCycle (batch 64): ~97.7 % on the 10,000 test images in ~20 s of training
    cfg = load_recipe(TINY_RECIPE, FAST + ["data.subset=6000", "data.batch_size=64", "train.epochs=2"])
    out = tmp_path / "run"
    res = train(cfg, out)
    r = res.result
    assert r["final_test_acc"] > 0.97, res.history
    assert r["status"] == "done" and r["eval_split"] == "test"

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.pt", "config.toml", "last.pt", "metrics.jsonl", "result.json", "summary.txt"])

    # config.toml: the resolved recipe, read back to an equal config
    assert load_recipe(out / "config.toml") == cfg

    # metrics.jsonl: one row per epoch, train_seconds cumulative and increasing
    rows = runs.read_metrics(out)
    assert rows == res.history and len(rows) == 2
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        # no validation split: the evaluation is on the test set and is named so
        assert set(row) == {k.replace("val_", "test_") for k in METRIC_KEYS}
        assert 0 < row["lr"] and 0 <= row["train_acc"] <= 1 and 0 <= row["test_acc"] <= 1
        assert row["epoch_seconds"] > 0
    assert rows[0]["train_seconds"] == pytest.approx(rows[0]["epoch_seconds"])
    assert rows[1]["train_seconds"] == pytest.approx(rows[0]["epoch_seconds"] + rows[1]["epoch_seconds"])
    assert rows[1]["train_seconds"] > rows[0]["train_seconds"]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]

    # result.json
    result = json.loads((out / "result.json").read_text())
    assert {k.replace("_val_", "_test_") for k in RESULT_KEYS} <= set(result)
    assert result["selected_on"] == "test" and "test set" in result["note"]
    assert result == json.loads(json.dumps(r))
    assert (result["model"], result["dataset"], result["epochs_run"], result["seed"]) == ("mnist_tiny", "mnist", 2, 0)
    assert result["params"] == summarize("mnist_tiny", dropout=0.05).total_params
    assert result["final_test_acc"] == rows[-1]["test_acc"]
    assert result["best_test_acc"] == max(row["test_acc"] for row in rows)
    assert not any(k.startswith("val_") or "_val_" in k for k in [*result, *rows[0]])
    assert result["train_seconds"] == pytest.approx(rows[-1]["train_seconds"])
    assert result["target"] == 0.994 and result["time_to_target_s"] is None  # the recipe's target, not reached
    assert (result["device"], result["dtype"], result["torch_version"]) == ("cpu", "float32", torch.__version__)
    assert re.fullmatch(r"[0-9a-f]{40}", result["git_commit"] or ""), result["git_commit"]
    assert result["git_dirty"] in (True, False)  # uncommitted changes to tracked files, when it started
    assert result["code"] == [{"commit": result["git_commit"], "dirty": result["git_dirty"], "from_epoch": 1,
                              "processes": 1}]

    # last.pt rebuilds the model, which scores exactly what was recorded on the test set
    last = runs.load_checkpoint(out, "last")
    assert last["epoch"] == 2 and last["model_name"] == "mnist_tiny" and last["model_options"] == {"dropout": 0.05}
    assert config.from_dict(last["config"]) == cfg
    test_loss, test_acc = evaluate_checkpoint(last, mnist_ok.test)
    assert test_acc == pytest.approx(rows[-1]["test_acc"], abs=1e-6)
    assert test_loss == pytest.approx(rows[-1]["test_loss"], rel=1e-5)
    # best.pt: the epoch with the best accuracy (the same weights when that is the last epoch)
    best = runs.load_checkpoint(out, "best")
    best_epoch = max(rows, key=lambda row: row["test_acc"])["epoch"]
    assert best["epoch"] == best_epoch
    if best_epoch == last["epoch"]:
        assert same_state(best["state_dict"], last["state_dict"])
    else:
        assert evaluate_checkpoint(best, mnist_ok.test)[1] == pytest.approx(rows[best_epoch - 1]["test_acc"], abs=1e-6)

    summary = (out / "summary.txt").read_text()
    assert f"{result['params']:,}" in summary and "Conv2d" in summary


# ----------------------------------------------------------------------------- resume


def check_checkpoints_score_what_was_recorded(out: Path, history: list[dict]) -> None:
    """last.pt and best.pt rebuild models that score exactly what metrics.jsonl says for their epochs."""
    split = val_split_of()
    for which in ("last", "best"):
        ckpt = runs.load_checkpoint(out, which)
        row = history[ckpt["epoch"] - 1]
        loss, acc = evaluate_checkpoint(ckpt, split)
        assert acc == pytest.approx(row["val_acc"], abs=1e-6) and loss == pytest.approx(row["val_loss"], rel=1e-5)
    accs = [row["val_acc"] for row in history]
    assert runs.load_checkpoint(out, "best")["epoch"] == accs.index(max(accs)) + 1  # first epoch with the best
    assert runs.load_checkpoint(out, "last")["epoch"] == len(history)


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, interrupt_at_epoch, mnist_ok):
    # crop, alternating flip (epoch parity) and dropout: both RNGs and the epoch matter
    cfg = tiny("train.epochs=3", "data.flip=true", "data.alternate_flip=true")
    full = train(cfg, tmp_path / "full")
    check_checkpoints_score_what_was_recorded(tmp_path / "full", full.history)

    disarm = interrupt_at_epoch(3)
    out = tmp_path / "cut"
    with pytest.raises(Interrupted) as e:
        train(cfg, out)
    assert e.value.run_result.result["status"] == "interrupted"
    assert json.loads((out / "result.json").read_text())["status"] == "interrupted"
    assert runs.load_checkpoint(out, "last")["epoch"] == 2 and len(runs.read_metrics(out)) == 2
    disarm()

    resumed = train(None, out, resume=True)
    assert resumed.result["status"] == "done" and resumed.result["epochs_run"] == 3
    timing = {"epoch_seconds", "train_seconds", "wall_seconds"}
    strip = [{k: v for k, v in row.items() if k not in timing} for row in full.history]
    assert [{k: v for k, v in row.items() if k not in timing} for row in resumed.history] == strip
    assert runs.read_metrics(out) == resumed.history
    a, b = runs.load_checkpoint(tmp_path / "full"), runs.load_checkpoint(out)
    assert same_state(a["state_dict"], b["state_dict"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(same_state(sa[k], sb[k]) for k in sa)
    # the code it trained with: the start's checkout, then the resume's (from epoch 3)
    assert [c["from_epoch"] for c in resumed.result["code"]] == [1, 3]
    assert {c["commit"] for c in resumed.result["code"]} == {full.result["git_commit"]}
    assert resumed.result["git_commit"] == full.result["git_commit"]
    # cumulative training time continues from the interrupted run
    assert resumed.history[2]["train_seconds"] == pytest.approx(
        resumed.history[1]["train_seconds"] + resumed.history[2]["epoch_seconds"])


def test_resume_of_a_finished_run_changes_nothing_in_history(tmp_path, mnist_ok):
    out = tmp_path / "run"
    first = train(tiny("train.epochs=1"), out)
    again = train(None, out, resume=True)
    assert again.history == first.history and again.result["epochs_run"] == 1
    assert again.result["code"] == first.result["code"]  # no second entry: nothing ran


# ----------------------------------------------------------------------------- divergence


def test_nan_stop_keeps_the_last_good_checkpoint(tmp_path, mnist_ok):
    # epoch 1 at lr 0.01, then the LR ramps to 1e10 in epoch 2: the loss becomes NaN there
    cfg = tiny("train.epochs=4", "optim.lr=0.01", "schedule.name=piecewise", "schedule.knots=[0, 1, 1.25]",
               "schedule.values=[1, 1, 1e12]")
    out = tmp_path / "run"
    with pytest.raises(CnnlabError) as e:
        train(cfg, out)
    msg = str(e.value)
    history = runs.read_metrics(out)
    assert len(history) >= 1
    m = re.search(r"at epoch (\d+), step (\d+)", msg)
    assert m, msg
    assert int(m.group(1)) == len(history) + 1 and int(m.group(2)) >= 1
    assert "learning rate" in msg and "optim.lr" in msg and "\n" not in msg
    assert str(out / "last.pt") in msg and f"(epoch {len(history)})" in msg
    last = runs.load_checkpoint(out, "last")
    assert last["epoch"] == len(history)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["epochs_run"] == len(history)


def test_nan_in_the_first_epoch(tmp_path, mnist_ok):
    out = tmp_path / "run"
    with pytest.raises(CnnlabError, match=r"at epoch 1, step \d+ \(lr 1e\+06\).*learning rate"):
        train(tiny("optim.lr=1e6", "schedule.name=constant"), out)
    assert not (out / "last.pt").exists()
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "diverged" and result["epochs_run"] == 0


def test_nan_stop_through_the_cli_is_one_line(tmp_path, capsys, mnist_ok):
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:  # a warning would be a second stderr line
        warnings.simplefilter("always")
        rc, _, err = run_cli(capsys, "train", TINY_RECIPE, *sum((["--set", s] for s in TINY), []),
                             "--set", "optim.lr=1e6", "--set", "schedule.name=constant", "--out", out)
    assert_one_line_error(rc, err, "epoch 1", "step", "learning rate")
    assert [str(w.message) for w in caught] == []


# ----------------------------------------------------------------------------- Ctrl-C (a real SIGINT)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_saves_state_and_resume_completes(sig, tmp_path, capsys, mnist_ok):
    """Ctrl-C, or ``kill`` (SIGTERM), mid-run: the last finished epoch is kept and the run resumes."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # 2,048 training images: an epoch takes long enough that the signal always lands before the run ends
    sets = TINY + ["train.epochs=3", "data.subset=2298"]
    cmd = [sys.executable, "-m", "cnnlab.cli", "train", str(TINY_RECIPE), "--out", str(out), "--quiet"]
    cmd += sum((["--set", s] for s in sets), [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=sigint_as_default)
    try:
        deadline = time.monotonic() + 120
        while not (runs.read_metrics(out) and (out / "last.pt").is_file() and (out / "best.pt").is_file()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no epoch finished in 120 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    last = runs.load_checkpoint(out, "last")
    done = last["epoch"]
    assert 1 <= done < 3
    assert f"interrupted in epoch {done + 1}; last.pt holds epoch {done}" in stdout, stdout
    assert f"--resume {out}" in stdout, stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "interrupted"
    assert result["epochs_run"] == len(runs.read_metrics(out)) == done

    rc, stdout, err = run_cli(capsys, "train", "--resume", out)
    assert rc == 0, err
    assert "final val acc" in stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and result["epochs_run"] == 3
    assert [row["epoch"] for row in runs.read_metrics(out)] == [1, 2, 3]
    assert runs.load_checkpoint(out, "last")["epoch"] == 3


# ----------------------------------------------------------------------------- bad input, through the CLI


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, mnist_ok) -> Path:
    """A finished 1-epoch run directory (copy it before use)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("existing") / "run"
    train(load_recipe(TINY_RECIPE, TINY + ["train.epochs=1"] + MINI), out)
    torch.set_num_threads(threads)
    return out


def _args(*sets: str) -> list[str]:
    return sum((["--set", s] for s in TINY + list(sets)), [])


def bad_train_cases(tmp_path: Path, writers) -> dict[str, tuple[list, list[str]]]:
    """name -> (argv after ``train``, needles); the run directory is appended as --out ... --overwrite."""
    imgs = writers.write_image_folder(tmp_path / "small-gray", mode="L", size=8, per_class=2, layout="split")
    big = writers.write_image_folder(tmp_path / "big-rgb", size=64, per_class=2, layout="split")
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[optim\nlr = 0.1\n")
    return {
        "unknown key": ([TINY_RECIPE, *_args("optim.lrr=0.1")], ["unknown key optim.lrr", "did you mean 'lr'"]),
        "unknown table": ([TINY_RECIPE, *_args("trian.epochs=2")], ["unknown table [trian]"]),
        "wrong type lr": ([TINY_RECIPE, *_args("lr=fast")], ["optim.lr = 'fast': expected a number"]),
        "wrong type epochs": ([TINY_RECIPE, *_args("epochs=1.5")], ["train.epochs = 1.5: expected an integer"]),
        "bool for int": ([TINY_RECIPE, *_args("data.subset=true")], ["expected an integer"]),
        "lr <= 0": ([TINY_RECIPE, *_args("lr=0")], ["optim.lr = 0.0: must be > 0"]),
        "lr < 0": ([TINY_RECIPE, *_args("lr=-1")], ["must be > 0"]),
        "epochs < 1": ([TINY_RECIPE, *_args("epochs=0")], ["train.epochs = 0: must be >= 1"]),
        "ambiguous key": ([TINY_RECIPE, *_args("name=adam")], ["--set name", "model, optim, schedule"]),
        "batch > dataset": ([TINY_RECIPE, *_args("data.subset=100", "data.batch_size=128")],
                            ["data.batch_size = 128", "100 training images", "batch size <= 100"]),
        "channels": ([TINY_RECIPE, *_args("model.name=cifar_sep92k")],
                     ["cifar_sep92k takes 3-channel images", "1 channel"]),
        "input size": ([TINY_RECIPE, *_args(f"data.dataset={imgs.root}", f"data.root={tmp_path / 'cache'}",
                                            "data.batch_size=2", "data.val_split=0", "data.subset=0")],
                       ["does not fit the model"]),
        "output size": ([ROOT / "recipes" / "cifar_dw56k.toml",
                         *_args(f"data.dataset={big.root}", f"data.root={tmp_path / 'cache'}", "data.batch_size=2",
                                "data.val_split=0", "data.subset=0")],
                        ["cifar_dw56k gives outputs of shape", "not 3 class scores", "global pooling"]),
        "unknown model": ([TINY_RECIPE, *_args("model.name=mnist_tiniest")], ["unknown model 'mnist_tiniest'"]),
        "recipe missing": ([tmp_path / "nope.toml"], ["nope.toml", "no such file"]),
        "not toml": ([bad_toml], ["bad.toml", "not valid TOML"]),
        "lr inf": ([TINY_RECIPE, *_args("lr=inf")], ["optim.lr = inf: expected a finite number"]),
        "weight decay nan": ([TINY_RECIPE, *_args("optim.weight_decay=nan")], ["optim.weight_decay", "finite"]),
        "seed too large": ([TINY_RECIPE, *_args("train.seed=123456789012345678901")], ["train.seed", "out of range", "2**63"]),
        "seed < 0": ([TINY_RECIPE, *_args("train.seed=-1")], ["train.seed = -1: must be >= 0"]),
        "crop_pad >= size": ([TINY_RECIPE, *_args("data.crop_pad=28")], ["data.crop_pad = 28", "28x28 images"]),
        "cutout > size": ([TINY_RECIPE, *_args("data.cutout=29")], ["data.cutout = 29", "28x28 images"]),
    }


def test_bad_train_input_is_one_line_and_keeps_the_run_dir(tmp_path, capsys, writers, existing_run):
    for name, (argv, needles) in bad_train_cases(tmp_path, writers).items():
        run = tmp_path / f"run-{name.replace(' ', '-').replace('<', 'lt').replace('>', 'gt')}"
        shutil.copytree(existing_run, run)
        before = snapshot(run)
        rc, _, err = run_cli(capsys, "train", *argv, "--out", run, "--overwrite")
        assert_one_line_error(rc, err, *needles)
        assert snapshot(run) == before, name


def test_existing_run_dir_needs_overwrite(tmp_path, capsys, existing_run):
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    before = snapshot(run)
    rc, _, err = run_cli(capsys, "train", TINY_RECIPE, *_args(), "--out", run)
    assert_one_line_error(rc, err, str(run), "already holds files", "--overwrite", "--resume")
    assert snapshot(run) == before


def test_resume_without_a_checkpoint(tmp_path, capsys, existing_run):
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    (run / "last.pt").unlink()
    (run / "best.pt").unlink()
    before = snapshot(run)
    rc, _, err = run_cli(capsys, "train", "--resume", run)
    assert_one_line_error(rc, err, "no checkpoint last.pt")
    assert snapshot(run) == before


def test_resume_of_an_empty_or_missing_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "empty")
    assert_one_line_error(rc, err, "no checkpoint last.pt")
    assert list((tmp_path / "empty").iterdir()) == []
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "nowhere")
    assert_one_line_error(rc, err, "no such run directory")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "digit.png").write_bytes(b"\x89PNG")
    for argv in (["evaluate", tmp_path / "digit.png"], ["predict", tmp_path / "digit.png", tmp_path / "digit.png"]):
        rc, _, err = run_cli(capsys, *argv)  # a file where a run directory belongs
        assert_one_line_error(rc, err, "digit.png: a file, not a run directory")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage" * 10])
def test_resume_with_a_corrupt_last_pt(tmp_path, capsys, existing_run, content):
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    (run / "last.pt").write_bytes(content)
    before = snapshot(run)
    rc, _, err = run_cli(capsys, "train", "--resume", run)
    assert_one_line_error(rc, err, "last.pt", "damaged checkpoint")
    assert snapshot(run) == before


def test_resume_with_a_checkpoint_that_is_not_cnnlab(tmp_path, capsys, existing_run):
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    torch.save({"weights": torch.zeros(3)}, run / "last.pt")
    before = snapshot(run)
    rc, _, err = run_cli(capsys, "train", "--resume", run)
    assert_one_line_error(rc, err, "not a cnnlab checkpoint")
    assert snapshot(run) == before


CHECKPOINT_EDITS = {  # a cnnlab checkpoint with one field made wrong -> what the error names
    "config": (lambda c: c.update(config="x"), "config is a str"),
    "model_options": (lambda c: c.update(model_options=None), "model_options is a NoneType"),
    "num_classes": (lambda c: c.update(num_classes="10"), "num_classes is a str"),
    "state_dict": (lambda c: c.update(state_dict=5), "state_dict is a int"),
    "dataset": (lambda c: c.update(dataset={}), "dataset shape None"),
    "classes": (lambda c: c["dataset"].update(classes=["a"]), "do not name its 10 classes"),
    "shape": (lambda c: c["dataset"].update(shape=[1, 28]), "dataset shape [1, 28]"),
    "mean": (lambda c: c["dataset"].update(mean=[0.1, 0.2, 0.3]), "dataset mean"),
}


@pytest.mark.parametrize("field", CHECKPOINT_EDITS)
def test_a_checkpoint_with_a_wrong_field_is_one_line_everywhere(tmp_path, capsys, existing_run, field):
    edit, needle = CHECKPOINT_EDITS[field]
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, run / name)
    before = snapshot(run)
    for argv in (["train", "--resume", run], ["evaluate", run], ["export", run, "--out", tmp_path / "m.onnx"]):
        rc, _, err = run_cli(capsys, *argv)
        assert_one_line_error(rc, err, "not a cnnlab checkpoint", needle)
    assert snapshot(run) == before


@pytest.mark.parametrize("name,content", [("metrics.jsonl", b'{"epoch": 1}\n\xff\xfe junk\n'),
                                          ("metrics.jsonl", b"[1, 2]\n"), ("result.json", bytes(range(256))),
                                          ("result.json", b"[1, 2]")])
def test_a_damaged_json_file_of_a_run_is_one_line(tmp_path, capsys, existing_run, name, content):
    """Not UTF-8, or JSON that is not the object cnnlab wrote: one line naming the file; the runs table
    still lists the run."""
    run = tmp_path / "runs" / "r1"
    shutil.copytree(existing_run, run)
    (run / name).write_bytes(content)
    before = snapshot(run)
    commands = [["report", run]] + ([["compare", run, existing_run]] if name == "metrics.jsonl" else [])
    for argv in commands:  # compare draws the curves, so it needs metrics.jsonl only
        rc, _, err = run_cli(capsys, *argv)
        assert_one_line_error(rc, err, name, "damaged")
    rc, out, err = run_cli(capsys, "runs", tmp_path / "runs")
    assert rc == 0 and "r1" in out, err
    assert snapshot(run) == before


def test_resume_with_a_recipe_is_refused(tmp_path, capsys, existing_run):
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    before = snapshot(run)
    for argv in ([TINY_RECIPE, "--resume", run], ["--resume", run, "--out", tmp_path / "elsewhere"],
                 ["--resume", run, "--overwrite"]):
        rc, _, err = run_cli(capsys, "train", *argv)
        assert_one_line_error(rc, err, "--resume", "pass only --resume RUN_DIR")
    assert snapshot(run) == before and not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------- stops: target and patience


def fake_accuracies(monkeypatch, accs: list[float]) -> None:
    """Make the evaluation report ``accs`` epoch after epoch (the training itself is real)."""
    it = iter(accs)
    monkeypatch.setattr(train_mod, "loss_and_accuracy", lambda logits, labels: (1.0, next(it)))


def test_target_stops_at_the_first_epoch_reaching_it(tmp_path, monkeypatch, mnist_ok):
    fake_accuracies(monkeypatch, [0.3, 0.6, 0.4, 0.8, 0.9])
    res = train(tiny("train.epochs=5", "train.target=0.5", "train.stop_at_target=true", *MINI), tmp_path / "run")
    r = res.result
    assert [row["val_acc"] for row in res.history] == [0.3, 0.6]
    assert (r["status"], r["epochs_run"], r["target_epoch"], r["target"]) == ("target", 2, 2, 0.5)
    assert r["time_to_target_s"] == res.history[1]["train_seconds"]
    assert r["time_to_target_s"] == json.loads((tmp_path / "run" / "result.json").read_text())["time_to_target_s"]


def test_target_without_stopping_keeps_training(tmp_path, monkeypatch, mnist_ok):
    fake_accuracies(monkeypatch, [0.3, 0.6, 0.4, 0.8])
    res = train(tiny("train.epochs=4", "train.target=0.5", "train.stop_at_target=false", *MINI),
                tmp_path / "run")
    r = res.result
    assert r["epochs_run"] == 4 and r["status"] == "target"
    assert r["target_epoch"] == 2 and r["time_to_target_s"] == res.history[1]["train_seconds"]
    assert r["time_to_target_s"] < res.history[-1]["train_seconds"]


def test_target_with_real_accuracy(tmp_path, mnist_ok):
    """The run stops after the first epoch whose real accuracy reaches the target: the target is
    the best accuracy of the same run (same seed) without one."""
    free = [row["val_acc"] for row in train(tiny("train.epochs=5"), None).history]
    target = max(free)
    res = train(tiny("train.epochs=5", f"train.target={target}", "train.stop_at_target=true"), tmp_path / "run")
    accs = [row["val_acc"] for row in res.history]
    assert accs == free[:free.index(target) + 1]
    assert accs[-1] >= target and all(a < target for a in accs[:-1]), accs
    r = res.result
    assert r["status"] == "target" and r["target_epoch"] == len(accs)
    assert r["time_to_target_s"] == res.history[-1]["train_seconds"]


def test_target_not_reached(tmp_path, monkeypatch, mnist_ok):
    fake_accuracies(monkeypatch, [0.3, 0.4])
    r = train(tiny("train.target=0.99", "train.stop_at_target=true", *MINI), tmp_path / "run").result
    assert (r["status"], r["epochs_run"], r["time_to_target_s"], r["target_epoch"]) == ("done", 2, None, None)


def test_patience_early_stop(tmp_path, monkeypatch, mnist_ok):
    fake_accuracies(monkeypatch, [0.5, 0.6, 0.6, 0.55, 0.9, 0.95, 0.97, 0.98])
    out = tmp_path / "run"
    res = train(tiny("train.epochs=8", "train.patience=2", *MINI), out)
    assert [row["val_acc"] for row in res.history] == [0.5, 0.6, 0.6, 0.55]
    assert res.result["epochs_run"] == 4 and res.result["status"] == "done"
    assert runs.load_checkpoint(out, "best")["epoch"] == 2  # an equal accuracy is no improvement
    assert runs.load_checkpoint(out, "last")["epoch"] == 4


def test_no_patience_runs_every_epoch(tmp_path, monkeypatch, mnist_ok):
    fake_accuracies(monkeypatch, [0.5, 0.4, 0.3, 0.2])
    res = train(tiny("train.epochs=4", *MINI), None)
    assert len(res.history) == 4 and res.run_dir is None


# ----------------------------------------------------------------------------- EMA, TTA, loss, optimizers, lr


def test_ema_is_checkpointed_and_used_for_evaluation(tmp_path, existing_run):
    out = tmp_path / "run"
    res = train(tiny("train.ema=0.99"), out)
    last = runs.load_checkpoint(out, "last")
    ema, raw = last["ema_state_dict"], last["state_dict"]
    assert ema is not None and ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    split = val_split_of()
    loss, acc = evaluate_checkpoint(last, split, use_ema=True)
    assert acc == pytest.approx(res.history[-1]["val_acc"], abs=1e-6)
    assert loss == pytest.approx(res.history[-1]["val_loss"], rel=1e-5)
    raw_loss, _ = evaluate_checkpoint(last, split, use_ema=False)
    assert raw_loss != pytest.approx(loss, rel=1e-6)
    # without EMA nothing is saved for it
    assert runs.load_checkpoint(existing_run, "last")["ema_state_dict"] is None


def test_tta_averages_the_mirror(tmp_path, mnist_ok):
    out = tmp_path / "run"
    res = train(tiny("train.tta=true", "train.epochs=1"), out)
    last = runs.load_checkpoint(out, "last")
    split = val_split_of()
    loss, acc = evaluate_checkpoint(last, split, tta=True)
    assert acc == pytest.approx(res.history[-1]["val_acc"], abs=1e-6)
    assert loss == pytest.approx(res.history[-1]["val_loss"], rel=1e-5)
    assert evaluate_checkpoint(last, split, tta=False)[0] != pytest.approx(loss, rel=1e-6)
    # `cnnlab evaluate` evaluates as the run was trained (TTA on) unless told otherwise
    from cnnlab.evaluate import evaluate_run
    ev = evaluate_run(out, "last", n_images=1)
    assert ev["tta"] is True and ev["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert evaluate_run(out, "last", tta=False, n_images=1)["tta"] is False
    shifted = train(tiny("train.tta_shift=1", "train.epochs=1"), tmp_path / "shifted")
    ev = evaluate_run(tmp_path / "shifted", "last", n_images=1)
    assert ev["tta"] is False and ev["tta_shift"] == 1
    assert ev["accuracy"] == pytest.approx(shifted.history[-1]["val_acc"], abs=1e-6)
    assert evaluate_run(tmp_path / "shifted", "last", tta=False, n_images=1)["tta_shift"] == 0  # --no-tta: none


def test_label_smoothing_changes_the_loss(mnist_ok):
    plain = train(tiny("train.epochs=1", *MINI), None).history[0]
    smooth = train(tiny("train.epochs=1", *MINI, "optim.label_smoothing=0.2"), None).history[0]
    assert smooth["train_loss"] != pytest.approx(plain["train_loss"], rel=1e-4)
    assert all(torch.isfinite(torch.tensor([plain["train_loss"], smooth["train_loss"]])))


def test_label_smoothing_is_passed_to_the_loss(monkeypatch, mnist_ok):
    seen = []
    real = train_mod.F.cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("label_smoothing"))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod.F, "cross_entropy", spy)
    train(tiny("train.epochs=1", *MINI, "optim.label_smoothing=0.1"), None)
    assert seen.count(0.1) == 2  # both training steps (the evaluation loss is plain cross-entropy)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                       ("sgd", torch.optim.SGD)])
def test_optimizers_run(tmp_path, name, cls, mnist_ok):
    cfg = tiny(f"optim.name={name}", "optim.lr=0.003", "optim.weight_decay=0.01", "schedule.name=constant")
    model = torch.nn.Linear(3, 2)
    assert type(train_mod.build_optimizer(model, cfg.optim)) is cls
    out = tmp_path / name
    res = train(cfg, out)
    assert len(res.history) == 2
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in res.history)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    state = runs.load_checkpoint(out)["optimizer"]["state"]
    expected = {"exp_avg", "exp_avg_sq"} if name != "sgd" else {"momentum_buffer"}
    assert state and all(expected <= set(s) for s in state.values())


def test_set_lr_moves_momentum_and_betas():
    model = torch.nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_mod.set_lr(sgd, 0.05, 0.85)
    assert sgd.param_groups[0]["lr"] == 0.05 and sgd.param_groups[0]["momentum"] == 0.85
    adam = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    train_mod.set_lr(adam, 0.02, 0.8)
    assert adam.param_groups[0]["lr"] == 0.02 and adam.param_groups[0]["betas"] == (0.8, 0.99)
    train_mod.set_lr(adam, 0.03, None)
    assert adam.param_groups[0]["betas"] == (0.8, 0.99)


def test_keras_decay_recorded_lr_matches_the_formula(mnist_ok):
    res = train(tiny("schedule.name=constant", "optim.lr=0.01", "optim.decay=0.001", "train.epochs=3", *MINI), None)
    spe = 128 // 64
    for row in res.history:
        last_step = row["epoch"] * spe - 1  # the row records the LR of the epoch's last step
        assert row["lr"] == pytest.approx(0.01 / (1 + 0.001 * last_step), rel=1e-12)


def test_seed002_inverse_schedule_recorded_lr(mnist_ok):
    res = train(load_recipe(SEED002_RECIPE, TINY + ["train.epochs=3"] + MINI), None)
    lrs = [row["lr"] for row in res.history]
    assert lrs == pytest.approx([0.003 / (1 + 0.319 * e) for e in range(3)], rel=1e-12)
    assert [round(v, 10) for v in lrs] == [0.003, 0.0022744503, 0.0018315018]  # the seed's Keras log


def test_train_without_a_run_dir_writes_nothing(tmp_path, monkeypatch, mnist_ok):
    monkeypatch.chdir(tmp_path)
    res = train(tiny("train.epochs=1", *MINI), None)
    assert res.run_dir is None and len(res.history) == 1 and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- run directory edge cases


def test_resume_given_the_checkpoint_file_continues_the_run(tmp_path, interrupt_at_epoch, mnist_ok):
    out = tmp_path / "run"
    disarm = interrupt_at_epoch(2)
    with pytest.raises(train_mod.Interrupted):
        train(tiny(), out)
    disarm()
    res = train(None, out / "last.pt", resume=True)
    assert res.run_dir == out and res.result["epochs_run"] == 2
    assert not (out / "last.pt").is_dir() and (out / "config.toml").is_file()


def test_out_that_is_a_file_is_one_line(tmp_path, capsys, mnist_ok):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    rc, _, err = run_cli(capsys, "train", TINY_RECIPE, *_args(), "--out", f)
    assert_one_line_error(rc, err, "a file, not a directory")
    assert f.read_text() == "keep me"


def test_overwrite_leaves_nothing_of_the_old_run_but_keeps_lr_find(tmp_path, existing_run):
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    (run / "eval.json").write_text("{}")
    (run / "report.html").write_text("old")
    (run / "lr_find.json").write_text('{"suggestion": 0.1}')
    old_result = (run / "result.json").read_text()
    train(tiny("train.epochs=1", "train.seed=5"), run, overwrite=True)
    assert not (run / "eval.json").exists() and not (run / "report.html").exists()
    assert (run / "lr_find.json").read_text() == '{"suggestion": 0.1}'
    assert (run / "result.json").read_text() != old_result
    assert json.loads((run / "result.json").read_text())["seed"] == 5


def test_lr_find_result_does_not_block_training_in_the_same_dir(tmp_path, mnist_ok):
    run = tmp_path / "run"
    run.mkdir()
    (run / "lr_find.json").write_text("{}")
    (run / "lr_find.png").write_bytes(b"png")
    res = train(tiny("train.epochs=1"), run)
    assert res.result["epochs_run"] == 1 and (run / "lr_find.png").read_bytes() == b"png"


def test_resume_of_a_run_stopped_at_its_target_trains_no_more(tmp_path, monkeypatch, mnist_ok):
    out = tmp_path / "run"
    fake_accuracies(monkeypatch, [0.5, 0.99, 0.995])
    first = train(tiny("train.epochs=3", "train.target=0.9", "train.stop_at_target=true"), out)
    assert first.result["epochs_run"] == 2
    metrics_before = (out / "metrics.jsonl").read_bytes()
    again = train(None, out, resume=True)
    assert again.result["epochs_run"] == 2 and (out / "metrics.jsonl").read_bytes() == metrics_before


@pytest.mark.parametrize("setting, needle", [
    ("optim.momentum=-1", "optim.momentum"), ("optim.eps=0", "optim.eps"), ("optim.betas=[0.9]", "optim.betas"),
    ("optim.grad_clip=-1", "optim.grad_clip"), ('schedule.knots=["a", 2]', "lists of numbers"),
    ("schedule.div_factor=0", "div_factor"), ("data.cutout_p=2", "data.cutout_p"),
    ('train.device="mps"', "train.device"), ("data.crop_pad=40", "data.crop_pad = 40"),
])
def test_more_bad_values_are_one_line(tmp_path, capsys, setting, needle, mnist_ok):
    rc, _, err = run_cli(capsys, "train", TINY_RECIPE, *_args(setting, "data.crop_mode=reflect"),
                         "--out", tmp_path / "run")
    assert_one_line_error(rc, err, needle)


def test_threads_setting_applies_to_the_run_only(monkeypatch, mnist_ok):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    seen = {}
    real_setup = train_mod.setup

    def spy(cfg, model=None, log=print, **kw):
        s = real_setup(cfg, model, log, **kw)
        seen["threads"] = torch.get_num_threads()
        return s

    monkeypatch.setattr(train_mod, "setup", spy)
    train(tiny("train.epochs=1", f"train.threads={other}", *MINI), None)
    assert seen["threads"] == other and torch.get_num_threads() == before


def test_image_folder_run_given_by_relative_path_evaluates_from_anywhere(tmp_path, writers, monkeypatch):
    """The run stores the folder's absolute path, so `cnnlab evaluate` works from another directory."""
    writers.write_image_folder(tmp_path / "digits", mode="L", size=28, per_class=4, layout="split")
    monkeypatch.chdir(tmp_path)
    cfg = tiny("data.dataset=digits", f"data.root={tmp_path / 'cache'}", "data.batch_size=4", "data.val_split=0",
               "data.subset=0", "data.eval_batch_size=4", "train.epochs=1")
    train(cfg, tmp_path / "run")
    assert load_recipe(tmp_path / "run" / "config.toml").data.dataset == str(tmp_path / "digits")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from cnnlab.evaluate import evaluate_run
    ev = evaluate_run(tmp_path / "run", n_images=1)
    assert ev["split"] == "test" and ev["n"] == 12 and ev["dataset"] == "digits"


def test_rng_state_from_another_device_reseeds_deterministically():
    """A checkpoint's data generator from a GPU run cannot drive a CPU generator: reseed from the saved
    torch state (same result every time) and say that the batches differ."""
    src = train_mod.rng_state(torch.Generator().manual_seed(3))
    same = torch.Generator()
    train_mod.set_rng_state(same, src, log=lambda *a: None)
    assert torch.equal(same.get_state(), src["data"])
    notes, draws = [], []
    for _ in range(2):
        gen = torch.Generator()
        train_mod.set_rng_state(gen, {**src, "data_device": "cuda"}, log=notes.append)
        draws.append(torch.randint(0, 1000, (5,), generator=gen))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], torch.randint(0, 1000, (5,), generator=torch.Generator().manual_seed(3)))
    assert "resuming on cpu a run saved on cuda" in notes[0]


def test_lookahead_update_follows_the_airbench_rule():
    """From 30% of training, every 5 steps: avg <- lerp(avg, w, 1 - rho), w <- avg,
    rho = decay^5 * progress^3; nothing before."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.BatchNorm1d(1))
    w = model[0].weight
    total, decay = 20, 0.9
    avg = None
    for step in range(9):  # done = 1..9: before 30% (6) or not a multiple of 5
        avg = train_mod.lookahead_update(avg, model, step, total, decay)
    assert avg is None
    avg = train_mod.lookahead_update(avg, model, 9, total, decay)  # done = 10: starts, copies
    assert avg is not None and torch.equal(avg[0], w.detach())
    assert len(avg) == 6  # Linear weight, bias; BN weight, bias, running mean, var (not its int counter)
    start = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    for step in range(10, 14):  # done 11..14: not multiples of 5, nothing happens
        assert train_mod.lookahead_update(avg, model, step, total, decay) is avg
    assert torch.equal(w.detach(), start + 1)
    train_mod.lookahead_update(avg, model, 14, total, decay)  # done = 15
    rho = decay ** 5 * (15 / 20) ** 3
    expected = start + (1 - rho) * 1.0
    assert torch.allclose(avg[0], expected) and torch.allclose(w.detach(), expected)


def float_keys(ckpt: dict) -> list[str]:
    return [k for k, v in ckpt["state_dict"].items() if v.is_floating_point()]


def test_lookahead_run_resumes_exactly_and_changes_training(tmp_path, interrupt_at_epoch, mnist_ok):
    cfg = tiny("train.epochs=3", "train.lookahead=0.95", "data.batch_size=32")
    full = train(cfg, tmp_path / "full")
    end = runs.load_checkpoint(tmp_path / "full")
    # 16 steps per epoch, averaging every 5 from step 15: training ends on the average (airbench),
    # but an epoch that is not the last keeps the steps made since the last average
    assert same_state(dict(zip(float_keys(end), end["lookahead"])), {k: end["state_dict"][k] for k in float_keys(end)})
    disarm = interrupt_at_epoch(3)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "cut")
    disarm()
    mid = runs.load_checkpoint(tmp_path / "cut")
    assert mid["epoch"] == 2
    assert not same_state(dict(zip(float_keys(mid), mid["lookahead"])),
                          {k: mid["state_dict"][k] for k in float_keys(mid)})
    resumed = train(None, tmp_path / "cut", resume=True)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in full.history]
    assert same_state(runs.load_checkpoint(tmp_path / "full")["state_dict"],
                      runs.load_checkpoint(tmp_path / "cut")["state_dict"])
    plain = train(tiny("train.epochs=3", "data.batch_size=32"), None)
    assert plain.history[-1]["val_loss"] != full.history[-1]["val_loss"]


def test_optimizer_groups_follow_airbench():
    """Only normalisation-layer parameters get bias_lr_scale (airbench's BatchNorm biases); the
    whitening conv's bias keeps the base LR and the full decay; frozen weights are left out."""
    cfg = load_recipe(ROOT / "recipes" / "airbench94.toml", [])
    model = create_model("airbench94")
    opt = train_mod.build_optimizer(model, cfg.optim)
    whiten_bias = model.features[0].bias
    norms = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    by_scale = {g["lr_scale"]: g for g in opt.param_groups}
    assert set(by_scale) == {1.0, cfg.optim.bias_lr_scale}
    norm_group = by_scale[cfg.optim.bias_lr_scale]
    assert {id(p) for p in norm_group["params"]} == {id(p) for p in norms}
    assert norm_group["weight_decay"] == pytest.approx(cfg.optim.weight_decay / cfg.optim.bias_lr_scale)
    base = [g for g in opt.param_groups if any(p is whiten_bias for p in g["params"])]
    assert len(base) == 1 and base[0]["lr_scale"] == 1.0 and base[0]["weight_decay"] == cfg.optim.weight_decay
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.features[0].weight) not in grouped  # the frozen whitening filters
    no_decay = copy.deepcopy(cfg.optim)
    no_decay.decay_bn_and_bias = False
    groups = train_mod.build_optimizer(model, no_decay).param_groups
    assert [g["weight_decay"] for g in groups] == [cfg.optim.weight_decay, 0.0, 0.0]


def test_interrupt_during_evaluation_reports_only_what_last_pt_holds(tmp_path, monkeypatch, mnist_ok):
    """Ctrl-C in epoch 2's evaluation (its training seconds already counted): result.json gives
    the seconds, best accuracy and target of epoch 1, as last.pt and metrics.jsonl do."""
    real_predict, calls = train_mod.predict, []

    def predict(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_predict(*a, **k)

    monkeypatch.setattr(train_mod, "predict", predict)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(tiny("train.epochs=3", "train.target=0.01"), out)
    result, ckpt = json.loads((out / "result.json").read_text()), runs.load_checkpoint(out, "last")
    assert ckpt["epoch"] == 1 and result["epochs_run"] == 1
    assert result["train_seconds"] == ckpt["state"]["train_seconds"] == runs.read_metrics(out)[0]["train_seconds"]
    assert result["time_to_target_s"] == ckpt["state"]["time_to_target_s"] and result["target_epoch"] == 1


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_are_fused_and_stay_fused_after_loading_an_unfused_state(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 4 * 4, 3))
    o = config.OptimConfig(name=name, lr=0.01, momentum=0.9, weight_decay=1e-3)
    opt = train_mod.build_optimizer(model, o)
    assert all(g["fused"] for g in opt.param_groups)
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))

    def step(m, optimizer):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        optimizer.step()

    step(model, opt)
    unfused = copy.deepcopy(opt.state_dict())  # as an older cnnlab saved it
    for g in unfused["param_groups"]:
        g["fused"], g["foreach"] = None, None
    twin = copy.deepcopy(model)
    opt2 = train_mod.build_optimizer(twin, o)
    train_mod.load_optimizer_state(opt2, unfused)
    assert all(g["fused"] for g in opt2.param_groups)
    step(model, opt)
    step(twin, opt2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- hooks for callers (search, notebooks)


def test_on_epoch_sees_each_saved_row_and_stoprun_ends_the_run_cleanly(tmp_path, mnist_ok):
    seen = []

    def on_epoch(row):
        seen.append((row["epoch"], len(runs.read_metrics(tmp_path / "run"))))  # the row is on disk already
        if row["epoch"] == 2:
            raise train_mod.StopRun("pruned")

    res = train(tiny("train.epochs=4"), tmp_path / "run", on_epoch=on_epoch)
    assert seen == [(1, 1), (2, 2)]
    assert res.result["status"] == "pruned" and res.result["epochs_run"] == 2
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "pruned"
    assert runs.load_checkpoint(tmp_path / "run", "last")["epoch"] == 2


def test_a_ready_module_trains_without_a_registry_entry(tmp_path, mnist_ok):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10))
    cfg = tiny("train.epochs=1")
    res = train(cfg, tmp_path / "run", model=net)
    assert res.result["params"] == sum(p.numel() for p in net.parameters())
    assert next(net.parameters()).grad is not None  # this very module was trained
    assert 0 <= res.result["final_val_acc"] <= 1


def test_setup_leaves_the_callers_config_alone(tmp_path, mnist_ok):
    cfg = tiny("train.epochs=1")
    before = config.to_dict(cfg)
    train_mod.setup(cfg, log=lambda *a: None)
    assert config.to_dict(cfg) == before


def test_micro_batches_normalise_each_chunk_with_its_own_statistics(tmp_path, mnist_ok):
    """mnist_tiny has BatchNorm: in chunks of 32 each chunk is normalised by its own statistics, so
    training differs from whole batches of 128; a chunk as large as the batch is the whole batch."""
    whole = runs.load_checkpoint(train(tiny("train.epochs=1"), tmp_path / "whole").run_dir)
    same = runs.load_checkpoint(train(tiny("train.epochs=1", "train.micro_batch=128"), tmp_path / "same").run_dir)
    chunks = runs.load_checkpoint(train(tiny("train.epochs=1", "train.micro_batch=32"), tmp_path / "chunks").run_dir)
    assert all(torch.equal(v, same["state_dict"][k]) for k, v in whole["state_dict"].items())
    gaps = {k: float((chunks["state_dict"][k] - v).abs().max()) for k, v in whole["state_dict"].items()
            if v.is_floating_point()}
    assert max(gaps.values()) > 1e-3, gaps
    assert all(torch.isfinite(v).all() for v in chunks["state_dict"].values() if v.is_floating_point())


def test_eval_every_and_tta_at_the_end_only(tmp_path, mnist_ok):
    res = train(tiny("train.epochs=3", "train.eval_every=2", "train.tta=true", "train.tta_each_epoch=false"),
                tmp_path / "run")
    accs = [r["val_acc"] for r in res.history]
    assert accs[0] is None and accs[1] is not None and accs[2] is not None  # epoch 2, and the last
    assert [r.get("tta") for r in res.history] == [None, False, True]
    # the final number is the TTA one, and it is what a fresh TTA evaluation of last.pt gives
    last = runs.load_checkpoint(tmp_path / "run", "last")
    assert evaluate_checkpoint(last, val_split_of(), tta=True)[1] == pytest.approx(accs[2], abs=1e-6)
    assert res.result["final_val_acc"] == accs[2] and res.result["final_val_tta"] is True
    # wall time counts evaluation and saving too, so it is never below training time
    assert all(r["wall_seconds"] >= r["train_seconds"] for r in res.history)
    assert res.result["wall_seconds"] >= res.result["train_seconds"]


def test_setup_builds_the_models_cpu_kernels_before_any_step(monkeypatch, tmp_path, mnist_ok):
    """The first epoch's time is the step's, not the C++ compiler's: setup builds (or loads) the
    kernels the model's layers call, before the loop's timer starts."""
    built = []
    monkeypatch.setattr(layers, "build_kernels", lambda model, channels_last, log: built.append((model, channels_last)))
    s = train_mod.setup(tiny("train.epochs=1", "train.device=cpu", "train.channels_last=true"), log=lambda *a: None)
    assert built == [(s.model, True)]
