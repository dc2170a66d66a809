"""The pictures of a run: curves, confusion matrix, misclassified images, Grad-CAM, feature maps.

Every function takes plain data (rows of metrics.jsonl, counts, images already de-normalised to
[0, 1]) and writes one PNG atomically. Figures are made with ``matplotlib.figure.Figure`` and the
Agg canvas directly, so nothing here touches pyplot's global state or needs a display, and
importing it leaves the user's matplotlib backend (a notebook's inline one) as it was.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cnnlab.atomic import atomic_write_bytes

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as PNG via a temp file + rename (readers never see half a file)."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    atomic_write_bytes(path, buf.getvalue())
    return path


def to_hwc(image: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """A [C, H, W] image in [0, 1] as an array imshow takes, and the colour map (gray for one channel)."""
    arr = image.detach().float().clamp(0, 1).cpu().numpy()
    if arr.shape[0] == 1:
        return arr[0], "gray"
    return arr.transpose(1, 2, 0), None


def show_image(ax, image: torch.Tensor) -> None:
    arr, cmap = to_hwc(image)
    ax.imshow(arr, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def grid_shape(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return max(1, math.ceil(n / cols)), cols


# ----------------------------------------------------------------------------- training curves


def _column(rows: list[dict], key: str) -> list[float]:
    """One value per row (NaN where the row has none, e.g. an epoch that was not evaluated)."""
    return [float("nan") if r.get(key) is None else r[key] for r in rows]


def eval_split(rows: list[dict]) -> str:
    """The split the rows were evaluated on: "val" (held out from training) or "test"."""
    return "test" if any("test_acc" in r for r in rows) else "val"


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Loss and accuracy per epoch (train and evaluation), and the learning rate, from metrics.jsonl rows."""
    fig = new_figure(12, 3.8)
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 0.7]})
    epochs, split = _column(rows, "epoch"), eval_split(rows)
    ax_loss.plot(epochs, _column(rows, "train_loss"), "o-", label="train")
    ax_loss.plot(epochs, _column(rows, f"{split}_loss"), "s-", label=split)
    ax_loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.plot(epochs, [100 * v for v in _column(rows, "train_acc")], "o-", label="train")
    ax_acc.plot(epochs, [100 * v for v in _column(rows, f"{split}_acc")], "s-", label=split)
    evaluated = [i for i, r in enumerate(rows) if r.get(f"{split}_acc") is not None]
    best = max(evaluated, key=lambda i: rows[i][f"{split}_acc"]) if evaluated else None
    if best is not None:
        v = 100 * rows[best][f"{split}_acc"]
        ax_acc.annotate(f"best {v:.2f}%", (epochs[best], v), textcoords="offset points", xytext=(-8, -14),
                        ha="right", fontsize=9)
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="%")
    ax_lr.plot(epochs, _column(rows, "lr"), "d-", color="tab:green")
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend()
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    return save(fig, path)


def plot_compare(named_rows: list[tuple[str, list[dict]]], path: str | Path) -> Path:
    """Evaluation accuracy and loss per epoch of several runs, overlaid (train loss dashed)."""
    fig = new_figure(12, 4.2)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, (name, rows) in enumerate(named_rows):
        color = f"C{i % 10}"
        epochs, split = _column(rows, "epoch"), eval_split(rows)
        ax_acc.plot(epochs, [100 * v for v in _column(rows, f"{split}_acc")], "o-", color=color, label=f"{name} ({split})")
        ax_loss.plot(epochs, _column(rows, f"{split}_loss"), "o-", color=color, label=f"{name} ({split})")
        ax_loss.plot(epochs, _column(rows, "train_loss"), "x--", color=color, alpha=0.6, label=f"{name} (train)")
    ax_acc.set(title="evaluation accuracy", xlabel="epoch", ylabel="%")
    ax_loss.set(title="loss (solid: evaluation, dashed: train)", xlabel="epoch", ylabel="cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=8)
    return save(fig, path)


# ----------------------------------------------------------------------------- confusion matrix


def _matrix(ax, values: np.ndarray, classes: list[str], title: str, fmt) -> None:
    k = len(classes)
    im = ax.imshow(values, cmap="Blues", vmin=0)
    ax.set(title=title, xlabel="predicted", ylabel="true")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=45 if max(map(len, classes)) > 2 else 0, ha="right" if
                       max(map(len, classes)) > 2 else "center", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    if k <= 20:
        top = values.max() if values.size else 0
        for i in range(k):
            for j in range(k):
                color = "white" if top and values[i, j] > 0.6 * top else "black"
                ax.text(j, i, fmt(values[i, j]), ha="center", va="center", fontsize=7 if k > 10 else 8, color=color)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def plot_confusion(counts, classes: list[str], path: str | Path, title: str = "") -> Path:
    """Counts and row-normalised (recall per true class) confusion matrices side by side."""
    cm = np.asarray(counts, dtype=np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = max(5.0, 0.5 * len(classes) + 2)
    fig = new_figure(2 * size + 1, size)
    ax_counts, ax_norm = fig.subplots(1, 2)
    _matrix(ax_counts, cm, classes, "counts", lambda v: f"{int(v)}")
    _matrix(ax_norm, norm, classes, "row-normalised (fraction of each true class)", lambda v: f"{v:.2f}" if v else "0")
    if title:
        fig.suptitle(title)
    return save(fig, path)


# ----------------------------------------------------------------------------- images


def plot_misclassified(images: torch.Tensor, true: list[str], predicted: list[str], confidence: list[float],
                       path: str | Path, cols: int = 8, title: str = "") -> Path:
    """A grid of images (de-normalised [N, C, H, W] in [0, 1]) titled true / predicted (confidence)."""
    n = len(images)
    nrows, ncols = grid_shape(max(n, 1), cols)
    fig = new_figure(1.7 * ncols, 2.0 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.axis("off")
    for i in range(n):
        show_image(axes[i], images[i])
        axes[i].axis("on")
        axes[i].set_title(f"true: {true[i]}\npred: {predicted[i]} ({confidence[i]:.0%})", fontsize=8, color="darkred")
    if n == 0:
        axes[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    fig.suptitle(title or "misclassified (highest loss first)")
    return save(fig, path)


def plot_gradcam(images: torch.Tensor, cam_pred: torch.Tensor, cam_true: torch.Tensor, true: list[str],
                 predicted: list[str], path: str | Path, layer: str = "") -> Path:
    """Per image: the image, the Grad-CAM of the predicted class and of the true class, overlaid."""
    n = len(images)
    per_row = 3 if n > 4 else 1  # image triplets per row
    nrows = max(1, math.ceil(n / per_row))
    fig = new_figure(5.4 * per_row, 2.0 * nrows + 0.5)
    axes = np.atleast_2d(fig.subplots(nrows, 3 * per_row)).reshape(nrows, 3 * per_row)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, per_row)
        ax_img, ax_p, ax_t = axes[r, 3 * c: 3 * c + 3]
        for ax, cam, label in ((ax_img, None, f"true: {true[i]}"), (ax_p, cam_pred[i], f"CAM pred: {predicted[i]}"),
                               (ax_t, cam_true[i], f"CAM true: {true[i]}")):
            ax.axis("on")
            show_image(ax, images[i])
            if cam is not None:
                ax.imshow(cam.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_title(label, fontsize=8)
    fig.suptitle(f"Grad-CAM{' at ' + layer if layer else ''}: where the evidence for a class lies (red = strong)")
    return save(fig, path)


def plot_activations(maps: dict[str, torch.Tensor], image: torch.Tensor, path: str | Path,
                     max_channels: int = 8, title: str = "") -> Path:
    """Feature maps of one image: one row per layer (its first ``max_channels`` channels), the image first."""
    names = [n for n, a in maps.items() if a.dim() == 4]
    nrows = max(1, len(names))
    ncols = max_channels + 1
    fig = new_figure(1.25 * ncols, 1.35 * nrows + 0.5)
    axes = np.atleast_2d(fig.subplots(nrows, ncols)).reshape(nrows, ncols)
    for ax in axes.ravel():
        ax.axis("off")
    for r, name in enumerate(names):
        act = maps[name][0]
        if r == 0:
            show_image(axes[0, 0], image)
            axes[0, 0].axis("on")
            axes[0, 0].set_title("input", fontsize=8)
        for c in range(min(max_channels, act.shape[0])):
            ax = axes[r, c + 1]
            ax.axis("on")
            ax.imshow(act[c].float().numpy(), cmap="viridis", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"channel {c}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"{name}\n{act.shape[0]}x{act.shape[1]}x{act.shape[2]}", fontsize=7)
    fig.suptitle(title or "feature maps of each block (brighter = stronger activation)")
    return save(fig, path)


def plot_lr_find(result: dict, path: str | Path) -> Path:
    """The LR range test: loss per step and smoothed, log-LR axis, the suggestion marked."""
    fig = new_figure(7, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result["lrs"], result["losses"], color="0.75", lw=0.8, label="loss per step")
    ax.plot(result["lrs"], result["smoothed"], color="C0", lw=2, label="smoothed loss")
    ax.axvline(result["suggestion"], color="C3", ls="--", label=f"suggested lr {result['suggestion']:.2g}")
    ax.set_xscale("log")
    low = min(result["smoothed"])
    ax.set_ylim(low * 0.9, min(max(result["losses"]), low * 4.5))
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {result['model']} on {result['dataset']}")
    ax.legend()
    ax.grid(alpha=0.3)
    return save(fig, path)


# ----------------------------------------------------------------------------- searches


def _trial_points(trials: list[dict], state: str, x_key: str | None) -> tuple[list, list]:
    """x (a trial attribute such as "params", or the trial number) and validation accuracy in %
    of the trials (records of a search's trials.json) in ``state``."""
    pts = [(r["attrs"][x_key] if x_key else r["number"], 100 * r["val_acc"]) for r in trials
           if r["state"] == state and r["val_acc"] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_tradeoff(trials: list[dict], front: list[dict], best: dict | None, budget: int | None,
                  path: str | Path, size_key: str = "params") -> Path:
    """Validation accuracy against model size, one point per trial: trained, pruned (at the last
    epoch it reported), the Pareto front, the best trial, the budget line, and the designs
    rejected before training as ticks on the size axis."""
    fig = new_figure(8, 4.6)
    ax = fig.subplots()
    xs, ys = _trial_points(trials, "complete", size_key)
    ax.scatter(xs, ys, color="C0", label="trained", zorder=3)
    xs, ys = _trial_points(trials, "pruned", size_key)
    if xs:
        ax.scatter(xs, ys, marker="x", color="0.55", label="pruned (last epoch reported)", zorder=2)
    if front:
        ax.plot([r["attrs"][size_key] for r in front], [100 * r["val_acc"] for r in front], "-", color="C1",
                label="Pareto front", zorder=1)
    if best is not None:
        ax.scatter([best["attrs"][size_key]], [100 * best["val_acc"]], marker="*", s=260, color="C3",
                   label=f"best (trial {best['number']})", zorder=4)
    rejected = [r["attrs"][size_key] for r in trials if r["state"] == "rejected" and size_key in r["attrs"]]
    if rejected:
        ax.plot(rejected, [0.02] * len(rejected), "|", ms=14, color="C3", transform=ax.get_xaxis_transform(),
                label="rejected before training")
    if budget:
        ax.axvline(budget, ls="--", color="C3", label=f"budget {budget:,} {size_key}")
    ax.set(title=f"validation accuracy against {size_key}", xlabel=size_key, ylabel="validation accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_search_history(trials: list[dict], path: str | Path) -> Path:
    """Validation accuracy per trial number, with the best so far."""
    fig = new_figure(8, 3.8)
    ax = fig.subplots()
    xs, ys = _trial_points(trials, "complete", None)
    ax.scatter(xs, ys, color="C0", label="trained", zorder=3)
    if ys:
        ax.step(xs, np.maximum.accumulate(ys), where="post", color="C1", label="best so far")
    px, py = _trial_points(trials, "pruned", None)
    if px:
        ax.scatter(px, py, marker="x", color="0.55", label="pruned (last epoch reported)")
    ax.set(title="optimisation history", xlabel="trial", ylabel="validation accuracy %")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_importances(importances: dict[str, float], path: str | Path) -> Path:
    """Horizontal bars: how much each searched key mattered (Optuna's importances, summing to 1)."""
    names = list(importances)[::-1]
    fig = new_figure(8, 0.9 + 0.35 * max(1, len(names)))
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names], color="C0")
    ax.set(title="parameter importances", xlabel="importance (sum 1)")
    ax.grid(alpha=0.3, axis="x")
    return save(fig, path)
