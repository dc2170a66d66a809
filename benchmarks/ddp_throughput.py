"""Training images/s of one recipe as 1 process x T threads against P processes x T/P threads
(and 1 process x 1 thread, the unit both are made of).

    PYTHONPATH=src python benchmarks/ddp_throughput.py recipes/mnist_fast.toml --rounds 3 --set data.subset=15360

Each round trains the recipe once each way through the CLI (``cnnlab train``, and ``cnnlab train
--nproc P``), turn about, so a change in the machine's load hits all alike; the rate is the last
epoch's training images / its training seconds (evaluation excluded). Prints a markdown table
with the per-round rates, the medians and the ratios of P processes to each one-process way.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cnnlab import runs

ROOT = Path(__file__).resolve().parents[1]


def images_per_s(recipe: str, sets: list[str], out: Path, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "cnnlab", "train", recipe, "--out", str(out), "--overwrite", "--quiet", *extra,
           *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    last = runs.read_metrics(out)[-1]
    return runs.read_result(out)["images_per_epoch"] / last["epoch_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the one process (the P processes share them)")
    a = p.parse_args()
    load = os.getloadavg()[0]
    each = max(1, a.threads // a.nproc)
    ways = {"one": ([f"train.threads={a.threads}"], []), "single": (["train.threads=1"], []),
            "many": ([f"train.threads={each}"], ["--nproc", str(a.nproc)])}
    rates = {k: [] for k in ways}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.rounds):
            for k, (sets, extra) in ways.items():
                rates[k].append(images_per_s(a.recipe, a.set + sets, Path(tmp) / k, extra))
    sets = "".join(f" --set {s}" for s in a.set)
    print(f"`python benchmarks/ddp_throughput.py {a.recipe}{sets} --rounds {a.rounds}` "
          f"(load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)\n")
    print(f"| round | 1 process x {a.threads} threads | 1 process x 1 thread | {a.nproc} processes x {each} thread(s) "
          f"| ratio to 1 x {a.threads} | ratio to 1 x 1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    rows = [*zip(*rates.values())] + [tuple(statistics.median(v) for v in rates.values())]
    for i, (x, x1, y) in enumerate(rows, 1):
        print(f"| {i if i <= a.rounds else '**median**'} | {x:.0f} | {x1:.0f} | {y:.0f} | {y / x:.2f} | {y / x1:.2f} |")
    print("\n(images/s of training, the last epoch)")


if __name__ == "__main__":
    main()
