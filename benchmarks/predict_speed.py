"""What shipping a model costs and gives: ONNX file sizes, accuracy fp32 vs int8, inference speed (issue 17).

Not a test: run it by hand and paste the tables into BENCHMARKS.md.

    PYTHONPATH=src python benchmarks/predict_speed.py --run mnist_fast=runs/mnist_fast [--run NAME=RUN ...]
        [--models mnist_tiny,mnist_fast,cifar_dw56k,airbench94,resnet9] [--rounds 5] [--out runs/predict_speed]

For each model: the weights of a trained run when one is given (``--run NAME=RUN_DIR``, its best.pt),
else the model as initialised ("untrained": no accuracy). It is exported as ``cnnlab export`` does
(``export.to_onnx``; int8 by ``export.quantize``, calibrated on 512 training images), then:

- file sizes of the float32 and int8 ONNX files;
- accuracy on the run's evaluation split, single view: PyTorch float32, ONNX Runtime float32 and int8,
  and how often int8 and float32 agree (trained runs only);
- images/s at batch 1 and 256 on one thread: PyTorch float32 and bfloat16 (autocast), as
  ``cnnlab predict`` runs a run's model (NCHW, eval mode), and ONNX Runtime float32 and int8 (CPU
  provider, all graph optimisations). The four take turns for ``--slice`` seconds each, ``--rounds``
  times, on real images; the medians are reported, so load on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab import bench, evaluate, export, runs  # noqa: E402
from cnnlab.augment import Loader  # noqa: E402
from cnnlab.data import load_dataset  # noqa: E402
from cnnlab.models import create_model, get_spec  # noqa: E402
from cnnlab.onnxfile import OrtModel  # noqa: E402
from cnnlab.predict import Preprocessing, run_preprocessing  # noqa: E402

MODELS = ("mnist_tiny", "mnist_fast", "cifar_dw56k", "airbench94", "resnet9")
ENGINES = ("PyTorch fp32", "PyTorch bf16", "ORT fp32", "ORT int8")
BATCHES = (1, 256)


def untrained(name: str):
    """A freshly initialised model, its preprocessing from the dataset its input shape says, and that dataset."""
    shape = get_spec(name).input_shape
    quiet = dict(acquire=False, log=lambda *a, **k: None)  # (the shared CIFAR copy is unverified: known)
    ds = load_dataset("mnist", **quiet) if shape[0] == 1 else load_dataset("cifar10", val_split=5000, **quiet)
    prep = Preprocessing(shape, tuple(ds.mean), tuple(ds.std), tuple(ds.classes))
    return create_model(name).eval(), prep, ds.train, ds.test, ds.test_name


def trained(run: Path):
    ckpt, model = evaluate.load_run_model(run)
    val_split = int(ckpt["config"].get("data", {}).get("val_split", 0) or 0)
    split, split_name = evaluate.load_eval_split(ckpt)
    return model, run_preprocessing(ckpt), evaluate.load_run_dataset(ckpt, val_split).train, split, split_name


def images_per_s(fn, x: torch.Tensor, seconds: float) -> float:
    """Images per second of ``fn(x)`` called for at least ``seconds`` (and at least once)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * len(x) / dt


def measure(name: str, run: Path | None, rounds: int, slice_s: float) -> dict:
    model, prep, train, split, split_name = trained(run) if run else untrained(name)
    data = export.to_onnx(model, prep.shape, name).SerializeToString()
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:export.CALIBRATION_IMAGES]
    int8 = export.quantize(data, train.images[pick], prep)
    row = {"model": name, "run": str(run) if run else None, "fp32_bytes": len(data), "int8_bytes": len(int8)}
    if run:
        logits = {k: export.onnx_logits(src, split, prep) for k, src in
                  (("pytorch", model), ("ort_fp32", data), ("ort_int8", int8))}
        preds = {k: v.argmax(1) for k, v in logits.items()}
        row.update(split=split_name, images=len(split),
                   **{f"{k}_acc": (p == split.labels).float().mean().item() for k, p in preds.items()},
                   agreement=(preds["ort_fp32"] == preds["ort_int8"]).float().mean().item())
    ort32, ort8 = OrtModel(data, threads=1), OrtModel(int8, threads=1)

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    engines = dict(zip(ENGINES, (model, bf16, ort32, ort8)))
    x = Loader(split.images[:max(BATCHES)], split.labels[:max(BATCHES)], max(BATCHES), prep.mean, prep.std)
    x = next(x.epoch(None))[0]
    rates = {(e, b): [] for e in ENGINES for b in BATCHES}
    with torch.no_grad():
        for fn in engines.values():  # warm up: first calls allocate and pick kernels
            fn(x[:1])
            fn(x)
        for _ in range(rounds):
            for b in BATCHES:
                for e, fn in engines.items():
                    rates[e, b].append(images_per_s(fn, x[:b], slice_s))
    row["images_per_s"] = {f"{e} @ {b}": statistics.median(v) for (e, b), v in rates.items()}
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | weights | fp32 file | int8 file | accuracy PyTorch fp32 | ORT fp32 | ORT int8 | int8 vs fp32 | agreement |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["run"]:
            acc = (f"{r['pytorch_acc']:.2%} ({r['split']}) | {r['ort_fp32_acc']:.2%} | {r['ort_int8_acc']:.2%} | "
                   f"{100 * (r['ort_int8_acc'] - r['ort_fp32_acc']):+.2f} pts | {r['agreement']:.2%}")
        else:
            acc = "- | - | - | - | -"
        lines.append(f"| {r['model']} | {'trained' if r['run'] else 'untrained'} | {r['fp32_bytes'] / 1024:,.0f} KiB | "
                     f"{r['int8_bytes'] / 1024:,.0f} KiB | {acc} |")
    lines += ["", "| model | batch | " + " | ".join(f"{e} img/s" for e in ENGINES) + " | ORT int8 / PyTorch fp32 |",
              "|---|---:|" + "---:|" * (len(ENGINES) + 1)]
    for r in rows:
        for b in BATCHES:
            v = [r["images_per_s"][f"{e} @ {b}"] for e in ENGINES]
            lines.append(f"| {r['model']} | {b} | " + " | ".join(f"{x:,.0f}" for x in v) + f" | {v[3] / v[0]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR", help="a trained run of model NAME")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--slice", type=float, default=0.3, help="seconds each engine runs per round")
    ap.add_argument("--out", default="runs/predict_speed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    given = dict(r.split("=", 1) for r in args.run)
    rows = [measure(name, Path(given[name]) if name in given else None, args.rounds, args.slice)
            for name in args.models.split(",")]
    env = {**bench.environment(), "rounds": args.rounds, "slice_s": args.slice}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(out / "predict_speed.json", {"rows": rows, "environment": env})
    text = markdown(rows) + (f"\n\none thread, medians of {args.rounds} rounds; {env['cpu']}, torch {env['torch_version']}, "
                             f"commit {str(env['git_commit'])[:10]}\n")
    runs.write_text(out / "predict_speed.md", text)
    print(text)


if __name__ == "__main__":
    main()
