"""Understanding a run: evaluation pictures, the one-file HTML report, the runs table, comparisons.

``evaluate_and_plot(run)`` evaluates a run (``evaluate.evaluate``) and draws its pictures.
``write_report(run)`` writes ``report.html``: one self-contained file (images as base64 data
URIs, inline CSS, no JavaScript, nothing fetched) that reads top to bottom as what was trained,
how training went, where the model fails and why. ``runs_table`` lists runs; ``compare``
overlays the curves of several runs.
"""

from __future__ import annotations

import base64
import html
import tomllib
from datetime import datetime
from pathlib import Path

import torch

from cnnlab import evaluate, gradcam, jsonfile, plots, runs
from cnnlab.augment import denormalize, normalize
from cnnlab.errors import CnnlabError
from cnnlab.tables import format_table

PICTURES = ("curves.png", "confusion.png", "misclassified.png", "gradcam.png", "activations.png")


# ----------------------------------------------------------------------------- evaluation + pictures


def _normalized(ev: evaluate.Evaluation, idx: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(ev.mean, dtype=torch.float32)
    std = torch.tensor(ev.std, dtype=torch.float32)
    return normalize(ev.split.images[idx], mean, std)


def misclassified_indices(ev: evaluate.Evaluation, n: int) -> torch.Tensor:
    """Indices of up to ``n`` misclassified images, highest loss first."""
    labels = ev.split.labels
    loss = evaluate.per_sample_loss(ev.logits, labels)
    wrong = (ev.logits.argmax(1) != labels).nonzero().flatten()
    return wrong[loss[wrong].argsort(descending=True)][:n]


def evaluate_and_plot(run_dir: str | Path, checkpoint: str = "best", split: str | None = None, tta: bool | None = None,
                      n_images: int = 16, layer: str | None = None, out_dir: str | Path | None = None) -> dict:
    """Evaluate a run, write eval.json and the pictures (``PICTURES``) into ``out_dir`` (default: the run)."""
    run_dir = Path(run_dir)
    if n_images < 1:
        raise CnnlabError(f"--n {n_images}: show at least 1 image")
    ev = evaluate.evaluate(run_dir, checkpoint, split, tta, n_images, out_dir)
    out = Path(out_dir or run_dir)
    s = ev.summary
    title = f"{run_dir.name}: {s['model']} on {s['dataset']} ({s['split']}, {checkpoint}.pt)"
    rows = runs.read_metrics(run_dir)
    if rows:
        plots.plot_curves(rows, out / "curves.png", title=run_dir.name)
    plots.plot_confusion(s["confusion_matrix"], ev.classes, out / "confusion.png", title=title)

    idx = misclassified_indices(ev, n_images)
    x = _normalized(ev, idx)
    shown = denormalize(x, ev.mean, ev.std)
    probs = ev.logits[idx].softmax(1)
    pred, true = probs.argmax(1), ev.split.labels[idx]
    true_names = [ev.classes[int(t)] for t in true]
    pred_names = [ev.classes[int(p)] for p in pred]
    plots.plot_misclassified(shown, true_names, pred_names, [float(p.max()) for p in probs],
                             out / "misclassified.png")

    with gradcam.GradCAM(ev.model, layer=layer, input_shape=tuple(ev.split.images.shape[1:])) as cam:
        cam_pred = cam(x, pred) if len(x) else torch.zeros(0)
        cam_true = cam(x, true) if len(x) else torch.zeros(0)
        cam_layer = cam.layer
    plots.plot_gradcam(shown, cam_pred, cam_true, true_names, pred_names, out / "gradcam.png", layer=cam_layer)

    first = torch.tensor([0])
    layers = [layer] if layer else None
    maps = gradcam.activations(ev.model, _normalized(ev, first), layers)
    label = ev.classes[int(ev.split.labels[0])]
    plots.plot_activations(maps, denormalize(_normalized(ev, first), ev.mean, ev.std)[0], out / "activations.png",
                           max_channels=16 if layer else 8,
                           title=f"feature maps of {s['split']} image 0 (a '{label}'), brighter = stronger")
    s.update(gradcam_layer=cam_layer, misclassified_shown=[int(i) for i in idx],
             pictures=[p for p in PICTURES if (out / p).is_file()])
    runs.write_json(out / "eval.json", s)
    return s


# ----------------------------------------------------------------------------- the HTML report


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1180px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 3px solid #2a6fb0; padding-bottom: .2em; }
h2 { margin-top: 2em; color: #2a6fb0; border-bottom: 1px solid #ccd; }
pre { background: #f5f6f8; padding: .8em; overflow-x: auto; font-size: 12px; border: 1px solid #e2e4e8; }
summary { font-weight: bold; margin: 1em 0 .4em; cursor: pointer; }
table { border-collapse: collapse; margin: .6em 0; font-size: 14px; }
th, td { border: 1px solid #d6d9de; padding: .25em .6em; text-align: right; }
th { background: #eef2f7; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #e2e4e8; margin: .4em 0; }
.numbers { display: flex; flex-wrap: wrap; gap: .8em; }
.numbers div { background: #eef2f7; padding: .5em .9em; border-radius: 6px; }
.numbers b { display: block; font-size: 1.4em; }
.note { color: #666; font-size: 13px; }
"""


def _esc(v) -> str:
    return html.escape(str(v))


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _loss(v) -> str:
    return f"{v:.4f}" if v is not None else "-"


def _secs(v) -> str:
    return "not reached" if v is None else f"{v:.1f} s"


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def table(head: list[str], body: list[list]) -> str:
    h = "".join(f"<th>{_esc(c)}</th>" for c in head)
    rows = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in body)
    return f"<table><tr>{h}</tr>{rows}</table>"


def numbers(items: list[tuple[str, str]]) -> str:
    return '<div class="numbers">' + "".join(f"<div>{_esc(k)}<b>{_esc(v)}</b></div>" for k, v in items) + "</div>"


def _needs_evaluation(run_dir: Path) -> bool:
    ev = run_dir / "eval.json"
    if evaluate.read_eval(run_dir) is None or any(not (run_dir / p).is_file() for p in PICTURES[1:]):
        return True
    ckpt = run_dir / "best.pt"
    return ckpt.is_file() and ckpt.stat().st_mtime > ev.stat().st_mtime


def section_trained(run_dir: Path, result: dict) -> str:
    config = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").is_file() else "(no config.toml)"
    summary = (run_dir / "summary.txt").read_text() if (run_dir / "summary.txt").is_file() else "(no summary.txt)"
    facts = numbers([("model", result.get("model", "?")), ("dataset", result.get("dataset", "?")),
                     ("parameters", f"{result.get('params', 0):,}"), ("epochs run", result.get("epochs_run", "?")),
                     ("device", f"{result.get('device', '?')} / {result.get('dtype', '?')}")])
    # long listings fold away (<details> needs no script); the key facts stay in view
    return (f"<h2>1. What was trained</h2>{facts}"
            f"<details><summary>Recipe (config.toml)</summary><pre>{_esc(config)}</pre></details>"
            f"<details open><summary>Model summary</summary><pre>{_esc(summary)}</pre></details>")


def section_training(run_dir: Path, result: dict, rows: list[dict]) -> str:
    split = runs.eval_split(result)
    target = result.get("target")
    ttt = _secs(result.get("time_to_target_s")) if target else "no target set"
    if target and result.get("target_epoch"):
        ttt += f" (epoch {result['target_epoch']})"
    facts = numbers([(f"final {split} accuracy", _pct(runs.final_acc(result))),
                     (f"best {split} accuracy", _pct(runs.best_acc(result))),
                     ("target", _pct(target) if target else "none"), (f"time to target ({split})", ttt),
                     ("training time", _secs(result.get("train_seconds"))),
                     ("wall time", _secs(result.get("wall_seconds"))), ("status", result.get("status", "?"))])
    parts = [f"<h2>2. How training went</h2>{facts}"]
    if result.get("note"):
        parts.append(f"<p class=note>{_esc(result['note'])}</p>")
    if (run_dir / "curves.png").is_file():
        parts.append(image_tag(run_dir / "curves.png", "loss, accuracy and learning rate per epoch"))
    body = [[r["epoch"], f"{r['lr']:.3g}", f"{r['images']:,}" if "images" in r else "?", f"{r['train_loss']:.4f}",
             _pct(r["train_acc"]), _loss(r.get(f"{split}_loss")), _pct(r.get(f"{split}_acc")), f"{r['epoch_seconds']:.1f}",
             f"{r['train_seconds']:.1f}"] for r in rows]
    parts.append(table(["epoch", "lr", "images", "train loss", "train acc", f"{split} loss", f"{split} acc", "epoch s",
                        "total train s"], body))
    if len({r.get("images") for r in rows}) > 1:
        parts.append("<p class=note>Epochs after the first trained on the hardest images only (train.hard_fraction): "
                     "their train loss and accuracy are those of the hard images.</p>")
    if (run_dir / "lr_find.png").is_file():
        parts.append("<h3>Learning-rate finder</h3>" + image_tag(run_dir / "lr_find.png", "LR range test"))
    return "".join(parts)


def tta_text(ev: dict) -> str:
    """The test-time augmentation an eval.json used, in words."""
    views = ", ".join(["flip"] * bool(ev.get("tta")) + [f"shift {ev['tta_shift']} px"] * bool(ev.get("tta_shift")))
    fraction = ev.get("tta_fraction") or 1.0
    if views and fraction < 1:
        views += f" (for the least confident {fraction:.0%} of each batch)"
    return views or "off"


def section_failures(run_dir: Path, ev: dict) -> str:
    facts = numbers([(f"{ev['split']} accuracy", _pct(ev["accuracy"])),
                     ("balanced accuracy", _pct(ev["balanced_accuracy"])),
                     ("images", f"{ev['n']:,}"), ("loss", f"{ev['loss']:.4f}"),
                     ("checkpoint", f"{ev['checkpoint']}.pt (epoch {ev.get('epoch', '?')})"),
                     ("TTA", tta_text(ev))])
    body = [[c, _pct(v["precision"]), _pct(v["recall"]), f"{v['f1']:.3f}", v["support"]]
            for c, v in ev["per_class"].items()]
    pairs = [[p["true"], p["predicted"], p["count"]] for p in ev["most_confused"]]
    parts = [f"<h2>3. Where it fails</h2>{facts}<h3>Per class</h3>",
             table(["class", "precision", "recall (= class accuracy)", "F1", "images"], body),
             image_tag(run_dir / "confusion.png", "confusion matrix: counts and row-normalised"),
             "<h3>Most-confused pairs</h3>",
             table(["true class", "predicted as", "images"], pairs) if pairs else "<p>No confusions.</p>",
             "<h3>Misclassified images (highest loss first)</h3>",
             image_tag(run_dir / "misclassified.png", "misclassified images with true and predicted class")]
    return "".join(parts)


def section_why(run_dir: Path, ev: dict) -> str:
    layer = ev.get("gradcam_layer", "?")
    return ("<h2>4. Why: what the model looks at</h2>"
            f"<p>Grad-CAM at layer <code>{_esc(layer)}</code> for the misclassified images above: for each image, "
            "the evidence for the predicted class and for the true class (red = strong).</p>"
            + image_tag(run_dir / "gradcam.png", "Grad-CAM overlays")
            + "<h3>Feature maps</h3>" + image_tag(run_dir / "activations.png", "feature maps of each block"))


def build_html(run_dir: Path, result: dict, rows: list[dict], ev: dict) -> str:
    title = f"cnnlab report: {run_dir.name}"
    when = datetime.now().isoformat(timespec="seconds")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>"
            f"<p class=\"note\">{_esc(result.get('model', '?'))} on {_esc(result.get('dataset', '?'))}; "
            f"run directory {_esc(run_dir)}; report written {when}.</p>"
            + section_trained(run_dir, result) + section_training(run_dir, result, rows)
            + section_failures(run_dir, ev) + section_why(run_dir, ev) + "</body></html>\n")


def write_report(run_dir: str | Path, log=lambda *a, **k: None) -> Path:
    """Write ``report.html`` in the run (evaluating it first when eval.json or pictures are missing)."""
    run_dir = runs.existing_run(run_dir)
    result = runs.read_result(run_dir)
    rows = runs.read_metrics(run_dir)
    if _needs_evaluation(run_dir):
        log(f"evaluating {run_dir} first (no up-to-date eval.json and pictures)")
        evaluate_and_plot(run_dir)
    if rows and not (run_dir / "curves.png").is_file():
        plots.plot_curves(rows, run_dir / "curves.png", title=run_dir.name)
    ev = evaluate.read_eval(run_dir)
    if ev is None:
        raise CnnlabError(f"{run_dir / 'eval.json'}: unreadable; run `cnnlab evaluate {run_dir}` again")
    path = run_dir / "report.html"
    runs.write_text(path, build_html(run_dir, result, rows, ev))
    return path


# ----------------------------------------------------------------------------- runs table, compare


COLUMNS = ("name", "model", "dataset", "params", "epochs", "best_acc", "time_to_target", "date")
DESCENDING = {"best_acc", "date", "params"}


def run_row(run_dir: Path) -> dict:
    """One row of the runs table (from result.json; from config.toml for an unfinished run)."""
    row = {"name": run_dir.name, "model": "?", "dataset": "?", "params": None, "epochs": None, "best_acc": None,
           "time_to_target": None, "date": ""}
    path = run_dir / "result.json"
    try:
        r = jsonfile.read_object(path) if path.is_file() else None
    except CnnlabError:  # a damaged run still gets its row, from its config
        r = None
    if r is not None:
        row.update(model=r.get("model", "?"), dataset=r.get("dataset", "?"), params=r.get("params"),
                   epochs=r.get("epochs_run"), best_acc=runs.best_acc(r), time_to_target=r.get("time_to_target_s"),
                   date=(r.get("finished") or "")[:16].replace("T", " "))
    else:
        try:
            cfg = tomllib.loads((run_dir / "config.toml").read_text())
            row.update(model=cfg.get("model", {}).get("name", "?"), dataset=cfg.get("data", {}).get("dataset", "?"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            pass
        row["date"] = "unfinished"
    return row


def sort_rows(rows: list[dict], col: str) -> list[dict]:
    """Rows sorted by ``col`` (accuracy, params, date: largest first); rows without a value last."""
    missing = [r for r in rows if r[col] is None or r[col] in ("", "unfinished")]
    present = [r for r in rows if r not in missing]
    return sorted(present, key=lambda r: r[col], reverse=col in DESCENDING) + missing


def format_rows(rows: list[dict]) -> str:
    head = ("name", "model", "dataset", "params", "epochs", "best acc", "time-to-target", "date")
    body = [(r["name"], r["model"], r["dataset"], f"{r['params']:,}" if r["params"] is not None else "?",
             str(r["epochs"]) if r["epochs"] is not None else "?", _pct(r["best_acc"]),
             _secs(r["time_to_target"]) if r["time_to_target"] is not None else "-", r["date"]) for r in rows]
    return format_table(head, body, left=(0, 1, 2, 7))


def runs_table(root: str | Path = "runs", sort_by: str = "date") -> str:
    """A text table of the runs under ``root`` (or of ``root`` itself when it is one run)."""
    root = Path(root)
    if sort_by not in COLUMNS:
        raise CnnlabError(f"--sort {sort_by!r}: expected one of {', '.join(COLUMNS)}")
    if not root.is_dir():
        raise CnnlabError(f"{root}: no such directory; pass the folder holding your runs (default runs/)")
    found = runs.list_runs(root)
    if not found:
        return f"no runs in {root} (train one with `cnnlab train RECIPE --out {root}/NAME`)"
    return format_rows(sort_rows([run_row(p) for p in found], sort_by))


def compare(run_dirs: list[str | Path], out: str | Path = "compare.png") -> tuple[Path, str]:
    """Overlay the curves of several runs into one PNG; return it and a text table of the runs."""
    if not run_dirs:
        raise CnnlabError("compare needs at least one run directory, e.g. cnnlab compare runs/a runs/b")
    named, rows = [], []
    for d in map(Path, run_dirs):
        runs.existing_run(d)
        metrics = runs.read_metrics(d)
        if not metrics:
            raise CnnlabError(f"{d}: no metrics.jsonl rows; the run has not finished an epoch")
        named.append((d.name, metrics))
        rows.append(run_row(d))
    names = [n for n, _ in named]
    if len(set(names)) != len(names):  # same folder names under different parents: use the paths
        named = [(str(d), m) for d, (_, m) in zip(run_dirs, named)]
    path = plots.plot_compare(named, out)
    return path, format_rows(rows)
