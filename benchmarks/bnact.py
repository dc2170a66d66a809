"""cnnlab's fused BatchNorm -> ReLU/GELU [-> dropout] training kernels (``cnnlab.bnact``) against
torch's modules one by one, in one run.

First every BatchNorm2d -> ReLU/GELU [-> Dropout] site of ``mnist_tiny`` (batch 128), ``cifar_dw56k``
(batch 32) and ``airbench94`` (GELU, batch 256), bf16 and fp32, channels_last: forward and backward
of torch's modules (``BatchNorm2d``, in-place ``ReLU`` or ``GELU``, cnnlab's ``Dropout``) and of
the fused kernel, taking turns repeat by repeat,
medians. "MB" is the least memory traffic a pass needs (forward: read x, write y; backward: read dy
and x, write dx); "% of bandwidth" compares it with this machine's copy bandwidth, measured here.
Then whole training steps (forward, backward, SGD; bf16 autocast, channels_last) of zoo models with
the fused kernel on and off (``ConvBlock.fused``), taking turns.

    PYTHONPATH=src python benchmarks/bnact.py [--repeats 20] [--threads N] [--cpu-time]

Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab import bnact  # noqa: E402
from cnnlab.bench import copy_bandwidth_gbs, cpu_name, interleaved_step_times  # noqa: E402
from cnnlab.layers import ConvBlock, Dropout  # noqa: E402
from cnnlab.models import create_model, get_spec  # noqa: E402

SITES = {"mnist_tiny": 128, "cifar_dw56k": 32, "airbench94": 256}
STEPS = {"mnist_tiny": 128, "mnist_fast": 256, "cifar_dw56k": 32, "resnet9": 64, "airbench94": 256}


def sites(model_name: str, batch: int) -> list[dict]:
    """Input shape, activation and dropout of every fusable BatchNorm2d -> ReLU/GELU [-> Dropout] run of a model."""
    model = create_model(model_name).to(memory_format=torch.channels_last)
    found, hooks = [], []
    for m in model.modules():
        if isinstance(m, ConvBlock):
            kids = list(m)
            for i, k in enumerate(kids[:-1]):
                if isinstance(k, nn.BatchNorm2d):
                    p = kids[i + 2].p if i + 2 < len(kids) and isinstance(kids[i + 2], Dropout) else 0.0
                    act = "gelu" if isinstance(kids[i + 1], nn.GELU) else "relu"
                    hooks.append(k.register_forward_hook(
                        lambda mod, inp, out, p=p, act=act: found.append({"shape": tuple(inp[0].shape), "p": p,
                                                                          "act": act})))
    with torch.no_grad():
        model.eval()(torch.zeros(batch, *get_spec(model_name).input_shape).to(memory_format=torch.channels_last))
    for h in hooks:
        h.remove()
    return found


def time_site(shape: tuple, act: str, p: float, dtype: torch.dtype, repeats: int, clock) -> dict:
    """Median forward and backward seconds of torch's modules and of the fused kernel."""
    c = shape[1]
    torch_act = nn.GELU() if act == "gelu" else nn.ReLU(inplace=True)
    torch_mods = nn.Sequential(nn.BatchNorm2d(c), torch_act, *([Dropout(p)] if p else []))
    fused_bn = nn.BatchNorm2d(c)
    variants = {
        "torch": lambda x: torch_mods(x),
        "fused": lambda x: bnact.batch_norm_act(x, fused_bn, act=act, p=p),
    }
    x0 = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x0)
    times = {name: ([], []) for name in variants}
    for i in range(repeats + 1):
        for name, fn in variants.items():
            x = x0.clone().requires_grad_()
            y0 = x * 1  # a non-leaf input, as in a network (in-place ReLU needs one)
            t0 = clock()
            y = fn(y0)
            t1 = clock()
            y.backward(grad)
            t2 = clock()
            if i:
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    return {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in times.items()}


def step_times(model_name: str, batch: int, repeats: int, clock) -> dict:
    """Median seconds of a training step with the fused kernel off and on."""
    torch.manual_seed(0)
    x = torch.randn(batch, *get_spec(model_name).input_shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    setups = {}
    for name, fused in (("modules", False), ("fused", True)):
        torch.manual_seed(0)
        model = create_model(model_name).to(memory_format=torch.channels_last)
        for m in model.modules():
            if isinstance(m, ConvBlock):
                m.fused = fused
        setups[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
    return interleaved_step_times(setups, x, y, torch.bfloat16, repeats, clock)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (for --threads 1)")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if not bnact.available():
        sys.exit("the fused kernels could not be built; see the warning above")
    bandwidth = copy_bandwidth_gbs(args.repeats, clock)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"copy bandwidth {bandwidth:.1f} GB/s (read + write); {'CPU' if args.cpu_time else 'wall'} time\n")
    print("| model | site (N, C, H, W), dropout | dtype | variant | fwd ms | bwd ms | fwd MB | bwd MB "
          "| fwd % of bandwidth | bwd % of bandwidth | fwd+bwd speed-up |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    totals: dict = {}
    for model_name, batch in SITES.items():
        for site in sites(model_name, batch):
            shape, act, p = site["shape"], site["act"], site["p"]
            for dtype in (torch.bfloat16, torch.float32):
                size = torch.tensor([], dtype=dtype).element_size()
                numel = torch.Size(shape).numel()
                fwd_bytes, bwd_bytes = 2 * size * numel, 3 * size * numel
                res = time_site(shape, act, p, dtype, args.repeats, clock)
                ref = sum(res["torch"])
                for name, (tf, tb) in res.items():
                    key = (model_name, str(dtype)[6:], name)
                    totals[key] = [a + b for a, b in zip(totals.get(key, [0.0, 0.0]), (tf, tb))]
                    print(f"| {model_name} | {shape}, {p} | {str(dtype)[6:]} | {name} | {1e3 * tf:.2f} | "
                          f"{1e3 * tb:.2f} | {fwd_bytes / 1e6:.1f} | {bwd_bytes / 1e6:.1f} | "
                          f"{100 * fwd_bytes / tf / 1e9 / bandwidth:.0f} | {100 * bwd_bytes / tb / 1e9 / bandwidth:.0f} | "
                          f"{ref / (tf + tb):.2f}x |")
    print("\nAll sites of one step (sum of medians):\n")
    print("| model | dtype | variant | fwd ms | bwd ms | speed-up |")
    print("|---|---|---|---:|---:|---:|")
    for (model_name, dtype, name), (tf, tb) in totals.items():
        ref = sum(totals[(model_name, dtype, "torch")])
        print(f"| {model_name} | {dtype} | {name} | {1e3 * tf:.1f} | {1e3 * tb:.1f} | {ref / (tf + tb):.2f}x |")
    print("\nTraining steps (bf16 autocast, channels_last, forward+backward+SGD):\n")
    print("| model | batch | modules ms/step | fused ms/step | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for model_name, batch in STEPS.items():
        t = step_times(model_name, batch, args.repeats, clock)
        print(f"| {model_name} | {batch} | {1e3 * t['modules']:.1f} | {1e3 * t['fused']:.1f} | "
              f"{t['modules'] / t['fused']:.2f}x |")


if __name__ == "__main__":
    main()
