"""Predictions and classification metrics, and the evaluation of a saved run.

``predict`` runs a model over a loader (optionally with flip test-time augmentation);
``metrics`` turns labels and predictions into accuracy, balanced accuracy, per-class
precision/recall/F1, the confusion matrix and the most-confused class pairs.
``evaluate_run`` rebuilds a run's model and dataset from its checkpoint, evaluates it and writes
``eval.json``. No plotting here: ``report.evaluate_and_plot`` draws the pictures.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnlab import jsonfile, runs
from cnnlab.augment import Loader, translate
from cnnlab.data import Dataset, Split, load_dataset
from cnnlab.models import model_device
from cnnlab.errors import CnnlabError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision context for ``dtype`` on ``device`` (a no-op for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tta_views(x: torch.Tensor, flip: bool, shift: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The views test-time augmentation averages: (the image and, with ``flip``, its mirror), and
    (with ``shift``) those views shifted by -``shift`` and +``shift`` pixels along the diagonal."""
    views = [x, x.flip(3)] if flip else [x]
    shifted = [translate(v, d, d) for d in (-shift, shift) for v in views] if shift else []
    return views, shifted


def tta_logits(model: torch.nn.Module, x: torch.Tensor, flip: bool = False, shift: int = 0) -> torch.Tensor:
    """Mean logits over the views; the shifted views, if any, share half of the weight (as airbench)."""
    views, shifted = tta_views(x, flip, shift)
    out = sum(model(v).float() for v in views) / len(views)
    if shifted:
        out = 0.5 * out + 0.5 * sum(model(v).float() for v in shifted) / len(shifted)
    return out


def predict(model: torch.nn.Module, loader, tta: bool = False, dtype=torch.float32,
            tta_shift: int = 0, tta_fraction: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on CPU) and labels for every image of ``loader``, in order; with ``tta``
    (mirror) or ``tta_shift`` (translation) the logits are ``tta_logits``, for every image or, with
    ``tta_fraction`` < 1, for that fraction of each batch (``least_confident``; the rest: one view)."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    logits, labels = [], []
    try:
        for x, y in loader.epoch(None):
            with torch.no_grad(), autocast(device, dtype):
                if (tta or tta_shift) and tta_fraction < 1:
                    out = model(x).float()
                    unsure = least_confident(out, tta_fraction)
                    out[unsure] = tta_logits(model, x[unsure], tta, tta_shift)
                else:
                    out = tta_logits(model, x, tta, tta_shift)
            logits.append(out.cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def least_confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """Rows of the ``ceil(fraction * n)`` predictions with the lowest top-1 probability."""
    k = math.ceil(fraction * len(logits))
    return logits.softmax(1).amax(1).argsort(stable=True)[:k]


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts [true, predicted]."""
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics(labels: torch.Tensor, preds: torch.Tensor, classes: list[str], top_pairs: int = 10) -> dict:
    """Accuracy, balanced accuracy, per-class precision/recall/F1/accuracy, confusion matrix."""
    k = len(classes)
    cm = confusion_matrix(labels, preds, k).double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    recall = torch.where(support > 0, tp / support.clamp_min(1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12),
                     torch.zeros_like(tp))
    present = support > 0
    off = cm.clone()
    off.fill_diagonal_(0)
    pairs = sorted(((int(off[i, j]), i, j) for i in range(k) for j in range(k) if off[i, j] > 0), reverse=True)
    return {
        "n": int(cm.sum()),
        "accuracy": float(tp.sum() / cm.sum().clamp_min(1)),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {
            classes[i]: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                         "accuracy": float(recall[i]), "support": int(support[i])}
            for i in range(k)
        },
        "confusion_matrix": cm.long().tolist(),
        "most_confused": [{"true": classes[i], "predicted": classes[j], "count": c} for c, i, j in pairs[:top_pairs]],
    }


# ----------------------------------------------------------------------------- evaluating a saved run


@dataclass
class Evaluation:
    """Everything an evaluation computed: the JSON summary plus what the pictures need."""

    summary: dict  # the content of eval.json
    model: torch.nn.Module  # in eval mode, on the run's device (``run_device``)
    split: Split  # uint8 images and labels that were evaluated
    logits: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_run_model(run_dir: Path, checkpoint: str = "best") -> tuple[dict, torch.nn.Module]:
    """The checkpoint dict and the rebuilt model, in eval mode on the run's device (``run_device``)."""
    ckpt = runs.load_checkpoint(runs.existing_run(run_dir), checkpoint)
    return ckpt, runs.model_from_checkpoint(ckpt).eval().to(run_device(ckpt))


def run_device(ckpt: dict) -> torch.device:
    """The device a run trained on when this machine has it (a CUDA run evaluates on a GPU), else the CPU."""
    name = str(ckpt["config"].get("train", {}).get("device", "auto"))
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if name.startswith("cuda:") and name[5:].isdigit() and int(name[5:]) < torch.cuda.device_count():
        return torch.device(name)
    return torch.device("cuda")


def run_tta(ckpt: dict, tta: bool | None) -> tuple[bool, int]:
    """(mirror, shift) test-time augmentation for a run: ``None`` as the run evaluated itself (its
    ``train.tta`` and ``train.tta_shift``); True: the mirror and the run's shift; False: none."""
    run_train = ckpt["config"].get("train", {})
    if tta is None:
        return bool(run_train.get("tta", False)), int(run_train.get("tta_shift", 0))
    return bool(tta), int(run_train.get("tta_shift", 0)) if tta else 0


def run_tta_fraction(ckpt: dict, tta: bool | None) -> float:
    """The share of each batch that gets the TTA views: ``None`` as the run evaluated itself (its
    ``train.tta_fraction``); otherwise every image."""
    return float(ckpt["config"].get("train", {}).get("tta_fraction", 1.0)) if tta is None else 1.0


def run_dtype(ckpt: dict, model: torch.nn.Module) -> torch.dtype:
    """The autocast dtype a run evaluates in: its ``train.dtype`` (float16, a GPU format, is float32 on a CPU)."""
    dtype = DTYPES.get(ckpt["config"].get("train", {}).get("dtype", "float32"), torch.float32)
    if dtype == torch.float16 and model_device(model).type == "cpu":
        return torch.float32
    return dtype


def load_run_dataset(ckpt: dict, val_split: int) -> Dataset:
    """The dataset a run trained on, from the cache, with its last ``val_split`` training images held out."""
    cfg_data = ckpt["config"].get("data", {})
    name = cfg_data.get("dataset") or ckpt["dataset"]["name"]  # an image folder's path, not just its folder name
    return load_dataset(name, root=cfg_data.get("root") or None, val_split=val_split, acquire=False,
                        log=lambda *a, **k: None)


def load_eval_split(ckpt: dict, split: str | None = None) -> tuple[Split, str]:
    """The images a run is evaluated on: its test split, or ("val") the split held out by val_split.

    ``split=None`` means the split the run itself was evaluated on while training.
    """
    if split is None:
        split = "val" if int(ckpt["config"].get("data", {}).get("val_split", 0) or 0) else "test"
    if split not in ("test", "val"):
        raise CnnlabError(f"--split {split!r}: expected 'test' or 'val'")
    cfg_data = ckpt["config"].get("data", {})
    info = ckpt["dataset"]
    val_split = int(cfg_data.get("val_split", 0) or 0)
    if split == "val" and not val_split:
        raise CnnlabError(f"this run has no validation split (data.val_split = 0, it was evaluated on "
                          f"{info.get('eval_split', 'test')}); use --split test")
    ds = load_run_dataset(ckpt, val_split if split == "val" else 0)
    if ds.test is None:
        raise CnnlabError(f"{ds.name} has no test split; evaluate with --split val")
    if list(ds.shape) != list(info["shape"]) or list(ds.classes) != list(info["classes"]):
        raise CnnlabError(f"dataset {ds.name} now has shape {list(ds.shape)} and {ds.num_classes} classes but the "
                          f"run was trained on {list(info['shape'])} with {len(info['classes'])}; "
                          f"evaluate with the dataset the run was trained on")
    return ds.test, ds.test_name


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)


def top_losses(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], n: int) -> list[dict]:
    """The ``n`` images with the highest loss: index, true and predicted class, confidence, loss."""
    loss = per_sample_loss(logits, labels)
    probs = logits.softmax(1)
    order = loss.argsort(descending=True)[:max(0, n)]
    return [{"index": int(i), "true": classes[int(labels[i])], "predicted": classes[int(probs[i].argmax())],
             "confidence": float(probs[i].max()), "loss": float(loss[i])} for i in order]


def evaluate(run_dir: str | Path, checkpoint: str = "best", split: str | None = None, tta: bool | None = None,
             n_images: int = 16, out_dir: str | Path | None = None) -> Evaluation:
    """Evaluate a run's checkpoint on a split, write ``eval.json`` (into ``out_dir`` or the run).

    ``tta=None`` evaluates as the run did (its ``train.tta``, ``tta_shift`` and ``tta_fraction``), so the
    numbers match its metrics."""
    run_dir = Path(run_dir)
    ckpt, model = load_run_model(run_dir, checkpoint)
    fraction = run_tta_fraction(ckpt, tta)
    tta, tta_shift = run_tta(ckpt, tta)
    images, split_name = load_eval_split(ckpt, split)
    info = ckpt["dataset"]
    classes = list(info["classes"])
    batch = int(ckpt["config"].get("data", {}).get("eval_batch_size", 1000) or 1000)
    loader = Loader(images.images, images.labels, batch, info["mean"], info["std"], device=model_device(model))
    dtype = run_dtype(ckpt, model)
    try:
        logits, labels = predict(model, loader, tta=tta, dtype=dtype, tta_shift=tta_shift, tta_fraction=fraction)
    except RuntimeError as e:
        raise CnnlabError(f"model {ckpt['model_name']} cannot run on {info['name']} images "
                          f"({str(e).splitlines()[0]}); the checkpoint does not match its dataset") from None
    m = metrics(labels, logits.argmax(1), classes)
    loss = float(per_sample_loss(logits, labels).mean())
    summary = {
        "run": str(run_dir), "checkpoint": checkpoint, "epoch": ckpt.get("epoch"), "split": split_name,
        "dataset": info["name"], "model": ckpt["model_name"], "tta": bool(tta), "tta_shift": tta_shift,
        "tta_fraction": fraction if (tta or tta_shift) else None,
        "dtype": str(dtype).removeprefix("torch."), "device": str(model_device(model)), "loss": loss, **m,
        "top_losses": top_losses(logits, labels, classes, n_images),
    }
    runs.write_json(Path(out_dir or run_dir) / "eval.json", summary)
    return Evaluation(summary, model, images, logits, classes, tuple(info["mean"]), tuple(info["std"]))


def evaluate_run(run_dir: str | Path, checkpoint: str = "best", split: str | None = None, tta: bool | None = None,
                 n_images: int = 16, out_dir: str | Path | None = None) -> dict:
    """Evaluate a run and write ``eval.json``; return its content (see ``evaluate`` for the pictures' inputs)."""
    return evaluate(run_dir, checkpoint, split, tta, n_images, out_dir).summary


def read_eval(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        return None
    try:
        return jsonfile.read_object(path)
    except CnnlabError:  # a damaged eval.json is as good as none: `cnnlab evaluate` writes it again
        return None
