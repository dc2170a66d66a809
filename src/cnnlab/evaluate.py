"""Predictions and classification metrics.

``predict`` runs a model over a loader (optionally with flip test-time augmentation);
``metrics`` turns labels and predictions into accuracy, balanced accuracy, per-class
precision/recall/F1, the confusion matrix and the most-confused class pairs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision context for ``dtype`` on ``device`` (a no-op for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict(model: torch.nn.Module, loader, tta: bool = False, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on CPU) and labels for every image of ``loader``, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    try:
        for x, y in loader.epoch(None):
            with autocast(device, dtype):
                out = model(x)
                if tta:
                    out = (out + model(x.flip(3))) / 2
            logits.append(out.float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


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
