"""Shared fixtures: the real dataset cache, and writers of tiny datasets in the exact release formats.

Writers (plain functions, also exposed as fixtures so any test file can use them without imports):

- ``write_idx(path, array)``: an IDX file of unsigned bytes (magic 0x00000801/0x00000803), raw or
  gzip when ``path`` ends in ``.gz``.
- ``write_mnist_dir(folder, ...)``: the four MNIST-family IDX files.
- ``write_cifar_dir(folder, ...)``: CIFAR-10 or CIFAR-100 python-pickle batches
  (``data_batch_1..5``/``test_batch``/``batches.meta`` or ``train``/``test``/``meta``) inside
  ``folder/cifar-10-batches-py`` (or ``cifar-100-python``).
- ``write_tar_gz(folder, archive)``: the release ``.tar.gz`` with that folder inside.
- ``write_image_folder(root, ...)``: ``root/<class>/*.png`` or ``root/{train,test}/<class>/*.png``.

Shared by every test file: ``cli(*argv)`` runs the cnnlab command in the test's process;
``check`` holds the common assertions (``one_line_error``, ``untimed``, ``snapshot``);
``mnist_run`` is one short real-MNIST run per session; torch's thread count is restored after
each test (``train.threads`` sets it process-wide).
"""

from __future__ import annotations

import gzip
import os
import pickle
import signal
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------- environment


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Tests never reach for the network: ``get_dataset`` skips its download step."""
    monkeypatch.setenv("CNNLAB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real dataset cache (``$CNNLAB_DATA`` or ``~/.cache/cnnlab``), holding MNIST and Fashion-MNIST."""
    return Path(os.environ.get("CNNLAB_DATA") or Path.home() / ".cache" / "cnnlab").expanduser()


@pytest.fixture
def cache_root(tmp_path) -> Path:
    """An empty, private cache root for tests that acquire datasets."""
    root = tmp_path / "cache"
    root.mkdir()
    return root


def stray_files(root: Path) -> list[Path]:
    """Temporary or staging leftovers anywhere under ``root`` (there should be none)."""
    return [p for p in Path(root).rglob("*")
            if p.name.endswith(".tmp") or p.name.startswith((".staging-", ".raw-old"))]


# ----------------------------------------------------------------------------- IDX (MNIST family)


def idx_bytes(array: np.ndarray, magic: bytes | None = None) -> bytes:
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 0x08, a.ndim])
    return header + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@dataclass
class FakeIdx:
    folder: Path
    train_x: np.ndarray  # [N, H, W] uint8
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def path(self, stem: str) -> Path:
        return next(p for p in (self.folder / stem, self.folder / f"{stem}.gz") if p.exists())


def write_mnist_dir(folder: Path, n_train: int = 24, n_test: int = 12, gz: bool = False,
                    seed: int = 0, size: int = 28) -> FakeIdx:
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    tx = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    ty = (np.arange(n_train) % 10).astype(np.uint8)
    vx = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)
    vy = ((np.arange(n_test) + 3) % 10).astype(np.uint8)
    folder = Path(folder)
    write_idx(folder / f"train-images-idx3-ubyte{ext}", tx)
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", ty)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", vx)
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", vy)
    return FakeIdx(folder, tx, ty, vx, vy)


# ----------------------------------------------------------------------------- CIFAR pickle batches


def cifar_batch(data: np.ndarray, labels, label_key: bytes = b"labels", name: str = "batch") -> dict:
    """A batch dict exactly as in the release (python 2 pickles read with encoding='bytes')."""
    d = {b"batch_label": name.encode(), label_key: [int(v) for v in labels], b"data": data,
         b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))]}
    if label_key == b"fine_labels":
        d[b"coarse_labels"] = [int(v) // 5 for v in labels]
    return d


def write_pickle(path: Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
    return path


@dataclass
class FakeCifar:
    root: Path  # pass this to --from (it holds the archive folder)
    folder: Path  # root / cifar-10-batches-py (or cifar-100-python)
    train_x: np.ndarray  # [N, 3072] uint8, as written
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]


def write_cifar_dir(root: Path, name: str = "cifar10", per_batch: int = 8, n_test: int = 10,
                    seed: int = 0, classes: list[str] | None = None, test: bool = True) -> FakeCifar:
    """CIFAR release files under ``root/<archive folder>``: random pixels, labels cycling over classes."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    if name == "cifar10":
        folder, key = root / "cifar-10-batches-py", b"labels"
        train_names, test_name, n_classes = [f"data_batch_{i}" for i in range(1, 6)], "test_batch", 10
        classes = classes or [f"class_{c}" for c in CIFAR10_CLASSES]  # differ from the built-in names
    else:
        folder, key = root / "cifar-100-python", b"fine_labels"
        train_names, test_name, n_classes = ["train"], "test", 100
        per_batch = max(per_batch, 120)
        classes = classes or [f"fine_{i:03d}" for i in range(100)]
    xs, ys = [], []
    for b, bname in enumerate(train_names):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = (np.arange(per_batch) * 7 + b) % n_classes
        write_pickle(folder / bname, cifar_batch(x, y, key, f"training batch {b + 1}"))
        xs.append(x)
        ys.append(y)
    vx = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    vy = (np.arange(n_test) * 3 + 1) % n_classes
    if test:
        write_pickle(folder / test_name, cifar_batch(vx, vy, key, "testing batch 1"))
    if name == "cifar10":
        write_pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in classes],
                                               b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    else:
        write_pickle(folder / "meta", {b"fine_label_names": [c.encode() for c in classes],
                                       b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]})
    return FakeCifar(root, folder, np.concatenate(xs), np.concatenate(ys).astype(np.int64), vx,
                     vy.astype(np.int64), classes)


def write_tar_gz(folder: Path, archive: Path) -> Path:
    """``archive`` (.tar.gz) holding ``folder`` under its own name, like the release archive."""
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=Path(folder).name)
    return archive


# ----------------------------------------------------------------------------- image folders


@dataclass
class FakeImages:
    root: Path
    classes: list[str]
    images: dict[str, np.ndarray]  # part ("train"/"test") -> [N, C, H, W] uint8 in load order
    labels: dict[str, np.ndarray]


def write_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class: int = 3, size: int = 8,
                       mode: str = "RGB", layout: str = "single", seed: int = 0) -> FakeImages:
    """PNG images under ``root/<class>/`` (``layout="single"``) or ``root/{train,test}/<class>/``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    parts = {"train": root} if layout == "single" else {"train": root / "train", "test": root / "test"}
    images, labels = {}, {}
    for part, folder in parts.items():
        xs, ys = [], []
        for label, cls in enumerate(classes):
            (folder / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                if mode == "L":
                    arr = rng.integers(0, 256, (size, size), dtype=np.uint8)
                    chw = arr[None]
                else:
                    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                    chw = arr.transpose(2, 0, 1)
                Image.fromarray(arr, mode=mode).save(folder / cls / f"{i:03d}.png")
                xs.append(chw)
                ys.append(label)
        images[part], labels[part] = np.stack(xs), np.asarray(ys, dtype=np.int64)
    return FakeImages(root, list(classes), images, labels)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def tiny_mnist_dir(tmp_path) -> FakeIdx:
    """Four raw IDX files (24 train / 12 test images, 28x28) in a fresh folder."""
    return write_mnist_dir(tmp_path / "idx")


@pytest.fixture
def tiny_mnist_gz_dir(tmp_path) -> FakeIdx:
    """The same layout gzip-compressed (``*.gz``)."""
    return write_mnist_dir(tmp_path / "idx-gz", gz=True, seed=1)


@pytest.fixture
def tiny_cifar_dir(tmp_path) -> FakeCifar:
    """A CIFAR-10 release directory: 5 x 8 training images, 10 test images."""
    return write_cifar_dir(tmp_path / "cifar10-src")


@pytest.fixture
def tiny_cifar_tar(tmp_path) -> tuple[Path, FakeCifar]:
    """The same as a ``cifar-10-python.tar.gz`` archive (with ``cifar-10-batches-py/`` inside)."""
    fake = write_cifar_dir(tmp_path / "cifar10-tar-src", seed=2)
    return write_tar_gz(fake.folder, tmp_path / "cifar-10-python.tar.gz"), fake


@pytest.fixture
def tiny_cifar100_tar(tmp_path) -> tuple[Path, FakeCifar]:
    fake = write_cifar_dir(tmp_path / "cifar100-src", name="cifar100", seed=3)
    return write_tar_gz(fake.folder, tmp_path / "cifar-100-python.tar.gz"), fake


@pytest.fixture
def tiny_image_folder(tmp_path) -> FakeImages:
    """RGB 8x8 PNGs with ``train/`` and ``test/`` subfolders, 3 classes x 3 images each."""
    return write_image_folder(tmp_path / "images", layout="split")


@pytest.fixture(scope="session")
def writers() -> SimpleNamespace:
    """The writer helpers of this file, for tests that build their own (often broken) inputs."""
    return SimpleNamespace(idx_bytes=idx_bytes, write_idx=write_idx, write_mnist_dir=write_mnist_dir,
                           cifar_batch=cifar_batch, write_pickle=write_pickle, write_cifar_dir=write_cifar_dir,
                           write_tar_gz=write_tar_gz, write_image_folder=write_image_folder,
                           stray_files=stray_files)


# ----------------------------------------------------------------------------- the CLI, runs and assertions


@pytest.fixture(autouse=True)
def _restore_threads():
    """``train.threads`` sets torch's process-wide thread count; give the next test its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (exit code, stdout, stderr)``: the cnnlab command, run in this process."""
    from cnnlab.cli import main

    def run(*argv):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    """The command failed with exit code 2 and one line ``error: ...`` holding every needle, no traceback."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


TIMES = ("epoch_seconds", "train_seconds", "wall_seconds")


def untimed(rows: list[dict]) -> list[dict]:
    """Metrics rows without their timings (what two equal runs share bit for bit)."""
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes (to show that nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def check() -> SimpleNamespace:
    return SimpleNamespace(one_line_error=assert_one_line_error, untimed=untimed, snapshot=snapshot)


MNIST_RUN = ["data.subset=2000", "data.val_split=1000", "train.epochs=1", "train.quiet=true", 'train.dtype="float32"',
             'optim.name="adam"', "optim.lr=0.003", 'schedule.name="constant"', "data.crop_pad=0",
             "data.batch_size=32", "train.threads=1"]


@pytest.fixture(scope="session")
def mnist_run_sets() -> list[str]:
    """The overrides of ``mnist_run`` (on recipes/mnist_tiny.toml), for variants of it."""
    return list(MNIST_RUN)


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory) -> Path:
    """One real-MNIST run per test session: 2000 training images, 1 epoch, 1000 held out ("val").
    Tests copy it before changing anything in it."""
    from cnnlab import config, train

    run = tmp_path_factory.mktemp("mnist-run") / "tiny"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "mnist_tiny.toml"
    train.train(config.load_recipe(recipe, MNIST_RUN), run)
    return run


@pytest.fixture
def interrupt_at_epoch(monkeypatch):
    """``disarm = interrupt_at_epoch(N)``: training raises KeyboardInterrupt as epoch N starts, as
    Ctrl-C would; ``disarm()`` lets training run normally again."""
    from cnnlab import train as train_mod

    original = train_mod._progress

    def arm(at: int):
        def interrupting(total, epoch, quiet):
            if epoch == at:
                raise KeyboardInterrupt
            return original(total, epoch, quiet)

        monkeypatch.setattr(train_mod, "_progress", interrupting)
        return lambda: monkeypatch.setattr(train_mod, "_progress", original)

    return arm


def sigint_as_default() -> None:
    """``preexec_fn`` for a child the test stops with SIGINT (Ctrl-C): a shell that starts pytest as a
    background job (``make test &`` in a script) starts it with SIGINT ignored, the child would inherit
    that and never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
