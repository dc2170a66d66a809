"""Datasets from their canonical release files, kept as uint8 tensors: the entry point.

A dataset is acquired once into a cache directory (``~/.cache/cnnlab`` or ``$CNNLAB_DATA``):
its release files are copied to ``<root>/<name>/raw/`` and checked against the published
checksums, then converted on first load to one compact uint8 tensor file
(``<root>/<name>/tensors.pt``) that later loads read in well under a second. The tensor file
records the size and mtime of the raw files it was built from and is rebuilt when they change.

Formats: IDX (raw or .gz) for MNIST and Fashion-MNIST, the python-pickle batches (a directory
or the ``.tar.gz`` archive) for CIFAR-10/100, and an image folder (``root/<class>/*.png``, with
``train/`` and ``test/`` subfolders or a single tree) for users' own images.

The work is split by concern, lowest first: ``datasets`` (the registry and the in-memory
``Dataset``), ``formats`` (reading each file format), ``cache`` (the tensor cache), ``acquire``
(getting the release files). This module loads a dataset through them and names what callers use.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab import jsonfile
from cnnlab.acquire import get_dataset
from cnnlab.cache import data_root, load_cached, load_folder_cached
from cnnlab.datasets import DATASETS, Dataset, Split, describe, split_validation, subset
from cnnlab.errors import CnnlabError

__all__ = ["DATASETS", "Dataset", "Split", "data_root", "dataset_ref", "describe", "get_dataset", "load_dataset",
           "subset"]


def load_dataset(name: str, root: str | Path | None = None, val_split: int = 0,
                 acquire: bool = True, log=print) -> Dataset:
    """Load a dataset by name (or an image-folder path) as uint8 tensors, from the tensor cache.

    Known datasets not yet in the cache are acquired first when an offline source exists
    (``acquire``). With ``val_split`` > 0 that many training images become the evaluation split
    ("val", see ``split_validation``); a dataset without a test split needs it.
    """
    ds = load_known(name, root, acquire, log) if name in DATASETS else load_folder(name, root)
    if val_split:
        ds = split_validation(ds, val_split)
    elif ds.test is None:
        raise CnnlabError(f"{ds.name} has no test split here; set val_split (e.g. val_split = 5000) "
                          f"to hold out validation images from the training set")
    return ds


def load_folder(name: str, root: str | Path | None) -> Dataset:
    path = Path(name).expanduser()
    if not path.is_dir():
        raise CnnlabError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}, "
                          f"or the path of an image folder (root/<class>/*.png)")
    return load_folder_cached(path, data_root(root))


def load_known(name: str, root: str | Path | None, acquire: bool, log) -> Dataset:
    folder = data_root(root) / name
    if not (folder / "source.json").is_file():
        if not acquire:
            raise CnnlabError(f"dataset '{name}' is not in {data_root(root)}: run `cnnlab data get {name}`")
        get_dataset(name, root=root, log=log)
    source = jsonfile.read_object(folder / "source.json", f"run `cnnlab data get {name}` again")
    if not isinstance(source.get("source"), str) or not isinstance(source.get("verified"), bool):
        raise CnnlabError(f"{folder / 'source.json'}: damaged (source or verified missing or of the wrong type); run `cnnlab data get {name}` again")
    ds = load_cached(name, folder / "raw", folder / "tensors.pt")
    # verified only if the acquired files were and the files read now still are
    ds.source, ds.verified = source["source"], source["verified"] and ds.verified
    if not ds.verified:
        log(f"warning: {name} from {ds.source} is an unverified copy (checksums differ from the release)")
    return ds


def dataset_ref(name: str) -> str:
    """How a recipe should name the dataset ``name`` to find it again from any working directory:
    a known dataset by its name, an image folder by its absolute path."""
    return name if name in DATASETS else str(Path(name).expanduser().resolve())
