"""Where models come from, and what cnnlab expects of one (the model protocol).

The model protocol: any ``nn.Module`` is a model if

* (must) ``forward(x)`` maps images ``[N, C, H, W]`` to logits ``[N, num_classes]``.

It may also have, and cnnlab reads these only through the small functions below
(``body``, ``input_shape``, ``init_from_data``, ``start_epoch``):

* ``features`` and ``head``: modules with ``forward(x) == head(features(x))``, ``features`` ending
  in a spatial map. Grad-CAM then looks at the last spatial child of ``features`` and the feature
  maps show each of its children; without them, the last spatial layer and each top-level child.
* ``input_shape``: the ``(C, H, W)`` it is built for; ``summary`` and Grad-CAM use it when no shape
  is given, and training refuses data with another channel count.
* ``init_from_data(images)``: called once before training with up to 5,000 normalized training
  images on the training device (airbench's whitening).
* ``start_epoch(epoch)``: called before each epoch (1-based, also after a resume).

``build(name, options, num_classes, input_shape)`` is the one way a ``[model]`` table becomes a
module (training, checkpoints, summary, bench and the LR finder all use it):

* ``[model] layers = [...]``: a design in the layer notation (``cnnlab.design``); ``name`` is a label.
* ``name = "path/to/file.py:function"`` or ``"package.module:function"``: your own code, called as
  ``function(num_classes=..., **other [model] keys)``; ``source(name)`` is what a checkpoint keeps
  (the file and its sha256) so a fresh process rebuilds it and notices a changed file.
* any other ``name``: the zoo below, ``create_model(name, num_classes, **options)``. Each zoo
  model is a ``layers.Net`` built from the factories in ``layers``; its constructor checks its own
  options. Parameter budgets (``ModelSpec.budget``) bound ``sum(p.numel() for p in
  model.parameters())`` at default options (trainable + frozen, BN buffers excluded).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cnnlab.config import file_reference
from cnnlab.design import build_design
from cnnlab.errors import CnnlabError
from cnnlab.layers import (CenterCrop, ConvBlock, Dropout, GlobalPool, Mul, Net, Residual, SeparableConv2d,
                           conv_bn)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    constructor: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    source: str
    description: str
    budget: tuple[int, int]
    options: dict = field(default_factory=dict)  # option name -> default, from the constructor signature


MODELS: dict[str, ModelSpec] = {}


def register(name: str, input_shape: tuple[int, int, int], source: str, description: str,
             budget: tuple[int, int], num_classes: int = 10):
    """Decorator adding a constructor ``f(num_classes, **options) -> nn.Module`` to ``MODELS``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        params = inspect.signature(fn).parameters
        options = {k: p.default for k, p in params.items() if k != "num_classes"}
        MODELS[name] = ModelSpec(name, fn, tuple(input_shape), num_classes, source, description,
                                 tuple(budget), options)
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(MODELS)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters (or, without any, its buffers) live; CPU for an empty model."""
    t = next(model.parameters(), None)
    t = t if t is not None else next(model.buffers(), None)
    return t.device if t is not None else torch.device("cpu")


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        near = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.3)
        hint = f"did you mean {', '.join(near)}?" if near else f"choose one of: {', '.join(list_models())}"
        raise CnnlabError(f"unknown model {name!r}; {hint} (see `cnnlab models`)")
    return MODELS[name]


def _check_options(spec: ModelSpec, options: dict) -> None:
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(sorted(spec.options)) or "(none)"
        raise CnnlabError(f"unknown option {unknown[0]!r} for model {spec.name!r}; valid options: {valid}")


def create_model(name: str, num_classes: int | None = None, **options) -> nn.Module:
    """Build a registered model; bad names or options raise ``CnnlabError``."""
    spec = get_spec(name)
    _check_options(spec, options)
    if num_classes is None:
        num_classes = spec.num_classes
    _check_num_classes(num_classes)
    model = spec.constructor(num_classes=num_classes, **options)
    model.input_shape = spec.input_shape  # the protocol's hook: summary and Grad-CAM default to it
    return model


def _check_num_classes(num_classes) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise CnnlabError(f"num_classes={num_classes!r} must be a positive integer")


# --------------------------------------------------------------------------- the model protocol


def body(model: nn.Module) -> nn.Module:
    """The part of the model that maps images to spatial maps: ``features`` if it has one, else the model."""
    features = getattr(model, "features", None)
    return features if isinstance(features, nn.Module) else model


def input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` the model says it is built for, or None."""
    shape = getattr(model, "input_shape", None)
    return tuple(int(v) for v in shape) if isinstance(shape, (tuple, list)) and len(shape) == 3 else None


def init_from_data(model: nn.Module, images: torch.Tensor) -> None:
    """Let the model set itself up from normalized training images, if it wants to (airbench's whitening)."""
    hook = getattr(model, "init_from_data", None)
    if callable(hook):
        hook(images)


def start_epoch(model: nn.Module, epoch: int) -> None:
    """Tell the model an epoch (1-based) begins, if it has a per-epoch rule (airbench: freeze the whitening bias)."""
    hook = getattr(model, "start_epoch", None)
    if callable(hook):
        hook(epoch)


# --------------------------------------------------------------------------- the one entry point


def build(name: str, options: dict, num_classes: int, input_shape: tuple) -> nn.Module:
    """The module a ``[model]`` table describes (``name`` plus its other keys as ``options``), for
    ``num_classes`` classes and images of ``input_shape`` (C, H, W)."""
    _check_num_classes(num_classes)
    options = dict(options)
    if "layers" in options:
        return _build_design(name, options, num_classes, input_shape)
    if is_reference(name):
        return _call_reference(name, options, num_classes)
    return create_model(name, num_classes, **options)


DESIGN_KEYS = [k for k in inspect.signature(build_design).parameters if k not in ("num_classes", "input_shape")]


def _build_design(name: str, options: dict, num_classes: int, input_shape: tuple) -> nn.Module:
    if name in MODELS or is_reference(name):
        what = "a zoo model" if name in MODELS else "a Python function"
        raise CnnlabError(f"[model] has layers, so its name is only a label, but {name!r} names {what}; "
                          f"drop layers to use {name!r}, or give the design another name")
    unknown = sorted(set(options) - set(DESIGN_KEYS))
    if unknown:
        raise CnnlabError(f"unknown [model] key {unknown[0]!r} for a layer design; valid keys: name, "
                          f"{', '.join(DESIGN_KEYS)}, max_params, max_macs")
    return build_design(num_classes=num_classes, input_shape=tuple(input_shape), **options)


def is_reference(name: str) -> bool:
    """``"file.py:function"`` or ``"package.module:function"`` (a zoo name has no colon)."""
    return ":" in name


def label(name: str) -> str:
    """A short name for tables: ``/home/me/nets/my_nets.py:build`` -> ``my_nets.py:build``."""
    ref = file_reference(name)
    return f"{ref[0].name}:{ref[1]}" if ref is not None else name


def load_reference(ref: str) -> Callable:
    """The function a reference names, importing its file or module; one-line errors for each way it fails."""
    target, _, fn_name = ref.rpartition(":")
    if not target or not fn_name.isidentifier():
        raise CnnlabError(f"[model] name = {ref!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    file = file_reference(ref)
    module = _import_file(file[0]) if file is not None else _import_module(target)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise CnnlabError(f"{target} has no function {fn_name!r}; its functions: {', '.join(found) or '(none)'}")
    return fn


def _import_file(path: Path):
    if not path.is_file():
        raise CnnlabError(f"{path}: no such file; [model] name takes 'path/to/file.py:function', the path "
                          f"relative to the recipe's folder or the working directory")
    module_name = f"cnnlab_user_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as an import would: dataclasses and pickle look classes up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file failed: say where, in one line
        del sys.modules[module_name]
        raise CnnlabError(f"{path} raised {describe_exception(e, path)} while being imported; fix the file") from None
    return module


def _import_module(target: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise CnnlabError(f"no module named {e.name!r} (from [model] name {target!r}); check the name, "
                              f"install the package, or give a file path 'path/to/file.py:function'") from None
        raise CnnlabError(f"module {target} raised {describe_exception(e, None)} while being imported; fix it") from None
    except Exception as e:  # the user's module failed: say where, in one line
        raise CnnlabError(f"module {target} raised {describe_exception(e, None)} while being imported; fix it") from None


def describe_exception(e: Exception, path: Path | None = None) -> str:
    """``NameError: name 'nn' is not defined (my_nets.py line 7)``: the innermost frame in ``path``
    (default: the innermost outside torch), for a one-line error about someone's code."""
    frames = traceback.extract_tb(e.__traceback__)
    torch_dir = Path(torch.__file__).parent
    mine = [f for f in frames if (Path(f.filename).resolve() == path.resolve() if path is not None
                                  else torch_dir not in Path(f.filename).resolve().parents)]
    frames = mine or frames
    at = f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})" if frames else ""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}{': ' + text if text else ''}{at}"


def _call_reference(ref: str, options: dict, num_classes: int) -> nn.Module:
    fn = load_reference(ref)
    try:
        inspect.signature(fn).bind(num_classes=num_classes, **options)
    except TypeError as e:
        params = ", ".join(inspect.signature(fn).parameters)
        given = ", ".join(["num_classes", *options])
        raise CnnlabError(f"{label(ref)} cannot take ({given}): {e}; its parameters are ({params}); give it "
                          f"num_classes and one parameter per other [model] key") from None
    try:
        model = fn(num_classes=num_classes, **options)
    except CnnlabError:
        raise
    except Exception as e:  # the user's function failed: say where, in one line
        path = Path(inspect.getsourcefile(fn) or "")
        raise CnnlabError(f"{label(ref)} raised {describe_exception(e, path)}; fix the function") from None
    if not isinstance(model, nn.Module):
        raise CnnlabError(f"{label(ref)} returned a {type(model).__name__}, not a torch.nn.Module; return the "
                          f"network itself (e.g. an nn.Sequential)")
    return model


def source(name: str) -> dict | None:
    """What a checkpoint keeps to rebuild a model from a Python reference: the reference, the file
    it lives in and that file's sha256 (None for zoo models and designs: their config says it all)."""
    if not is_reference(name):
        return None
    file = file_reference(name)
    if file is not None:
        path = file[0].resolve()
    else:
        spec = importlib.util.find_spec(name.rpartition(":")[0])
        path = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        return {"ref": name, "path": None, "sha256": None}
    return {"ref": name, "path": str(path), "sha256": _sha256(path)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def source_changed(record: dict | None) -> str | None:
    """How the file a checkpoint's model was built from (its ``source`` record) differs now, or None."""
    path = (record or {}).get("path")
    if not path or not record.get("sha256") or not Path(path).is_file():
        return None  # a zoo model or a design; a missing file is reported when the model is built
    now = _sha256(Path(path))
    if now == record["sha256"]:
        return None
    return f"{path} changed since the checkpoint was saved (sha256 {record['sha256'][:12]} -> {now[:12]})"


# --------------------------------------------------------------------------- zoo option checks


def _check_width(model: str, width) -> None:
    if not (isinstance(width, (int, float)) and 0.25 <= width <= 4):
        raise CnnlabError(f"width={width!r} for {model!r} is out of range; use a multiplier in [0.25, 4]")


def _check_probability(model: str, key: str, value) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise CnnlabError(f"{key}={value!r} for {model!r} is out of range; use a probability in [0, 1)")


def _check_pool(model: str, pool) -> None:
    if pool not in ("avg", "max"):
        raise CnnlabError(f"pool={pool!r} for {model!r} is not valid; use 'avg' or 'max'")


def _check_positive(model: str, key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CnnlabError(f"{key}={value!r} for {model!r} must be a number")
    if value <= 0:
        raise CnnlabError(f"{key}={value!r} must be > 0")


def _w(channels: int, width: float) -> int:
    return max(1, round(channels * width))


# --------------------------------------------------------------------------- MNIST (seed 002, Week 2)


def _mnist_net(chans: dict, num_classes: int, dropout: float, pool: str, width: float, name: str) -> Net:
    """conv-BN-ReLU-drop blocks, maxpool + 1x1 transition, GAP head with a 1x1 conv to classes."""
    _check_probability(name, "dropout", dropout)
    _check_pool(name, pool)
    _check_width(name, width)
    c1, c2, t, c3 = (_w(chans[k], width) for k in ("c1", "c2", "t", "c3"))
    features = nn.Sequential(
        conv_bn(1, c1, padding=0, dropout=dropout),  # 28 -> 26, RF 3
        conv_bn(c1, c2, padding=0, dropout=dropout),  # 26 -> 24, RF 5
        nn.MaxPool2d(2),  # 24 -> 12, RF 6
        conv_bn(c2, t, k=1, padding=0),  # transition 1x1
        conv_bn(t, c3, padding=0, dropout=dropout),  # 12 -> 10, RF 10
        conv_bn(c3, c3, padding=0, dropout=dropout),  # 10 -> 8, RF 14
        conv_bn(c3, c3, padding=0, dropout=dropout),  # 8 -> 6, RF 18
        *([conv_bn(c3, c3, padding=1, dropout=dropout)] if chans["extra"] else []),  # 6 -> 6, RF 22
    )
    head = nn.Sequential(GlobalPool(pool, flatten=False), nn.Conv2d(c3, num_classes, 1, bias=False), nn.Flatten())
    return Net(features, head)


@register("mnist_tiny", (1, 28, 28), "seed 002 (Week 2)", "MNIST <15k: 3x3 conv-BN-ReLU-drop, maxpool+1x1, GAP, no dense",
          budget=(10_000, 14_999))
def mnist_tiny(num_classes: int = 10, dropout: float = 0.05, pool: str = "avg", width: float = 1.0) -> nn.Module:
    """16 -> 24, maxpool, 1x1 -> 16, four 3x3 convs of 16 (last padded), GAP, 1x1 to classes (13,600 params)."""
    return _mnist_net(dict(c1=16, c2=24, t=16, c3=16, extra=True), num_classes, dropout, pool, width, "mnist_tiny")


@register("mnist_8k", (1, 28, 28), "seed 002 (Week 2)", "MNIST <8k: like mnist_tiny, narrower and one conv fewer",
          budget=(5_000, 7_999))
def mnist_8k(num_classes: int = 10, dropout: float = 0.05, pool: str = "avg", width: float = 1.0) -> nn.Module:
    """8 -> 16, maxpool, 1x1 -> 8, three 3x3 convs of 16, GAP, 1x1 to classes (7,432 params)."""
    return _mnist_net(dict(c1=8, c2=16, t=8, c3=16, extra=False), num_classes, dropout, pool, width, "mnist_8k")


@register("mnist_fast", (1, 28, 28), "cnnlab (for speed)", "MNIST <15k built for CPU speed: 24x24 centre, space-to-depth",
          budget=(10_000, 14_999))
def mnist_fast(num_classes: int = 10, dropout: float = 0.0, pool: str = "avg", width: float = 1.0,
               crop: int = 24) -> nn.Module:
    """Built for time to 99.4% on a CPU, where the element-wise work on large maps (BatchNorm,
    ReLU, pooling) costs as much as the convolutions:

    * the central ``crop`` x ``crop`` pixels only (MNIST digits sit in a centred 20x20 box: 24 keeps
      99.8% of the ink), 0.73x the pixels of the full image for every layer (1.4x faster per step);
    * a 2x2 space-to-depth, so no layer runs at full resolution;
    * 16 -> 16 at 12x12, maxpool, 16 -> 32 at 6x6, 32 -> 16 at 4x4 ('valid'), GAP, 1x1 to classes.

    RF 28 before the GAP, 40 after; 12,416 trainable parameters."""
    _check_probability("mnist_fast", "dropout", dropout)
    _check_pool("mnist_fast", pool)
    _check_width("mnist_fast", width)
    if not (isinstance(crop, int) and not isinstance(crop, bool) and 12 <= crop <= 28 and crop % 2 == 0):
        raise CnnlabError(f"crop={crop!r} for mnist_fast must be an even number of pixels from 12 to 28")
    a, b, c, d = (_w(ch, width) for ch in (16, 16, 32, 16))
    features = nn.Sequential(
        CenterCrop(crop),  # 28 -> 24
        nn.PixelUnshuffle(2),  # 1x24x24 -> 4x12x12, RF 2, jump 2
        conv_bn(4, a, dropout=dropout),  # 12, RF 6
        conv_bn(a, b, dropout=dropout),  # 12, RF 10
        nn.MaxPool2d(2),  # 6, RF 12, jump 4
        conv_bn(b, c, dropout=dropout),  # 6, RF 20
        conv_bn(c, d, padding=0),  # 4, RF 28
    )
    head = nn.Sequential(GlobalPool(pool, flatten=False), nn.Conv2d(d, num_classes, 1, bias=False), nn.Flatten())
    return Net(features, head)


# --------------------------------------------------------------------------- CIFAR (seed 002, Week 3)


def _sep_bn(c_in: int, c_out: int, padding: int, dropout: float) -> ConvBlock:
    """Keras SeparableConv2D (bias on the pointwise) -> BN(eps 1e-3, Keras default) -> ReLU -> Dropout."""
    layers = [SeparableConv2d(c_in, c_out, 3, padding=padding), nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01), nn.ReLU()]
    return ConvBlock(*layers, Dropout(dropout)) if dropout > 0 else ConvBlock(*layers)


@register("cifar_sep92k", (3, 32, 32), "seed 002 (Week 3)", "the Keras SeparableConv2D net, 92,901 params (Keras count)",
          budget=(91_237, 91_237))
def cifar_sep92k(num_classes: int = 10, dropout: float = 0.1, dropout_lin: float = 0.25) -> nn.Module:
    """Exact port of the seed's Keras Sequential net. BN uses Keras defaults (eps 1e-3, momentum 0.99 =
    PyTorch 0.01). ``dropout`` is the seed's p_conv, ``dropout_lin`` its p_lin (values not given in the
    seed; 0.1 / 0.25 chosen)."""
    _check_probability("cifar_sep92k", "dropout", dropout)
    _check_probability("cifar_sep92k", "dropout_lin", dropout_lin)
    features = nn.Sequential(
        _sep_bn(3, 64, 1, dropout),  # 32
        _sep_bn(64, 64, 0, dropout),  # 30
        nn.MaxPool2d(2),  # 15
        _sep_bn(64, 64, 1, dropout),  # 15
        _sep_bn(64, 128, 0, dropout),  # 13
        nn.MaxPool2d(2),  # 6
        _sep_bn(128, 128, 1, dropout),  # 6
        _sep_bn(128, 128, 0, dropout),  # 4
    )
    dense = [nn.Linear(128, 256), nn.BatchNorm1d(256, eps=1e-3, momentum=0.01), nn.ReLU()]
    head = nn.Sequential(GlobalPool("avg"), *dense, *([Dropout(dropout_lin)] if dropout_lin > 0 else []),
                         nn.Linear(256, num_classes))
    return Net(features, head)


# --------------------------------------------------------------------------- CIFAR (seed 000)


def _dw_bn(c_in: int, c_out: int, padding: int) -> nn.Sequential:
    """Depthwise 3x3 with depth multiplier c_out / c_in (groups=c_in), then BN-ReLU."""
    return conv_bn(c_in, c_out, padding=padding, groups=c_in)


@register("cifar_dw56k", (3, 32, 32), "seed 000 (Assignment 6A)", "depthwise-conv CIFAR net, 84.4% with 56k params",
          budget=(50_000, 60_000))
def cifar_dw56k(num_classes: int = 10) -> nn.Module:
    """Seed 000's 'winning architecture'. Choices (the seed gives only the layer list):

    * ``DepthConv(n)`` is read as a Keras ``DepthwiseConv2D`` with depth multiplier 2 (each input
      channel -> 2 output channels, ``groups=c_in``), which is what gives the seed's ~56k params; a
      depthwise-separable conv (depthwise + pointwise to n) would give ~111k.
    * every conv except the output one is conv(bias=False)-BN-ReLU.
    * unpadded convs are 'valid'; ``MaxPool(2, padded)`` is Keras 'same' pooling = ``ceil_mode``.
      Spatial: 32 ->30 ->28 ->26 ->26, pool 13, block 2 keeps 13, pool (ceil) 7, 7 ->7 ->5,
      so the output ``Conv(10, 5x5)`` maps 5x5 -> 1x1 (with bias), then Flatten.
    """
    features = nn.Sequential(
        conv_bn(3, 32, padding=0),  # 30
        _dw_bn(32, 64, 0),  # 28
        _dw_bn(64, 128, 0),  # 26
        _dw_bn(128, 256, 1),  # 26
        nn.MaxPool2d(2),  # 13
        conv_bn(256, 32, k=1),
        conv_bn(32, 32, padding=1),
        _dw_bn(32, 64, 1),
        _dw_bn(64, 128, 1),
        nn.MaxPool2d(2, ceil_mode=True),  # 7
        conv_bn(128, 32, k=1),
        conv_bn(32, 32, padding=1),
        _dw_bn(32, 64, 1),
        _dw_bn(64, 128, 0),  # 5
        conv_bn(128, 32, k=1),
    )
    head = nn.Sequential(nn.Conv2d(32, num_classes, 5), nn.Flatten())
    return Net(features, head)


# --------------------------------------------------------------------------- ResNet9 / DavidNet (seed 001)


@register("resnet9", (3, 32, 32), "seed 001 (Assignment 14)", "DavidNet / resnet_small (Keras), 6,577,600 params",
          budget=(6_573_120, 6_573_120))
def resnet9(num_classes: int = 10, width: float = 1.0, dropout: float = 0.1, pool: str = "max",
            bn_momentum_keras: float = 0.1, scale: float = 1.0) -> nn.Module:
    """The seed's Keras ``resnet_small``: 3x3 convs without bias, BN eps 1e-5, Keras momentum 0.1
    (= PyTorch momentum 0.9), final MaxPool(4) (``pool='avg'`` for AvgPool(4)), Linear(512, 10, bias=False),
    logits times ``scale`` (DAWNBench used 0.125)."""
    _check_width("resnet9", width)
    _check_probability("resnet9", "dropout", dropout)
    _check_pool("resnet9", pool)
    _check_positive("resnet9", "scale", scale)
    m = bn_momentum_keras
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m < 1:
        raise CnnlabError("bn_momentum_keras must be in [0, 1) (Keras convention: moving = m*moving + (1-m)*batch)")
    c = {k: _w(v, width) for k, v in dict(prep=64, l1=128, l2=256, l3=512).items()}

    def block(c_in, c_out, drop=0.0):
        return conv_bn(c_in, c_out, dropout=drop, bn_momentum=1 - bn_momentum_keras, bn_eps=1e-5)

    features = nn.Sequential(
        block(3, c["prep"]),
        block(c["prep"], c["l1"]),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(block(c["l1"], c["l1"], dropout), block(c["l1"], c["l1"]))),
        block(c["l1"], c["l2"]),
        nn.MaxPool2d(2),
        block(c["l2"], c["l3"]),
        nn.MaxPool2d(2),
        Residual(nn.Sequential(block(c["l3"], c["l3"], dropout), block(c["l3"], c["l3"]))),
    )
    head = nn.Sequential(nn.MaxPool2d(4) if pool == "max" else nn.AvgPool2d(4), nn.Flatten(),
                         nn.Linear(c["l3"], num_classes, bias=False), Mul(scale))
    return Net(features, head)


# --------------------------------------------------------------------------- ERA custom ResNet (seed 003)


@register("resnet_custom", (3, 32, 32), "seed 003 (ERA Session 10)", "custom ResNet (conv-pool-BN-ReLU + res blocks)",
          budget=(6_570_000, 6_580_000))
def resnet_custom(num_classes: int = 10, dropout: float = 0.0, downsample: str = "maxpool", width: float = 1.0) -> nn.Module:
    """PrepLayer conv64; Layer1 conv128-MaxPool-BN-ReLU + ResBlock(128); Layer2 conv256-MaxPool-BN-ReLU;
    Layer3 conv512-MaxPool-BN-ReLU + ResBlock(512); MaxPool(4); FC 512 -> classes (with bias).

    ``downsample`` (seed 003 mentions strided and dilated convs) replaces each conv+MaxPool(2) with
    'strided': a 3x3 conv with stride 2, or 'dilated': a 3x3 conv with stride 2 and dilation 2 (pad 2);
    both halve the map with the same parameter count; 'dilated' sees a wider context."""
    _check_probability("resnet_custom", "dropout", dropout)
    _check_width("resnet_custom", width)
    if downsample not in ("maxpool", "strided", "dilated"):
        raise CnnlabError(f"downsample={downsample!r} is not valid; use 'maxpool', 'strided' or 'dilated'")
    c = {k: _w(v, width) for k, v in dict(prep=64, l1=128, l2=256, l3=512).items()}

    def down(c_in, c_out):
        if downsample == "maxpool":
            return conv_bn(c_in, c_out, pool=2, dropout=dropout)
        if downsample == "strided":
            return conv_bn(c_in, c_out, stride=2, padding=1, dropout=dropout)
        return conv_bn(c_in, c_out, stride=2, dilation=2, padding=2, dropout=dropout)

    def res(ch):
        return Residual(nn.Sequential(conv_bn(ch, ch, dropout=dropout), conv_bn(ch, ch, dropout=dropout)))

    features = nn.Sequential(
        conv_bn(3, c["prep"], dropout=dropout),
        down(c["prep"], c["l1"]),
        res(c["l1"]),
        down(c["l1"], c["l2"]),
        down(c["l2"], c["l3"]),
        res(c["l3"]),
    )
    head = nn.Sequential(nn.MaxPool2d(4), nn.Flatten(), nn.Linear(c["l3"], num_classes))
    return Net(features, head)


# --------------------------------------------------------------------------- airbench94


def _air_bn(c: int) -> nn.BatchNorm2d:
    """airbench BN: their momentum 0.6 = PyTorch 0.4, eps 1e-12, weight frozen at 1, bias trainable."""
    bn = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


def _air_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """3x3 conv whose first ``c_in`` filters start as the identity (airbench's implicit residual)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(c_in, c_out)])
    return conv


def _air_group(c_in: int, c_out: int) -> ConvBlock:
    """conv-MaxPool-BN-GELU-conv-BN-GELU; a ConvBlock, so each BN -> GELU trains as one fused kernel on a CPU."""
    return ConvBlock(
        _air_conv(c_in, c_out), nn.MaxPool2d(2), _air_bn(c_out), nn.GELU(),
        _air_conv(c_out, c_out), _air_bn(c_out), nn.GELU(),
    )


class AirbenchNet(Net):
    """``features[0]`` is a patch-whitening conv (2x2 in airbench94, 3x3 in resnet9_page); call
    ``init_from_data`` before training.
    Its bias trains for the first ``whiten_bias_epochs`` epochs only (``start_epoch``)."""

    whiten_bias_epochs = 3

    def start_epoch(self, epoch: int) -> None:
        """Called by the training loop before each epoch (1-based): freezes the whitening bias after
        ``whiten_bias_epochs`` epochs, as airbench does (also after a resume)."""
        self.features[0].bias.requires_grad_(epoch <= self.whiten_bias_epochs)

    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening conv from kernel-sized patches of ``images`` (N, C, H, W, normalized) and freeze it.

        Filters are the eigenvectors of the (uncentered) patch covariance scaled by 1/sqrt(eig + eps),
        largest eigenvalue first, followed by their negatives; the bias is zeroed (it stays trainable).
        """
        conv = self.features[0]
        c, (kh, kw) = conv.in_channels, conv.kernel_size
        if images.dim() != 4 or images.shape[1] != c:
            raise CnnlabError(f"init_from_data needs images shaped (N, {c}, H, W); got {tuple(images.shape)}")
        with torch.no_grad():
            patches = images.float().unfold(2, kh, 1).unfold(3, kw, 1)  # N, C, H', W', kh, kw
            flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw).double()
            cov = flat.T @ flat / flat.shape[0]
            eig, vec = torch.linalg.eigh(cov)  # ascending
            eig, vec = eig.flip(0), vec.flip(1)
            filters = (vec.T / torch.sqrt(eig.clamp_min(0) + eps)[:, None]).reshape(-1, c, kh, kw)
            conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
            conv.bias.zero_()
        conv.weight.requires_grad_(False)


@register("airbench94", (3, 32, 32), "airbench paper (Jordan 2024)", "airbench94: whitening conv + 3 conv groups, GELU",
          budget=(1_960_000, 1_980_000))
def airbench94(num_classes: int = 10, scale: float = 1 / 9, whiten_bias_epochs: int = 3) -> nn.Module:
    """Frozen 2x2 whitening conv 3 -> 24 (no padding, 32 -> 31; its bias trains for the first
    ``whiten_bias_epochs`` epochs), GELU, conv groups 64/256/256 (conv-MaxPool-BN-GELU-conv-BN-GELU,
    31 -> 15 -> 7 -> 3), global max pool, Linear(256, classes, bias=False), times ``scale``."""
    _check_positive("airbench94", "scale", scale)
    n = whiten_bias_epochs
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise CnnlabError(f"whiten_bias_epochs={n!r} for 'airbench94' must be a whole number of epochs >= 0")
    whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    whiten.weight.requires_grad_(False)
    features = nn.Sequential(whiten, nn.GELU(), _air_group(24, 64), _air_group(64, 256), _air_group(256, 256))
    head = nn.Sequential(GlobalPool("max"), nn.Linear(256, num_classes, bias=False), Mul(scale))
    net = AirbenchNet(features, head)
    net.whiten_bias_epochs = whiten_bias_epochs
    return net


# --------------------------------------------------------------------------- ResNet9, Page's final version


@register("resnet9_page", (3, 32, 32), "How to train your ResNet (Page)",
          "ResNet9 with 3x3 patch whitening, max-pool before BN, frozen BN scales", budget=(6_570_000, 6_580_000))
def resnet9_page(num_classes: int = 10, scale: float = 0.125, whiten_bias_epochs: int = 3) -> nn.Module:
    """ResNet9 after Page's final "How to train your ResNet" post, with airbench's whitening: a frozen
    3x3 patch-whitening conv 3 -> 54 (27 eigen-filters and their negatives, eps 5e-4; its bias
    trains for ``whiten_bias_epochs`` epochs), ReLU, a 1x1 prep conv to 64 (Page: 27 filters, no
    negatives, eps 1e-2, straight into the 1x1 conv), then as seed 003's custom ResNet:
    conv128-MaxPool-BN-ReLU + residual block, conv256-MaxPool-BN-ReLU, conv512-MaxPool-BN-ReLU +
    residual block, MaxPool(4), Linear(512, classes, bias=False), logits times ``scale``. Every
    BatchNorm weight is frozen at 1 (their biases train), as Page's. ReLU, not his CELU, and plain
    BatchNorm, not his ghost BatchNorm, so the fused BN -> ReLU kernel runs. Call ``init_from_data``
    before training (the training loop does)."""
    _check_positive("resnet9_page", "scale", scale)
    n = whiten_bias_epochs
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise CnnlabError(f"whiten_bias_epochs={n!r} for 'resnet9_page' must be a whole number of epochs >= 0")

    def block(c_in: int, c_out: int, k: int = 3, pool: int = 0) -> ConvBlock:
        b = conv_bn(c_in, c_out, k=k, pool=pool)
        for m in b:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.requires_grad_(False)
        return b

    def res(c: int) -> Residual:
        return Residual(nn.Sequential(block(c, c), block(c, c)))

    whiten = nn.Conv2d(3, 54, 3, padding=1, bias=True)
    whiten.weight.requires_grad_(False)
    features = nn.Sequential(
        whiten, nn.ReLU(), block(54, 64, k=1),
        block(64, 128, pool=2), res(128),
        block(128, 256, pool=2),
        block(256, 512, pool=2), res(512),
    )
    head = nn.Sequential(nn.MaxPool2d(4), nn.Flatten(), nn.Linear(512, num_classes, bias=False), Mul(scale))
    net = AirbenchNet(features, head)
    net.whiten_bias_epochs = whiten_bias_epochs
    return net
