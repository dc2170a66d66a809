"""Datasets from their release formats, the tensor cache, and one-line errors for bad input (issue 2)."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnlab import cache, datasets, formats
from cnnlab.data import DATASETS, get_dataset, load_dataset, subset
from cnnlab.errors import CnnlabError

# ../shared beside the repository (as CI has it), else where this workplace mounts it
SHARED_CIFAR = next((p for p in (Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg",
                                 Path("/work/shared/data/cifar10-jpeg")) if p.exists()),
                    Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg")


def quiet(_msg):
    pass


def acquire(name, root, src, **kw):
    msgs = []
    record = get_dataset(name, root=root, from_path=src, log=msgs.append, **kw)
    return record, msgs


def load(name, root, **kw):
    msgs = []
    ds = load_dataset(name, root=root, acquire=False, log=msgs.append, **kw)
    return ds, msgs


# ----------------------------------------------------------------------------- real MNIST / Fashion-MNIST


def test_real_mnist(data_root):
    ds, msgs = load("mnist", data_root)
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape == (60000, 1, 28, 28)
    assert ds.train.labels.dtype == torch.int64
    assert int(ds.train.labels[0]) == 5 and int(ds.test.labels[0]) == 7
    assert abs(ds.train.images.float().mean().item() / 255 - 0.1307) < 0.001
    assert abs(ds.mean[0] - 0.1307) < 0.001 and abs(ds.std[0] - 0.3081) < 0.001
    # wherever the copy came from (a download, the npm package, --from a folder): the release's checksums
    assert ds.source and ds.verified and msgs == []  # no "unverified" warning
    # the cached raw files really are the release files
    for f in (data_root / "mnist" / "raw").iterdir():
        stem = f.name.removesuffix(".gz")
        assert formats.md5_bytes(formats.read_idx_bytes(f)) == DATASETS["mnist"].md5[stem], f


def test_real_fashion_mnist(data_root):
    ds, msgs = load("fashion-mnist", data_root)
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.shape == (1, 28, 28)
    assert int(ds.train.labels[0]) == 9 and int(ds.test.labels[0]) == 9  # both "Ankle boot"
    assert ds.classes[9] == "Ankle boot" and ds.classes[0] == "T-shirt/top"
    assert abs(ds.mean[0] - 0.2860) < 0.001
    assert ds.source and ds.verified and msgs == []  # the release files, from wherever they came
    for f in (data_root / "fashion-mnist" / "raw").iterdir():
        stem = f.name.removesuffix(".gz")
        assert formats.md5_bytes(formats.read_idx_bytes(f)) == DATASETS["fashion-mnist"].md5[stem], f
    assert torch.bincount(ds.train.labels).tolist() == [6000] * 10


def test_real_cache_loads_fast(data_root):
    import time

    load("mnist", data_root)  # warm the page cache
    t = time.perf_counter()
    load("mnist", data_root)
    assert time.perf_counter() - t < 2.0


# ----------------------------------------------------------------------------- IDX from written files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_from_written_files(cache_root, writers, tmp_path, gz):
    fake = writers.write_mnist_dir(tmp_path / "src", gz=gz)
    record, msgs = acquire("mnist", cache_root, fake.folder)
    assert record["verified"] is False and "UNVERIFIED" in msgs[-1]
    assert sorted(record["files"]) == sorted(p.name for p in fake.folder.iterdir())
    ds, warn = load("mnist", cache_root)
    assert ds.verified is False and any("unverified" in m for m in warn)
    assert ds.train.images.shape == (24, 1, 28, 28) and ds.train.images.dtype == torch.uint8
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(fake.train_x))
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(fake.test_x))
    assert ds.train.labels.tolist() == fake.train_y.tolist()
    assert ds.test.labels.tolist() == fake.test_y.tolist()
    assert ds.source == str(fake.folder.resolve())


def test_strict_refuses_unverified_idx(cache_root, tiny_mnist_dir):
    with pytest.raises(CnnlabError) as e:
        acquire("mnist", cache_root, tiny_mnist_dir.folder, strict=True)
    msg = str(e.value)
    assert "checksum mismatch" in msg and "train-images-idx3-ubyte" in msg
    assert DATASETS["mnist"].md5["train-images-idx3-ubyte"] in msg  # what was expected
    assert not (cache_root / "mnist" / "raw").exists()
    assert not (cache_root / "mnist" / "tensors.pt").exists()


def test_what_a_killed_acquisition_left_is_cleaned_by_the_next(cache_root, tiny_mnist_dir):
    """kill -9 during ``data get`` leaves its hidden staging folder; the next acquisition removes it."""
    left = cache_root / "mnist" / ".staging-killed" / "raw"
    left.mkdir(parents=True)
    (left / "train-images-idx3-ubyte").write_bytes(bytes(1000))
    acquire("mnist", cache_root, tiny_mnist_dir.folder)
    assert stray(cache_root) == []
    assert load("mnist", cache_root)[0].train.images.shape == (24, 1, 28, 28)


def test_a_second_acquisition_of_a_dataset_waits_for_the_first(cache_root, tiny_mnist_dir):
    """The lock is held as a running ``data get`` holds it; another must wait, not clean its staging."""
    import fcntl
    import threading
    (cache_root / "mnist").mkdir()
    with open(cache_root / "mnist" / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        running = cache_root / "mnist" / ".staging-running"
        running.mkdir()
        second = threading.Thread(target=acquire, args=("mnist", cache_root, tiny_mnist_dir.folder))
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and running.is_dir() and not (cache_root / "mnist" / "raw").exists()
        running.rmdir()  # the first one finishes
    second.join(timeout=30)
    assert not second.is_alive() and (cache_root / "mnist" / "raw").is_dir()


# ----------------------------------------------------------------------------- CIFAR


def check_cifar(ds, fake, n_train=40, n_test=10):
    assert ds.train.images.shape == (n_train, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.test.images.shape == (n_test, 3, 32, 32)
    assert ds.train.labels.tolist() == fake.train_y.tolist()
    assert ds.test.labels.tolist() == fake.test_y.tolist()
    assert ds.classes == fake.classes  # from the meta file, not the built-in names
    # pixels round-trip in CHW order: row 0 of the batch is R plane, then G, then B
    assert torch.equal(ds.train.images[0], torch.from_numpy(fake.train_x[0].reshape(3, 32, 32)))
    assert int(ds.train.images[0, 1, 0, 0]) == int(fake.train_x[0, 1024])
    assert int(ds.train.images[0, 2, 31, 31]) == int(fake.train_x[0, 3071])
    assert int(ds.train.images[0, 0, 0, 5]) == int(fake.train_x[0, 5])
    assert torch.equal(ds.train.images.reshape(n_train, -1), torch.from_numpy(fake.train_x))
    assert torch.equal(ds.test.images.reshape(n_test, -1), torch.from_numpy(fake.test_x))
    assert ds.verified is False


def test_cifar10_from_directory(cache_root, tiny_cifar_dir):
    record, msgs = acquire("cifar10", cache_root, tiny_cifar_dir.root)
    assert record["verified"] is False and "UNVERIFIED" in msgs[-1]
    ds, warn = load("cifar10", cache_root)
    check_cifar(ds, tiny_cifar_dir)
    assert len(warn) == 1 and "unverified" in warn[0] and "cifar10" in warn[0]


def test_cifar10_from_batch_folder_itself(cache_root, tiny_cifar_dir):
    acquire("cifar10", cache_root, tiny_cifar_dir.folder)  # the cifar-10-batches-py folder directly
    check_cifar(load("cifar10", cache_root)[0], tiny_cifar_dir)


def test_cifar10_from_tar_gz(cache_root, tiny_cifar_tar):
    archive, fake = tiny_cifar_tar
    record, _ = acquire("cifar10", cache_root, archive)
    assert record["source"] == str(archive.resolve())
    assert sorted(record["files"]) == sorted(["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)])
    ds, _ = load("cifar10", cache_root)
    check_cifar(ds, fake)
    assert ds.num_classes == 10


def test_cifar100_from_tar_gz(cache_root, tiny_cifar100_tar):
    archive, fake = tiny_cifar100_tar
    acquire("cifar100", cache_root, archive)
    ds, _ = load("cifar100", cache_root)
    assert ds.num_classes == 100 and ds.classes[0] == "fine_000" and ds.classes[99] == "fine_099"
    n = len(fake.train_y)
    assert ds.train.images.shape == (n, 3, 32, 32)
    assert ds.train.labels.tolist() == fake.train_y.tolist()  # fine labels, not coarse
    assert int(ds.train.labels.max()) >= 20  # coarse labels stop at 19
    assert torch.equal(ds.test.images.reshape(len(fake.test_y), -1), torch.from_numpy(fake.test_x))


def test_cifar_without_test_batch_needs_val_split(cache_root, writers, tmp_path):
    fake = writers.write_cifar_dir(tmp_path / "notest", test=False)
    acquire("cifar10", cache_root, fake.root)
    with pytest.raises(CnnlabError, match="val_split"):
        load("cifar10", cache_root)
    ds, _ = load("cifar10", cache_root, val_split=10)
    assert (len(ds.train), len(ds.test), ds.test_name) == (30, 10, "val")
    assert torch.equal(ds.test.images.reshape(10, -1), torch.from_numpy(fake.train_x[-10:]))
    assert ds.test.labels.tolist() == fake.train_y[-10:].tolist()
    with pytest.raises(CnnlabError, match="val_split=40"):
        load("cifar10", cache_root, val_split=40)


@pytest.fixture(scope="module")
def shared_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-cache")
    msgs = []
    record = get_dataset("cifar10", root=root, from_path=SHARED_CIFAR, log=msgs.append)
    return root, record, msgs


@pytest.mark.skipif(not SHARED_CIFAR.exists(), reason=f"{SHARED_CIFAR} (shared CIFAR-10 copy) not on this machine")
def test_shared_cifar10_jpeg_copy(shared_cifar):
    root, record, msgs = shared_cifar
    assert record["verified"] is False and "UNVERIFIED" in msgs[-1]
    assert "test_batch" not in record["files"]
    warn = []
    ds = load_dataset("cifar10", root=root, val_split=5000, acquire=False, log=warn.append)
    assert any("unverified" in m for m in warn)
    assert (len(ds.train), len(ds.test), ds.test_name) == (45000, 5000, "val")
    assert int(ds.train.labels[0]) == 6 and ds.classes[6] == "frog"
    assert ds.classes == list(DATASETS["cifar10"].classes)
    assert ds.shape == (3, 32, 32) and ds.train.images.dtype == torch.uint8
    full = load_dataset("cifar10", root=root, val_split=1, acquire=False, log=quiet)
    assert len(full.train) + len(full.test) == 50000
    assert torch.bincount(torch.cat([full.train.labels, full.test.labels])).tolist() == [5000] * 10
    # README: channel means 0.4913 / 0.4821 / 0.4465
    assert np.allclose(ds.mean, (0.4913, 0.4821, 0.4465), atol=2e-3)
    with pytest.raises(CnnlabError, match="no test split"):
        load_dataset("cifar10", root=root, acquire=False, log=quiet)


# ----------------------------------------------------------------------------- image folders


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_image_folder_train_test(cache_root, writers, tmp_path, mode):
    fake = writers.write_image_folder(tmp_path / "imgs", mode=mode, layout="split")
    ds = load_dataset(str(fake.root), root=cache_root, log=quiet)
    c = 1 if mode == "L" else 3
    assert ds.shape == (c, 8, 8) and ds.classes == ["cat", "dog", "emu"]
    assert (len(ds.train), len(ds.test)) == (9, 9)
    assert torch.equal(ds.train.images, torch.from_numpy(fake.images["train"]))
    assert torch.equal(ds.test.images, torch.from_numpy(fake.images["test"]))
    assert ds.train.labels.tolist() == fake.labels["train"].tolist()
    assert ds.source == str(fake.root) and ds.verified is False
    assert len(ds.mean) == c


def rows(images: torch.Tensor) -> list[bytes]:
    """Each image's bytes, sorted: two sets of images compare equal whatever their order."""
    return sorted(bytes(x.flatten().tolist()) for x in images)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_image_folder_single_tree(cache_root, writers, tmp_path, mode):
    fake = writers.write_image_folder(tmp_path / "single", mode=mode, layout="single", per_class=4)
    with pytest.raises(CnnlabError, match="val_split"):
        load_dataset(str(fake.root), root=cache_root, log=quiet)
    ds = load_dataset(str(fake.root), root=cache_root, val_split=3, log=quiet)
    assert (len(ds.train), len(ds.test), ds.test_name) == (9, 3, "val")
    assert ds.shape == ((1 if mode == "L" else 3), 8, 8)
    # one image of each class validates (the files come sorted by class: the last 3 were all 'emu')
    assert sorted(ds.test.labels.tolist()) == [0, 1, 2]
    assert sorted(ds.train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # every image exactly once, with its own label
    assert rows(torch.cat([ds.train.images, ds.test.images])) == rows(torch.from_numpy(fake.images["train"]))
    for split in (ds.train, ds.test):
        for x, y in zip(split.images, split.labels):
            assert any(torch.equal(x, torch.from_numpy(f)) for f in fake.images["train"][fake.labels["train"] == int(y)])
    again = load_dataset(str(fake.root), root=cache_root, val_split=3, log=quiet)
    assert torch.equal(again.test.images, ds.test.images)  # seeded: the same split every time


def test_image_folder_carving_is_stratified_and_seeded(cache_root, writers, tmp_path):
    """Uneven classes (8, 4, 4 images): validation and subset keep each class's share."""
    fake = writers.write_image_folder(tmp_path / "uneven", classes=("a", "b", "c"), per_class=4, layout="single")
    for i in range(4):  # four more of class a
        (fake.root / "a" / f"{i:03d}.png").rename(fake.root / "a" / f"x{i:03d}.png")
    writers.write_image_folder(tmp_path / "more", classes=("a",), per_class=4, layout="single", seed=5)
    for f in (tmp_path / "more" / "a").iterdir():
        f.rename(fake.root / "a" / f.name)
    ds = load_dataset(str(fake.root), root=cache_root, val_split=4, log=quiet)
    assert torch.bincount(ds.test.labels, minlength=3).tolist() == [2, 1, 1]
    assert torch.bincount(ds.train.labels, minlength=3).tolist() == [6, 3, 3]
    small = subset(ds, 6)  # shares 3, 1.5, 1.5: the tie goes to the first class
    assert torch.bincount(small.train.labels, minlength=3).tolist() == [3, 2, 1]
    assert torch.equal(small.test.images, ds.test.images) and len(small.train) == 6
    assert torch.equal(subset(ds, 6).train.images, small.train.images)  # seeded
    assert subset(ds, 0) is ds and subset(ds, 100) is ds


def test_known_release_keeps_its_order(cache_root, tiny_mnist_dir):
    """MNIST and CIFAR carve as before: the last N training images validate, the first N train."""
    acquire("mnist", cache_root, tiny_mnist_dir.folder)
    ds, _ = load("mnist", cache_root, val_split=5)
    assert torch.equal(ds.test.images[:, 0], torch.from_numpy(tiny_mnist_dir.train_x[-5:]))
    small = subset(ds, 7)
    assert torch.equal(small.train.images[:, 0], torch.from_numpy(tiny_mnist_dir.train_x[:7]))
    assert small.train.images.data_ptr() == ds.train.images.data_ptr()  # a view, no copy


def test_stratified_indices_shares():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    for n in (1, 7, 10, 33, 99):
        idx = datasets.stratified_indices(labels, n, seed=3)
        counts = torch.bincount(labels[idx], minlength=3)
        assert len(idx) == len(set(idx.tolist())) == n and idx.tolist() == sorted(idx.tolist())
        assert all(abs(c - n * share) < 1 for c, share in zip(counts.tolist(), (0.5, 0.3, 0.2))), (n, counts)
    assert not torch.equal(datasets.stratified_indices(labels, 10, seed=0), datasets.stratified_indices(labels, 10, seed=1))


# ----------------------------------------------------------------------------- the tensor cache


def _fail(*a, **k):
    raise AssertionError("raw files were read although the tensor cache is current")


def test_second_load_comes_from_cache(cache_root, tiny_mnist_dir, monkeypatch):
    acquire("mnist", cache_root, tiny_mnist_dir.folder)
    tensors = cache_root / "mnist" / "tensors.pt"
    assert tensors.is_file()
    blob = torch.load(tensors, weights_only=True)
    assert blob["train_x"].dtype == torch.uint8 and blob["train_x"].shape == (24, 1, 28, 28)
    monkeypatch.setattr(cache, "read_raw", _fail)
    monkeypatch.setattr(formats, "parse_idx", _fail)
    ds, _ = load("mnist", cache_root)
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(tiny_mnist_dir.train_x))


def test_cache_rebuilt_when_raw_file_changes(cache_root, tiny_mnist_dir, writers):
    acquire("mnist", cache_root, tiny_mnist_dir.folder)
    raw = cache_root / "mnist" / "raw" / "train-labels-idx1-ubyte"
    before = (cache_root / "mnist" / "tensors.pt").stat().st_mtime_ns
    new = (tiny_mnist_dir.train_y + 1) % 10
    writers.write_idx(raw, new)  # same size, new content
    st = raw.stat()
    os.utime(raw, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    calls = []
    real = cache.read_raw
    data_read_raw = lambda *a: calls.append(a) or real(*a)  # noqa: E731
    mp = pytest.MonkeyPatch()
    mp.setattr(cache, "read_raw", data_read_raw)
    try:
        ds, _ = load("mnist", cache_root)
        assert len(calls) == 1 and ds.train.labels.tolist() == new.tolist()
        ds2, _ = load("mnist", cache_root)  # the rebuilt cache is current again
        assert len(calls) == 1 and ds2.train.labels.tolist() == new.tolist()
    finally:
        mp.undo()
    assert (cache_root / "mnist" / "tensors.pt").stat().st_mtime_ns != before


def test_damaged_cache_is_rebuilt(cache_root, tiny_cifar_dir):
    acquire("cifar10", cache_root, tiny_cifar_dir.root)
    tensors = cache_root / "cifar10" / "tensors.pt"
    tensors.write_bytes(tensors.read_bytes()[:1000])
    ds, _ = load("cifar10", cache_root)
    check_cifar(ds, tiny_cifar_dir)
    assert torch.load(tensors, weights_only=True)["train_x"].shape == (40, 3, 32, 32)


def test_image_folder_cache(cache_root, tiny_image_folder, monkeypatch, writers):
    load_dataset(str(tiny_image_folder.root), root=cache_root, log=quiet)
    assert len(list((cache_root / "folders").glob("*.pt"))) == 1
    with monkeypatch.context() as m:
        m.setattr(cache, "read_image_folder", _fail)
        ds = load_dataset(str(tiny_image_folder.root), root=cache_root, log=quiet)
        assert torch.equal(ds.train.images, torch.from_numpy(tiny_image_folder.images["train"]))
    # adding an image invalidates the cache
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tiny_image_folder.root / "train" / "emu" / "zzz.png")
    ds = load_dataset(str(tiny_image_folder.root), root=cache_root, log=quiet)
    assert len(ds.train) == 10 and int(ds.train.images[-1].max()) == 7


def test_missing_dataset_is_not_acquired_without_acquire(cache_root):
    with pytest.raises(CnnlabError, match="cnnlab data get mnist"):
        load_dataset("mnist", root=cache_root, acquire=False, log=quiet)


# ----------------------------------------------------------------------------- bad input


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def primed(cache_root, writers, tmp_path):
    """A cache holding a good (tiny) mnist and cifar10, to check that failures leave it alone."""
    mn = writers.write_mnist_dir(tmp_path / "good-mnist", seed=11)
    cf = writers.write_cifar_dir(tmp_path / "good-cifar", seed=12)
    acquire("mnist", cache_root, mn.folder)
    acquire("cifar10", cache_root, cf.root)
    return cache_root, mn, cf, _snapshot(cache_root)


def _bad_idx(tmp_path, writers, what):
    fake = writers.write_mnist_dir(tmp_path / "bad", gz=what.endswith("gz"))
    p = fake.path("t10k-images-idx3-ubyte")
    if what == "missing":
        p = fake.path("t10k-labels-idx1-ubyte")
        p.unlink()
        return fake.folder, [str(p), "missing", "expected"]
    if what == "magic":
        writers.write_idx(p, fake.test_x, magic=b"\x00\x00\x08\x02")
        return fake.folder, [str(p), "wrong magic number 00000802", "expected", "00000803"]
    if what == "truncated":
        p.write_bytes(p.read_bytes()[:-100])
        return fake.folder, [str(p), "truncated", "needs 9424"]
    if what == "truncated-gz":
        p.write_bytes(p.read_bytes()[:-50])
        return fake.folder, [str(p), "cannot read", "expected an IDX file"]
    if what == "damaged-gz":  # deflate stream corrupted: zlib.error inside gzip
        raw = bytes(range(256)) * 40
        blob = bytearray(gzip.compress(writers.idx_bytes(np.frombuffer(raw, np.uint8).reshape(-1, 32, 20))))
        for i in range(20, 60):
            blob[i] ^= 0x5A
        p.write_bytes(bytes(blob))
        return fake.folder, [str(p), "cannot read", "expected an IDX file"]
    if what == "count":
        writers.write_idx(fake.path("t10k-labels-idx1-ubyte"), fake.test_y[:-1])
        return fake.folder, ["test has 12 images but 11 labels", "expected equal counts"]
    raise AssertionError(what)


def _assert_refused(name, root, src, needles):
    """Acquiring ``name`` from ``src`` fails with one line that contains every needle."""
    with pytest.raises(CnnlabError) as e:
        acquire(name, root, src)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


IDX_CASES = ["missing", "magic", "truncated", "truncated-gz", "damaged-gz", "count"]


@pytest.mark.parametrize("what", IDX_CASES)
def test_bad_idx_input(primed, writers, tmp_path, what):
    root, mn, _, snap = primed
    _assert_refused("mnist", root, *_bad_idx(tmp_path, writers, what))
    _check_untouched(root, snap, mn)


def _bad_cifar(tmp_path, writers, what):
    fake = writers.write_cifar_dir(tmp_path / "badc", seed=5)
    b3 = fake.folder / "data_batch_3"
    if what == "shape":
        writers.write_pickle(b3, writers.cifar_batch(np.zeros((8, 3000), np.uint8), range(8)))
        return fake.root, [str(b3), "[8, 3000]", "expected uint8 [N, 3072]"]
    if what == "dtype":
        writers.write_pickle(b3, writers.cifar_batch(np.zeros((8, 3072), np.float32), range(8)))
        return fake.root, [str(b3), "float32", "expected uint8 [N, 3072]"]
    if what == "labels":
        writers.write_pickle(b3, writers.cifar_batch(np.zeros((8, 3072), np.uint8), range(7)))
        return fake.root, [str(b3), "7 labels", "expected uint8 [N, 3072]"]
    if what == "keys":
        writers.write_pickle(b3, {b"data": np.zeros((8, 3072), np.uint8)})
        return fake.root, [str(b3), "expected 'data' and 'labels'"]
    if what == "not-pickle":
        b3.write_bytes(b"this is not a pickle")
        return fake.root, [str(b3), "not a readable python-pickle batch", "expected a CIFAR release file"]
    if what == "truncated":
        b3.write_bytes(b3.read_bytes()[:5000])
        return fake.root, [str(b3), "not a readable python-pickle batch", "expected"]
    if what == "missing":
        b3.unlink()
        return fake.root, ["data_batch_3", "missing", "expected all of"]
    if what == "no-such-path":
        return tmp_path / "nowhere", [str(tmp_path / "nowhere"), "does not exist", "expected"]
    if what == "not-tar":
        p = tmp_path / "cifar-10-python.tar.gz"
        p.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
        return p, [str(p), "not a readable .tar.gz archive", "expected the CIFAR"]
    if what == "truncated-tar":
        archive = writers.write_tar_gz(fake.folder, tmp_path / "c.tar.gz")
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
        return archive, [str(archive), "not a readable .tar.gz archive", "expected the CIFAR"]
    raise AssertionError(what)


CIFAR_CASES = ["shape", "dtype", "labels", "keys", "not-pickle", "truncated", "missing", "no-such-path",
               "not-tar", "truncated-tar"]


@pytest.mark.parametrize("what", CIFAR_CASES)
def test_bad_cifar_input(primed, writers, tmp_path, what):
    root, mn, cf, snap = primed
    _assert_refused("cifar10", root, *_bad_cifar(tmp_path, writers, what))
    _check_untouched(root, snap, mn)
    ds, _ = load("cifar10", root)
    check_cifar(ds, cf)


def test_strict_checksum_mismatch_keeps_cache(primed, writers, tmp_path):
    root, mn, cf, snap = primed
    other = writers.write_cifar_dir(tmp_path / "other", seed=99)
    with pytest.raises(CnnlabError) as e:
        acquire("cifar10", root, other.root, strict=True)
    msg = str(e.value)
    assert "checksum mismatch" in msg and str(other.root.resolve()) in msg and "--strict" in msg
    assert "data_batch_1" in msg and DATASETS["cifar10"].md5["data_batch_1"] in msg
    _check_untouched(root, snap, mn)
    # without --strict the same copy replaces the cached one
    acquire("cifar10", root, other.root)
    check_cifar(load("cifar10", root)[0], other)
    assert stray(root) == []


def stray(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith((".staging-", ".raw-old"))]


def _check_untouched(root, snap, mn):
    assert _snapshot(root) == snap  # nothing replaced, nothing half-written
    assert stray(root) == []
    ds, _ = load("mnist", root)
    assert torch.equal(ds.train.images[:, 0], torch.from_numpy(mn.train_x))


def test_unknown_dataset_lists_known(cache_root):
    for call in (lambda: get_dataset("cifar11", root=cache_root, log=quiet),
                 lambda: load_dataset("cifar11", root=cache_root, log=quiet)):
        with pytest.raises(CnnlabError) as e:
            call()
        msg = str(e.value)
        assert "unknown dataset 'cifar11'" in msg
        for known in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
            assert known in msg
    assert list(cache_root.iterdir()) == []


def test_idx_source_not_a_directory(cache_root, tmp_path):
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(CnnlabError, match="not a directory; expected a folder with the four mnist IDX"):
        acquire("mnist", cache_root, f)
    assert stray(cache_root) == [] and not (cache_root / "mnist" / "raw").exists()


def _bad_folder(tmp_path, writers, what):
    from PIL import Image

    root = tmp_path / "imgbad"
    if what == "empty":
        root.mkdir()
        return root, [str(root), "no class folders", "expected"]
    if what == "empty-classes":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
        return root, [str(root), "no images", "expected"]
    if what == "turned":  # the same stored size, but EXIF says one is shown turned by 90 degrees
        for cls in ("cat", "emu"):
            (root / cls).mkdir(parents=True)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(root / "cat" / "photo.jpg")
        Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(root / "emu" / "photo.jpg", exif=exif)
        return root, ["emu/photo.jpg", "size 9x8 (as shown, after any EXIF rotation) differs from 8x9", "the same size"]
    fake = writers.write_image_folder(root, layout="split")
    if what == "non-image":
        bad = root / "train" / "dog" / "notes.txt"
        bad.write_text("hello")
        return root, [str(bad), "not an image file", "expected only", ".png"]
    if what == "undecodable":
        bad = root / "test" / "cat" / "broken.png"
        bad.write_bytes(b"\x89PNG not really")
        return root, [str(bad), "not an image", "expected a PNG"]
    if what == "size":
        bad = root / "train" / "emu" / "big.png"
        Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(bad)
        return root, [str(bad), "differs from", "expected all images the same size"]
    if what == "not-a-dir-name":
        return tmp_path / "nope", ["unknown dataset", str(tmp_path / "nope"), "known: mnist"]
    if what == "test-class-not-in-train":
        shutil.copytree(root / "test" / "cat", root / "test" / "fox")
        return root, [str(root / "test" / "fox"), "class not in", "cat, dog, emu", "expected the same class folders"]
    if what == "empty-class":
        (root / "train" / "yak").mkdir()
        return root, [str(root / "train" / "yak"), "no images in this class folder", "or remove the folder"]
    if what == "one-class":
        for cls in ("dog", "emu"):
            for part in ("train", "test"):
                shutil.rmtree(root / part / cls)
        return root, [str(root / "train"), "one class folder (cat)", "at least 2"]
    raise AssertionError(what, fake)


@pytest.mark.parametrize("what", ["empty", "empty-classes", "non-image", "undecodable", "size", "not-a-dir-name",
                                  "test-class-not-in-train", "empty-class", "one-class", "turned"])
def test_bad_image_folder(primed, writers, tmp_path, what):
    root, mn, _, snap = primed
    src, needles = _bad_folder(tmp_path, writers, what)
    with pytest.raises(CnnlabError) as e:
        load_dataset(str(src), root=root, log=quiet)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    _check_untouched(root, snap, mn)


def test_image_folder_reads_deep_grey_like_predict_and_skips_hidden_files(primed, writers, tmp_path):
    """16-bit grey PNGs become the 8-bit values predict sees (not clipped to white), grey with alpha
    stays grey, and hidden files and folders (.DS_Store, .ipynb_checkpoints) are not images or classes."""
    from PIL import Image

    from cnnlab.predict import read_image as predict_read

    root, *_ = primed
    fake = writers.write_image_folder(tmp_path / "deep", mode="L", layout="split")
    for part in ("train", "test"):
        for f in sorted((fake.root / part).glob("*/*.png")):
            grey = np.asarray(Image.open(f))
            Image.fromarray(grey.astype(np.uint16) * 257).save(f)  # the same picture in 16 bits
            assert Image.open(f).mode.startswith("I")
        (fake.root / part / "cat" / ".DS_Store").write_bytes(b"\x00\x01 not an image")
        (fake.root / part / ".ipynb_checkpoints").mkdir()
    la = fake.root / "train" / "dog" / "000.png"
    Image.fromarray(np.stack([fake.images["train"][3][0], np.full((8, 8), 200, np.uint8)], -1), "LA").save(la)
    ds = load_dataset(str(fake.root), root=root, log=quiet)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.train.images.shape == (9, 1, 8, 8)
    assert (ds.train.images.numpy() == fake.images["train"]).all()
    assert (ds.test.images.numpy() == fake.images["test"]).all()
    f = fake.root / "test" / "emu" / "001.png"
    assert (predict_read(f, (1, 8, 8)) == ds.test.images[7].numpy()).all()


def test_image_folder_with_one_colour_image_is_colour_and_its_cache_follows_the_reader(primed, writers, tmp_path,
                                                                                        monkeypatch):
    """A colour file among grey ones makes the dataset RGB (the greys get three equal channels); a
    cache written by another version of the folder reader is read again, not trusted."""
    from PIL import Image

    root, *_ = primed
    fake = writers.write_image_folder(tmp_path / "mixed", mode="L", layout="split")
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour).save(fake.root / "test" / "emu" / "001.png")
    ds = load_dataset(str(fake.root), root=root, log=quiet)
    assert ds.train.images.shape == (9, 3, 8, 8)
    assert (ds.train.images.numpy() == np.repeat(fake.images["train"], 3, 1)).all()
    assert ds.test.images[7].tolist() == colour.transpose(2, 0, 1).tolist()
    monkeypatch.setattr(cache, "FOLDER_READER", "an older reader")
    calls = []
    monkeypatch.setattr(cache, "read_image_folder", lambda p: calls.append(p) or formats.read_image_folder(p))
    load_dataset(str(fake.root), root=root, log=quiet)
    assert calls == [fake.root.resolve()] or calls == [fake.root]


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"[1, 2]", b"{}", b'{"source": 5, "verified": true}'])
def test_damaged_source_json_is_one_line(primed, content):
    root, *_ = primed
    (root / "mnist" / "source.json").write_bytes(content)
    with pytest.raises(CnnlabError) as e:
        load("mnist", root)
    msg = str(e.value)
    assert "\n" not in msg and "source.json" in msg and "damaged" in msg and "cnnlab data get mnist" in msg, msg


def test_failed_get_on_empty_cache_leaves_nothing_loadable(cache_root, writers, tmp_path):
    src, _ = _bad_idx(tmp_path, writers, "magic")
    with pytest.raises(CnnlabError):
        acquire("mnist", cache_root, src)
    assert stray(cache_root) == []
    assert not (cache_root / "mnist" / "tensors.pt").exists()
    with pytest.raises(CnnlabError, match="cnnlab data get mnist"):
        load("mnist", cache_root)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Files are written to a private temp file, then renamed: the result is readable like any file."""
    from cnnlab.atomic import atomic_write_bytes

    umask = os.umask(0o022)
    os.umask(umask)
    target = tmp_path / "report.html"
    atomic_write_bytes(target, b"<html></html>")
    assert target.read_bytes() == b"<html></html>"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temp file left
