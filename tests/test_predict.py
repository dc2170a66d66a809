"""``cnnlab predict`` and ``cnnlab export`` (issue 17), through the CLI in fresh processes, on real runs.

Two real runs are trained once per module: ``mnist_fast`` on 12,000 real MNIST images (its recipe's
bfloat16 autocast and 1-pixel shift TTA) and ``cifar_dw56k`` on 1,000 images of the shared CIFAR-10
copy (float32, flip TTA, 500 images held out as "val"). Real evaluation images are written as PNG
files (MNIST also enlarged, as RGB, and on a wider canvas), predicted, and compared image by image
with ``evaluate.predict`` on the same uint8 pixels, the path ``cnnlab evaluate`` takes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from cnnlab import evaluate
from cnnlab.augment import Loader
from cnnlab.errors import CnnlabError
from cnnlab.formats import open_image
from cnnlab.predict import read_image

ROOT = Path(__file__).resolve().parents[1]
N_MNIST = 300  # real MNIST test images per variant
N_CIFAR = 100  # real CIFAR-10 validation images
BATCH = 100  # predict's batch = the reference batch, so both see the same batches

pytestmark = pytest.mark.slow


def run_cli(*args, script: str | None = None, timeout: int = 900) -> tuple[int, str, str]:
    """``python -m cnnlab.cli ARGS`` (or ``python -c SCRIPT ARGS``) in a fresh process: exit code, stdout, stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "CNNLAB_OFFLINE": "1"}
    cmd = [sys.executable, *(["-c", script] if script else ["-m", "cnnlab.cli"]), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def train_run(out: Path, recipe: str, *sets: str) -> Path:
    rc, _, err = run_cli("train", ROOT / "recipes" / recipe, "--out", out, "--quiet",
                         *[a for s in ("train.epochs=1", "train.threads=1", *sets) for a in ("--set", s)])
    assert rc == 0, err
    return out


def save_png(pixels: np.ndarray, path: Path, mode: str | None = None) -> None:
    """uint8 [C, H, W] as a PNG (grey for C = 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    (image.convert(mode) if mode else image).save(path)


def reference_probs(run: Path, images: torch.Tensor, tta: bool, dtype: torch.dtype, shift: int) -> torch.Tensor:
    """Softmax of ``evaluate.predict`` (the evaluation path) on uint8 images, in batches of BATCH."""
    ckpt, model = evaluate.load_run_model(run)
    info = ckpt["dataset"]
    loader = Loader(images, torch.zeros(len(images), dtype=torch.long), BATCH, info["mean"], info["std"])
    return evaluate.predict(model, loader, tta=tta, dtype=dtype, tta_shift=shift)[0].softmax(1)


def predicted(path: Path) -> dict[str, dict]:
    """A predict --out JSON file as {file name relative to its folder: row}."""
    rows = json.loads(path.read_text())["predictions"]
    return {r["path"]: r for r in rows}


# ----------------------------------------------------------------------------- fixtures: real runs, real images


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def mnist_run(work) -> Path:
    return train_run(work / "mnist_fast", "mnist_fast.toml", "data.subset=12000")


@pytest.fixture(scope="module")
def cifar_run(work) -> Path:
    return train_run(work / "cifar_dw56k", "cifar_dw56k.toml", "data.subset=1000", "data.val_split=500")


@pytest.fixture(scope="module")
def mnist_images(work, mnist_run):
    """The first N_MNIST real test images as PNG, five ways: as they are, enlarged 2x (56x56, each
    pixel a 2x2 block), as RGB, centred on a 28x40 black canvas, and drawn in white on a transparent
    canvas (the digit only in the alpha channel). Returns (folder, uint8, labels)."""
    ckpt = evaluate.load_run_model(mnist_run)[0]
    split, name = evaluate.load_eval_split(ckpt)
    assert name == "test"
    x, y = split.images[:N_MNIST], split.labels[:N_MNIST]
    folder = work / "mnist_png"
    for i, img in enumerate(x.numpy()):
        save_png(img, folder / "a_orig" / f"{i:04d}.png")
        save_png(img.repeat(2, axis=1).repeat(2, axis=2), folder / "b_big" / f"{i:04d}.png")
        save_png(img, folder / "c_rgb" / f"{i:04d}.png", mode="RGB")
        save_png(np.pad(img, ((0, 0), (0, 0), (6, 6))), folder / "d_wide" / f"{i:04d}.png")
        save_png(np.concatenate([np.full((3, 28, 28), 255, np.uint8), img]), folder / "e_alpha" / f"{i:04d}.png")
    return folder, x, y


@pytest.fixture(scope="module")
def mnist_onnx(mnist_run):
    rc, out, err = run_cli("export", mnist_run, "--format", "onnx", "--int8")
    assert rc == 0, err
    return mnist_run / "model.onnx", out


# ----------------------------------------------------------------------------- same predictions as evaluation


def test_predict_mnist_pngs_match_evaluation(mnist_run, mnist_images, work):
    folder, x, y = mnist_images
    out = work / "mnist_pred.json"
    rc, stdout, err = run_cli("predict", mnist_run, folder, "--out", out, "--batch-size", BATCH, "--top", 3)
    assert rc == 0, err
    assert f"{5 * N_MNIST} images predicted" in stdout
    assert "note:" not in err  # all light digits on dark, as MNIST
    rows = predicted(out)
    assert len(rows) == 5 * N_MNIST
    # the recipe's evaluation: bfloat16 autocast, shifted copies averaged, no mirror
    ref = reference_probs(mnist_run, x, tta=False, dtype=torch.bfloat16, shift=1)
    for variant in ("a_orig", "b_big", "c_rgb", "d_wide", "e_alpha"):
        got = [rows[str(folder / variant / f"{i:04d}.png")] for i in range(N_MNIST)]
        assert [int(r["pred"]) for r in got] == ref.argmax(1).tolist(), variant
        assert torch.allclose(torch.tensor([r["prob"] for r in got]), ref.max(1).values, atol=1e-6), variant
        assert [len(r["top"]) for r in got] == [3] * N_MNIST
    acc = np.mean([int(rows[str(folder / "a_orig" / f"{i:04d}.png")]["pred"]) == int(y[i]) for i in range(N_MNIST)])
    print(f"mnist_fast (12,000 images, 1 epoch): predict accuracy on {N_MNIST} test PNGs {acc:.2%}")
    assert acc > 0.8  # real digits, read the right way round


def test_predict_cifar_pngs_match_evaluation(cifar_run, work):
    ckpt = evaluate.load_run_model(cifar_run)[0]
    split, name = evaluate.load_eval_split(ckpt)
    assert name == "val"
    x = split.images[:N_CIFAR]
    folder = work / "cifar_png"
    for i, img in enumerate(x.numpy()):
        save_png(img, folder / f"{i:04d}.png")
    out = work / "cifar_pred.csv"
    rc, stdout, err = run_cli("predict", cifar_run, folder / "*.png", "--out", out, "--batch-size", BATCH, "--top", 2)
    assert rc == 0, err
    with open(out, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["path", "pred", "prob", "class2", "prob2"]
    ref = reference_probs(cifar_run, x, tta=True, dtype=torch.float32, shift=0)  # the recipe's flip TTA
    classes = ckpt["dataset"]["classes"]
    assert [r[1] for r in table[1:]] == [classes[i] for i in ref.argmax(1)]
    assert np.allclose([float(r[2]) for r in table[1:]], ref.max(1).values.numpy(), atol=1e-5)
    assert [r[0] for r in table[1:]] == [str(folder / f"{i:04d}.png") for i in range(N_CIFAR)]


def test_invert_reads_ink_on_paper_as_the_model_was_trained(mnist_run, mnist_images, work):
    """Dark digits on light paper (PNG and TIFF files in one folder): with --invert they get the
    evaluation path's predictions of the light-on-dark originals; without it, other ones, and a note
    on stderr points to --invert."""
    folder, x, _ = mnist_images
    paper = work / "mnist_paper"
    names = [f"{i:04d}.tif" if i % 2 else f"{i:04d}.png" for i in range(50)]
    for name, img in zip(names, x.numpy()[:50]):
        save_png(255 - img, paper / name)  # Pillow writes the format the suffix names
    ref = reference_probs(mnist_run, x[:50], tta=False, dtype=torch.bfloat16, shift=1)
    preds, notes = {}, {}
    for flags in ((), ("--invert",)):
        rc, _, err = run_cli("predict", mnist_run, paper, "--out", work / "paper.json", *flags)
        assert rc == 0, err
        rows = predicted(work / "paper.json")
        assert len(rows) == 50
        preds[flags] = [int(rows[str(paper / name)]["pred"]) for name in names]
        notes[flags] = [line for line in err.splitlines() if line.startswith("note:")]
        if flags:
            probs = [rows[str(paper / name)]["prob"] for name in names]
            assert torch.allclose(torch.tensor(probs), ref.max(1).values, atol=1e-6)
    assert preds[("--invert",)] == ref.argmax(1).tolist()
    assert preds[()] != preds[("--invert",)]
    assert notes[()] == ["note: 50 of 50 images have a light border, but the model was trained on light ink on a "
                         "dark ground; if they are dark ink on a light ground, add --invert"]
    assert notes[("--invert",)] == []
    rc, _, err = run_cli("predict", mnist_run, folder / "a_orig", folder / "e_alpha", "--invert")
    assert rc == 0 and "note: 600 of 600 images have a light border" in err and "--invert made them so: drop it" in err


def test_predict_prints_a_table(mnist_run, mnist_images):
    folder = mnist_images[0]
    rc, out, err = run_cli("predict", mnist_run, folder / "a_orig" / "0000.png", folder / "a_orig" / "0001.png",
                           "--top", "2")
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["path", "pred", "prob", "#2", "prob"]
    assert len(lines) == 3 and lines[1].startswith(str(folder / "a_orig" / "0000.png"))
    assert re.search(r"\d\s+\d+\.\d%\s+\d\s+\d+\.\d%$", lines[1]), lines[1]


# ----------------------------------------------------------------------------- export and ONNX Runtime


def test_export_mnist_checks_ort_and_quantizes(mnist_onnx, mnist_run):
    path, stdout = mnist_onnx
    diff = float(re.search(r"largest logit difference (\S+)", stdout).group(1))
    assert diff <= 1e-4
    record = json.loads((mnist_run / "export.json").read_text())
    assert record["max_logit_diff"] == pytest.approx(diff, rel=0.01) and record["check_split"] == "test"
    q = record["int8"]
    assert (mnist_run / "model.int8.onnx").stat().st_size == q["bytes"] < path.stat().st_size == record["bytes"]
    assert q["images"] == 10_000 and q["calibration_images"] == 512
    print(f"mnist_fast tiny run: test accuracy fp32 {q['fp32_accuracy']:.2%}, int8 {q['int8_accuracy']:.2%}, "
          f"agreement {q['agreement']:.2%}")
    assert abs(q["int8_accuracy"] - q["fp32_accuracy"]) < 0.01 and q["agreement"] > 0.97
    assert f"int8 {q['int8_accuracy']:.2%}" in stdout and f"agree on {q['agreement']:.2%}" in stdout
    model = onnx.load(str(path))
    assert not list(path.parent.glob("*.data")) and not any(  # one self-contained file
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["cnnlab.classes"]) == [str(i) for i in range(10)]
    assert json.loads(meta["cnnlab.input_shape"]) == [1, 28, 28] and json.loads(meta["cnnlab.mean"]) == [0.1307]
    assert meta["cnnlab.run"] == "mnist_fast" and meta["cnnlab.version"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension


def test_predict_onnx_matches_pytorch_float32(mnist_onnx, mnist_run, mnist_images, work):
    folder, x, _ = mnist_images
    out = work / "mnist_onnx.json"
    rc, _, err = run_cli("predict", mnist_onnx[0], folder / "a_orig", folder / "b_big", "--out", out,
                         "--batch-size", BATCH)
    assert rc == 0, err
    rows = predicted(out)
    ref = reference_probs(mnist_run, x, tta=False, dtype=torch.float32, shift=1)  # metadata: shift TTA
    for variant in ("a_orig", "b_big"):
        got = [rows[str(folder / variant / f"{i:04d}.png")] for i in range(N_MNIST)]
        assert [int(r["pred"]) for r in got] == ref.argmax(1).tolist()
        assert torch.allclose(torch.tensor([r["prob"] for r in got]), ref.max(1).values, atol=1e-5)
    rc, _, err = run_cli("predict", mnist_run / "model.int8.onnx", folder / "a_orig", "--out", work / "int8.json")
    assert rc == 0, err
    int8 = predicted(work / "int8.json")
    agree = np.mean([int8[k]["pred"] == rows[k]["pred"] for k in int8])
    assert len(int8) == N_MNIST and agree > 0.97


def test_export_cifar_run(cifar_run, work):
    out = work / "exports" / "dw.onnx"
    rc, stdout, err = run_cli("export", cifar_run, "--int8", "--out", out)
    assert rc == 0, err
    assert "on 256 val images: largest logit difference" in stdout and "val accuracy on 500 images" in stdout
    assert out.is_file() and (work / "exports" / "dw.int8.onnx").is_file()
    q = json.loads((cifar_run / "export.json").read_text())["int8"]
    print(f"cifar_dw56k tiny run: val accuracy fp32 {q['fp32_accuracy']:.2%}, int8 {q['int8_accuracy']:.2%}, "
          f"agreement {q['agreement']:.2%}")
    assert q["split"] == "val" and q["agreement"] > 0.9
    rc, stdout, err = run_cli("predict", out, work / "cifar_png", "--out", work / "cifar_onnx.json",
                              "--batch-size", BATCH)
    assert rc == 0, err
    rc, _, err = run_cli("predict", cifar_run, work / "cifar_png", "--out", work / "cifar_run.json")
    assert rc == 0, err
    onnx_rows, run_rows = predicted(work / "cifar_onnx.json"), predicted(work / "cifar_run.json")
    assert onnx_rows.keys() == run_rows.keys()
    assert all(onnx_rows[k]["pred"] == run_rows[k]["pred"] for k in onnx_rows)  # both float32 with flip TTA


# ----------------------------------------------------------------------------- bad input


def test_unreadable_files_are_named_and_the_rest_predicted(mnist_run, mnist_images, work):
    folder = work / "mixed"
    folder.mkdir()
    good = mnist_images[0] / "a_orig"
    for name in ("0000.png", "0001.png"):
        shutil.copy(good / name, folder / name)
    (folder / "notes.png").write_text("not an image\n")
    data = (good / "0002.png").read_bytes()
    (folder / "cut.png").write_bytes(data[:len(data) // 2])
    (folder / "._0000.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # hidden: not searched
    (folder / ".ipynb_checkpoints").mkdir()
    shutil.copy(good / "0000.png", folder / ".ipynb_checkpoints" / "0000-checkpoint.png")
    rc, out, err = run_cli("predict", mnist_run, folder)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("2 of the inputs could not be predicted (2 were)")
    assert any(str(folder / "notes.png") in line and "not an image" in line for line in lines)
    assert any(str(folder / "cut.png") in line and "truncated" in line for line in lines)
    assert len(out.strip().splitlines()) == 3  # header + the two readable images


def test_nothing_to_predict_exits_2(mnist_run, work):
    empty = work / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here\n")
    rc, _, err = run_cli("predict", mnist_run, empty)
    assert_one_line_error(rc, err, "nothing to predict", str(empty), "no image files")
    bad = work / "only_bad"
    bad.mkdir()
    (bad / "a.png").write_text("text\n")
    rc, _, err = run_cli("predict", mnist_run, bad)
    assert_one_line_error(rc, err, "none of the 1 files is a readable image", "a.png")


def test_foreign_onnx_needs_mean_std_size(mnist_onnx, mnist_images, work):
    model = onnx.load(str(mnist_onnx[0]))
    del model.metadata_props[:]
    foreign = work / "foreign.onnx"
    onnx.save(model, str(foreign))
    images = mnist_images[0] / "a_orig"
    rc, _, err = run_cli("predict", foreign, images)
    assert_one_line_error(rc, err, "no cnnlab metadata", "--mean, --std, --size")
    rc, _, err = run_cli("predict", foreign, images, "--mean", "0.1307")
    assert_one_line_error(rc, err, "pass --std, --size")
    rc, _, err = run_cli("predict", foreign, images, "--mean", "0.5,0.5,0.5", "--std", "1,1,1", "--size", "28")
    assert_one_line_error(rc, err, "3 channel(s)")
    rc, _, err = run_cli("predict", foreign, images, "--mean", "0.1307", "--std", "0.3081", "--size", "28x28",
                         "--out", work / "foreign.json", "--top", "10")
    assert rc == 0, err
    rows = predicted(work / "foreign.json")
    rc, _, err = run_cli("predict", mnist_onnx[0], images, "--no-tta", "--out", work / "own.json", "--top", "10")
    own = predicted(work / "own.json")
    assert rc == 0 and rows.keys() == own.keys()
    assert all(rows[k]["top"] == own[k]["top"] for k in rows)  # the same preprocessing, given by hand
    rc, _, err = run_cli("predict", mnist_onnx[0], images, "--mean", "0.5")
    assert_one_line_error(rc, err, "carries its own preprocessing", "drop --mean")
    rc, _, err = run_cli("predict", mnist_run, images, "--size", "28")
    assert_one_line_error(rc, err, "carries its own preprocessing", "drop --size")


def test_run_without_checkpoint_and_bad_files(mnist_run, mnist_images, work):
    images = mnist_images[0] / "a_orig"
    bare = work / "no_checkpoint"
    bare.mkdir()
    shutil.copy(mnist_run / "config.toml", bare / "config.toml")
    rc, _, err = run_cli("predict", bare, images)
    assert_one_line_error(rc, err, "no checkpoint best.pt")
    rc, _, err = run_cli("export", bare)
    assert_one_line_error(rc, err, "no checkpoint best.pt")
    assert not (bare / "model.onnx").exists()
    rc, _, err = run_cli("predict", work / "nowhere", images)
    assert_one_line_error(rc, err, "no such run directory")
    damaged = work / "damaged.onnx"
    damaged.write_bytes(b"\x08\x07garbage")
    rc, _, err = run_cli("predict", damaged, images)
    assert_one_line_error(rc, err, "not a model ONNX Runtime can load")
    rc, _, err = run_cli("predict", mnist_run, images, "--out", work / "pred.txt")
    assert_one_line_error(rc, err, "expected a .csv or .json")
    rc, _, err = run_cli("export", mnist_run, "--out", work / "model.bin")
    assert_one_line_error(rc, err, "ending in .onnx")
    (work / "a_file").write_text("")
    for command, name in (("predict", "pred.json"), ("export", "model.onnx")):  # checked before any work
        rc, out, err = run_cli(command, mnist_run, *([images] if command == "predict" else []),
                               "--out", work / "a_file" / "sub" / name)
        assert_one_line_error(rc, err, f"{work / 'a_file'} is not a folder")
        assert out == ""
        (work / name).mkdir(exist_ok=True)
        rc, _, err = run_cli(command, mnist_run, *([images] if command == "predict" else []), "--out", work / name)
        assert_one_line_error(rc, err, "a directory; give a file name inside it")


UNEXPORTABLE = """
import sys, torch
from torch import nn
from cnnlab import cli, models
from cnnlab.layers import Net, conv_bn, GlobalPool

@torch.library.custom_op("cnnlabtest::twist", mutates_args=())
def twist(x: torch.Tensor) -> torch.Tensor:
    return x * 2

twist.register_fake(lambda x: torch.empty_like(x))
twist.register_autograd(lambda ctx, g: g * 2)

class Twist(nn.Module):
    def forward(self, x):
        return twist(x)

@models.register("twisted", (1, 28, 28), "test", "a layer ONNX cannot translate", budget=(0, 10**6))
def twisted(num_classes: int = 10) -> nn.Module:
    features = nn.Sequential(conv_bn(1, 8), Twist())
    return Net(features, nn.Sequential(GlobalPool("avg"), nn.Linear(8, num_classes)))

out = sys.argv[1]
rc = cli.main(["train", "recipes/mnist_fast.toml", "--out", out, "--quiet", "--set", 'model.name="twisted"',
               "--set", "data.subset=256", "--set", "train.epochs=1", "--set", "train.threads=1",
               "--set", 'train.dtype="float32"'])
assert rc == 0, rc
sys.exit(cli.main(["export", out]))
"""


def test_unexportable_layer_is_named(work):
    out = work / "twisted"
    rc, _, err = run_cli(out, script=UNEXPORTABLE)
    assert_one_line_error(rc, err, "operator cnnlabtest.twist.default", "layer features.1 (Twist)")
    assert not (out / "model.onnx").exists()


BLOCKED = """
import sys
sys.modules["onnxruntime"] = None  # as if the [onnx] extra were not installed
from cnnlab import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_missing_extra_says_what_to_install(mnist_onnx, mnist_run, mnist_images):
    rc, _, err = run_cli("predict", mnist_onnx[0], mnist_images[0] / "a_orig", script=BLOCKED)
    assert_one_line_error(rc, err, "pip install 'cnnlab[onnx]'")
    rc, _, err = run_cli("export", mnist_run, script=BLOCKED)
    assert_one_line_error(rc, err, "pip install 'cnnlab[onnx]'")
    rc, out, err = run_cli("predict", mnist_run, mnist_images[0] / "a_orig" / "0000.png", script=BLOCKED)
    assert rc == 0 and "0000.png" in out  # a run predicts without the extra


# ----------------------------------------------------------------------------- decoding


def test_read_image_converts_depth_channels_and_size(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit grey
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert (read_image(tmp_path / "deep.png", (1, 8, 8))[0] == grey).all()
    Image.fromarray(grey).save(tmp_path / "grey.png")
    rgb = read_image(tmp_path / "grey.png", (3, 8, 8))  # a grey file for an RGB model: three equal channels
    assert rgb.shape == (3, 8, 8) and (rgb == grey[None]).all()
    tall = np.zeros((16, 8), dtype=np.uint8)
    tall[4:12] = grey
    Image.fromarray(tall).save(tmp_path / "tall.png")  # covers 8x8 already: the centre is cut out
    assert (read_image(tmp_path / "tall.png", (1, 8, 8))[0] == grey).all()
    small = read_image(tmp_path / "grey.png", (1, 4, 4))[0]  # 2x2 blocks averaged
    assert (small == grey.reshape(4, 2, 4, 2).astype(float).mean((1, 3)).round()).all()


def test_a_picture_only_in_alpha_is_composited_and_other_alpha_dropped(tmp_path):
    """Strokes of one flat colour on a transparent canvas (what a drawing app exports) come out over
    the contrasting background, grey or RGB as the model takes; an image whose colours carry the
    picture keeps them (its alpha dropped, as before), and a uniformly transparent one is untouched."""
    digit = np.zeros((8, 8), np.uint8)
    digit[1:7, 3:5], digit[1, 2] = 255, 100  # a stroke, one pixel partly covered
    black_ink = np.zeros((8, 8, 4), np.uint8)
    black_ink[..., 3] = digit
    Image.fromarray(black_ink, "RGBA").save(tmp_path / "black.png")
    assert (read_image(tmp_path / "black.png", (1, 8, 8))[0] == 255 - digit).all()  # black on white
    rgb = read_image(tmp_path / "black.png", (3, 8, 8))
    assert (rgb == (255 - digit)[None]).all()
    white_ink = np.concatenate([np.full((8, 8, 1), 255, np.uint8), digit[..., None]], -1)
    Image.fromarray(white_ink, "LA").save(tmp_path / "white.png")
    assert (read_image(tmp_path / "white.png", (1, 8, 8))[0] == digit).all()  # white on black
    assert open_image(tmp_path / "white.png").mode == "L"  # grey with alpha stays grey
    coloured = np.zeros((8, 8, 4), np.uint8)
    coloured[..., 0], coloured[..., 3] = digit, np.where(digit > 0, 255, 0)  # the picture in the colours
    Image.fromarray(coloured, "RGBA").save(tmp_path / "coloured.png")
    assert (read_image(tmp_path / "coloured.png", (3, 8, 8)) == coloured[..., :3].transpose(2, 0, 1)).all()
    half = np.concatenate([np.full((8, 8, 1), 40, np.uint8), np.full((8, 8, 1), 128, np.uint8)], -1)
    Image.fromarray(half, "LA").save(tmp_path / "half.png")  # flat colour, flat alpha: no picture anywhere
    assert (read_image(tmp_path / "half.png", (1, 8, 8)) == 40).all()


def test_large_images_read_without_a_warning_and_bombs_are_one_error(tmp_path, monkeypatch):
    """Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; cnnlab reads the first
    silently (nothing on stderr beside its own output) and names the file for the second."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.full((12, 12), 7, np.uint8)).save(tmp_path / "large.png")  # 144 pixels: a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (read_image(tmp_path / "large.png", (1, 12, 12)) == 7).all()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "bomb.png")  # 400 pixels: refused
    with pytest.raises(CnnlabError, match="bomb.png: not a readable image.*expected a valid PNG"):
        read_image(tmp_path / "bomb.png", (1, 20, 20))
