"""Recipes: TOML files resolved into dataclasses, every key and type checked.

A recipe has five tables, ``[model]``, ``[data]``, ``[optim]``, ``[schedule]`` and ``[train]``.
``[model]`` holds ``name`` plus the model's own options (checked by the model registry).
Overrides use dotted keys, ``--set optim.lr=0.1``, or a bare key that only one table has,
``--set lr=0.1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab.errors import CnnlabError


@dataclass
class ModelConfig:
    name: str = "mnist_tiny"
    options: dict = field(default_factory=dict)  # the model's own options, e.g. dropout


@dataclass
class DataConfig:
    dataset: str = "mnist"  # a known name or the path of an image folder
    root: str = ""  # data cache directory ("" = $CNNLAB_DATA or ~/.cache/cnnlab)
    val_split: int = 0  # hold out the last N training images as the evaluation split
    subset: int = 0  # train on only the first N training images (0 = all); for quick trials
    batch_size: int = 128
    eval_batch_size: int = 1000
    crop_pad: int = 0  # pad-and-random-crop by this many pixels
    crop_mode: str = "zeros"  # "zeros" or "reflect"
    flip: bool = False  # random horizontal flip
    alternate_flip: bool = False  # with flip: mirror each image on every other epoch (airbench)
    cutout: int = 0  # side of the random erased square (0 = off)
    cutout_p: float = 1.0


@dataclass
class OptimConfig:
    name: str = "sgd"  # "sgd", "adam" or "adamw"
    lr: float = 0.01  # base LR; the peak LR for onecycle
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_bn_and_bias: bool = True  # False: no weight decay on BatchNorm and bias parameters
    bias_lr_scale: float = 1.0  # LR multiplier (and 1/x decay) for normalisation-layer parameters (airbench: 64)
    decay: float = 0.0  # Keras-style decay: lr / (1 + decay * iterations)
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm (0 = off)


@dataclass
class ScheduleConfig:
    name: str = "constant"  # constant, onecycle, cyclic, inverse, step, piecewise
    warmup_epochs: float = 0.0  # linear warmup from 0 before the schedule
    # onecycle
    pct_start: float = 0.25
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"  # "cos" or "linear"
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    # cyclic (triangular CLR): between min_lr and lr, half-cycle of step_epochs
    min_lr: float = 0.0
    step_epochs: float = 2.0
    # inverse (Keras LearningRateScheduler): lr / (1 + rate * epoch), held for the epoch
    rate: float = 0.0
    # step: lr * gamma ** (epoch // step_size)
    step_size: int = 10
    gamma: float = 0.1
    # piecewise linear in epochs: lr * interp(epoch, knots, values)
    knots: list = field(default_factory=list)
    values: list = field(default_factory=list)


@dataclass
class TrainConfig:
    epochs: int = 15
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA if present, else CPU), "cpu", "cuda", "cuda:1"
    dtype: str = "float32"  # "float32", "bfloat16" or "float16" (autocast)
    channels_last: bool = False
    compile: bool = False
    threads: int = 0  # CPU threads (0 = torch's default)
    target: float = 0.0  # stop at this evaluation accuracy (0 = run all epochs)
    stop_at_target: bool = True
    patience: int = 0  # early stop after this many epochs without improvement (0 = off)
    ema: float = 0.0  # EMA decay of weights per step (0 = off); evaluation uses the EMA
    lookahead: float = 0.0  # airbench's lookahead decay per step (0.95 there; 0 = off): see train.lookahead_update
    tta: bool = False  # average predictions over the image and its mirror at evaluation
    tta_shift: int = 0  # also average over the image shifted by +-N pixels along the diagonal (0 = off)
    tta_each_epoch: bool = True  # false: one view per epoch, the TTA views at the last epoch only (wall time)
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    sync_bn: bool = False  # several CUDA processes: BatchNorm statistics over the global batch (SyncBatchNorm)
    quiet: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTION_TYPES = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                 "schedule": ScheduleConfig, "train": TrainConfig}
CHOICES = {
    ("optim", "name"): ("sgd", "adam", "adamw"),
    ("schedule", "name"): ("constant", "onecycle", "cyclic", "inverse", "step", "piecewise"),
    ("schedule", "anneal"): ("cos", "linear"),
    ("data", "crop_mode"): ("zeros", "reflect"),
    ("train", "dtype"): ("float32", "bfloat16", "float16"),
}


def _suggest(key: str, valid) -> str:
    near = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def _check_type(where: str, value, default):
    """Coerce/check a TOML value against the type of the field's default."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise CnnlabError(f"{where} = {value!r}: expected true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise CnnlabError(f"{where} = {value!r}: expected an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CnnlabError(f"{where} = {value!r}: expected a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise CnnlabError(f"{where} = {value!r}: expected a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise CnnlabError(f"{where} = {value!r}: expected a list")
        return value
    return value


def from_dict(raw: dict) -> Config:
    """Build a checked Config from a nested dict (a parsed recipe)."""
    cfg = Config()
    for section, table in raw.items():
        if section not in SECTION_TYPES:
            raise CnnlabError(f"unknown table [{section}]{_suggest(section, SECTION_TYPES)}; "
                              f"valid tables: {', '.join(SECTION_TYPES)}")
        if not isinstance(table, dict):
            raise CnnlabError(f"'{section}' must be a table [{section}]")
        target = getattr(cfg, section)
        for key, value in table.items():
            if section == "model" and key != "name":
                target.options[key] = value  # checked by models.create_model
                continue
            fields = {f.name: f for f in dataclasses.fields(target) if f.name != "options"}
            if key not in fields:
                raise CnnlabError(f"unknown key {section}.{key}{_suggest(key, fields)}; valid keys in "
                                  f"[{section}]: {', '.join(fields)}")
            setattr(target, key, _check_type(f"{section}.{key}", value, getattr(target, key)))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise CnnlabError(f"{section}.{key} = {value!r}: expected one of {', '.join(choices)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cfg.schedule.knots + cfg.schedule.values):
        raise CnnlabError("schedule.knots and schedule.values must be lists of numbers, e.g. knots = [0, 5, 24]")
    checks = [
        (cfg.optim.lr > 0, f"optim.lr = {cfg.optim.lr}: must be > 0 (e.g. 0.01)"),
        (0 <= cfg.optim.momentum < 1, f"optim.momentum = {cfg.optim.momentum}: must be in [0, 1)"),
        (cfg.optim.eps > 0, f"optim.eps = {cfg.optim.eps}: must be > 0 (e.g. 1e-8)"),
        (len(cfg.optim.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas),
         f"optim.betas = {cfg.optim.betas}: expected two numbers in [0, 1), e.g. [0.9, 0.999]"),
        (cfg.optim.grad_clip >= 0, f"optim.grad_clip = {cfg.optim.grad_clip}: must be >= 0 (0 = off)"),
        (cfg.schedule.div_factor > 0 and cfg.schedule.final_div_factor > 0,
         "schedule.div_factor and schedule.final_div_factor must be > 0"),
        (cfg.schedule.rate >= 0, f"schedule.rate = {cfg.schedule.rate}: must be >= 0"),
        (cfg.schedule.gamma > 0, f"schedule.gamma = {cfg.schedule.gamma}: must be > 0"),
        (cfg.schedule.warmup_epochs >= 0, f"schedule.warmup_epochs = {cfg.schedule.warmup_epochs}: must be >= 0"),
        (0 <= cfg.data.cutout_p <= 1, f"data.cutout_p = {cfg.data.cutout_p}: must be in [0, 1]"),
        (cfg.data.flip or not cfg.data.alternate_flip, "data.alternate_flip needs data.flip = true"),
        (cfg.train.threads >= 0, f"train.threads = {cfg.train.threads}: must be >= 0 (0 = torch's default)"),
        (cfg.train.patience >= 0, f"train.patience = {cfg.train.patience}: must be >= 0"),

        (cfg.train.epochs >= 1, f"train.epochs = {cfg.train.epochs}: must be >= 1"),
        (cfg.data.batch_size >= 1, f"data.batch_size = {cfg.data.batch_size}: must be >= 1"),
        (cfg.data.eval_batch_size >= 1, f"data.eval_batch_size = {cfg.data.eval_batch_size}: must be >= 1"),
        (cfg.data.subset >= 0, f"data.subset = {cfg.data.subset}: must be >= 0"),
        (cfg.data.val_split >= 0, f"data.val_split = {cfg.data.val_split}: must be >= 0"),
        (cfg.data.crop_pad >= 0, f"data.crop_pad = {cfg.data.crop_pad}: must be >= 0"),
        (cfg.data.cutout >= 0, f"data.cutout = {cfg.data.cutout}: must be >= 0"),
        (0 <= cfg.optim.label_smoothing < 1, f"optim.label_smoothing = {cfg.optim.label_smoothing}: must be in [0, 1)"),
        (cfg.optim.weight_decay >= 0, f"optim.weight_decay = {cfg.optim.weight_decay}: must be >= 0"),
        (cfg.optim.bias_lr_scale > 0, f"optim.bias_lr_scale = {cfg.optim.bias_lr_scale}: must be > 0"),
        (cfg.optim.decay >= 0, f"optim.decay = {cfg.optim.decay}: must be >= 0"),
        (0 <= cfg.train.ema < 1, f"train.ema = {cfg.train.ema}: must be in [0, 1)"),
        (0 <= cfg.train.lookahead < 1, f"train.lookahead = {cfg.train.lookahead}: must be in [0, 1) (airbench: 0.95)"),
        (cfg.train.eval_every >= 1, f"train.eval_every = {cfg.train.eval_every}: must be >= 1 (1 = every epoch)"),
        (0 <= cfg.train.tta_shift <= 4, f"train.tta_shift = {cfg.train.tta_shift}: must be 0 (off) to 4 pixels"),
        (0 <= cfg.train.target <= 1, f"train.target = {cfg.train.target}: an accuracy in [0, 1], e.g. 0.994"),
        (0 < cfg.schedule.pct_start < 1, f"schedule.pct_start = {cfg.schedule.pct_start}: must be in (0, 1)"),
        (cfg.schedule.step_epochs > 0, f"schedule.step_epochs = {cfg.schedule.step_epochs}: must be > 0"),
        (cfg.schedule.step_size >= 1, f"schedule.step_size = {cfg.schedule.step_size}: must be >= 1"),
        (len(cfg.schedule.knots) == len(cfg.schedule.values),
         "schedule.knots and schedule.values must have the same length"),
        (all(a < b for a, b in zip(cfg.schedule.knots, cfg.schedule.knots[1:])),
         f"schedule.knots = {cfg.schedule.knots}: must be increasing epochs, e.g. [0, 5, 24]"),
        (cfg.schedule.name != "piecewise" or len(cfg.schedule.knots) >= 2,
         "schedule 'piecewise' needs knots and values with at least two points"),
    ]
    for ok, message in checks:
        if not ok:
            raise CnnlabError(message)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML recipe, apply ``key=value`` overrides, and check everything."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"recipe {path}: no such file; pass a .toml recipe such as recipes/mnist_tiny.toml")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise CnnlabError(f"recipe {path}: not valid TOML ({e})") from None
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise CnnlabError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.1")
    key, text = (s.strip() for s in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is a string
    if "." in key:
        section, name = key.split(".", 1)
    else:
        owners = [s for s, t in SECTION_TYPES.items() if key in {f.name for f in dataclasses.fields(t)}]
        if len(owners) != 1:
            where = f"in {', '.join(owners)}" if owners else "in no table"
            raise CnnlabError(f"--set {key}: the key is {where}; write it as table.key, e.g. optim.lr=0.1")
        section, name = owners[0], key
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise CnnlabError(f"'{section}' must be a table [{section}] (the recipe sets {section} = {table!r}), "
                          f"so --set {key} has nowhere to go")
    table[name] = value


def to_dict(cfg: Config) -> dict:
    d = dataclasses.asdict(cfg)
    options = d["model"].pop("options")
    d["model"].update(options)
    return d


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string (same escapes)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg: Config) -> str:
    """The fully resolved recipe as TOML (``load_recipe`` reads it back to an equal Config)."""
    lines = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)
