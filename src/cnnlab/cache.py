"""The tensor cache: each dataset as one compact uint8 tensor file that loads in well under a second.

A known dataset's cache is ``<root>/<name>/tensors.pt``, an image folder's is
``<root>/folders/<folder name>-<hash of its path>.pt``. Each records the size and mtime of the
files it was built from and is rebuilt (atomically) when they change or when it is damaged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from cnnlab.atomic import atomic_torch_save
from cnnlab.datasets import Dataset, Split
from cnnlab.formats import read_image_folder, read_raw, to_dataset, visible_files


def data_root(root: str | Path | None = None) -> Path:
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("CNNLAB_DATA") or Path.home() / ".cache" / "cnnlab").expanduser()


def fingerprint(files: list[Path]) -> list[list]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]


def cached(name: str, cache: Path, fp: list, build) -> Dataset:
    """The dataset from ``cache`` when its fingerprint matches ``fp``; else ``build()`` it and save the cache."""
    if cache.is_file():
        try:
            blob = torch.load(cache, weights_only=True)
            if blob.get("fingerprint") == fp:
                return Dataset(name, blob["classes"], Split(blob["train_x"], blob["train_y"]),
                               Split(blob["test_x"], blob["test_y"]) if "test_x" in blob else None,
                               blob.get("source", ""), blob.get("verified", False),
                               mean=tuple(blob["mean"]), std=tuple(blob["std"]))
        except Exception:  # a damaged cache is rebuilt below
            pass
    ds = build()
    save_cache(cache, fp, ds)
    return ds


def save_cache(cache: Path, fp: list, ds: Dataset) -> None:
    """Write ``ds`` as the tensor cache ``cache`` of the files fingerprinted ``fp`` (atomically)."""
    blob = {"fingerprint": fp, "classes": ds.classes, "train_x": ds.train.images, "train_y": ds.train.labels,
            "mean": list(ds.mean), "std": list(ds.std), "source": ds.source, "verified": ds.verified}
    if ds.test is not None:
        blob.update(test_x=ds.test.images, test_y=ds.test.labels)
    atomic_torch_save(blob, cache)


def load_cached(name: str, raw: Path, cache: Path) -> Dataset:
    """A known dataset from its tensor cache, rebuilt when the raw release files change."""
    files = [f for f in raw.iterdir() if f.is_file()] if raw.is_dir() else []
    return cached(name, cache, fingerprint(files), lambda: read_raw(name, raw))


# the version of formats.read_image_folder's decoding: a cache made by an older reader is rebuilt
# (2: 16-bit grey scaled, EXIF rotation, hidden files skipped, one colour image makes all colour;
# 3: a picture drawn only in the alpha channel composited, not dropped)
FOLDER_READER = "image folder reader 3"


def load_folder_cached(path: Path, root: Path) -> Dataset:
    """An image folder from its tensor cache, rebuilt when any file under it changes."""
    files = visible_files(path)  # hidden files are not read (.DS_Store)
    fp = [FOLDER_READER] + [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.md5(str(path.resolve()).encode()).hexdigest()[:12]

    def build() -> Dataset:
        arrays, classes = read_image_folder(path)
        return to_dataset(path.name, arrays, classes, str(path), False)

    ds = cached(path.name, root / "folders" / f"{path.name}-{key}.pt", fp, build)
    ds.source, ds.folder = str(path), True
    return ds
