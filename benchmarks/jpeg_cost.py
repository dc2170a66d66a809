"""What the shared CIFAR-10 copy's JPEG compression costs in accuracy, measured.

The shared copy (``../shared/data/cifar10-jpeg``) keeps the original pixels for about 7,700 of
its 50,000 images; the rest were decoded from JPEG files. A JPEG round trip (quality 75) barely
changes an image that already went through JPEG, but moves an original by ~6/255 per value, so
that error picks out the originals. This script takes those originals, holds out the last
``--test`` of them, and trains the same recipe twice on the same images: as they are, and
after one JPEG round trip (train and test images alike). It then evaluates each model on both
test sets and prints a Markdown table.

    python benchmarks/jpeg_cost.py --out /tmp/jpeg_cost [--recipe R] [--set key=value ...]

The default recipe is airbench94 scaled to the small set (batch 256 with the LR scaled to
match, 30 epochs, one thread). A run takes ~10 minutes per model on a free core.
"""

from __future__ import annotations

import argparse
import io
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cnnlab import config, data, formats, runs  # noqa: E402
from cnnlab.augment import Loader  # noqa: E402
from cnnlab.evaluate import DTYPES, loss_and_accuracy, predict  # noqa: E402
from cnnlab.runs import load_checkpoint, model_from_checkpoint  # noqa: E402
from cnnlab.train import train  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
SMALL_SET = ["data.val_split=0", "data.batch_size=256", "optim.lr=0.375", "train.epochs=30",
             "schedule.knots=[0.0, 6.9, 30.0]", "train.threads=1", "train.target=0", "train.quiet=true"]


def jpeg_round_trip(images: np.ndarray, quality: int = 75) -> np.ndarray:
    """uint8 [N, 3, H, W] -> the same images after JPEG encoding at ``quality`` and decoding."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img.transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB")).transpose(2, 0, 1)
    return out


def write_cifar_folder(folder: Path, train_x, train_y, test_x, test_y, meta: Path) -> None:
    """The CIFAR python-pickle layout: five training batches, ``test_batch``, ``batches.meta``."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(meta, folder / "batches.meta")
    for i, part in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        batch = {b"data": train_x[part].reshape(len(part), -1), b"labels": train_y[part].tolist()}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    test = {b"data": test_x.reshape(len(test_y), -1), b"labels": test_y.tolist()}
    (folder / "test_batch").write_bytes(pickle.dumps(test))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the two datasets and runs")
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared CIFAR-10 JPEG copy")
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "airbench94.toml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more recipe overrides")
    p.add_argument("--test", type=int, default=1000, help="originals held out for testing")
    p.add_argument("--threshold", type=float, default=3.0, help="round-trip error (per value, of 255) above "
                   "which an image counts as original")
    args = p.parse_args()

    info = data.DATASETS["cifar10"]
    raw, _, _ = formats.read_cifar_files(info, formats.cifar_files_from(args.shared, info), str(args.shared))
    x, y = raw["train_images"], raw["train_labels"]
    error = np.abs(jpeg_round_trip(x).astype(np.int16) - x).mean((1, 2, 3))
    keep = error > args.threshold
    x, y = x[keep], y[keep]
    print(f"{keep.sum()} of {len(keep)} images kept their original pixels (round-trip error > {args.threshold}/255)")
    meta_path = next(args.shared.rglob("batches.meta"))

    versions = {"original": x, "jpeg": jpeg_round_trip(x)}
    print(f"JPEG round trip moved them by {np.abs(versions['jpeg'].astype(np.int16) - x).mean():.2f}/255 per value")
    runs, tests = {}, {}
    for name, images in versions.items():
        src, root = args.out / f"src-{name}", args.out / f"data-{name}"
        write_cifar_folder(src, images[:-args.test], y[:-args.test], images[-args.test:], y[-args.test:], meta_path)
        data.get_dataset("cifar10", root=root, from_path=src, log=lambda *a, **k: None)
        tests[name] = data.load_dataset("cifar10", root=root, acquire=False, log=lambda *a, **k: None)
        cfg = config.load_recipe(args.recipe, SMALL_SET + args.set + [f"data.root={root}"])
        runs[name] = args.out / f"run-{name}"
        res = train(cfg, runs[name], overwrite=True, log=lambda *a, **k: None).result
        print(f"trained on {name}: {runs.final_acc(res):.2%} on its own test images, {res['train_seconds']:.0f} s")

    print("\n| trained on | tested on original | tested on JPEG |\n|---|---:|---:|")
    for name, run in runs.items():
        ckpt = load_checkpoint(run, "last")
        model = model_from_checkpoint(ckpt).eval()
        tcfg = ckpt["config"]["train"]
        accs = []
        for test_name in versions:
            ds = tests[test_name]
            loader = Loader(ds.test.images, ds.test.labels, 1000, ckpt["dataset"]["mean"], ckpt["dataset"]["std"])
            logits, labels = predict(model, loader, tcfg["tta"], DTYPES[tcfg["dtype"]], tcfg["tta_shift"])
            accs.append(loss_and_accuracy(logits, labels)[1])
        print(f"| {name} | {accs[0]:.2%} | {accs[1]:.2%} |")


if __name__ == "__main__":
    main()
