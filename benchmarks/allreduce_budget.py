"""What data-parallel training of each zoo model asks of the network, on paper.

    PYTHONPATH=src python benchmarks/allreduce_budget.py --threads 2 --steps 3

For each zoo model (through the recipe named after it, else the first that trains it: its batch
size, dtype and layout), this measures one training step of the whole global batch here
(``bench.throughput``: forward, backward, SGD; median of ``--steps`` after a warm-up), counts what
DDP all-reduces per step (every trainable parameter's gradient: 4 bytes each in float32, 2 with a
bf16 compression hook), and prints the network bandwidth above which a step of N processes is
compute-bound:

  a ring all-reduce sends (and receives) 2 (N - 1) / N x bytes per process per step, and each of N
  processes computes 1/N of the batch, t = T / N seconds for a step that takes T on one; the
  communication hides behind the computation when 2 (N - 1) / N x bytes / bandwidth < t.

The GPU columns give the same for GPUs whose step time T is estimated from airbench94's published
A100 time (3.29 s for 9.9 epochs of 50,000 images at batch 1024: 6.8 ms per step), scaled by each
model's MACs per step, with t at least 1 ms (a step's kernel launches and Python): an estimate,
nothing here ran on a GPU. A small batch per process uses a GPU less well than T / N assumes, so
its step takes longer and those bandwidths are upper bounds.
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from cnnlab import bench, config
from cnnlab.models import list_models
from cnnlab.summary import summarize
from cnnlab.train import torch_threads

ROOT = Path(__file__).resolve().parents[1]
AIRBENCH_A100_STEP_S = 3.29 / (9.9 * 50_000 / 1024)  # airbench94's published time, per 1024-image step


def recipe_per_model() -> dict[str, Path]:
    """The recipe named after each zoo model, else the first (by name) that trains it."""
    found = {}
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        name = tomllib.loads(path.read_text()).get("model", {}).get("name")
        if name in list_models() and (name not in found or path.stem == name):
            found[name] = path
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--processes", type=int, default=8)
    a = p.parse_args()
    n = a.processes
    air = summarize("airbench94")
    rows = []
    for name, path in sorted(recipe_per_model().items()):
        cfg = config.load_recipe(path)
        with torch_threads(a.threads):
            step = bench.throughput([cfg], steps=a.steps, settings=((cfg.train.dtype, cfg.train.channels_last),),
                                    log=lambda *x: None)[0]
        s = summarize(name, **cfg.model.options)
        seconds = step["ms_per_step"] / 1000
        fp32 = 4 * s.trainable_params
        ring = 2 * (n - 1) / n * fp32  # bytes each process sends per step
        gpu = max(1e-3, AIRBENCH_A100_STEP_S * (s.macs * cfg.data.batch_size) / (air.macs * 1024) / n)
        rows.append((name, path.name, s.trainable_params, fp32, cfg.data.batch_size, cfg.train.dtype, seconds,
                     ring / (seconds / n), ring / gpu, gpu))
    print(f"`python benchmarks/allreduce_budget.py --threads {a.threads} --steps {a.steps}` "
          f"({bench.cpu_name()}, {a.threads} threads); N = {n} processes\n")
    print("| model | recipe | trainable params | all-reduced per step (fp32 / bf16) | batch | dtype | step here (s) "
          f"| compute-bound above, {n} CPU processes like this | est. GPU step of 1/{n} batch (ms) "
          f"| compute-bound above, {n} GPUs |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for name, recipe, params, fp32, bs, dtype, sec, cpu_bw, gpu_bw, gpu in rows:
        print(f"| {name} | {recipe} | {params:,} | {fp32 / 1e6:.2f} / {fp32 / 2e6:.2f} MB | {bs} | {dtype} | {sec:.3f} "
              f"| {rate(cpu_bw)} | {1000 * gpu:.2f} | {rate(gpu_bw)} |")


def rate(bytes_per_s: float) -> str:
    """Bytes/s as MB/s or GB/s, with the Ethernet speed in bits beside it."""
    text = f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s >= 1e9 else f"{bytes_per_s / 1e6:.1f} MB/s"
    return f"{text} ({8 * bytes_per_s / 1e9:.2f} Gbit/s)"


if __name__ == "__main__":
    main()
