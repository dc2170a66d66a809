"""cnnlab's depthwise 3x3 kernels (``cnnlab.dwconv``) against torch's, in one run.

For each depthwise layer of ``cifar_dw56k`` (shapes taken from the model at the recipe's batch
size), forward and backward (input and weight gradient) of: torch's ``F.conv2d`` on a
channels_last input (oneDNN), cnnlab's fallback (the layer without the fast kernel: channels
repeated for multiplier > 1, then torch's kernel), and the fast kernel. The variants take turns
repeat by repeat; each reports its median. GFLOP/s counts 2 FLOPs per multiply-add (backward: input
and weight gradients, twice the forward); "bytes" is the least memory traffic the pass needs
(forward: read x, write y; backward: read dy and x, write dx), and "% of bandwidth" compares it with
this machine's copy bandwidth, measured here (a 256 MiB tensor copy: read + write). Then whole
training steps of cifar_dw56k (forward, backward, SGD) with and without the fast kernel.

    PYTHONPATH=src python benchmarks/dwconv.py [--repeats 20] [--threads N] [--batch 32] [--cpu-time]

``--cpu-time`` times with the process's CPU time instead of the wall clock: with ``--threads 1`` on
a machine that other work shares, the time slices the others take do not count.

Prints Markdown tables.
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

from cnnlab import dwconv  # noqa: E402
from cnnlab.bench import copy_bandwidth_gbs, cpu_name, interleaved_step_times  # noqa: E402
from cnnlab.evaluate import autocast  # noqa: E402
from cnnlab.layers import DepthwiseConv2d  # noqa: E402
from cnnlab.models import create_model  # noqa: E402


def depthwise_layers(batch: int) -> list[dict]:
    """Input shape, channels out, stride and padding of each DepthwiseConv2d in cifar_dw56k."""
    model = create_model("cifar_dw56k")
    found = []
    hooks = [m.register_forward_hook(lambda m, inp, out: found.append(
        {"shape": tuple(inp[0].shape), "c_out": m.out_channels, "stride": m.stride[0], "padding": m.padding[0]}))
        for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(batch, 3, 32, 32))
    for h in hooks:
        h.remove()
    return found


def layer_variants(layer: dict, dtype: torch.dtype) -> dict:
    """name -> (forward function, input, weight) for one layer shape."""
    n, c, h, w = layer["shape"]
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    fallback = DepthwiseConv2d(c, layer["c_out"], 3, stride=layer["stride"], padding=layer["padding"])
    fallback.fast = False
    weight = fallback.weight
    s, p = layer["stride"], layer["padding"]

    def torch_conv(x, weight):
        return F.conv2d(x, weight.to(x.dtype), None, s, p, 1, c)

    return {"torch": (torch_conv, x, weight),
            "cnnlab fallback": (lambda x, weight: fallback(x) if x.dtype == torch.float32 else
                                _with_autocast(fallback, x), x, weight),
            "fast": (lambda x, weight: dwconv.depthwise_conv3x3(x, weight, s, p), x, weight)}


def _with_autocast(module, x):
    with autocast(torch.device("cpu"), x.dtype):
        return module(x)


def time_layer(variants: dict, repeats: int, clock) -> dict:
    """Median forward and backward seconds per variant, the variants taking turns."""
    times = {name: ([], []) for name in variants}
    for i in range(repeats + 1):
        for name, (fn, x, weight) in variants.items():
            xg = x.detach().requires_grad_()
            t0 = clock()
            y = fn(xg, weight)
            t1 = clock()
            y.backward(torch.ones_like(y))
            t2 = clock()
            weight.grad = None
            if i:  # the first round warms up
                times[name][0].append(t1 - t0)
                times[name][1].append(t2 - t1)
    return {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in times.items()}


def step_times(batch: int, dtype: torch.dtype, repeats: int, clock) -> dict:
    """Median seconds of a cifar_dw56k training step (channels_last) with and without the fast kernel."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    setups = {}
    for name, fast in (("fallback", False), ("fast", True)):
        torch.manual_seed(0)
        model = create_model("cifar_dw56k").to(memory_format=torch.channels_last)
        for m in model.modules():
            if isinstance(m, DepthwiseConv2d):
                m.fast = fast
        setups[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9))
    return interleaved_step_times(setups, x, y, dtype, repeats, clock)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (cifar_dw56k's recipe: 32)")
    ap.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (for --threads 1)")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if not dwconv.available():
        sys.exit("the fast kernel could not be built; see the warning above")
    bandwidth = copy_bandwidth_gbs(args.repeats, clock)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"copy bandwidth {bandwidth:.1f} GB/s (read + write); {'CPU' if args.cpu_time else 'wall'} time\n")
    print("| layer (N, C, H, W) -> Co, stride, pad | dtype | variant | fwd ms | bwd ms | fwd GFLOP/s | bwd GFLOP/s "
          "| fwd MB | bwd MB | fwd % of bandwidth | bwd % of bandwidth | fwd+bwd speed-up vs torch |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    totals = {}
    for layer in depthwise_layers(args.batch):
        n, c, h, w = layer["shape"]
        s, p, co = layer["stride"], layer["padding"], layer["c_out"]
        ho, wo = (h + 2 * p - 3) // s + 1, (w + 2 * p - 3) // s + 1
        flops = 2 * 9 * n * co * ho * wo
        for dtype in (torch.float32, torch.bfloat16):
            size = torch.tensor([], dtype=dtype).element_size()
            fwd_bytes = size * (n * c * h * w + n * co * ho * wo)
            bwd_bytes = size * (n * co * ho * wo + 2 * n * c * h * w)
            res = time_layer(layer_variants(layer, dtype), args.repeats, clock)
            ref = sum(res["torch"])
            for name, (tf, tb) in res.items():
                totals.setdefault((dtype, name), [0.0, 0.0])
                totals[(dtype, name)][0] += tf
                totals[(dtype, name)][1] += tb
                print(f"| ({n}, {c}, {h}, {w}) -> {co}, {s}, {p} | {str(dtype)[6:]} | {name} | {1e3 * tf:.2f} | "
                      f"{1e3 * tb:.2f} | {flops / tf / 1e9:.1f} | {2 * flops / tb / 1e9:.1f} | {fwd_bytes / 1e6:.1f} | "
                      f"{bwd_bytes / 1e6:.1f} | {100 * fwd_bytes / tf / 1e9 / bandwidth:.0f} | "
                      f"{100 * bwd_bytes / tb / 1e9 / bandwidth:.0f} | {ref / (tf + tb):.2f}x |")
    print("\nAll depthwise layers of one step (sum of medians):\n")
    print("| dtype | variant | fwd ms | bwd ms | speed-up vs torch |")
    print("|---|---|---:|---:|---:|")
    for (dtype, name), (tf, tb) in totals.items():
        ref = sum(totals[(dtype, "torch")])
        print(f"| {str(dtype)[6:]} | {name} | {1e3 * tf:.1f} | {1e3 * tb:.1f} | {ref / (tf + tb):.2f}x |")
    print(f"\ncifar_dw56k training step (batch {args.batch}, channels_last, forward+backward+SGD):\n")
    print("| dtype | fallback ms/step | fast ms/step | speed-up |")
    print("|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        t = step_times(args.batch, dtype, args.repeats, clock)
        print(f"| {str(dtype)[6:]} | {1e3 * t['fallback']:.1f} | {1e3 * t['fast']:.1f} | {t['fallback'] / t['fast']:.2f}x |")


if __name__ == "__main__":
    main()
