"""A script the data-parallel tests run, under torchrun or as one plain process: trains a small
network WITHOUT BatchNorm (so N processes compute the same mathematics as one) on real MNIST through
the Python API, ``train(cfg, out, model=...)``.

    python tests/ddp_script.py OUT EPOCHS [--stop-after K] [--resume] [--micro-batch M] [--hard-fraction F]

``--stop-after K``: an ``on_epoch`` callback raises StopRun after epoch K (rank 0 decides, every
process stops). ``--resume``: continue OUT from its last.pt. ``--micro-batch M``: ``train.micro_batch``.
``--hard-fraction F``: ``train.hard_fraction``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from cnnlab import distributed
from cnnlab.config import load_recipe
from cnnlab.train import StopRun, train

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "mnist_tiny.toml"


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 10))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("epochs", type=int)
    p.add_argument("--stop-after", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--micro-batch", type=int, default=0)
    p.add_argument("--hard-fraction", type=float, default=1.0)
    a = p.parse_args()
    # 512 training images, batch 128 (64 per process with 2), 2-pixel crops: 4 steps per epoch
    cfg = load_recipe(RECIPE, ["train.quiet=true", "train.dtype=float32", "train.threads=1", "data.subset=512",
                               "data.val_split=250", "data.eval_batch_size=125", "data.batch_size=128",
                               "data.crop_pad=2", f"train.epochs={a.epochs}", "train.target=0",
                               f"train.micro_batch={a.micro_batch}", f"train.hard_fraction={a.hard_fraction}"])

    def stop(row: dict) -> None:
        if row["epoch"] == a.stop_after:
            raise StopRun("stopped")

    train(None if a.resume else cfg, a.out, resume=a.resume, overwrite=True, model=net(),
          on_epoch=stop if a.stop_after else None)


if __name__ == "__main__":
    main()
    if distributed.world_from_env().size > 1:  # under torchrun: end as cnnlab's own workers do (README)
        distributed.end_worker(0)
