"""Evaluation (issue 5): metrics against hand-computed values, ``cnnlab evaluate`` on a real tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from cnnlab import config, evaluate, runs, train
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import confusion_matrix, metrics, top_losses

PICTURES = ("curves.png", "confusion.png", "misclassified.png", "gradcam.png", "activations.png")


@pytest.fixture(scope="module")
def run_dir(mnist_run) -> Path:
    return mnist_run


# ----------------------------------------------------------------------------- metrics by hand


def test_confusion_matrix_is_true_by_predicted():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 1, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_metrics_two_classes_by_hand():
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    preds = torch.tensor([0, 0, 0, 1, 1, 1])
    m = metrics(labels, preds, ["cat", "dog"])
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1) / 2)
    cat, dog = m["per_class"]["cat"], m["per_class"]["dog"]
    assert (cat["precision"], cat["recall"], cat["support"]) == (pytest.approx(1.0), pytest.approx(0.75), 4)
    assert cat["f1"] == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert dog["precision"] == pytest.approx(2 / 3) and dog["recall"] == pytest.approx(1.0)
    assert dog["f1"] == pytest.approx(0.8)
    assert cat["accuracy"] == pytest.approx(0.75)  # per-class accuracy = recall of that class
    assert m["confusion_matrix"] == [[3, 1], [0, 2]]
    assert m["most_confused"] == [{"true": "cat", "predicted": "dog", "count": 1}]


def test_imbalanced_balanced_accuracy_differs_from_accuracy():
    # 8 images of class a, 1 of b, 1 of c; the model always says a.
    labels = torch.tensor([0] * 8 + [1, 2])
    preds = torch.zeros(10, dtype=torch.long)
    m = metrics(labels, preds, ["a", "b", "c", "d"])  # d has no images: left out of the balanced mean
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)
    a, b = m["per_class"]["a"], m["per_class"]["b"]
    assert a["precision"] == pytest.approx(0.8) and a["recall"] == pytest.approx(1.0)
    assert a["f1"] == pytest.approx(2 * 0.8 / 1.8)
    assert b["precision"] == 0.0 and b["recall"] == 0.0 and b["f1"] == 0.0  # never predicted: 0, not NaN
    assert m["per_class"]["d"]["support"] == 0
    assert [(p["true"], p["predicted"], p["count"]) for p in m["most_confused"]] == [("c", "a", 1), ("b", "a", 1)]


def test_top_losses_are_sorted_by_loss():
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0], [0.0, 0.5]])
    labels = torch.tensor([0, 0, 1, 1])
    top = top_losses(logits, labels, ["x", "y"], 3)
    assert [t["index"] for t in top] == [1, 2, 3]
    assert top[0]["true"] == "x" and top[0]["predicted"] == "y"
    assert top[0]["confidence"] == pytest.approx(torch.tensor([0.0, 4.0]).softmax(0)[1].item())
    assert top[0]["loss"] > top[1]["loss"] > top[2]["loss"]


# ----------------------------------------------------------------------------- a real run


def assert_png(path: Path, min_bytes: int = 8000):
    assert path.is_file(), path
    assert path.stat().st_size > min_bytes, (path, path.stat().st_size)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 150, (path, im.size)
        extrema = im.convert("L").getextrema()
        assert extrema[1] - extrema[0] > 100, (path, extrema)  # not a blank picture


def test_evaluate_run_matches_training_and_writes_eval_json(run_dir, tmp_path):
    result = json.loads((run_dir / "result.json").read_text())
    ev = evaluate.evaluate_run(run_dir, split="val", n_images=5, out_dir=tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(ev))
    # The run's own evaluation split, best checkpoint: the same number training reported.
    assert ev["split"] == "val" and ev["n"] == 1000 and ev["checkpoint"] == "best" and ev["tta"] is False
    assert ev["accuracy"] == pytest.approx(result["best_val_acc"], abs=1e-6)
    assert 0.5 < ev["accuracy"] <= 1
    assert sum(map(sum, ev["confusion_matrix"])) == 1000
    assert set(ev["per_class"]) == {str(i) for i in range(10)}
    assert len(ev["top_losses"]) == 5 and ev["top_losses"][0]["loss"] >= ev["top_losses"][-1]["loss"]
    assert all(p["true"] != p["predicted"] for p in ev["most_confused"])


def test_default_split_is_the_runs_own(run_dir, tmp_path):
    """A run trained with val_split (e.g. on the CIFAR copy without a test batch) is evaluated on
    that held-out split by default; a run without one on the test split."""
    ev = evaluate.evaluate_run(run_dir, n_images=2, out_dir=tmp_path)
    assert ev["split"] == "val" and ev["n"] == 1000
    ckpt = runs.load_checkpoint(run_dir, "best")
    ckpt["config"]["data"]["val_split"] = 0
    split, name = evaluate.load_eval_split(ckpt)
    assert name == "test" and len(split) == 10000


def test_cli_evaluate_writes_eval_json_and_pictures(run_dir, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    rc, out, err = cli("evaluate", run, "--split", "val", "--n", "6", "--tta")
    assert rc == 0, err
    assert "balanced accuracy" in out and "wrote" in out
    ev = json.loads((run / "eval.json").read_text())
    assert ev["tta"] is True and ev["gradcam_layer"] == "features.7"
    assert len(ev["misclassified_shown"]) == 6
    assert ev["pictures"] == list(PICTURES)
    for name in PICTURES:
        assert_png(run / name)


def _broken_copy(run_dir: Path, tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(run_dir, dst)
    return dst


def test_cli_evaluate_bad_inputs(run_dir, tmp_path, cli, check, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    check.one_line_error(*cli("evaluate", empty)[::2], "not a cnnlab run")
    check.one_line_error(*cli("evaluate", tmp_path / "nope")[::2], "no such run directory")

    no_ckpt = _broken_copy(run_dir, tmp_path, "no-ckpt")
    (no_ckpt / "best.pt").unlink()
    check.one_line_error(*cli("evaluate", no_ckpt)[::2], "no checkpoint best.pt")

    other = _broken_copy(run_dir, tmp_path, "other-model")
    ckpt = runs.load_checkpoint(other, "best")
    ckpt["model_name"] = "mnist_8k"
    runs.save_checkpoint(other / "best.pt", ckpt)
    check.one_line_error(*cli("evaluate", other)[::2], "do not fit model mnist_8k", "another model")

    no_val = _broken_copy(run_dir, tmp_path, "no-val")
    ckpt = runs.load_checkpoint(no_val, "best")
    ckpt["config"]["data"]["val_split"] = 0
    runs.save_checkpoint(no_val / "best.pt", ckpt)
    check.one_line_error(*cli("evaluate", no_val, "--split", "val")[::2], "--split test")

    check.one_line_error(*cli("evaluate", run_dir, "--split", "val", "--layer", "head.9")[::2],
                          "head.9", "features.7")

    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path / "no-data-here"))
    check.one_line_error(*cli("evaluate", run_dir, "--split", "val")[::2], "cnnlab data get mnist")


def test_tta_views_and_predict_average_them():
    """flip + shift 1: the image and its mirror (half the weight), and both shifted by (-1,-1) and
    (+1,+1) (the other half), as airbench's mirror + translate TTA."""
    from cnnlab.augment import Loader, translate
    from cnnlab.evaluate import predict, tta_views

    x = torch.randn(3, 1, 8, 8)
    x_before = x.clone()
    views, shifted = tta_views(x, flip=True, shift=1)
    assert len(views) == 2 and len(shifted) == 4 and torch.equal(views[1], x.flip(3))
    assert torch.equal(shifted[0], translate(x, -1, -1)) and torch.equal(shifted[3], translate(x.flip(3), 1, 1))
    assert torch.equal(x, x_before)
    assert [len(v) for v in tta_views(x, flip=False, shift=0)] == [1, 0]
    assert [len(v) for v in tta_views(x, flip=False, shift=2)] == [1, 2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5))
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    loader = Loader(images, torch.zeros(3, dtype=torch.long), 3, [0.5], [0.25])
    xn = next(loader.epoch(None))[0]
    logits, _ = predict(model, loader, tta=True, tta_shift=1)
    with torch.no_grad():
        plain = (model(xn) + model(xn.flip(3))) / 2
        moved = sum(model(translate(v, d, d)) for v in (xn, xn.flip(3)) for d in (-1, 1)) / 4
    assert torch.allclose(logits, 0.5 * plain + 0.5 * moved, atol=1e-6)
    assert not torch.allclose(logits, plain, atol=1e-4)
    assert torch.allclose(predict(model, loader, tta=True)[0], plain, atol=1e-6)
    assert not logits.requires_grad  # evaluation builds no autograd graph


def test_tta_for_the_least_confident_fraction_of_each_batch():
    """train.tta_fraction: one view for every image, the TTA views (replacing it) for the ceil(f * n)
    images of each batch whose top-1 probability under that view is lowest; 1 = every image."""
    from cnnlab.augment import Loader
    from cnnlab.evaluate import least_confident, predict, tta_logits

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 5))
    images = torch.randint(0, 256, (50, 1, 8, 8), dtype=torch.uint8)
    loader = Loader(images, torch.zeros(50, dtype=torch.long), 20, [0.5], [0.25])  # batches of 20, 20, 10
    one, _ = predict(model, loader)
    full, _ = predict(model, loader, tta=True, tta_shift=1)
    part, _ = predict(model, loader, tta=True, tta_shift=1, tta_fraction=0.25)
    assert torch.equal(predict(model, loader, tta=True, tta_shift=1, tta_fraction=1.0)[0], full)
    chosen = []
    for start, n in ((0, 20), (20, 20), (40, 10)):  # 5, 5 and 3 (ceil) images per batch
        rows = least_confident(one[start:start + n], 0.25) + start
        assert len(rows) == {20: 5, 10: 3}[n]
        confidence = one[start:start + n].softmax(1).amax(1)
        assert confidence[rows - start].max() <= confidence.sort().values[len(rows) - 1]
        chosen += rows.tolist()
    mask = torch.zeros(50, dtype=torch.bool)
    mask[chosen] = True
    assert torch.allclose(part[mask], full[mask], atol=1e-6) and torch.allclose(part[~mask], one[~mask], atol=1e-6)
    assert not torch.allclose(full[~mask], one[~mask], atol=1e-4)  # the views do change the others
    with torch.no_grad():
        x = next(loader.epoch(None))[0]
        assert torch.allclose(tta_logits(model, x[:3], True, 1), full[:3], atol=1e-6)


@pytest.mark.parametrize("value", [0, 1.5])
def test_tta_fraction_outside_0_1_is_refused(value):
    with pytest.raises(CnnlabError, match=r"train.tta_fraction = .*: must be in \(0, 1\]"):
        config.from_dict({"train": {"tta_fraction": value}})


def test_evaluate_uses_the_runs_precision(tmp_path, mnist_run_sets):
    """A bfloat16 run is evaluated under bfloat16 autocast, as training evaluated it: the same
    accuracy and loss (evaluating in float32 moves both)."""
    overrides = [o for o in mnist_run_sets if "dtype" not in o] + ['train.dtype="bfloat16"']
    train.train(config.load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "mnist_tiny.toml", overrides),
                tmp_path / "run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    ev = evaluate.evaluate_run(tmp_path / "run", split="val", n_images=1, out_dir=tmp_path)
    assert ev["dtype"] == "bfloat16"
    assert ev["accuracy"] == pytest.approx(result["best_val_acc"], abs=1e-6)
    assert ev["loss"] == pytest.approx(result["final_val_loss"], rel=1e-5)


def test_evaluate_gives_the_tta_views_to_the_fraction_the_run_did(tmp_path, mnist_run_sets, capsys):
    """A run evaluated with train.tta_fraction is re-evaluated the same way (the numbers its metrics
    hold, eval.json and the report say so); asking for TTA explicitly gives every image the views."""
    from cnnlab.report import tta_text

    sets = mnist_run_sets + ["train.tta_shift=1", "train.tta_fraction=0.1"]
    train.train(config.load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "mnist_tiny.toml", sets),
                tmp_path / "run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    ev = evaluate.evaluate_run(tmp_path / "run", split="val", n_images=1, out_dir=tmp_path / "as_run")
    assert (ev["tta_shift"], ev["tta_fraction"]) == (1, 0.1)
    assert ev["accuracy"] == pytest.approx(result["best_val_acc"], abs=1e-6)
    assert ev["loss"] == pytest.approx(result["final_val_loss"], rel=1e-5)
    assert tta_text(ev) == "shift 1 px (for the least confident 10% of each batch)"
    full = evaluate.evaluate_run(tmp_path / "run", split="val", tta=True, n_images=1, out_dir=tmp_path / "full")
    assert full["tta_fraction"] == 1.0 and full["loss"] != pytest.approx(ev["loss"], rel=1e-6)
    assert tta_text(full) == "flip, shift 1 px"
    from cnnlab.cli import main
    assert main(["evaluate", str(tmp_path / "run"), "--split", "val", "--n", "1"]) == 0
    assert "(1000 images, best.pt, TTA shift 1 px (for the least confident 10% of each batch)): accuracy" in \
        capsys.readouterr().out
