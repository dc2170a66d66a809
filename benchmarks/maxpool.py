"""cnnlab's 2x2 max-pool training kernel (``cnnlab.maxpool``) against torch's ``F.max_pool2d``,
in one run.

First every 2x2 max-pool site of ``mnist_tiny`` (batch 128), ``cifar_dw56k`` (batch 32),
``resnet9_page`` (batch 64) and ``airbench94`` (batch 256), bf16 and fp32, channels_last: forward and backward, the two taking
turns repeat by repeat, medians. "MB" is the least memory traffic a pass needs (forward: read x,
write y and one byte of index per output; backward: read dy and the index, write dx); "% of
bandwidth" compares it with this machine's copy bandwidth, measured here. Then whole training
steps (forward, backward, SGD; bf16 autocast, channels_last) with the kernel on and off
(``MaxPool2d.fast``), taking turns.

    PYTHONPATH=src python benchmarks/maxpool.py [--repeats 20] [--threads N]

Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab import maxpool  # noqa: E402
from cnnlab.bench import copy_bandwidth_gbs, cpu_name, interleaved_pass_times, switched_step_times  # noqa: E402
from cnnlab.layers import MaxPool2d  # noqa: E402
from cnnlab.models import create_model, get_spec  # noqa: E402

MODELS = {"mnist_tiny": 128, "cifar_dw56k": 32, "resnet9_page": 64, "airbench94": 256}


def sites(model_name: str, batch: int) -> list[tuple]:
    """Input shapes of every max-pool of a model that the kernel covers there."""
    model = create_model(model_name).to(memory_format=torch.channels_last)
    found = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: found.append((mod, inp[0])))
             for m in model.modules() if isinstance(m, MaxPool2d)]
    x = torch.zeros(batch, *get_spec(model_name).input_shape).contiguous(memory_format=torch.channels_last)
    model.train()(x.requires_grad_())
    for h in hooks:
        h.remove()
    return [tuple(x.shape) for mod, x in found if maxpool.applies(x, mod)]


def time_site(shape: tuple, dtype: torch.dtype, repeats: int, clock) -> dict:
    """Median forward and backward seconds of torch's pool and of the kernel."""
    variants = {"torch": lambda x: F.max_pool2d(x, 2), "cnnlab": maxpool.max_pool2x2}
    x0 = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    return interleaved_pass_times(variants, x0, torch.randn_like(F.max_pool2d(x0, 2)), repeats, clock)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    clock = time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    if not maxpool.available():
        sys.exit("the max-pool kernels could not be built; see the warning above")
    bandwidth = copy_bandwidth_gbs(args.repeats, clock)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"copy bandwidth {bandwidth:.1f} GB/s (read + write); wall time\n")
    print("| model | site (N, C, H, W) | dtype | variant | fwd ms | bwd ms | fwd MB | bwd MB "
          "| fwd % of bandwidth | bwd % of bandwidth | fwd+bwd speed-up |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for model_name, batch in MODELS.items():
        for shape in sites(model_name, batch):
            for dtype in (torch.bfloat16, torch.float32):
                size = torch.tensor([], dtype=dtype).element_size()
                numel = torch.Size(shape).numel()
                pooled = shape[0] * shape[1] * (shape[2] // 2) * (shape[3] // 2)
                fwd_bytes = size * numel + (size + 1) * pooled
                bwd_bytes = (size + 1) * pooled + size * numel
                res = time_site(shape, dtype, args.repeats, clock)
                ref = sum(res["torch"])
                for name, (tf, tb) in res.items():
                    print(f"| {model_name} | {shape} | {str(dtype)[6:]} | {name} | {1e3 * tf:.2f} | {1e3 * tb:.2f} | "
                          f"{fwd_bytes / 1e6:.1f} | {bwd_bytes / 1e6:.1f} | "
                          f"{100 * fwd_bytes / tf / 1e9 / bandwidth:.0f} | {100 * bwd_bytes / tb / 1e9 / bandwidth:.0f} | "
                          f"{ref / (tf + tb):.2f}x |")
    print("\nTraining steps (bf16 autocast, channels_last, forward+backward+SGD):\n")
    print("| model | batch | torch pool ms/step | cnnlab pool ms/step | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for model_name, batch in MODELS.items():
        t = switched_step_times(model_name, batch, MaxPool2d, "fast", args.repeats, clock)
        print(f"| {model_name} | {batch} | {1e3 * t['off']:.1f} | {1e3 * t['on']:.1f} | {t['off'] / t['on']:.2f}x |")


if __name__ == "__main__":
    main()
