"""The training loop: ``train(cfg, out)`` reads top to bottom as a few named steps.

Per step: LR (and momentum) from the schedule, forward under autocast, loss, backward (in
``train.micro_batch`` chunks, gradients summed, when the recipe asks), optimizer step, lookahead
and EMA updates. With ``train.hard_fraction`` < 1 the epochs after the first draw their batches
from the images that were hardest in the first (``hard_examples``). Per epoch (``run_epoch``):
train, evaluate (every ``train.eval_every`` epochs and after the last), record the row in the
``RunState`` (best, target, plateau), save ``last.pt`` (and ``best.pt``) and ``metrics.jsonl``,
print the table row.
``train(cfg, out, resume=True)`` restores the ``RunState``, optimizer and RNG states from
``last.pt``, so a resumed CPU run ends with the same metrics as one that was never interrupted.

Data-parallel (under torchrun, ``cnnlab train --nproc N``): every process runs this loop on its part
of each global batch through DDP (``distributed``); evaluation is sharded and gathered, so every
process reaches the same decisions (best, target, plateau); rank 0 alone writes and prints.

Accuracy is named for the split it was measured on: ``val_acc`` when the recipe holds out a
validation split (``data.val_split``), ``test_acc`` otherwise (then ``best.pt``, ``patience`` and
``stop_at_target`` select on the test set, and result.json says so).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from cnnlab import config as config_mod
from cnnlab import allocator, distributed, hard_examples, layers, models, muon, runs
from cnnlab.augment import Augment, Loader, normalize
from cnnlab.config import Config
from cnnlab.data import Dataset, dataset_ref, load_dataset, subset
from cnnlab.distributed import World
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import DTYPES, autocast, loss_and_accuracy, per_sample_loss, predict
from cnnlab.schedules import lr_at
from cnnlab.summary import check_budget, check_model


@dataclass
class RunResult:
    run_dir: Path | None
    history: list[dict] = field(default_factory=list)
    result: dict = field(default_factory=dict)


class StopRun(Exception):
    """Raised by an ``on_epoch`` callback to end a run cleanly after that epoch (e.g. a pruned
    search trial); ``status`` goes to result.json."""

    def __init__(self, status: str = "stopped"):
        super().__init__(status)
        self.status = status


class Interrupted(KeyboardInterrupt):
    """Raised after Ctrl-C once the run's state is saved; carries the partial RunResult."""

    def __init__(self, run_result: RunResult):
        super().__init__("interrupted")
        self.run_result = run_result


class _Diverged(Exception):
    def __init__(self, epoch: int, step: int, value: float, lr: float, what: str = "loss"):
        super().__init__(f"{what} {value} at epoch {epoch} step {step}")
        self.epoch, self.step, self.value, self.lr, self.what = epoch, step, value, lr, what


# ----------------------------------------------------------------------------- setup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise CnnlabError(f"train.device = {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnlabError(f"train.device = {name!r} but no CUDA GPU is available; use device = \"auto\" or \"cpu\"")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise CnnlabError(f"train.device = {name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CnnlabError(f"train.device = {name!r}: expected auto, cpu, cuda or cuda:N") from None


@dataclass
class Setup:
    """Everything a run needs, built from a config: data, model, loaders, optimizer and the
    training helpers (EMA copy, loss scaler, augmentation generator)."""

    cfg: Config  # the caller's config, resolved (an image folder's absolute path); the caller's is untouched
    ds: Dataset
    model: torch.nn.Module
    train_loader: Loader
    eval_loader: Loader
    optimizer: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype
    summary_text: str
    params: int
    macs: int  # multiply-accumulates of one forward pass, for this dataset's image size
    forward: torch.nn.Module | None = None  # the model, or its torch.compile'd wrapper
    ema: torch.nn.Module | None = None
    scaler: torch.amp.GradScaler | None = None
    gen: torch.Generator | None = None  # augmentation and shuffling, on the training device
    world: World = field(default_factory=World)
    parallel: distributed.DataParallel | None = None  # DDP around ``forward`` with several processes

    @property
    def split(self) -> str:
        """The split evaluated each epoch: "val" (held out from training) or "test"."""
        return self.ds.test_name


def check_compatible(cfg: Config, ds: Dataset) -> None:
    if cfg.data.batch_size > len(ds.train):
        raise CnnlabError(f"data.batch_size = {cfg.data.batch_size} is larger than the {len(ds.train)} training "
                          f"images of {ds.name}; use a batch size <= {len(ds.train)}")


NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def build_optimizer(model: torch.nn.Module, o) -> torch.optim.Optimizer:
    """Up to three parameter groups: weights; biases of other layers; normalisation-layer
    parameters, which alone get ``bias_lr_scale`` (as airbench's BatchNorm biases; its whitening
    bias keeps the base LR). ``decay_bn_and_bias = false`` takes decay off the last two."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    weights, biases, norms = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (norms if id(p) in norm_ids else biases if p.ndim <= 1 else weights).append(p)
    decay = o.weight_decay if o.decay_bn_and_bias else 0.0
    groups = [{"params": weights, "weight_decay": o.weight_decay, "lr_scale": 1.0},
              {"params": biases, "weight_decay": decay, "lr_scale": 1.0},
              {"params": norms, "weight_decay": decay / o.bias_lr_scale, "lr_scale": o.bias_lr_scale}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel per parameter instead of a dozen small ops; AdamW's step for a 13k-parameter
    # net on one CPU thread took 0.2 ms instead of 1.1 ms (SGD 0.09 instead of 0.17)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                               fused=True)
    if o.name == "muon":
        return muon.for_model(model, groups, o)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state, keeping this optimizer's fused kernels (a state saved by an
    unfused optimizer would otherwise switch them off)."""
    groups = [{**g, "fused": opt.defaults.get("fused"), "foreach": None} for g in state["param_groups"]]
    opt.load_state_dict({**state, "param_groups": groups})


def load_data(cfg: Config, log=print) -> tuple[Config, Dataset]:
    """The dataset of ``cfg`` (with its validation split and training subset) and a copy of
    ``cfg`` that names an image folder by its absolute path, so the run works from anywhere."""
    cfg = copy.deepcopy(cfg)
    ds = load_dataset(cfg.data.dataset, root=cfg.data.root or None, val_split=cfg.data.val_split, log=log)
    cfg.data.dataset = dataset_ref(cfg.data.dataset)
    ds = subset(ds, cfg.data.subset)
    check_compatible(cfg, ds)
    if cfg.data.crop_pad >= min(ds.shape[1:]):
        raise CnnlabError(f"data.crop_pad = {cfg.data.crop_pad} must be smaller than the {ds.shape[1]}x{ds.shape[2]} "
                          f"images; use e.g. crop_pad = 4")
    if cfg.data.cutout > max(ds.shape[1:]):
        raise CnnlabError(f"data.cutout = {cfg.data.cutout} is larger than the {ds.shape[1]}x{ds.shape[2]} images; "
                          f"use a square smaller than the image, e.g. cutout = 8")
    return cfg, ds


def make_loaders(cfg: Config, ds: Dataset, device: torch.device, world: World = World()) -> tuple[Loader, Loader]:
    """The training loader (this process's part of every batch) and the evaluation loader (its part of the split)."""
    aug = Augment(cfg.data.crop_pad, cfg.data.crop_mode, cfg.data.flip, cfg.data.cutout, cfg.data.cutout_p,
                  cfg.data.alternate_flip)
    common = dict(device=device, channels_last=cfg.train.channels_last)
    train_loader = Loader(ds.train.images, ds.train.labels, cfg.data.batch_size, ds.mean, ds.std,
                          augment=aug, shuffle=True, drop_last=len(ds.train) > cfg.data.batch_size,
                          seed=cfg.train.seed, rank=world.rank, world_size=world.size, **common)
    part = distributed.shard(len(ds.test), world)
    eval_loader = Loader(ds.test.images[part], ds.test.labels[part], cfg.data.eval_batch_size, ds.mean, ds.std,
                         **common)
    return train_loader, eval_loader


def setup(cfg: Config, model: torch.nn.Module | None = None, log=print, world: World = World()) -> Setup:
    """Load data, build (or take) and check the model, loaders, optimizer and helpers for ``cfg``
    (in process ``world.rank`` of a data-parallel run). The process keeps the memory its steps free
    (``allocator.keep_freed_memory``)."""
    allocator.keep_freed_memory()
    threads = cfg.train.threads or world.threads  # 0: torch's default
    if threads:
        torch.set_num_threads(threads)
    distributed.check_batch(cfg.data.batch_size, world.size)
    device = distributed.place(world, resolve_device(cfg.train.device))
    dtype = DTYPES[cfg.train.dtype]
    if model is None:
        check_budget(cfg)  # [model] max_params / max_macs, before any data is loaded
    cfg, ds = load_data(cfg, log)
    torch.manual_seed(cfg.train.seed)
    if model is None:
        model = models.build(cfg.model.name, cfg.model.options, ds.num_classes, ds.shape)
    summary = check_model(model, cfg.model.name, ds.shape, ds.num_classes, ds.name, cfg.model.max_params,
                          cfg.model.max_macs)  # one-line errors: channels, map too small, output, budgets
    train_loader, eval_loader = make_loaders(cfg, ds, device, world)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cpu" and not cfg.train.compile:  # (compiled graphs use torch's kernels)
        layers.build_kernels(model, cfg.train.channels_last, log)  # the compiler's time stays out of epoch 1
    n = min(len(ds.train), 5000)
    models.init_from_data(model, normalize(ds.train.images[:n].to(device), train_loader.mean, train_loader.std))
    model = distributed.sync_batchnorm(model, world, device, cfg.train.sync_bn)
    forward = torch.compile(model) if cfg.train.compile else model
    return Setup(cfg, ds, model, train_loader, eval_loader, build_optimizer(model, cfg.optim), device, dtype,
                 summary.to_text(), summary.total_params, summary.macs, forward=forward,
                 ema=copy.deepcopy(model).eval() if cfg.train.ema else None,
                 # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (scaler disabled)
                 scaler=grad_scaler(device, dtype),
                 # augmentation draws on the training device: no host-device copy (and sync) per batch on a GPU
                 gen=torch.Generator(device=device).manual_seed(cfg.train.seed), world=world,
                 parallel=distributed.DataParallel(forward, device) if world.size > 1 else None)


# ----------------------------------------------------------------------------- one step


def forward_loss(model, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the (float32) cross-entropy of one batch, under autocast to ``dtype``."""
    with autocast(x.device, dtype):
        logits = model(x)
        return logits, F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def accumulate_gradients(forward, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, micro_batch: int,
                         scaler: torch.amp.GradScaler, label_smoothing: float = 0.0) -> list[tuple]:
    """Forward and backward of one batch in chunks of ``micro_batch`` images (0: whole), adding to the
    gradients; each chunk's mean loss is weighted by its share of the batch, so the sum is the
    batch's gradient. Under DDP all chunks but the last skip the all-reduce (one per batch). Returns
    each chunk's (logits, loss, labels), detached; one ``optimizer_step`` per batch follows."""
    parts = micro_batches(x, y, micro_batch)
    chunks = []
    for k, (xk, yk) in enumerate(parts):
        with distributed.no_sync(forward, last=k == len(parts) - 1):
            logits, loss = forward_loss(forward, xk, yk, dtype, label_smoothing)
            scaler.scale(loss * (len(yk) / len(y))).backward()
        chunks.append((logits.detach(), loss.detach(), yk))
    return chunks


def micro_batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batch in consecutive chunks of ``size`` images (the last may be smaller); 0: the whole batch."""
    if not size or size >= len(y):
        return [(x, y)]
    return list(zip(x.split(size), y.split(size)))


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   grad_clip: float = 0.0) -> None:
    """Optional clipping of the gradients already accumulated, then one optimizer step."""
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its gradients underflow otherwise); a no-op for other dtypes."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if momentum is not None:
            if "betas" in g:
                g["betas"] = (momentum, g["betas"][1])
            elif g.get("momentum", 0) > 0:
                g["momentum"] = momentum


def float_state(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's floating-point weights and buffers (BN statistics), sharing its storage."""
    return [v for v in model.state_dict().values() if v.is_floating_point()]


def lookahead_update(avg: list | None, model: torch.nn.Module, step: int, total: int, decay: float,
                     every: int = 5, start: float = 0.3, power: float = 3.0) -> list | None:
    """airbench's lookahead, after optimizer step ``step`` (0-based) of ``total``: from ``start`` of
    training on, every ``every`` steps the running average of the weights (and BN statistics) moves
    toward them by ``1 - rho`` and replaces them, with ``rho = decay ** every * (progress ** power)``:
    little averaging early, strong averaging at the end. Returns the average (made on the first
    eligible step)."""
    done = step + 1
    if done < start * total or done % every:
        return avg
    state = float_state(model)
    with torch.no_grad():
        if avg is None:
            return [v.detach().clone() for v in state]
        rho = decay ** every * (done / total) ** power
        torch._foreach_lerp_(avg, state, 1 - rho)
        torch._foreach_copy_(state, avg)
    return avg


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_p = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def all_finite(model: torch.nn.Module) -> bool:
    """True when every parameter and buffer (BatchNorm statistics included) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in (*model.parameters(), *model.buffers())
               if t.is_floating_point())


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer reads true time."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- run state and checkpoints


@dataclass
class RunState:
    """What changes from epoch to epoch of a run; ``last.pt`` holds it, a resume restores it."""

    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl rows
    train_seconds: float = 0.0  # training only (evaluation excluded, as airbench and DAWNBench count)
    wall_seconds: float = 0.0  # training, evaluation and saving, over every start and resume
    best_acc: float = -1.0
    bad_epochs: int = 0  # evaluated epochs since the best one
    time_to_target_s: float | None = None
    target_epoch: int | None = None
    stopped: str | None = None  # "target" or "plateau" once the run stopped early
    code: list[dict] = field(default_factory=list)  # the cnnlab checkout of each start and resume
    lookahead: list | None = None  # airbench's lookahead average (tensors) once it starts
    hard_scores: torch.Tensor | None = None  # train.hard_fraction < 1: each training image's hardness in epoch 1

    def snapshot(self) -> RunState:
        """A copy to go back to (Ctrl-C reports what last.pt holds); tensors are replaced, not mutated, between saves."""
        return replace(self, history=list(self.history), code=list(self.code))

    def counters(self) -> dict:
        return {k: getattr(self, k) for k in ("train_seconds", "wall_seconds", "best_acc", "bad_epochs",
                                              "time_to_target_s", "target_epoch", "stopped", "code")}

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: torch.device) -> RunState:
        c = dict(ckpt["state"])
        c.setdefault("best_acc", c.pop("best_val_acc", -1.0))  # checkpoints before the split was named
        c.setdefault("wall_seconds", c.get("train_seconds", 0.0))
        known = {k: c[k] for k in cls().counters() if k in c}
        look = [t.to(device) for t in ckpt["lookahead"]] if ckpt.get("lookahead") is not None else None
        return cls(epoch=ckpt["epoch"], history=list(ckpt["history"]), lookahead=look,
                   hard_scores=ckpt.get("hard_scores"), **known)


def rng_state(gen: torch.Generator) -> dict:
    state = {"data": gen.get_state(), "data_device": gen.device.type, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(gen: torch.Generator, state: dict, log=print) -> None:
    if state.get("data_device", "cpu") == gen.device.type:
        gen.set_state(state["data"])
    else:  # a CPU run resumed on a GPU (or back): the generators differ, so does the data order from here on
        gen.manual_seed(int(torch.randint(0, 2 ** 62, (), generator=torch.Generator().set_state(state["torch"]))))
        log(f"note: resuming on {gen.device.type} a run saved on {state.get('data_device', 'cpu')}: "
            f"the batches differ from an uninterrupted run")
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])  # saved on a machine with more GPUs


def checkpoint(s: Setup, st: RunState) -> dict:
    """The checkpoint of the run as it stands (schema: ``runs.checkpoint``)."""
    return runs.checkpoint(
        model_name=s.cfg.model.name, model_options=dict(s.cfg.model.options), num_classes=s.ds.num_classes,
        model_source=models.source(s.cfg.model.name),
        config=config_mod.to_dict(s.cfg), dataset=runs.dataset_facts(s.ds), epoch=st.epoch,
        state_dict=s.model.state_dict(), optimizer=s.optimizer.state_dict(),
        ema_state_dict=s.ema.state_dict() if s.ema is not None else None, lookahead=st.lookahead,
        hard_scores=st.hard_scores,
        rng=rng_state(s.gen), scaler=s.scaler.state_dict() if s.scaler.is_enabled() else None,
        history=st.history, state=st.counters())


def restore(s: Setup, ckpt: dict, out: Path, log) -> RunState:
    """Load a checkpoint's weights, optimizer, EMA, scaler and RNG states into ``s``; its RunState."""
    # a model built from a user's .py file: warns if the file changed, one line if the weights no longer fit
    runs.load_weights(s.model, ckpt["state_dict"], s.cfg.model.name, models.source_changed(ckpt.get("model_source")))
    if len(ckpt["optimizer"]["param_groups"]) != len(s.optimizer.param_groups):
        raise CnnlabError(f"{out}/last.pt holds optimizer state for {len(ckpt['optimizer']['param_groups'])} "
                          f"parameter groups, this cnnlab makes {len(s.optimizer.param_groups)} (an older version "
                          f"saved it); start the run again with --overwrite")
    load_optimizer_state(s.optimizer, ckpt["optimizer"])
    if s.ema is not None and ckpt.get("ema_state_dict"):
        s.ema.load_state_dict(ckpt["ema_state_dict"])
    if ckpt.get("scaler"):
        s.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(s.gen, ckpt["rng"], log)
    check_hard_scores(s, ckpt, out)
    return RunState.from_checkpoint(ckpt, s.device)


def check_hard_scores(s: Setup, ckpt: dict, out: Path) -> None:
    """A run on the hard images resumes with one score per training image (a damaged last.pt, one line)."""
    scores, n = ckpt.get("hard_scores"), len(s.ds.train)
    if s.cfg.train.hard_fraction < 1 and 1 <= ckpt["epoch"] < s.cfg.train.epochs and not (
            isinstance(scores, torch.Tensor) and scores.shape == (n,) and scores.is_floating_point()
            and bool(torch.isfinite(scores).all())):
        raise CnnlabError(f"{out}/last.pt: its hard-image scores (train.hard_fraction) are missing or not one number "
                          f"per training image ({n}); start the run again with --overwrite")


def result_json(s: Setup, st: RunState, status: str) -> dict:
    """result.json: the outcome of the run, its accuracy named for the split it was measured on."""
    cfg, split = s.cfg, s.split
    evaluated = [r for r in st.history if r.get(f"{split}_acc") is not None]
    last = evaluated[-1] if evaluated else {}
    return {
        "status": status, "model": models.label(cfg.model.name), "dataset": s.ds.name, "eval_split": split,
        "selected_on": split,  # what best.pt, patience and stop_at_target compared
        **({"note": "no validation split (data.val_split = 0): every accuracy here is on the test set, and best.pt, "
                    "patience and stop_at_target selected on it"} if split == "test" else {}),
        "params": s.params, "macs_per_image": s.macs, "train_images": len(s.ds.train),
        "images_per_epoch": s.train_loader.images_per_epoch, "epochs_run": len(st.history), "epochs": cfg.train.epochs,
        "images_trained": sum(r.get("images", s.train_loader.images_per_epoch) for r in st.history),
        f"final_{split}_acc": last.get(f"{split}_acc"), f"final_{split}_tta": last.get("tta"),
        f"best_{split}_acc": max((r[f"{split}_acc"] for r in evaluated), default=None),
        f"final_{split}_loss": last.get(f"{split}_loss"), "train_seconds": st.train_seconds,
        "wall_seconds": st.wall_seconds, "target": cfg.train.target or None,
        "time_to_target_s": st.time_to_target_s, "target_epoch": st.target_epoch, "seed": cfg.train.seed,
        "device": str(s.device), "dtype": cfg.train.dtype, "threads": torch.get_num_threads(), "processes": s.world.size,
        "channels_last": cfg.train.channels_last, "compile": cfg.train.compile, "batch_size": cfg.data.batch_size,
        "torch_version": torch.__version__, "git_commit": st.code[0]["commit"],
        "git_dirty": any(c["dirty"] for c in st.code), "code": st.code,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def finish(out: Path | None, s: Setup, st: RunState, status: str) -> RunResult:
    res = result_json(s, st, status)
    if out is not None:
        runs.write_json(out / "result.json", res)
    return RunResult(out, st.history, res)


# ----------------------------------------------------------------------------- one epoch


def epoch_steps(s: Setup) -> list[int]:
    """Batches in each epoch of the run: the first over every image, the later ones over the pool of
    hard images when ``train.hard_fraction`` < 1."""
    t, full = s.cfg.train, len(s.train_loader)
    if t.hard_fraction == 1:
        return [full] * t.epochs
    pool = hard_examples.pool_size(len(s.ds.train), t.hard_fraction, s.cfg.data.batch_size)
    return [full] + [s.train_loader.steps(pool)] * (t.epochs - 1)


def train_epoch(s: Setup, st: RunState, epoch: int) -> dict:
    """One pass over the training data (over the hardest images after the first epoch, with
    ``train.hard_fraction``); the start of the epoch's metrics row."""
    cfg, model, opt, device = s.cfg, s.model, s.optimizer, s.device
    model.train()
    models.start_epoch(model, epoch)  # a model's own per-epoch rule (airbench: freeze the whitening bias)
    forward = s.parallel.wrapper() if s.parallel is not None else s.forward
    plan = epoch_steps(s)  # the schedule spans the run's steps; epochs of unequal length count by their mean
    total, before = sum(plan), sum(plan[:epoch - 1])
    steps_per_epoch = plan[0] if len(set(plan)) == 1 else total / len(plan)
    hard = cfg.train.hard_fraction < 1
    pool = hard_examples.hardest(st.hard_scores, cfg.train.hard_fraction, cfg.data.batch_size) if hard and epoch > 1 else None
    score = hard and epoch == 1 and cfg.train.epochs > 1  # the first epoch's losses choose the pool
    losses: list[tuple[torch.Tensor, ...]] = []  # (image indices, their losses, the batch number) of each batch
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, lr = 0, 0.0
    sync(device)
    t0 = time.perf_counter()
    with _progress(plan[epoch - 1], epoch, cfg.train.quiet or not s.world.main) as bar:
        for i, (idx, x, y) in enumerate(s.train_loader.batches(s.gen, epoch, pool)):
            step = before + i
            lr, mom = lr_at(cfg.schedule, cfg.optim, step, steps_per_epoch, cfg.train.epochs)
            set_lr(opt, lr, mom)
            opt.zero_grad(set_to_none=True)
            batch_losses = []
            for logits, loss, yk in accumulate_gradients(forward, x, y, s.dtype, cfg.train.micro_batch, s.scaler,
                                                         cfg.optim.label_smoothing):
                # free on one CPU process; on CUDA, and with several processes (all must stop together), the epoch-end check
                if device.type == "cpu" and s.world.size == 1 and not torch.isfinite(loss):
                    raise _Diverged(epoch, i + 1, float(loss), lr)  # before the optimizer step
                loss_sum += loss * len(yk)
                correct += (logits.argmax(1) == yk).sum()
                if score:
                    batch_losses.append(per_sample_loss(logits, yk, cfg.optim.label_smoothing))
            if score:
                losses.append((idx, torch.cat(batch_losses), torch.full_like(idx, i)))
            optimizer_step(model, opt, s.scaler, cfg.optim.grad_clip)
            if cfg.train.lookahead:
                st.lookahead = lookahead_update(st.lookahead, model, step, total, cfg.train.lookahead)
            if s.ema is not None:
                ema_update(s.ema, model, cfg.train.ema)
            seen += len(y)
            bar.update()
    if st.lookahead is not None and epoch == cfg.train.epochs:  # training ends on the average (airbench)
        with torch.no_grad():
            torch._foreach_copy_(float_state(model), st.lookahead)
    if score:  # each batch ranked whole (every process's rows of it), so all processes choose the same pool
        indices, values, batch = distributed.gather(s.world, *(torch.cat(t).cpu() for t in zip(*losses)))
        st.hard_scores = hard_examples.scores_of(len(s.ds.train), indices, hard_examples.batch_scores(values, batch))
    sync(device)
    seconds = time.perf_counter() - t0
    st.train_seconds += seconds
    loss_sum, correct, seen = distributed.sum_over(s.world, loss_sum, correct, torch.tensor(seen, device=device))
    return {"epoch": epoch, "lr": lr, "train_loss": loss_sum / seen, "train_acc": correct / seen,
            "images": int(seen), "epoch_seconds": seconds, "train_seconds": st.train_seconds}


def evaluate_epoch(s: Setup, row: dict) -> None:
    """Add the evaluation split's loss and accuracy to ``row`` (None on epochs ``eval_every`` skips);
    with ``tta_each_epoch = false`` the TTA views are used after the last epoch only."""
    cfg, epoch, split = s.cfg.train, row["epoch"], s.split
    last = epoch == cfg.epochs
    if not (last or epoch % cfg.eval_every == 0):
        row.update({f"{split}_loss": None, f"{split}_acc": None})
        return
    tta = cfg.tta_each_epoch or last
    distributed.share_buffers(s.world, s.model, s.ema)
    logits, labels = distributed.gather(s.world, *predict(s.ema if s.ema is not None else s.forward, s.eval_loader,
                                                          cfg.tta and tta, s.dtype, cfg.tta_shift if tta else 0,
                                                          cfg.tta_fraction))
    loss, acc = loss_and_accuracy(logits, labels)
    if not (math.isfinite(loss) and all_finite(s.model)):
        raise _Diverged(epoch, len(s.train_loader), loss, row["lr"], "evaluation loss")
    row.update({f"{split}_loss": loss, f"{split}_acc": acc, "tta": bool((cfg.tta or cfg.tta_shift) and tta)})


def record(s: Setup, st: RunState, row: dict) -> tuple[bool, bool]:
    """Add ``row`` to the history: best accuracy, time to target, plateau count, the stop reason.
    Returns (the row is the best evaluation so far, the row reached the target first)."""
    cfg, acc = s.cfg.train, row[f"{s.split}_acc"]
    st.history.append(row)
    st.epoch = row["epoch"]
    if acc is None:
        return False, False
    improved = acc > st.best_acc
    st.bad_epochs = 0 if improved else st.bad_epochs + 1
    st.best_acc = max(st.best_acc, acc)
    hit = bool(cfg.target and acc >= cfg.target and st.time_to_target_s is None)
    if hit:
        st.time_to_target_s, st.target_epoch = st.train_seconds, row["epoch"]
    st.stopped = ("target" if hit and cfg.stop_at_target else
                  "plateau" if cfg.patience and st.bad_epochs >= cfg.patience else None)
    return improved, hit


def save_epoch(out: Path | None, s: Setup, st: RunState, improved: bool) -> None:
    """best.pt (when improved), last.pt, then metrics.jsonl: a metrics row always has its last.pt."""
    if out is None:
        return
    ckpt = checkpoint(s, st)
    if improved:
        runs.save_checkpoint(out / "best.pt", ckpt)
    runs.save_checkpoint(out / "last.pt", ckpt)
    runs.write_metrics(out, st.history)


def run_epoch(out: Path | None, s: Setup, st: RunState, epoch: int, say) -> None:
    """Train, evaluate, record and save one epoch; print its row."""
    t0, wall0 = time.perf_counter(), st.wall_seconds
    row = train_epoch(s, st, epoch)
    evaluate_epoch(s, row)
    row["wall_seconds"] = st.wall_seconds = wall0 + time.perf_counter() - t0
    improved, hit = record(s, st, row)
    allocator.give_back_freed_memory()  # the next epoch faults its pages in once; nothing piles up
    save_epoch(out, s, st, improved)  # the last slow thing before the caller notes what last.pt holds
    st.wall_seconds = wall0 + time.perf_counter() - t0  # the save counts toward the next epoch's wall time
    say(table_row(row, s.split) + ("  <- target" if hit else ""))


# ----------------------------------------------------------------------------- the run


def train(cfg: Config | None = None, out: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, model: torch.nn.Module | None = None,
          on_epoch: Callable[[dict], None] | None = None, backend: str = "auto", log=print) -> RunResult:
    """Train per ``cfg`` into run directory ``out`` (None: nothing written); return the history.

    With ``resume``, ``cfg`` may be None: the config comes from ``out/last.pt``. ``model``: a ready
    module to train instead of the one ``cfg.model`` names (pass it again to resume). ``on_epoch(row)``
    runs after each epoch is saved and may raise ``StopRun`` to end the run there. ``train.threads``
    applies for the run only: torch's thread count is given back afterwards.

    Under torchrun (several processes) every process calls ``train``: it joins the process group
    (``backend``: auto, gloo or nccl) and trains its part of each batch; rank 0 alone writes ``out``,
    prints and runs ``on_epoch`` (its StopRun stops every process); the other ranks' RunResult has
    no run directory. A checkpoint resumes with any number of processes.
    """
    with torch_threads(0), distributed.session(backend) as world:  # setup() applies train.threads
        return _train(cfg, out, resume, overwrite, model, on_epoch, log, world)


def _train(cfg, out, resume, overwrite, model, on_epoch, log, world: World) -> RunResult:
    out = Path(out) if out is not None else None
    ckpt = open_resume(out) if resume else None
    if ckpt is not None:
        out, cfg = out.parent if out.is_file() else out, config_mod.from_dict(ckpt["config"])
    elif resume:  # stopped (kill -9) before its first checkpoint: start again from its recipe
        cfg = config_mod.load_recipe(out / "config.toml")
    elif out is not None and world.main:  # the others would race rank 0 clearing the folder
        check_out_dir(out, overwrite)
    if world.size > 1:
        on_epoch = rank0_callback(world, on_epoch)
    if not world.main:  # rank 0 alone writes the run directory and speaks
        out, log = None, (lambda *a, **k: None)
    say = (lambda *a, **k: None) if cfg.train.quiet else log
    s = setup(cfg, model, log=say, world=world)
    st = restore(s, ckpt, out, log) if ckpt is not None else RunState()
    distributed.fork_rng(world)
    if st.stopped:
        say(f"{out} already finished ({st.stopped}); nothing to resume")
        return RunResult(out, st.history, runs.read_result(out) if out is not None else {})
    if ckpt is not None:
        say(f"resuming {out} at epoch {st.epoch + 1}")
    elif out is not None:
        clear_run_dir(out)
    if st.epoch < s.cfg.train.epochs:  # a finished run resumed (to write its result again) runs no new code
        st.code.append({**runs.git_state(), "from_epoch": st.epoch + 1, "processes": world.size})
    if out is not None:
        runs.write_text(out / "config.toml", config_mod.to_toml(s.cfg))
        runs.write_text(out / "summary.txt", s.summary_text + "\n")
    say(header(s.split))
    for r in st.history:
        say(table_row(r, s.split))
    saved = st.snapshot()  # what last.pt holds
    try:
        for epoch in range(st.epoch + 1, s.cfg.train.epochs + 1):
            run_epoch(out, s, st, epoch, say)
            saved = st.snapshot()
            if on_epoch is not None:
                on_epoch(st.history[-1])
            if st.stopped:
                say(stop_message(s, st))
                break
    except KeyboardInterrupt:
        raise interrupted(out, s, saved if out is not None else st, log) from None
    except _Diverged as d:
        raise diverged(out, s, st, d) from None
    except StopRun as stop:
        return finish(out, s, st, stop.status)
    return finish(out, s, st, "target" if st.time_to_target_s is not None else "done")


def rank0_callback(world: World, on_epoch: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """``on_epoch`` as every process of a data-parallel run calls it: rank 0 runs it (it may write or
    ask a server) and its StopRun, if any, is raised in every process, so all stop together."""
    if on_epoch is None:
        return None

    def call(row: dict) -> None:
        status = None
        if world.main:
            try:
                on_epoch(row)
            except StopRun as stop:
                status = stop.status
        status = distributed.broadcast(world, status)
        if status is not None:
            raise StopRun(status)

    return call


def open_resume(out: Path | None) -> dict | None:
    """The checkpoint to resume from; None for a run stopped in its first epoch (its recipe recorded,
    no epoch yet), which then starts again."""
    if out is None:
        raise CnnlabError("--resume needs the run directory to continue, e.g. --resume runs/mnist_tiny")
    if out.is_dir() and (out / "config.toml").is_file() and not any((out / f).exists() for f in ("last.pt",
                                                                                                 "metrics.jsonl")):
        return None
    return runs.load_checkpoint(out, "last")


def stop_message(s: Setup, st: RunState) -> str:
    if st.stopped == "target":
        return (f"reached target {s.cfg.train.target:.2%} at epoch {st.epoch} after {st.train_seconds:.1f} s "
                f"of training")
    return f"stopping early: no improvement for {s.cfg.train.patience} epochs"


def interrupted(out: Path | None, s: Setup, saved: RunState, log) -> Interrupted:
    """After Ctrl-C (or SIGTERM): result.json for what last.pt holds; the exception to raise."""
    done = len(saved.history)
    log(f"interrupted in epoch {saved.epoch + 1}; "
        f"{'last.pt holds epoch ' + str(done) if out and done else 'nothing saved'}"
        + (f"; continue with: cnnlab train --resume {out}" if out else ""))
    return Interrupted(finish(out, s, saved, "interrupted"))


def diverged(out: Path | None, s: Setup, st: RunState, d: _Diverged) -> CnnlabError:
    finish(out, s, st, "diverged")
    kept = f"; the last good checkpoint is {out / 'last.pt'} (epoch {len(st.history)})" if out and st.history else ""
    return CnnlabError(f"{d.what} became {d.value} at epoch {d.epoch}, step {d.step} (lr {d.lr:.3g}): the learning "
                       f"rate is probably too high, lower optim.lr{kept}")


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads (0: leave the count as it is), then give the old count back."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# what a run writes; --overwrite removes these (an LR-finder result in the folder is kept)
RUN_FILES = ("config.toml", "metrics.jsonl", "result.json", "last.pt", "best.pt", "summary.txt", "eval.json",
             "report.html", "curves.png", "confusion.png", "misclassified.png", "gradcam.png", "activations.png")
KEEP = ("lr_find.json", "lr_find.png")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into ``out`` when it holds another run, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise CnnlabError(f"--out {out}: a file, not a directory; pass a directory such as runs/NAME")
    others = [p for p in out.iterdir() if p.name not in KEEP] if out.is_dir() else []
    if others and not overwrite:
        raise CnnlabError(f"{out} already holds files; pass --overwrite to replace that run, "
                          f"--resume to continue it, or --out another directory")


def clear_run_dir(out: Path) -> None:
    """Remove an old run's files (after the new run's setup succeeded) so the two never mix."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- what the user sees


def header(split: str) -> str:
    return (f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'train_acc':>9} {split + '_loss':>9} {split + '_acc':>8} "
            f"{'epoch_s':>8} {'train_s':>8}")


def table_row(r: dict, split: str) -> str:
    loss, acc = r.get(f"{split}_loss"), r.get(f"{split}_acc")
    evaluated = (f"{loss:>9.4f} {100 * acc:>7.2f}%" if acc is not None else f"{'-':>9} {'-':>8}")
    return (f"{r['epoch']:>5} {r['lr']:>9.2e} {r['train_loss']:>10.4f} {100 * r['train_acc']:>8.2f}% "
            f"{evaluated} {r['epoch_seconds']:>8.1f} {r['train_seconds']:>8.1f}")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextmanager
def _progress(total: int, epoch: int, quiet: bool):
    """A progress bar within the epoch on a terminal; nothing when quiet, piped or in CI."""
    if quiet or not sys.stderr.isatty() or os.environ.get("CI"):
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=f"epoch {epoch}", leave=False, unit="batch", dynamic_ncols=True) as bar:
        yield bar
