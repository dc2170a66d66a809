"""The plain PyTorch loop a course notebook uses, beside cnnlab's, in one invocation.

Reference: a ``torch.utils.data.Dataset`` whose ``__getitem__`` converts and augments one image
at a time (pad-and-crop, normalise), a ``DataLoader`` batching them, fp32, NCHW, stock
``nn.Dropout``, ``nn.ReLU`` and ``nn.Conv2d``, the recipe's optimizer (SGD, Adam or AdamW), label
smoothing and ``OneCycleLR``. cnnlab: the same model and recipe through ``cnnlab.train`` (uint8
data in memory, batch augmentation, the recipe's dtype and layout). Both train to the recipe's
target; time counts training only, evaluation excluded, for both.

    python benchmarks/reference_loop.py recipes/mnist_tiny.toml --seeds 3 [--epochs N]

Prints a Markdown table with per-seed times and the median ratio cnnlab / reference.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cnnlab import config, runs  # noqa: E402
from cnnlab.data import load_dataset  # noqa: E402
from cnnlab.evaluate import tta_logits  # noqa: E402
from cnnlab.layers import DepthwiseConv2d, Dropout, ReLU  # noqa: E402
from cnnlab.models import create_model  # noqa: E402
from cnnlab.train import torch_threads, train  # noqa: E402


class NotebookDataset(torch.utils.data.Dataset):
    """One image at a time: uint8 -> float, random pad-and-crop, normalise (the torchvision way)."""

    def __init__(self, images, labels, mean, std, pad: int, train: bool):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.pad, self.train = pad, train

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float() / 255
        if self.train and self.pad:
            x = F.pad(x, (self.pad,) * 4)
            dy, dx = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = x[:, dy:dy + self.images.shape[2], dx:dx + self.images.shape[3]]
        return (x - self.mean) / self.std, int(self.labels[i])


def stock_layers(model: nn.Module) -> nn.Module:
    """Swap cnnlab's fast Dropout, in-place ReLU and depthwise conv for torch's own layers, as a
    notebook would have them (same weights)."""
    for name, child in model.named_children():
        if isinstance(child, Dropout):
            setattr(model, name, nn.Dropout(child.p))
        elif isinstance(child, ReLU):
            setattr(model, name, nn.ReLU())
        elif isinstance(child, DepthwiseConv2d):
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                             padding=child.padding, groups=child.groups, bias=child.bias is not None)
            conv.load_state_dict(child.state_dict())
            setattr(model, name, conv)
        else:
            stock_layers(child)
    return model


def reference_run(cfg: config.Config, seed: int) -> dict:
    torch.manual_seed(seed)
    ds = load_dataset(cfg.data.dataset, val_split=cfg.data.val_split, log=lambda *a: None)
    model = stock_layers(create_model(cfg.model.name, num_classes=ds.num_classes, **cfg.model.options))
    train_set = NotebookDataset(ds.train.images, ds.train.labels, ds.mean, ds.std, cfg.data.crop_pad, True)
    test_set = NotebookDataset(ds.test.images, ds.test.labels, ds.mean, ds.std, 0, False)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=True)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=cfg.data.eval_batch_size)
    o, s = cfg.optim, cfg.schedule
    if o.name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay)
    else:
        cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
        opt = cls(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=o.lr, epochs=cfg.train.epochs, steps_per_epoch=len(train_loader), pct_start=s.pct_start,
        anneal_strategy=s.anneal, div_factor=s.div_factor, final_div_factor=s.final_div_factor)
    train_seconds, time_to_target, acc = 0.0, None, 0.0
    for epoch in range(1, cfg.train.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=o.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        train_seconds += time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():  # scored like cnnlab (the recipe's TTA, if any): only the training loops differ
            for x, y in test_loader:
                correct += int((tta_logits(model, x, cfg.train.tta, cfg.train.tta_shift).argmax(1) == y).sum())
        acc = correct / len(test_set)
        print(f"  reference seed {seed} epoch {epoch}: acc {acc:.2%}, {train_seconds:.1f} s", flush=True)
        if cfg.train.target and acc >= cfg.train.target:
            time_to_target = train_seconds
            break
    return {"seed": seed, "final_acc": acc, "train_seconds": train_seconds, "time_to_target_s": time_to_target}


def cnnlab_run(cfg: config.Config, seed: int) -> dict:
    c = copy.deepcopy(cfg)
    c.train.seed, c.train.quiet, c.train.stop_at_target = seed, True, True
    r = train(c, None).result
    print(f"  cnnlab seed {seed}: acc {runs.final_acc(r):.2%}, {r['train_seconds']:.1f} s", flush=True)
    return {"seed": seed, "final_acc": runs.final_acc(r), "train_seconds": r["train_seconds"],
            "time_to_target_s": r["time_to_target_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    cfg = config.load_recipe(args.recipe, args.set)
    if cfg.schedule.name != "onecycle":
        sys.exit("error: the reference loop mirrors OneCycle recipes only")
    rows = []
    for seed in range(args.seeds):
        with torch_threads(cfg.train.threads):  # both loops get the recipe's thread count
            rows.append((cnnlab_run(cfg, seed), reference_run(cfg, seed)))
    sets = "".join(f" --set {v}" for v in args.set)
    print(f"\n`python benchmarks/reference_loop.py {args.recipe} --seeds {args.seeds}{sets}` "
          f"(threads {cfg.train.threads or torch.get_num_threads()}, torch {torch.__version__})\n")
    print(f"| seed | cnnlab acc | cnnlab time to {cfg.train.target:.2%} (s) | reference acc | reference time (s) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for c, r in rows:
        ct, rt = c["time_to_target_s"], r["time_to_target_s"]
        ratio = ct / rt if ct and rt else None
        if ratio:
            ratios.append(ratio)
        fmt = lambda v: f"{v:.1f}" if v is not None else "not reached"  # noqa: E731
        print(f"| {c['seed']} | {c['final_acc']:.2%} | {fmt(ct)} | {r['final_acc']:.2%} | {fmt(rt)} | "
              f"{f'{ratio:.3f}' if ratio else '-'} |")
    if ratios:
        print(f"\nmedian ratio cnnlab / reference: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
