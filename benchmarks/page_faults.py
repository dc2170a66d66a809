"""Training steps with glibc's default malloc against ``allocator.keep_freed_memory``, in one run.

Each (model, batch) is timed in fresh processes (the malloc setting is process-wide and cannot be
undone), the two settings taking turns round by round: forward, backward and SGD steps on random
data, bf16 autocast, channels_last, after a warm-up. Per step: minor page faults, kernel (system)
CPU time, user CPU time, and the median wall time; the table gives the medians over the rounds.

    PYTHONPATH=src python benchmarks/page_faults.py [--rounds 3] [--steps 40] [--threads 2]

Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab import allocator  # noqa: E402
from cnnlab.bench import cpu_name  # noqa: E402
from cnnlab.models import create_model, get_spec  # noqa: E402

JOBS = [("mnist_tiny", 128), ("cifar_dw56k", 32), ("resnet_custom", 128)]


def child(name: str, batch: int, steps: int, threads: int, keep: bool) -> dict:
    """Time ``steps`` training steps in this process; returns per-step numbers."""
    if keep and not allocator.keep_freed_memory():
        raise SystemExit("this C library is not glibc: nothing to compare")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    x = torch.randn(batch, *get_spec(name).input_shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"faults": (r1.ru_minflt - r0.ru_minflt) / steps, "sys_ms": (r1.ru_stime - r0.ru_stime) / steps * 1e3,
            "user_ms": (r1.ru_utime - r0.ru_utime) / steps * 1e3, "step_ms": statistics.median(times) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        name, batch, mode = args.child
        print(json.dumps(child(name, int(batch), args.steps, args.threads, mode == "keep")))
        return
    print(f"{cpu_name()}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps\n")
    print("| model | batch | malloc | faults/step | kernel ms/step | user ms/step | step ms (median) | speed-up |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, batch in JOBS:
        runs = {"default": [], "keep": []}
        for _ in range(args.rounds):
            for mode in runs:
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--threads",
                                      str(args.threads), "--child", name, str(batch), mode],
                                     capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(out.stdout))
        med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
        for mode, m in med.items():
            speed = med["default"]["step_ms"] / m["step_ms"]
            print(f"| {name} | {batch} | {mode} | {m['faults']:.0f} | {m['sys_ms']:.2f} | {m['user_ms']:.1f} "
                  f"| {m['step_ms']:.1f} | {speed:.2f}x |")


if __name__ == "__main__":
    main()
