"""What Muon's step costs: airbench94's optimizer step with airbench94_muon's Muon against the
airbench94 recipe's fused SGD, beside one forward+backward of the network at the recipe's batch.

The two optimizers take turns on the same gradients (random, fixed); each reports its median
step. Newton-Schulz is float32 matrix products on the hidden conv kernels (256 x 2304 the
largest), ``ns_steps`` times per step.

    PYTHONPATH=src python benchmarks/muon.py [--repeats 10] [--threads N] [--batch 2000]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab.bench import cpu_name  # noqa: E402
from cnnlab.config import load_recipe  # noqa: E402
from cnnlab.evaluate import autocast  # noqa: E402
from cnnlab.models import create_model  # noqa: E402
from cnnlab.train import build_optimizer  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def median_seconds(fn, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--batch", type=int, default=2000, help="batch of the forward+backward (airbench94_muon: 2000)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_model("airbench94").to(memory_format=torch.channels_last)
    model.init_from_data(torch.randn(500, 3, 32, 32))
    grads = {p: torch.randn_like(p) for p in model.parameters() if p.requires_grad}
    optimizers = {name: build_optimizer(model, load_recipe(RECIPES / f"{name}.toml").optim)
                  for name in ("airbench94", "airbench94_muon")}
    steps = {name: [] for name in optimizers}
    for i in range(args.repeats + 1):
        for name, opt in optimizers.items():
            for p, g in grads.items():
                p.grad = g.clone()
            t0 = time.perf_counter()
            opt.step()
            if i:
                steps[name].append(time.perf_counter() - t0)
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))

    def forward_backward():
        with autocast(torch.device("cpu"), torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()

    fwd_bwd = median_seconds(forward_backward, max(2, args.repeats // 3))
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; airbench94, "
          f"forward+backward at batch {args.batch} (bf16, channels_last): {fwd_bwd:.2f} s\n")
    print("| optimizer | step ms | % of forward+backward |")
    print("|---|---:|---:|")
    for name, label in (("airbench94", "SGD (fused), airbench94 recipe"),
                        ("airbench94_muon", "Muon (3 Newton-Schulz steps) + SGD, airbench94_muon recipe")):
        t = statistics.median(steps[name])
        print(f"| {label} | {1e3 * t:.1f} | {100 * t / fwd_bwd:.1f} |")


if __name__ == "__main__":
    main()
