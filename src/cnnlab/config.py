"""Recipes: TOML files resolved into dataclasses, every key and type checked.

A recipe has five tables, ``[model]``, ``[data]``, ``[optim]``, ``[schedule]`` and ``[train]``.
``[model]`` holds ``name``, the budgets ``max_params`` / ``max_macs``, and the model's own options
(checked where the model is built, ``models.build``). ``name`` is a zoo model, a label for a design
given by ``layers = [...]``, or ``"path/to/file.py:function"`` (read relative to the recipe's folder,
then the working directory, and kept as an absolute path so the run rebuilds from anywhere) or
``"package.module:function"``.
Overrides use dotted keys, ``--set optim.lr=0.1``, or a bare key that only one table has,
``--set lr=0.1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import datetime
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab.errors import CnnlabError


@dataclass
class ModelConfig:
    name: str = "mnist_tiny"  # a zoo model, a design's label (with layers), or "file.py:function"
    options: dict = field(default_factory=dict)  # the model's own options, e.g. dropout, or a design's layers
    max_params: int = 0  # refuse a model with more parameters (Keras total; 0 = no limit)
    max_macs: int = 0  # refuse a model with more multiply-accumulates per image (0 = no limit)


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
    name: str = "sgd"  # "sgd", "adam", "adamw" or "muon" (Muon for the hidden layers' weights, SGD for the rest)
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
    # name = "muon": lr, momentum, nesterov and weight_decay are the SGD part's (first layer, head,
    # biases, BatchNorm); the schedule scales muon_lr alike
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    ns_steps: int = 5  # Newton-Schulz iterations per step
    muon_normalize: bool = False  # rescale each Muon weight to norm sqrt(out_channels) per step (airbench94_muon)


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
    tta_fraction: float = 1.0  # the TTA views for this fraction of each batch, its least confident images under one view (1 = all)
    micro_batch: int = 0  # forward+backward in chunks of this many images, one optimizer step per batch (0 = whole batch): see README
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    hard_fraction: float = 1.0  # epochs after the first train on this fraction of the images (>= 1 batch), those hardest in the first (1 = all): see hard_examples
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
    ("optim", "name"): ("sgd", "adam", "adamw", "muon"),
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
        if not -2**63 <= value < 2**63:
            raise CnnlabError(f"{where} = {value}: out of range; expected an integer within +-2**63")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CnnlabError(f"{where} = {value!r}: expected a number")
        if isinstance(value, int) and abs(value) > 2**1000 or not math.isfinite(value):  # past float's range
            raise CnnlabError(f"{where} = {value!r}: expected a finite number")
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


def from_dict(raw: dict, base_dir: str | Path | None = None) -> Config:
    """Build a checked Config from a nested dict (a parsed recipe); ``base_dir`` is where a relative
    ``[model] name = "file.py:function"`` is looked for first (the recipe's folder)."""
    cfg = Config()
    for section, table in raw.items():
        if section not in SECTION_TYPES:
            raise CnnlabError(f"unknown table [{section}]{_suggest(section, SECTION_TYPES)}; "
                              f"valid tables: {', '.join(SECTION_TYPES)}")
        if not isinstance(table, dict):
            raise CnnlabError(f"'{section}' must be a table [{section}]")
        target = getattr(cfg, section)
        for key, value in table.items():
            fields = {f.name: f for f in dataclasses.fields(target) if f.name != "options"}
            if section == "model" and key not in fields:
                target.options[key] = value  # checked by models.build
                continue
            if key not in fields:
                raise CnnlabError(f"unknown key {section}.{key}{_suggest(key, fields)}; valid keys in "
                                  f"[{section}]: {', '.join(fields)}")
            setattr(target, key, _check_type(f"{section}.{key}", value, getattr(target, key)))
    if "layers" in cfg.model.options and "name" not in raw.get("model", {}):
        cfg.model.name = "design"
    cfg.model.name = resolve_reference(cfg.model.name, base_dir)
    validate(cfg)
    return cfg


def file_reference(name: str) -> tuple[Path, str] | None:
    """``"path/to/nets.py:build"`` -> ``(Path("path/to/nets.py"), "build")``; None for a zoo name or
    a ``"package.module:function"``."""
    target, colon, function = name.rpartition(":")
    if not colon or not (target.endswith(".py") or "/" in target or "\\" in target):
        return None
    return Path(target).expanduser(), function


def resolve_reference(name: str, base_dir: str | Path | None) -> str:
    """A relative file reference made absolute: found in ``base_dir`` first, else the working directory."""
    ref = file_reference(name)
    if ref is None or ref[0].is_absolute():
        return name
    path, function = ref
    folders = ([Path(base_dir)] if base_dir is not None else []) + [Path.cwd()]
    for folder in folders:
        if (folder / path).is_file():
            return f"{(folder / path).resolve()}:{function}"
    where = " or ".join(str(f.resolve()) for f in folders)
    raise CnnlabError(f"[model] name = {name!r}: no file {path} in {where}; give the path of your .py file "
                      f"relative to the recipe's folder or the working directory")


def validate(cfg: Config) -> None:
    for (section, key), choices in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise CnnlabError(f"{section}.{key} = {value!r}: expected one of {', '.join(choices)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in cfg.schedule.knots + cfg.schedule.values):
        raise CnnlabError("schedule.knots and schedule.values must be lists of numbers, e.g. knots = [0, 5, 24]")
    checks = [
        (cfg.model.max_params >= 0, f"model.max_params = {cfg.model.max_params}: must be >= 0 (0 = no limit)"),
        (cfg.model.max_macs >= 0, f"model.max_macs = {cfg.model.max_macs}: must be >= 0 (0 = no limit)"),
        (cfg.optim.lr > 0, f"optim.lr = {cfg.optim.lr}: must be > 0 (e.g. 0.01)"),
        (0 <= cfg.optim.momentum < 1, f"optim.momentum = {cfg.optim.momentum}: must be in [0, 1)"),
        (cfg.optim.eps > 0, f"optim.eps = {cfg.optim.eps}: must be > 0 (e.g. 1e-8)"),
        (len(cfg.optim.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.optim.betas),
         f"optim.betas = {cfg.optim.betas}: expected two numbers in [0, 1), e.g. [0.9, 0.999]"),
        (cfg.optim.muon_lr > 0, f"optim.muon_lr = {cfg.optim.muon_lr}: must be > 0 (e.g. 0.02)"),
        (0 <= cfg.optim.muon_momentum < 1, f"optim.muon_momentum = {cfg.optim.muon_momentum}: must be in [0, 1)"),
        (cfg.optim.ns_steps >= 1, f"optim.ns_steps = {cfg.optim.ns_steps}: must be >= 1 (e.g. 5)"),
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
        (cfg.train.seed >= 0, f"train.seed = {cfg.train.seed}: must be >= 0"),
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
        (cfg.train.micro_batch >= 0, f"train.micro_batch = {cfg.train.micro_batch}: must be >= 0 (0 = the whole batch)"),
        (0 < cfg.train.tta_fraction <= 1,
         f"train.tta_fraction = {cfg.train.tta_fraction}: must be in (0, 1] (1 = the TTA views for every image)"),
        (0 < cfg.train.hard_fraction <= 1,
         f"train.hard_fraction = {cfg.train.hard_fraction}: must be in (0, 1] (1 = every image every epoch)"),
        (cfg.train.hard_fraction == 1 or (cfg.schedule.name in ("onecycle", "constant") and not cfg.schedule.warmup_epochs),
         f"train.hard_fraction = {cfg.train.hard_fraction} makes the later epochs shorter than the first, and schedule "
         f"'{cfg.schedule.name}'{' with warmup_epochs' if cfg.schedule.warmup_epochs else ''} counts epochs: use "
         f"schedule.name = \"onecycle\" or \"constant\" without warmup_epochs (they follow the run's steps)"),
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
    raw = read_toml(path)
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, base_dir=Path(path).parent)


def read_toml(path: str | Path, what: str = "recipe", example: str = "recipes/mnist_tiny.toml") -> dict:
    """The tables of a TOML file (a recipe, or a search file), with one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"{what} {path}: no such file; pass a .toml {what} such as {example}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as e:  # ValueError: an integer of > 4300 digits
        raise CnnlabError(f"{what} {path}: not valid TOML ({e})") from None
    except RecursionError:  # tomllib reads nested arrays and tables recursively
        raise CnnlabError(f"{what} {path}: arrays or tables nested too deeply to read") from None


def apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise CnnlabError(f"--set {item!r}: expected key=value, e.g. optim.lr=0.1")
    key, text = (s.strip() for s in item.split("=", 1))
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        value = text  # a bare word is a string (so is an integer too long to read, refused as one later)
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


TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(s: str, where: str) -> str:
    """``s`` as a TOML basic string: quote, backslash and control characters escaped, the rest as it is."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in s):
        raise CnnlabError(f"{where} = {s!r}: holds characters that are not text (undecodable bytes), so it "
                          f"cannot be written to config.toml; use a name or path that is valid UTF-8")
    return '"' + "".join(TOML_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                         for c in s) + '"'


def toml_key(k: str, where: str) -> str:
    return k if k and all(c.isascii() and (c.isalnum() or c in "_-") for c in k) else toml_string(k, where)


def toml_value(v, where: str) -> str:
    """``v`` in TOML: booleans, numbers, strings, dates and times, arrays and (inline) tables of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # inf, nan and 1e+16 are TOML too
    if isinstance(v, str):
        return toml_string(v, where)
    if isinstance(v, (datetime.date, datetime.time)):  # datetime.datetime is a date
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x, f"{where}[{i}]") for i, x in enumerate(v)) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(str(k), where)} = {toml_value(x, f'{where}.{k}')}" for k, x in v.items()) + "}"
    raise CnnlabError(f"{where} is a {type(v).__name__}, which config.toml cannot hold; give a string, number, "
                      f"boolean, date, list or table")


def to_toml(cfg: Config) -> str:
    """The fully resolved recipe as TOML (``load_recipe`` reads it back to an equal Config)."""
    lines = []
    for section, table in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{toml_key(k, section)} = {toml_value(v, f'{section}.{k}')}" for k, v in table.items()]
        lines.append("")
    return "\n".join(lines)
