"""``cnnlab data get|info``: one-line errors, exit codes, no tracebacks (issue 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnlab.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


# ----------------------------------------------------------------------------- bad inputs, as commands


def bad_cases(tmp_path: Path, writers) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (argv, substrings the one-line error must contain); inputs written under tmp_path."""
    root = str(tmp_path / "cache")
    cases = {"unknown": (["data", "get", "cifar11", "--root", root],
                         ["unknown dataset 'cifar11'", "mnist, fashion-mnist, cifar10, cifar100"])}

    magic = writers.write_mnist_dir(tmp_path / "magic")
    f = magic.path("train-labels-idx1-ubyte")
    writers.write_idx(f, magic.train_y, magic=b"\x00\x00\x09\x01")
    cases["magic"] = (["data", "get", "mnist", "--from", str(magic.folder), "--root", root],
                      [str(f), "wrong magic number 00000901", "expected"])

    trunc = writers.write_mnist_dir(tmp_path / "trunc", gz=True)
    f2 = trunc.path("train-images-idx3-ubyte")
    f2.write_bytes(f2.read_bytes()[:-64])
    cases["truncated"] = (["data", "get", "fashion-mnist", "--from", str(trunc.folder), "--root", root],
                          [str(f2), "expected an IDX file"])

    shape = writers.write_cifar_dir(tmp_path / "shape")
    b = shape.folder / "test_batch"
    writers.write_pickle(b, writers.cifar_batch(np.zeros((10, 32, 32, 3), np.uint8), range(10)))
    cases["cifar-shape"] = (["data", "get", "cifar10", "--from", str(shape.root), "--root", root],
                            [str(b), "[10, 32, 32, 3]", "expected uint8 [N, 3072]"])

    strict = writers.write_cifar_dir(tmp_path / "strict")
    cases["strict"] = (["data", "get", "cifar10", "--from", str(strict.root), "--root", root, "--strict"],
                       ["checksum mismatch", str(strict.root), "data_batch_1", "expected"])

    empty = tmp_path / "empty-folder"
    empty.mkdir()
    cases["empty-folder"] = (["data", "info", str(empty), "--root", root], [str(empty), "no class folders"])
    return cases


CASES = ["unknown", "magic", "truncated", "cifar-shape", "strict", "empty-folder"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_in_process(cli, check, tmp_path, writers, case):
    argv, needles = bad_cases(tmp_path, writers)[case]
    rc, out, err = cli(*argv)
    assert rc == 2
    check.one_line_error(rc, err, *needles)
    cache = tmp_path / "cache"  # nothing half-written: no temporary files, no tensor cache
    assert writers.stray_files(cache) == []
    assert list(cache.rglob("tensors.pt")) == [] and list(cache.rglob("raw")) == []


def test_bad_input_as_a_real_process(tmp_path, writers, check):
    """The same commands as separate processes (run side by side): exit code 2, one line, no traceback."""
    cases = bad_cases(tmp_path, writers)
    env = {**os.environ, "PYTHONPATH": str(SRC), "CNNLAB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *argv], env=env, cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, proc.returncode, err)
        check.one_line_error(proc.returncode, err, *cases[name][1])


def test_failed_get_keeps_the_cached_dataset(cli, check, tmp_path, writers):
    root = str(tmp_path / "cache")
    good = writers.write_mnist_dir(tmp_path / "good", seed=4)
    rc, out, _ = cli("data", "get", "mnist", "--from", str(good.folder), "--root", root)
    assert rc == 0 and "UNVERIFIED" in out and "24 train / 12 test" in out
    before = {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}
    bad = writers.write_mnist_dir(tmp_path / "bad", seed=5)
    (bad.folder / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03")
    rc, _, err = cli("data", "get", "mnist", "--from", str(bad.folder), "--root", root)
    check.one_line_error(rc, err, str(bad.folder / "t10k-images-idx3-ubyte"), "truncated header")
    rc, _, err = cli("data", "get", "mnist", "--from", str(bad.folder), "--root", root, "--strict")
    assert rc == 2
    after = {p: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}
    assert after == before and writers.stray_files(Path(root)) == []
    rc, out, err = cli("data", "info", "mnist", "--root", root)
    assert rc == 0 and "train:    24 images" in out and "unverified" in out


def test_info_without_get(cli, check, tmp_path):
    rc, _, err = cli("data", "info", "cifar100", "--root", str(tmp_path))
    check.one_line_error(rc, err, "cnnlab data get cifar100")


def test_missing_arguments_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data"])
    assert e.value.code != 0
    with pytest.raises(SystemExit) as e:
        main(["data", "get"])
    assert e.value.code != 0


# ----------------------------------------------------------------------------- good inputs


def test_info_real_mnist(cli, data_root):
    rc, out, err = cli("data", "info", "mnist", "--root", str(data_root))
    assert rc == 0 and err == ""
    assert "60,000" in out and "10,000" in out and "0.1307" in out and "0.3081" in out
    source = json.loads((data_root / "mnist" / "source.json").read_text())["source"]
    assert f"source:   {source} (verified)" in out and "1x28x28" in out  # wherever the copy came from


def test_info_val_split_and_image_folder(cli, check, tmp_path, tiny_image_folder, tiny_cifar_dir):
    root = str(tmp_path / "cache")
    rc, out, _ = cli("data", "get", "cifar10", "--from", str(tiny_cifar_dir.root), "--root", root)
    assert rc == 0 and "40 train / 10 test" in out
    rc, out, _ = cli("data", "info", "cifar10", "--root", root, "--val-split", "5")
    assert rc == 0 and "train:    35 images" in out and re.search(r"^val:\s+5 images$", out, re.M)
    assert "class_airplane" in out and "unverified" in out
    rc, out, _ = cli("data", "info", str(tiny_image_folder.root), "--root", root)
    assert rc == 0 and "3x8x8" in out and "cat, dog, emu" in out and "train:    9 images" in out
    rc, _, err = cli("data", "info", "cifar10", "--root", root, "--val-split", "40")
    check.one_line_error(rc, err, "val_split=40")
