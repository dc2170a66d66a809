"""The training loop: one explicit function, ``train(cfg)``, and the pieces it is made of.

Per step: LR (and momentum) from the schedule, forward under autocast, loss, backward, step,
EMA update. Per epoch: time the training (evaluation excluded), evaluate, write a row of
``metrics.jsonl``, save ``last.pt`` (and ``best.pt``), print a table row, check the stops
(target accuracy, plateau). ``train(cfg, out, resume=True)`` continues from ``last.pt`` with the
saved optimizer and RNG states, so a resumed CPU run ends with the same metrics as one that
was never interrupted.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnlab import config as config_mod
from cnnlab import muon, runs
from cnnlab.augment import Augment, Loader, normalize
from cnnlab.config import Config
from cnnlab.data import DATASETS, Dataset, Split, load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import DTYPES, autocast, loss_and_accuracy, predict
from cnnlab.models import create_model, get_spec
from cnnlab.schedules import lr_at
from cnnlab.summary import summarize


@dataclass
class RunResult:
    run_dir: Path | None
    history: list[dict] = field(default_factory=list)
    result: dict = field(default_factory=dict)


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
    """Everything a run needs, built from a config: data, model, loaders, optimizer."""

    cfg: Config
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


def forward_loss(model, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype,
                 label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the (float32) cross-entropy of one batch, under autocast to ``dtype``."""
    with autocast(x.device, dtype):
        logits = model(x)
        return logits, F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)


def backward_step(model: torch.nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  loss: torch.Tensor, grad_clip: float = 0.0) -> None:
    """Gradients of ``loss`` (scaled for fp16), optional clipping, one optimizer step."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (its gradients underflow otherwise); a no-op for other dtypes."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def check_compatible(cfg: Config, ds: Dataset) -> None:
    spec = get_spec(cfg.model.name)
    if spec.input_shape[0] != ds.shape[0]:
        raise CnnlabError(f"model {spec.name} takes {spec.input_shape[0]}-channel images but {ds.name} has "
                          f"{ds.shape[0]} channel(s); choose a model for {ds.shape[0]}-channel input (`cnnlab models`)")
    if cfg.data.batch_size > len(ds.train):
        raise CnnlabError(f"data.batch_size = {cfg.data.batch_size} is larger than the {len(ds.train)} training "
                          f"images of {ds.name}; use a batch size <= {len(ds.train)}")


def check_output(name: str, summary, ds: Dataset) -> None:
    """The model must give one logit per class: a head without global pooling fed larger images
    gives more, and cross-entropy would train on them silently."""
    out = summary.output_shape
    if out != (ds.num_classes,):
        raise CnnlabError(f"model {name} gives outputs of shape {out} on {ds.name}'s {'x'.join(map(str, ds.shape))} "
                          f"images, not {ds.num_classes} class scores; use images of the model's size "
                          f"({'x'.join(map(str, get_spec(name).input_shape))}) or a model with global pooling")


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


def setup(cfg: Config, log=print) -> Setup:
    """Load data, build and check the model, loaders and optimizer for ``cfg``."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    dtype = DTYPES[cfg.train.dtype]
    ds = load_dataset(cfg.data.dataset, root=cfg.data.root or None, val_split=cfg.data.val_split, log=log)
    if cfg.data.dataset not in DATASETS:  # an image folder: keep its absolute path, so the run works from anywhere
        cfg.data.dataset = str(Path(cfg.data.dataset).expanduser().resolve())
    if cfg.data.subset:
        ds.train = Split(ds.train.images[:cfg.data.subset], ds.train.labels[:cfg.data.subset])
    check_compatible(cfg, ds)
    if cfg.data.crop_mode == "reflect" and cfg.data.crop_pad >= min(ds.shape[1:]):
        raise CnnlabError(f"data.crop_pad = {cfg.data.crop_pad} with reflect padding must be smaller than the "
                          f"{ds.shape[1]}x{ds.shape[2]} images; use e.g. crop_pad = 4")
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model.name, num_classes=ds.num_classes, **cfg.model.options)
    summary = summarize(model, input_shape=ds.shape)  # raises a clear error when the shape does not fit
    check_output(cfg.model.name, summary, ds)
    aug = Augment(cfg.data.crop_pad, cfg.data.crop_mode, cfg.data.flip, cfg.data.cutout, cfg.data.cutout_p,
                  cfg.data.alternate_flip)
    common = dict(device=device, channels_last=cfg.train.channels_last)
    train_loader = Loader(ds.train.images, ds.train.labels, cfg.data.batch_size, ds.mean, ds.std,
                          augment=aug, shuffle=True, drop_last=len(ds.train) > cfg.data.batch_size,
                          seed=cfg.train.seed, **common)
    eval_loader = Loader(ds.test.images, ds.test.labels, cfg.data.eval_batch_size, ds.mean, ds.std, **common)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if hasattr(model, "init_from_data"):
        n = min(len(ds.train), 5000)
        model.init_from_data(normalize(ds.train.images[:n].to(device), train_loader.mean, train_loader.std))
    optimizer = build_optimizer(model, cfg.optim)
    return Setup(cfg, ds, model, train_loader, eval_loader, optimizer, device, dtype, summary.to_text(),
                 summary.total_params, summary.macs)


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
        torch.cuda.set_rng_state_all(state["cuda"])


HEADER = f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'train_acc':>9} {'val_loss':>9} {'val_acc':>8} {'epoch_s':>8} {'train_s':>8}"


def table_row(r: dict) -> str:
    return (f"{r['epoch']:>5} {r['lr']:>9.2e} {r['train_loss']:>10.4f} {100 * r['train_acc']:>8.2f}% "
            f"{r['val_loss']:>9.4f} {100 * r['val_acc']:>7.2f}% {r['epoch_seconds']:>8.1f} {r['train_seconds']:>8.1f}")


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a timer reads true time."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


def train(cfg: Config | None = None, out: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, log=print) -> RunResult:
    """Train per ``cfg`` into run directory ``out`` (None: nothing written); return the history.

    With ``resume``, ``cfg`` may be None: the config comes from ``out/last.pt``. ``train.threads``
    applies for the run only: torch's thread count is given back afterwards.
    """
    with torch_threads(0):  # setup() applies train.threads (read from the checkpoint on resume)
        return _train(cfg, out, resume, overwrite, log)


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


def _train(cfg: Config | None, out: str | Path | None, resume: bool, overwrite: bool, log) -> RunResult:
    out = Path(out) if out is not None else None
    ckpt = None
    if resume:
        if out is None:
            raise CnnlabError("--resume needs the run directory to continue, e.g. --resume runs/mnist_tiny")
        ckpt = runs.load_checkpoint(out, "last")
        out = out.parent if out.is_file() else out
        cfg = config_mod.from_dict(ckpt["config"])
    elif out is not None:
        check_out_dir(out, overwrite)
    quiet = cfg.train.quiet
    say = (lambda *a, **k: None) if quiet else log
    s = setup(cfg, log=say)
    if out is not None and ckpt is None:
        clear_run_dir(out)
    model, opt, device = s.model, s.optimizer, s.device
    ema = copy.deepcopy(model).eval() if cfg.train.ema else None
    lookahead = None  # the lookahead average (a list of tensors) once it starts
    fwd = torch.compile(model) if cfg.train.compile else model
    # fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not (scaler disabled)
    scaler = grad_scaler(device, s.dtype)
    # augmentation draws on the training device: no host-device copy (and sync) per batch on a GPU
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    steps_per_epoch = len(s.train_loader)
    history: list[dict] = []
    state = {"train_seconds": 0.0, "best_val_acc": -1.0, "time_to_target_s": None, "target_epoch": None,
             "bad_epochs": 0, "code": []}  # code: the cnnlab checkout each start or resume trained with
    start_epoch = 1
    if ckpt is not None:
        runs.load_weights(model, ckpt["state_dict"], cfg.model.name)
        if len(ckpt["optimizer"]["param_groups"]) != len(opt.param_groups):
            raise CnnlabError(f"{out}/last.pt holds optimizer state for {len(ckpt['optimizer']['param_groups'])} "
                              f"parameter groups, this cnnlab makes {len(opt.param_groups)} (an older version saved "
                              f"it); start the run again with --overwrite")
        load_optimizer_state(opt, ckpt["optimizer"])
        if ema is not None and ckpt.get("ema_state_dict"):
            ema.load_state_dict(ckpt["ema_state_dict"])
        if ckpt.get("lookahead") is not None:
            lookahead = [t.to(device) for t in ckpt["lookahead"]]
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(gen, ckpt["rng"], log)
        history = list(ckpt["history"])
        state.update(ckpt["state"])
        start_epoch = ckpt["epoch"] + 1
        if state.get("stopped"):
            say(f"{out} already finished ({state['stopped']}); nothing to resume")
            return RunResult(out, history, runs.read_result(out))
        say(f"resuming {out} at epoch {start_epoch}")
    state["code"].append({**runs.git_state(), "from_epoch": start_epoch})
    meta = {"model_name": cfg.model.name, "model_options": dict(cfg.model.options), "num_classes": s.ds.num_classes,
            "config": config_mod.to_dict(cfg), "dataset": {"name": s.ds.name, "classes": s.ds.classes,
            "mean": list(s.ds.mean), "std": list(s.ds.std), "shape": list(s.ds.shape), "eval_split": s.ds.test_name}}
    if out is not None:
        runs.write_text(out / "config.toml", config_mod.to_toml(cfg))
        runs.write_text(out / "summary.txt", s.summary_text + "\n")

    def result(status: str) -> dict:
        last = history[-1] if history else {}
        return {
            "status": status, "model": cfg.model.name, "dataset": s.ds.name, "eval_split": s.ds.test_name,
            "params": s.params, "macs_per_image": s.macs, "train_images": len(s.ds.train), "images_per_epoch": s.train_loader.images_per_epoch, "epochs_run": len(history), "epochs": cfg.train.epochs,
            "final_val_acc": last.get("val_acc"), "best_val_acc": max((r["val_acc"] for r in history), default=None),
            "final_val_loss": last.get("val_loss"), "train_seconds": state["train_seconds"],
            "target": cfg.train.target or None, "time_to_target_s": state["time_to_target_s"],
            "target_epoch": state["target_epoch"], "seed": cfg.train.seed, "device": str(device),
            "dtype": cfg.train.dtype, "threads": torch.get_num_threads(), "channels_last": cfg.train.channels_last,
            "compile": cfg.train.compile, "batch_size": cfg.data.batch_size, "torch_version": torch.__version__,
            "git_commit": state["code"][0]["commit"], "git_dirty": any(c["dirty"] for c in state["code"]),
            "code": state["code"], "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def save(epoch: int, name: str) -> None:
        if out is None:
            return
        runs.save_checkpoint(out / name, {
            **meta, "epoch": epoch, "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
            "ema_state_dict": ema.state_dict() if ema is not None else None, "lookahead": lookahead,
            "rng": rng_state(gen),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "history": history, "state": dict(state)})

    def finish(status: str) -> RunResult:
        res = result(status)
        if out is not None:
            runs.write_json(out / "result.json", res)
        return RunResult(out, history, res)

    say(HEADER)
    for r in history:
        say(table_row(r))
    epoch, step_in_epoch = start_epoch, 0
    saved_rows, saved_state = len(history), dict(state)  # what last.pt holds
    try:
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            model.train()
            if hasattr(model, "start_epoch"):  # a model's own per-epoch rule (airbench: freeze the whitening bias)
                model.start_epoch(epoch)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            sync(device)
            t0 = time.perf_counter()
            bar = _progress(steps_per_epoch, epoch, quiet)
            try:
                for step_in_epoch, (x, y) in enumerate(s.train_loader.epoch(gen, epoch)):
                    step = (epoch - 1) * steps_per_epoch + step_in_epoch
                    lr, mom = lr_at(cfg.schedule, cfg.optim, step, steps_per_epoch, cfg.train.epochs)
                    set_lr(opt, lr, mom)
                    logits, loss = forward_loss(fwd, x, y, s.dtype, cfg.optim.label_smoothing)
                    if device.type == "cpu" and not torch.isfinite(loss):  # free on CPU; on CUDA the epoch-end check
                        raise _Diverged(epoch, step_in_epoch + 1, float(loss.detach()), lr)
                    backward_step(model, opt, scaler, loss, cfg.optim.grad_clip)
                    if cfg.train.lookahead:
                        lookahead = lookahead_update(lookahead, model, step, steps_per_epoch * cfg.train.epochs,
                                                     cfg.train.lookahead)
                    if ema is not None:
                        ema_update(ema, model, cfg.train.ema)
                    loss_sum += loss.detach() * len(y)
                    correct += (logits.argmax(1) == y).sum()
                    seen += len(y)
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            if lookahead is not None and epoch == cfg.train.epochs:  # training ends on the average (airbench)
                with torch.no_grad():
                    torch._foreach_copy_(float_state(model), lookahead)
            sync(device)
            epoch_seconds = time.perf_counter() - t0
            state["train_seconds"] += epoch_seconds
            logits_v, labels_v = predict(ema if ema is not None else fwd, s.eval_loader, cfg.train.tta, s.dtype,
                                         cfg.train.tta_shift)
            val_loss, val_acc = loss_and_accuracy(logits_v, labels_v)
            if not (math.isfinite(val_loss) and all_finite(model)):
                raise _Diverged(epoch, steps_per_epoch, val_loss, lr, "evaluation loss")
            row = {"epoch": epoch, "lr": lr, "train_loss": float(loss_sum) / seen, "train_acc": float(correct) / seen,
                   "val_loss": val_loss, "val_acc": val_acc, "epoch_seconds": epoch_seconds,
                   "train_seconds": state["train_seconds"]}
            history.append(row)
            improved = val_acc > state["best_val_acc"]
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["best_val_acc"] = max(state["best_val_acc"], val_acc)
            hit = cfg.train.target and val_acc >= cfg.train.target and state["time_to_target_s"] is None
            if hit:
                state["time_to_target_s"], state["target_epoch"] = state["train_seconds"], epoch
            stop = ("target" if hit and cfg.train.stop_at_target else
                    "plateau" if cfg.train.patience and state["bad_epochs"] >= cfg.train.patience else None)
            state["stopped"] = stop
            if improved:
                save(epoch, "best.pt")
            save(epoch, "last.pt")
            saved_rows, saved_state = len(history), dict(state)
            if out is not None:  # after the checkpoints: a metrics row always has its last.pt
                runs.write_metrics(out, history)
            say(table_row(row) + ("  <- target" if hit else ""))
            if stop == "target":
                say(f"reached target {cfg.train.target:.2%} at epoch {epoch} after {state['train_seconds']:.1f} s of training")
                break
            if stop == "plateau":
                say(f"stopping early: no improvement for {cfg.train.patience} epochs")
                break
    except KeyboardInterrupt:
        if out is not None:  # interrupted after training or while saving: report what last.pt holds
            del history[saved_rows:]
            state.clear()
            state.update(saved_state)
        done = len(history)
        log(f"interrupted in epoch {epoch}; {'last.pt holds epoch ' + str(done) if out and done else 'nothing saved'}"
            + (f"; continue with: cnnlab train --resume {out}" if out else ""))
        res = finish("interrupted")
        raise Interrupted(res) from None
    except _Diverged as d:
        finish("diverged")
        kept = f"; the last good checkpoint is {out / 'last.pt'} (epoch {len(history)})" if out and history else ""
        raise CnnlabError(f"{d.what} became {d.value} at epoch {d.epoch}, step {d.step} (lr {d.lr:.3g}): the learning rate "
                          f"is probably too high, lower optim.lr{kept}") from None
    status = "target" if state["time_to_target_s"] is not None else "done"
    return finish(status)


class _Diverged(Exception):
    def __init__(self, epoch: int, step: int, value: float, lr: float, what: str = "loss"):
        super().__init__(f"{what} {value} at epoch {epoch} step {step}")
        self.epoch, self.step, self.value, self.lr, self.what = epoch, step, value, lr, what


def all_finite(model: torch.nn.Module) -> bool:
    """True when every parameter and buffer (BatchNorm statistics included) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in (*model.parameters(), *model.buffers())
               if t.is_floating_point())


class Interrupted(KeyboardInterrupt):
    """Raised after Ctrl-C once the run's state is saved; carries the partial RunResult."""

    def __init__(self, run_result: RunResult):
        super().__init__("interrupted")
        self.run_result = run_result


def _progress(total: int, epoch: int, quiet: bool):
    if quiet or not sys.stderr.isatty() or os.environ.get("CI"):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}", leave=False, unit="batch", dynamic_ncols=True)
