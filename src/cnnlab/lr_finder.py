"""The LR range test: raise the LR exponentially for a few hundred steps, watch the loss.

The loss is smoothed with a bias-corrected exponential moving average; the test stops when the
smoothed loss exceeds ``diverge`` times its minimum. The model and optimizer are restored
afterwards, so the test can run on a model about to be trained.

The suggestion is the LR where the smoothed loss has come down halfway from its starting value
to its minimum (see ``suggest``): a level crossing on the smooth descending part of the curve,
which stays put across seeds where steepest-gradient suggestions jump around.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from cnnlab import runs
from cnnlab.config import Config
from cnnlab.errors import CnnlabError
from cnnlab.train import accumulate_gradients, grad_scaler, optimizer_step, set_lr, setup, torch_threads


def exp_lrs(start: float, end: float, steps: int) -> list[float]:
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def ema_smooth(values: list[float], beta: float) -> list[float]:
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The first LR at which the smoothed loss has fallen halfway from its start to its minimum.

    A level crossing on the descending part of the curve: the descent is smooth and repeats
    across seeds, whereas the position of the minimum and of the steepest slope jump with noise.
    """
    head = smoothed[: max(1, len(smoothed) // 10)]
    start = sum(head) / len(head)
    low = min(smoothed)
    level = start - 0.5 * (start - low)
    for lr, v in zip(lrs, smoothed):
        if v <= level:
            return lr
    return lrs[smoothed.index(low)]


def lr_find(cfg: Config, start_lr: float = 1e-6, end_lr: float = 10.0, steps: int = 200,
            beta: float = 0.9, diverge: float = 4.0, log=print) -> dict:
    """Run the range test for ``cfg``'s model, data and optimizer; return lrs, losses, suggestion."""
    with torch_threads(cfg.train.threads):
        return _lr_find(cfg, start_lr, end_lr, steps, beta, diverge, log)


def _lr_find(cfg, start_lr, end_lr, steps, beta, diverge, log):
    if not 0 < start_lr < end_lr:
        raise CnnlabError(f"LR range {start_lr}..{end_lr}: need 0 < start < end, e.g. 1e-6..10")
    if steps < 10:
        raise CnnlabError(f"--steps {steps}: need at least 10 steps (a few hundred is typical)")
    s = setup(cfg, log=log)
    model, opt = s.model, s.optimizer
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    scaler = grad_scaler(s.device, s.dtype)
    gen = torch.Generator(device=s.device).manual_seed(cfg.train.seed)
    lrs_planned = exp_lrs(start_lr, end_lr, steps)
    lrs, losses = [], []
    stop_reason = None
    model.train()
    try:
        batches = iter(())
        for lr in lrs_planned:
            try:
                x, y = next(batches)
            except StopIteration:
                batches = s.train_loader.epoch(gen)
                x, y = next(batches)
            set_lr(opt, lr, None)
            opt.zero_grad(set_to_none=True)
            chunks = accumulate_gradients(model, x, y, s.dtype, cfg.train.micro_batch, scaler,  # as training steps
                                          cfg.optim.label_smoothing)
            value = float(sum(loss * len(yk) for _, loss, yk in chunks)) / len(y)
            if not math.isfinite(value):
                stop_reason = "non-finite loss"
                break
            optimizer_step(model, opt, scaler, cfg.optim.grad_clip)
            lrs.append(lr)
            losses.append(value)
            smoothed = ema_smooth(losses, beta)
            if len(losses) > 10 and smoothed[-1] > diverge * min(smoothed):
                stop_reason = f"smoothed loss above {diverge:g}x its minimum"
                break
    finally:
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
    if len(losses) < 10:
        raise CnnlabError(f"the loss diverged after {len(losses)} steps at lr {lrs_planned[len(losses)]:.2g}; "
                          f"start the range lower (--start)")
    smoothed = ema_smooth(losses, beta)
    return {"model": cfg.model.name, "dataset": cfg.data.dataset, "seed": cfg.train.seed, "lrs": lrs,
            "losses": losses, "smoothed": smoothed, "suggestion": suggest(lrs, smoothed),
            "stopped_early": len(losses) < steps, "stop_reason": stop_reason, "start_lr": start_lr, "end_lr": end_lr}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runs.write_json(out / "lr_find.json", result)
