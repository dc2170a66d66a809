"""Loader throughput vs. one training step, and tensor-cache load times (issue 2).

Not a test: run it by hand and paste the table where it is needed.

    PYTHONPATH=src python benchmarks/loader_throughput.py [--device cpu|cuda] [--batches 60] [--threads 1]

Reports, as a Markdown table:

- images/s of ``cnnlab.augment.Loader`` for the MNIST shape (1x28x28, batch 128) and the CIFAR shape
  (3x32x32, batch 512), without and with augmentation (pad-and-crop 2 / 4 + flip + cutout), fp32 and
  bf16 output;
- the time of one training step (forward + backward + SGD step) of a small MNIST conv net on a batch
  of 128 (``create_model("mnist_tiny")``, else a ~14k-parameter stand-in), and the ratio of that step
  time to the loader's time for one batch of 128 (the loader should be >= 20x faster);
- the wall time of ``load_dataset`` (the uint8 tensor cache) for mnist and fashion-mnist, median of 5.

MNIST-shape images are the real MNIST training set when it is in the cache, else random pixels; the
CIFAR shape always uses 50,000 random images (throughput does not depend on pixel values).
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

from cnnlab.augment import Augment, Loader  # noqa: E402
from cnnlab.errors import CnnlabError  # noqa: E402

MIN_RATIO = 20.0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def loader_rate(loader: Loader, batches: int, device: str, seed: int = 0) -> float:
    """Images per second over ``batches`` batches (after two warm-up batches)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    it = loader.epoch(gen)
    for _ in range(2):
        next(it)
    sync(device)
    n, t0 = 0, time.perf_counter()
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            it = loader.epoch(gen)
            x, _ = next(it)
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def small_net() -> tuple[nn.Module, str]:
    try:
        from cnnlab.models import create_model

        return create_model("mnist_tiny"), "mnist_tiny"
    except (ImportError, AttributeError, CnnlabError):
        def block(i, o, p=0):
            return [nn.Conv2d(i, o, 3, padding=p, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        net = nn.Sequential(*block(1, 16), *block(16, 24), nn.MaxPool2d(2), nn.Conv2d(24, 16, 1, bias=False),
                            *block(16, 16), *block(16, 16), *block(16, 16), *block(16, 16, 1),
                            nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 10, 1, bias=False), nn.Flatten())
        return net, "stand-in conv net"


def train_step_time(device: str, steps: int) -> tuple[float, str, int]:
    """Median seconds of one forward+backward+SGD step on a batch of 128 MNIST-shape images."""
    torch.manual_seed(0)
    model, name = small_net()
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    times = []
    for i in range(steps + 3):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), name, sum(p.numel() for p in model.parameters())


def cache_load_times(repeats: int = 5) -> dict[str, float | str]:
    from cnnlab.data import load_dataset

    out = {}
    for name in ("mnist", "fashion-mnist"):
        try:
            load_dataset(name, acquire=False, log=lambda m: None)  # warm the page cache
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                load_dataset(name, acquire=False, log=lambda m: None)
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times)
        except CnnlabError as e:
            out[name] = f"not cached ({e})"
    return out


def mnist_images() -> tuple[torch.Tensor, torch.Tensor, tuple, tuple, str]:
    from cnnlab.data import load_dataset

    try:
        ds = load_dataset("mnist", acquire=False, log=lambda m: None)
        return ds.train.images, ds.train.labels, ds.mean, ds.std, "real MNIST train"
    except CnnlabError:
        x = torch.randint(0, 256, (60000, 1, 28, 28), dtype=torch.uint8)
        return x, torch.randint(0, 10, (60000,)), (0.1307,), (0.3081,), "random"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, default=60, help="batches timed per loader configuration")
    p.add_argument("--steps", type=int, default=20, help="training steps timed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads for the CPU (default 1; 0 leaves torch's default)")
    args = p.parse_args(argv)
    # On a small shared CPU, OpenMP's spinning threads make every small op wait on the slowest core
    # (measured: 2 threads on 2 busy cores made loader batches ~30x slower), so time with one thread.
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device

    mx, my, mmean, mstd, msrc = mnist_images()
    cx = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cy = torch.randint(0, 10, (50000,))
    shapes = [
        ("MNIST 1x28x28", mx, my, mmean, mstd, 128, Augment(crop_pad=2, flip=True, cutout=8)),
        ("CIFAR 3x32x32", cx, cy, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 512,
         Augment(crop_pad=4, crop_mode="reflect", flip=True, cutout=16)),
    ]
    rows = []
    rate_mnist_aug_fp32 = None
    for label, x, y, mean, std, bs, aug in shapes:
        for aug_name, augment in (("none", None), (describe_aug(aug), aug)):
            for dtype in (torch.float32, torch.bfloat16):
                loader = Loader(x, y, bs, mean, std, device=dev, augment=augment, shuffle=True,
                                drop_last=True, dtype=dtype)
                rate = loader_rate(loader, args.batches, dev)
                rows.append((label, bs, aug_name, str(dtype).replace("torch.", ""), rate))
                if label.startswith("MNIST") and augment is not None and dtype == torch.float32:
                    rate_mnist_aug_fp32 = rate

    step, net_name, n_params = train_step_time(dev, args.steps)
    loader_batch = 128 / rate_mnist_aug_fp32
    ratio = step / loader_batch
    loads = cache_load_times()

    print(f"device: {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"MNIST images: {msrc}\n")
    print("| shape | batch | augmentation | output | images/s | ms/batch |")
    print("|---|---:|---|---|---:|---:|")
    for label, bs, aug_name, dtype, rate in rows:
        print(f"| {label} | {bs} | {aug_name} | {dtype} | {rate:,.0f} | {1000 * bs / rate:.2f} |")
    print()
    print("| comparison | value |")
    print("|---|---:|")
    print(f"| training step, {net_name} ({n_params:,} params), batch 128, fwd+bwd+SGD | {1000 * step:.2f} ms |")
    print(f"| loader, MNIST batch 128, augmented, fp32 | {1000 * loader_batch:.3f} ms |")
    print(f"| ratio step / loader (must be >= {MIN_RATIO:.0f}x) | {ratio:.1f}x {'OK' if ratio >= MIN_RATIO else 'TOO SLOW'} |")
    for name, t in loads.items():
        value = f"{1000 * t:.1f} ms" if isinstance(t, float) else t
        print(f"| `load_dataset('{name}')` from tensors.pt, median of 5 | {value} |")
    return 0 if ratio >= MIN_RATIO else 1


def describe_aug(a: Augment) -> str:
    return f"crop {a.crop_pad} ({a.crop_mode}) + flip + cutout {a.cutout}"


if __name__ == "__main__":
    sys.exit(main())
