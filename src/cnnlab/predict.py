"""Classify image files with a trained run or an exported ONNX file (``cnnlab predict``).

Each file is decoded as the run's training data were stored: grey or RGB as the dataset, scaled to
cover the model's input size and centre-cropped to it (area averaging when shrinking, so an image
enlarged by a whole factor comes back to its exact pixels), 8 bits per channel. The batch then goes
through the same ``Loader`` normalisation (the dataset's mean/std) and ``evaluate.predict`` as
``cnnlab evaluate``, with the run's test-time augmentation and autocast dtype: the same pixels get
the same predictions.

An ONNX file made by ``cnnlab export`` carries that preprocessing as ``cnnlab.*`` metadata; a file
from elsewhere needs it given (mean, std, size).
"""

from __future__ import annotations

import csv
import glob
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cnnlab import __version__, evaluate, runs
from cnnlab.augment import Loader
from cnnlab.atomic import check_writable
from cnnlab.formats import IMAGE_SUFFIXES, open_image, visible_files
from cnnlab.errors import CnnlabError
from cnnlab.onnxfile import OrtModel

OUTPUT_FORMATS = (".csv", ".json")


@dataclass(frozen=True)
class Preprocessing:
    """What turns an image file into a model input, and how predictions are averaged."""

    shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] = ()  # empty: classes are named by their logit index
    tta: bool = False  # average each image with its mirror
    tta_shift: int = 0  # and with its copies shifted by -+tta_shift pixels


@dataclass
class Classifier:
    model: nn.Module  # a run's model, or an ONNX file in ONNX Runtime
    prep: Preprocessing
    dtype: torch.dtype  # autocast dtype (a run's train.dtype; float32 for ONNX)
    source: str  # what predicts, for the output


@dataclass
class Predictions:
    rows: list[dict]  # per readable file: path, pred, prob, top [{class, prob}, ...]
    failures: list[str]  # one line per file that could not be read
    other_ground: list[str] = field(default_factory=list)  # grey files whose border is light where the
    # training images' ground is dark (MNIST), or dark where it is light: see ``ground_note``


# ----------------------------------------------------------------------------- what a model expects


def run_preprocessing(ckpt: dict, tta: bool | None = None) -> Preprocessing:
    """A run's preprocessing from its checkpoint; ``tta`` as in ``evaluate.run_tta``."""
    info = ckpt["dataset"]
    flip, shift = evaluate.run_tta(ckpt, tta)
    return Preprocessing(tuple(info["shape"]), tuple(info["mean"]), tuple(info["std"]), tuple(info["classes"]),
                         flip, shift)


def onnx_metadata(ckpt: dict, prep: Preprocessing, run_name: str, checkpoint: str) -> dict[str, str]:
    """The ``cnnlab.*`` metadata of an ONNX file exported from a run's checkpoint."""
    return {
        "cnnlab.version": __version__, "cnnlab.run": run_name, "cnnlab.checkpoint": checkpoint,
        "cnnlab.model": ckpt["model_name"], "cnnlab.dataset": ckpt["dataset"]["name"],
        "cnnlab.classes": json.dumps(list(prep.classes)), "cnnlab.mean": json.dumps(list(prep.mean)),
        "cnnlab.std": json.dumps(list(prep.std)), "cnnlab.input_shape": json.dumps(list(prep.shape)),
        "cnnlab.tta": json.dumps(prep.tta), "cnnlab.tta_shift": json.dumps(prep.tta_shift),
    }


def metadata_preprocessing(meta: dict[str, str], path) -> Preprocessing | None:
    """The preprocessing an ONNX file's cnnlab metadata gives; None for a file without it."""
    if "cnnlab.input_shape" not in meta:
        return None
    try:
        prep = Preprocessing(tuple(int(v) for v in json.loads(meta["cnnlab.input_shape"])),
                             tuple(float(v) for v in json.loads(meta["cnnlab.mean"])),
                             tuple(float(v) for v in json.loads(meta["cnnlab.std"])),
                             tuple(str(c) for c in json.loads(meta["cnnlab.classes"])),
                             bool(json.loads(meta.get("cnnlab.tta", "false"))),
                             int(json.loads(meta.get("cnnlab.tta_shift", "0"))))
    except (KeyError, ValueError, TypeError) as e:
        raise CnnlabError(f"{path}: damaged cnnlab metadata ({type(e).__name__}: {e}); export the run again "
                          f"with `cnnlab export`") from None
    if len(prep.shape) != 3 or not len(prep.mean) == len(prep.std) == prep.shape[0]:
        raise CnnlabError(f"{path}: cnnlab metadata gives input shape {list(prep.shape)} with {len(prep.mean)} means "
                          f"and {len(prep.std)} stds; export the run again with `cnnlab export`")
    return prep


def given_preprocessing(model: OrtModel, mean, std, size, path) -> Preprocessing:
    """The preprocessing of an ONNX file not made by cnnlab, from --mean, --std and --size."""
    missing = [flag for flag, v in (("--mean", mean), ("--std", std), ("--size", size)) if v is None]
    if missing:
        raise CnnlabError(f"{path} has no cnnlab metadata (it was not made by `cnnlab export`), so how its "
                          f"inputs were normalised is unknown: pass {', '.join(missing)}, "
                          f"e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --size 224")
    channels = len(mean)
    if len(std) != channels or channels not in (1, 3):
        raise CnnlabError(f"--mean has {len(mean)} values and --std {len(std)}: give one per channel, "
                          f"1 for grey or 3 for RGB models")
    dims = model.input.shape
    if len(dims) != 4 or (isinstance(dims[1], int) and dims[1] != channels):
        raise CnnlabError(f"{path} takes input {dims} but --mean gives {channels} channel(s); expected "
                          f"[batch, {channels}, height, width]: give one mean and std per input channel")
    return Preprocessing((channels, *size), tuple(mean), tuple(std))


def load_classifier(source: str | Path, checkpoint: str = "best", tta: bool | None = None,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                    size: tuple[int, int] | None = None) -> Classifier:
    """A run directory's model (its ``checkpoint``), or an ``.onnx`` file in ONNX Runtime.

    ``mean``/``std``/``size`` are for ONNX files not made by cnnlab; a run or a cnnlab file carries
    its own. ``tta=None`` averages as the run evaluated itself; True/False force it on/off."""
    path = Path(source)
    given = [flag for flag, v in (("--mean", mean), ("--std", std), ("--size", size)) if v is not None]
    if path.suffix.lower() != ".onnx":
        if given:
            raise CnnlabError(f"{', '.join(given)}: only for ONNX files not made by cnnlab; the run {path} "
                              f"carries its own preprocessing: drop {', '.join(given)}")
        ckpt, model = evaluate.load_run_model(path, checkpoint)
        return Classifier(model, run_preprocessing(ckpt, tta), evaluate.run_dtype(ckpt, model),
                          f"{path} ({checkpoint}.pt)")
    if not path.is_file():
        raise CnnlabError(f"{path}: no such file; pass a run directory or an .onnx file (`cnnlab export RUN`)")
    model = OrtModel(path)
    prep = metadata_preprocessing(model.metadata, path)
    if prep is None:
        prep = given_preprocessing(model, mean, std, size, path)
    elif given:
        raise CnnlabError(f"{path} carries its own preprocessing (made by `cnnlab export`): drop {', '.join(given)}")
    if tta is not None:
        prep = replace(prep, tta=tta, tta_shift=prep.tta_shift if tta else 0)
    return Classifier(model, prep, torch.float32, str(path))


# ----------------------------------------------------------------------------- image files


def find_images(paths: list[str]) -> tuple[list[Path], list[str]]:
    """Files to predict and problems (one line each): named files as they are (whatever their
    suffix), and the image files (by suffix) in folders, recursively (hidden files and folders
    skipped, as in image-folder datasets), and matched by globs."""
    files, problems = [], []
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    for text in paths:
        path = Path(text).expanduser()
        if path.is_file():
            files.append(path)
            continue
        if path.is_dir():
            found = [f for f in visible_files(path) if f.suffix.lower() in IMAGE_SUFFIXES]
            where = "in this folder or its subfolders"
        elif any(ch in text for ch in "*?["):
            found = sorted(Path(m) for m in glob.glob(text, recursive=True)
                           if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_SUFFIXES)
            where = "matched by this pattern"
        else:
            problems.append(f"{text}: no such file or folder")
            continue
        if not found:
            problems.append(f"{text}: no image files ({suffixes}) {where}")
        files += found
    return files, problems


def fit(image, width: int, height: int):
    """Scale a PIL image to cover ``width`` x ``height`` and centre-crop it there (area averaging when
    shrinking, bicubic when enlarging); an image of that size is returned as it is."""
    from PIL import Image, ImageOps

    if image.size == (width, height):
        return image
    shrinking = max(width / image.width, height / image.height) <= 1
    return ImageOps.fit(image, (width, height), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)


def read_image(path: Path, shape: tuple[int, int, int], invert: bool = False) -> np.ndarray:
    """A file as uint8 [C, H, W] for a model taking ``shape``: grey (C = 1) or RGB (C = 3), any size;
    ``invert``: each value v of the file read as 255 - v."""
    from PIL import ImageOps

    channels, height, width = shape
    image = open_image(path, grey=channels == 1)
    if invert:
        image = ImageOps.invert(image)
    pixels = np.array(fit(image, width, height))  # a copy torch may own
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- predicting


def predict_files(clf: Classifier, files: list[Path], batch_size: int = 256, top: int = 1,
                  invert: bool = False) -> Predictions:
    """Top-``top`` classes and probabilities of each readable file, ``batch_size`` files at a time;
    files that cannot be read are listed in ``failures``. A progress bar shows on large folders.
    ``invert``: as in ``read_image``."""
    if batch_size < 1:
        raise CnnlabError(f"--batch-size {batch_size}: give a batch size >= 1, e.g. 256")
    rows, failures, other_ground = [], [], []
    p = clf.prep
    with tqdm(total=len(files), unit="image", leave=False, disable=len(files) <= 4 * batch_size or None) as bar:
        for start in range(0, len(files), batch_size):
            images, readable = [], []
            for f in files[start:start + batch_size]:
                try:
                    images.append(torch.from_numpy(read_image(f, p.shape, invert)))
                    readable.append(f)
                    if p.shape[0] == 1 and light_border(images[-1]) != (p.mean[0] > 0.5):
                        other_ground.append(str(f))
                except CnnlabError as e:
                    failures.append(str(e))
            bar.update(min(batch_size, len(files) - start))
            if not images:
                continue
            loader = Loader(torch.stack(images), torch.zeros(len(images), dtype=torch.long), len(images), p.mean, p.std)
            logits, _ = evaluate.predict(clf.model, loader, tta=p.tta, dtype=clf.dtype, tta_shift=p.tta_shift)
            rows += prediction_rows(readable, logits, p.classes, top)
    return Predictions(rows, failures, other_ground)


def light_border(image: torch.Tensor) -> bool:
    """Whether the outermost pixels of a uint8 [C, H, W] image are light on average (> 127.5)."""
    ring = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], 1)
    return ring.float().mean().item() > 127.5


def ground_note(preds: Predictions, prep: Preprocessing, invert: bool) -> str | None:
    """One line when grey files look the other way round from the training images (light digits on a
    dark ground for MNIST): the likely cause is dark ink on light paper, which ``--invert`` reads."""
    if not preds.other_ground:
        return None
    seen, trained = ("light", "dark") if prep.mean[0] <= 0.5 else ("dark", "light")  # border, training ground
    advice = ("--invert made them so: drop it for these files" if invert else
              f"if they are {trained} ink on a {seen} ground, add --invert")
    return (f"note: {len(preds.other_ground)} of {len(preds.rows)} images have a {seen} border, but the model "
            f"was trained on {seen} ink on a {trained} ground; {advice}")


def prediction_rows(files: list[Path], logits: torch.Tensor, classes: tuple[str, ...], top: int) -> list[dict]:
    names = list(classes) or [str(i) for i in range(logits.shape[1])]
    if not 1 <= top <= len(names):
        raise CnnlabError(f"--top {top}: the model has {len(names)} classes; give 1 to {len(names)}")
    probs, idx = logits.softmax(1).topk(top, dim=1)
    return [{"path": str(f), "pred": names[int(i[0])], "prob": float(q[0]),
             "top": [{"class": names[int(j)], "prob": float(v)} for v, j in zip(q, i)]}
            for f, q, i in zip(files, probs, idx)]


# ----------------------------------------------------------------------------- output


def check_output(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise CnnlabError(f"--out {path}: expected a .csv or .json file name")
    return check_writable(path)


def write_predictions(path: str | Path, preds: Predictions, source: str) -> Path:
    """A CSV (header: path, pred, prob, then class2, prob2, ... for the other top-k) or a JSON file."""
    path = check_output(path)
    if path.suffix.lower() == ".json":
        runs.write_json(path, {"model": source, "predictions": preds.rows, "unreadable": preds.failures})
        return path
    top = len(preds.rows[0]["top"]) if preds.rows else 1
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "pred", "prob"] + [f"{col}{k}" for k in range(2, top + 1) for col in ("class", "prob")])
    for r in preds.rows:
        writer.writerow([r["path"], r["pred"], f"{r['prob']:.6f}"]
                        + [v for t in r["top"][1:] for v in (t["class"], f"{t['prob']:.6f}")])
    runs.write_text(path, buf.getvalue())
    return path


def predictions_table(rows: list[dict]) -> str:
    """One line per image: path, predicted class, its probability, then the other top-k classes."""
    width = max(len(r["path"]) for r in [{"path": "path"}, *rows])
    classes = max(len(t["class"]) for r in rows for t in r["top"])
    head = ["pred"] + [f"#{k}" for k in range(2, len(rows[0]["top"]) + 1)]
    lines = [f"{'path':<{width}}  " + "  ".join(f"{h:<{classes}} {'prob':>6}" for h in head)]
    lines += [f"{r['path']:<{width}}  " + "  ".join(f"{t['class']:<{classes}} {t['prob']:6.1%}" for t in r["top"])
              for r in rows]
    return "\n".join(line.rstrip() for line in lines)
