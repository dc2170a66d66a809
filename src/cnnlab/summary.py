"""Keras-style model summary: per-layer output shape, params, receptive field; totals and MACs.

Shapes come from forward hooks on every leaf module (and every module with parameters of its own),
registered in a context manager that always removes them. MACs are torch's ``FlopCounterMode``
count of one forward pass halved (2 FLOPs per multiply-accumulate of a convolution or matrix
product), so convolutions and matmuls called as functions count too.

Receptive fields come from a structural walk of the module tree, exact for what it recognises:
``nn.Sequential`` (and ``layers.ConvBlock``) composes its children, ``Residual`` takes the larger RF of identity and branch,
a ``layers.Net`` runs features then head, and convolutions (with dilation and stride), pooling,
space-to-depth, global pooling, Flatten, centre crops, padding and per-pixel layers (activations,
normalisation, dropout) are known. Anything else (a custom module, a container with its own
``forward``) makes the RF unknown from there on: shown as "?", never guessed. RF and jump are
reported along the height.

Parameter counts follow the Keras convention: non-trainable = frozen parameters + BatchNorm
running_mean / running_var (``num_batches_tracked`` is not counted); total = trainable + non-trainable.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cnnlab import models
from cnnlab.data import DATASETS, load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.layers import CenterCrop, ConvBlock, Dropout, GlobalPool, Mul, Net, Residual
from cnnlab.models import MODELS, create_model, get_spec, model_device
from cnnlab.tables import format_table

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# per-pixel layers: the receptive field passes through unchanged (normalisation statistics aside)
_PER_PIXEL = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Identity, Dropout, Mul, CenterCrop,
              nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU,
              nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
              nn.Softplus, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)


@dataclass
class Row:
    name: str
    type: str
    output_shape: tuple
    params: int
    rf: int | None
    jump: int | None


@dataclass
class Summary:
    rows: list[Row]
    total_params: int
    trainable_params: int
    non_trainable_params: int
    macs: int
    input_shape: tuple
    model_name: str = ""
    receptive_field: int | None = None  # RF of the model's output (None: unknown)
    output_shape: tuple = ()  # the model's output for one image, e.g. (10,)

    def to_text(self) -> str:
        head = ("Layer (type)", "Output Shape", "Param #", "RF", "Jump")
        body = [(f"{r.name} ({r.type})", str((None, *r.output_shape)), f"{r.params:,}",
                 "?" if r.rf is None else str(r.rf), "?" if r.jump is None else str(r.jump)) for r in self.rows]
        table = format_table(head, body, rule="=").split("\n")
        line = table[1]
        title = f'Model: "{self.model_name}"  input {self.input_shape}' if self.model_name else f"input {self.input_shape}"
        lines = [title, line, *table, line,
                 f"Total params: {self.total_params:,}",
                 f"Trainable params: {self.trainable_params:,}",
                 f"Non-trainable params: {self.non_trainable_params:,}",
                 f"MACs per image: {self.macs:,}"]
        lines.append(f"Receptive field: {self.receptive_field}" if self.receptive_field is not None else
                     "Receptive field: ? (a layer cnnlab cannot follow; see the rows marked ?)")
        return "\n".join(lines)


def count_params(model: nn.Module) -> tuple[int, int, int]:
    """(total, trainable, non_trainable) in the Keras convention."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable + frozen + _bn_stats(model), trainable, frozen + _bn_stats(model)


def _bn_stats(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n += m.running_mean.numel() + m.running_var.numel()
    return n


def _own_params(m: nn.Module) -> int:
    n = sum(p.numel() for p in m.parameters(recurse=False))
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
        n += m.running_mean.numel() + m.running_var.numel()
    return n


@contextlib.contextmanager
def _recording(model: nn.Module):
    """Hooks every leaf module and every module with parameters of its own; yields ``(records, state)``.
    Hooks are always removed on exit."""
    records: list[tuple[str, nn.Module, tuple, tuple]] = []  # name, module, in shape, out shape
    state: dict = {"entered": None, "in_shape": None}
    handles = []

    def pre(name):
        def hook(m, args):
            state["entered"], state["in_shape"] = (name, m), tuple(args[0].shape) if args else None
        return hook

    def post(name):
        def hook(m, args, out):
            if isinstance(out, torch.Tensor):
                records.append((name, m, tuple(args[0].shape) if args else (), tuple(out.shape)))
        return hook

    try:
        for name, m in model.named_modules():
            if name and (not list(m.children()) or next(m.parameters(recurse=False), None) is not None):
                handles.append(m.register_forward_pre_hook(pre(name)))
                handles.append(m.register_forward_hook(post(name)))
        yield records, state
    finally:
        for h in handles:
            h.remove()


def _explain(err: RuntimeError, state: dict, input_shape: tuple) -> CnnlabError:
    if state["entered"] is None:
        return CnnlabError(f"input shape {input_shape} does not fit the model: {str(err).splitlines()[0]}")
    name, m = state["entered"]
    shp = state["in_shape"]
    where = f"input shape {input_shape} does not fit the model: layer '{name}' ({type(m).__name__})"
    if isinstance(m, nn.Conv2d) and shp is not None and len(shp) == 4 and shp[1] != m.in_channels:
        return CnnlabError(f"{where} expects {m.in_channels} input channels but got {shp[1]}; "
                           f"use an input with the channels the model was built for")
    if isinstance(m, (nn.Conv2d, *_POOLS)) and shp is not None and len(shp) == 4:
        return CnnlabError(f"{where} got a {shp[2]}x{shp[3]} map, too small for its kernel; "
                           f"use a larger input (the model's own input shape)")
    if isinstance(m, nn.Linear) and shp is not None:
        return CnnlabError(f"{where} expects {m.in_features} input features but got {shp[-1]}; "
                           f"use the model's own input shape")
    return CnnlabError(f"{where} failed: {str(err).splitlines()[0]}")


# ----------------------------------------------------------------------------- receptive field


def _k(v) -> int:
    return v[0] if isinstance(v, tuple) else int(v)


def _runs_own_forward(m: nn.Module, cls: type) -> bool:
    """True when ``m`` is a ``cls`` whose forward is ``cls``'s own (a subclass may compute something else)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def _window(m: nn.Module, in_shape: tuple | None) -> tuple[int, int] | None:
    """(kernel, stride) along the height of a leaf that slides a window, (1, 1) for a per-pixel
    layer, None when cnnlab does not know what the layer does to the receptive field."""
    height = in_shape[2] if in_shape is not None and len(in_shape) == 4 else None
    if isinstance(m, nn.Conv2d):
        return _k(m.dilation) * (_k(m.kernel_size) - 1) + 1, _k(m.stride)
    if isinstance(m, _POOLS):
        return _k(getattr(m, "dilation", 1)) * (_k(m.kernel_size) - 1) + 1, _k(m.stride or m.kernel_size)
    if isinstance(m, nn.PixelUnshuffle):  # space-to-depth: a k x k window with stride k
        return m.downscale_factor, m.downscale_factor
    if isinstance(m, _PER_PIXEL):
        return 1, 1
    if isinstance(m, (GlobalPool, nn.Flatten, nn.Linear, *_ADAPTIVE)) and in_shape is not None and len(in_shape) == 2:
        return 1, 1  # on a vector: the map was already folded in
    if isinstance(m, GlobalPool) or (isinstance(m, nn.Flatten) and m.start_dim == 1):
        return (height, height) if height else None
    if isinstance(m, _ADAPTIVE) and height:
        out = m.output_size if isinstance(m.output_size, int) else m.output_size[0]
        out = height if out is None else out
        return (height // out, height // out) if height % out == 0 else None
    return None


def receptive_fields(model: nn.Module, in_shapes: dict[nn.Module, tuple] | None = None) -> dict[nn.Module, tuple]:
    """Walk the module tree; return ``{module: (rf, jump)}`` after every module visited, with
    ``(None, None)`` from the first module whose effect cnnlab does not know.

    ``in_shapes`` maps a module to its input shape ``(N, C, H, W)`` or ``(N, F)`` (global pooling
    and Flatten see the whole map; a Linear on a map is not followed)."""
    in_shapes = in_shapes or {}
    out: dict[nn.Module, tuple] = {}

    def walk(m: nn.Module, rf: int | None, jump: int | None) -> tuple[int | None, int | None]:
        if rf is None:
            pass
        elif _runs_own_forward(m, Residual):
            b_rf, b_jump = walk(m.branch, rf, jump)
            rf, jump = (max(rf, b_rf), b_jump) if b_rf is not None else (None, None)
        elif _runs_own_forward(m, nn.Sequential) or _runs_own_forward(m, ConvBlock):  # both compose in order
            for child in m:
                rf, jump = walk(child, rf, jump)
        elif _runs_own_forward(m, Net):
            rf, jump = walk(m.features, rf, jump)
            rf, jump = walk(m.head, rf, jump)
        elif not list(m.children()) and (w := _window(m, in_shapes.get(m))) is not None:
            rf, jump = rf + (w[0] - 1) * jump, jump * w[1]
        else:
            rf, jump = None, None
        for sub in m.modules():  # inside a module not followed, every layer is unknown too
            out.setdefault(sub, (None, None))
        out[m] = (rf, jump)
        return rf, jump

    walk(model, 1, 1)
    return out


# ----------------------------------------------------------------------------- public API


def summarize(model_or_name, input_shape=None, **options) -> Summary:
    """Summarize a model instance or a registered model name (``options`` go to ``create_model``).

    ``input_shape`` defaults to the model's own (the protocol's ``input_shape``). The model stays on
    its device: the probe image is made there.
    """
    name = ""
    if isinstance(model_or_name, str):
        name = model_or_name
        model = create_model(name, **options)
        input_shape = input_shape or get_spec(name).input_shape
    else:
        model = model_or_name
        input_shape = input_shape or models.input_shape(model)
        if input_shape is None:
            raise CnnlabError("summarize(model) needs input_shape=(C, H, W) for a model without an input_shape")
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise CnnlabError(f"input_shape {input_shape} must be (C, H, W) with positive sizes")
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=model_device(model))
    try:
        with _recording(model) as (records, state), torch.no_grad(), FlopCounterMode(display=False) as flops:
            try:
                y = model(x)
            except CnnlabError:
                raise
            except RuntimeError as err:
                raise _explain(err, state, input_shape) from err
            except Exception as err:  # a user's forward failed: one line saying where
                raise CnnlabError(f"the model's forward failed on a {'x'.join(map(str, input_shape))} input: "
                                  f"{models.describe_exception(err)}") from err
    finally:
        model.train(was_training)
    if not isinstance(y, torch.Tensor):
        raise CnnlabError(f"the model's forward returned a {type(y).__name__}, not a tensor of logits "
                          f"[N, num_classes]; return the logits alone")

    rfs = receptive_fields(model, {m: shp for _, m, shp, _ in records})
    rows = []
    for lname, m, _, oshape in records:
        rf, jump = rfs.get(m, (None, None))
        rows.append(Row(lname, type(m).__name__, oshape[1:], _own_params(m), rf, jump))
    total, trainable, non_trainable = count_params(model)
    macs = flops.get_total_flops() // 2  # FlopCounterMode counts 2 FLOPs per multiply-accumulate
    return Summary(rows, total, trainable, non_trainable, macs, input_shape, name, rfs[model][0], tuple(y.shape[1:]))


def check_model(model: nn.Module, name: str, input_shape: tuple, num_classes: int, data: str = "the data",
                max_params: int = 0, max_macs: int = 0) -> Summary:
    """The summary of ``model`` on ``input_shape`` images, after the checks every model must pass:
    the channel count it declares, a forward pass that fits, logits ``[N, num_classes]``, and the
    budgets (Keras total parameters, MACs per image; 0 = none). Each failure is a one-line error."""
    label = models.label(name)
    declared = models.input_shape(model)
    if declared is not None and declared[0] != input_shape[0]:
        raise CnnlabError(f"model {label} takes {declared[0]}-channel images but {data} has {input_shape[0]} "
                          f"channel(s); choose a model for {input_shape[0]}-channel input (`cnnlab models`)")
    s = summarize(model, input_shape=input_shape)
    if s.output_shape != (num_classes,):
        size = f"images of the model's size ({'x'.join(map(str, declared))}) or " if declared else ""
        raise CnnlabError(f"model {label} gives outputs of shape {s.output_shape} on {data}'s "
                          f"{'x'.join(map(str, input_shape))} images, not {num_classes} class scores; use {size}"
                          f"a model with global pooling (or a head ending in {num_classes} logits)")
    if max_params and s.total_params > max_params:
        raise CnnlabError(f"model {label} has {s.total_params:,} parameters, over [model] max_params = "
                          f"{max_params:,}; make it smaller (fewer channels or layers) or raise max_params")
    if max_macs and s.macs > max_macs:
        raise CnnlabError(f"model {label} needs {s.macs:,} MACs per {'x'.join(map(str, input_shape))} image, "
                          f"over [model] max_macs = {max_macs:,}; make it cheaper (pool earlier, fewer channels) "
                          f"or raise max_macs")
    return s


def data_facts(data_cfg) -> tuple[tuple[int, int, int], int, str]:
    """(image shape, number of classes, name) of a recipe's dataset: from the registry when it knows
    them, else from the dataset already in the cache (an image folder)."""
    info = DATASETS.get(data_cfg.dataset)
    if info is not None and info.classes:
        return info.shape, len(info.classes), info.name
    ds = load_dataset(data_cfg.dataset, root=data_cfg.root or None, acquire=False, log=lambda *a, **k: None)
    return ds.shape, ds.num_classes, ds.name


def recipe_model(cfg) -> tuple[nn.Module, Summary]:
    """The model a recipe describes and its checked summary, for the recipe's dataset, without
    training (``cnnlab summary RECIPE.toml``)."""
    shape, num_classes, data = data_facts(cfg.data)
    model = models.build(cfg.model.name, cfg.model.options, num_classes, shape)
    s = check_model(model, cfg.model.name, shape, num_classes, data, cfg.model.max_params, cfg.model.max_macs)
    s.model_name = models.label(cfg.model.name)
    return model, s


def check_budget(cfg) -> None:
    """``[model] max_params`` / ``max_macs`` checked before any data is loaded, for a dataset whose
    shape and classes the registry knows (others are checked once their data is read)."""
    info = DATASETS.get(cfg.data.dataset)
    if (cfg.model.max_params or cfg.model.max_macs) and info is not None and info.classes:
        recipe_model(cfg)


def models_table() -> str:
    """One line per registered model: name, input, classes, params, MACs, source."""
    head = ("model", "input", "classes", "params", "trainable", "MACs/image", "source")
    body = []
    for name in sorted(MODELS):
        spec = MODELS[name]
        s = summarize(name)
        body.append((name, "x".join(map(str, spec.input_shape)), str(spec.num_classes), f"{s.total_params:,}",
                     f"{s.trainable_params:,}", f"{s.macs:,}", spec.source))
    return format_table(head, body, left=(0, 1, 6))
