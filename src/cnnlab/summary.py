"""Keras-style model summary: per-layer output shape, params, receptive field; totals and MACs.

Shapes and MACs come from forward hooks on leaf modules (registered in a context manager that always
removes them). Receptive fields come from a structural walk of the module tree: ``nn.Sequential``
composes its children, ``Residual`` takes the larger RF of identity and branch, models with
``features``/``head`` run features then head, and any other container is assumed to run its children
in registration order. Kernels are assumed square; RF and jump are reported along the height.

Parameter counts follow the Keras convention: non-trainable = frozen parameters + BatchNorm
running_mean / running_var (``num_batches_tracked`` is not counted); total = trainable + non-trainable.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.layers import GlobalPool, Residual
from cnnlab.models import MODELS, create_model, get_spec, model_device
from cnnlab.tables import format_table

_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


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
    receptive_field: int | None = None  # RF of the last layer that has one
    output_shape: tuple = ()  # the model's output for one image, e.g. (10,)

    def to_text(self) -> str:
        head = ("Layer (type)", "Output Shape", "Param #", "RF", "Jump")
        body = [(f"{r.name} ({r.type})", str((None, *r.output_shape)), f"{r.params:,}",
                 "" if r.rf is None else str(r.rf), "" if r.jump is None else str(r.jump)) for r in self.rows]
        table = format_table(head, body, rule="=").split("\n")
        line = table[1]
        title = f'Model: "{self.model_name}"  input {self.input_shape}' if self.model_name else f"input {self.input_shape}"
        lines = [title, line, *table, line,
                 f"Total params: {self.total_params:,}",
                 f"Trainable params: {self.trainable_params:,}",
                 f"Non-trainable params: {self.non_trainable_params:,}",
                 f"MACs per image: {self.macs:,}"]
        if self.receptive_field is not None:
            lines.append(f"Receptive field: {self.receptive_field}")
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


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call, for the whole batch."""
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return out.numel() * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return out.numel() * m.in_features
    return 0


@contextlib.contextmanager
def _recording(model: nn.Module):
    """Hooks every leaf module; yields ``(records, state)``. Hooks are always removed on exit."""
    records: list[tuple[str, nn.Module, tuple, tuple, int]] = []  # name, module, in shape, out shape, macs
    state: dict = {"entered": None, "in_shape": None}
    handles = []

    def pre(name):
        def hook(m, args):
            state["entered"], state["in_shape"] = (name, m), tuple(args[0].shape) if args else None
        return hook

    def post(name):
        def hook(m, args, out):
            if isinstance(out, torch.Tensor):
                records.append((name, m, tuple(args[0].shape), tuple(out.shape), _macs(m, out)))
        return hook

    try:
        for name, m in model.named_modules():
            if name and not list(m.children()):
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


def receptive_fields(model: nn.Module, in_sizes: dict[nn.Module, int] | None = None) -> dict[nn.Module, tuple[int, int]]:
    """Walk the module tree; return ``{module: (rf, jump)}`` after every module visited.

    ``in_sizes`` maps a module to its input height (needed for adaptive/global pooling and Flatten,
    which see the whole map: kernel = stride = input size).
    """
    in_sizes = in_sizes or {}
    out: dict[nn.Module, tuple[int, int]] = {}

    def walk(m: nn.Module, rf: int, jump: int) -> tuple[int, int]:
        if isinstance(m, Residual):
            b_rf, b_jump = walk(m.branch, rf, jump)
            rf, jump = max(rf, b_rf), b_jump
        elif isinstance(m, nn.Sequential):
            for child in m:
                rf, jump = walk(child, rf, jump)
        elif hasattr(m, "features") and hasattr(m, "head"):
            rf, jump = walk(m.features, rf, jump)
            rf, jump = walk(m.head, rf, jump)
        elif isinstance(m, nn.Conv2d):
            k = _k(m.dilation) * (_k(m.kernel_size) - 1) + 1
            rf, jump = rf + (k - 1) * jump, jump * _k(m.stride)
        elif isinstance(m, nn.PixelUnshuffle):  # space-to-depth: a k x k, stride k window
            f = m.downscale_factor
            rf, jump = rf + (f - 1) * jump, jump * f
        elif isinstance(m, _POOLS):
            k, s = _k(m.kernel_size), _k(m.stride or m.kernel_size)
            k = _k(getattr(m, "dilation", 1)) * (k - 1) + 1
            rf, jump = rf + (k - 1) * jump, jump * s
        elif isinstance(m, (*_ADAPTIVE, GlobalPool, nn.Flatten)):
            size = in_sizes.get(m, 1)
            rf, jump = rf + (size - 1) * jump, jump * size
        elif list(m.children()):
            for child in m.children():
                rf, jump = walk(child, rf, jump)
        out[m] = (rf, jump)
        return rf, jump

    walk(model, 1, 1)
    return out


# ----------------------------------------------------------------------------- public API


def summarize(model_or_name, input_shape=None, **options) -> Summary:
    """Summarize a model instance or a registered model name (``options`` go to ``create_model``).

    The model stays on its device: the probe image is made there.
    """
    name = ""
    if isinstance(model_or_name, str):
        name = model_or_name
        model = create_model(name, **options)
        input_shape = input_shape or get_spec(name).input_shape
    else:
        model = model_or_name
        if input_shape is None:
            spec = MODELS.get(getattr(model, "_cnnlab_name", None))
            if spec is None:
                raise CnnlabError("summarize(model) needs input_shape=(C, H, W) for a model instance")
            input_shape = spec.input_shape
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise CnnlabError(f"input_shape {input_shape} must be (C, H, W) with positive sizes")
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=model_device(model))
    try:
        with _recording(model) as (records, state), torch.no_grad():
            try:
                y = model(x)
            except RuntimeError as err:
                raise _explain(err, state, input_shape) from err
    finally:
        model.train(was_training)

    in_sizes = {m: (shp[2] if len(shp) == 4 else 1) for _, m, shp, _, _ in records}
    rfs = receptive_fields(model, in_sizes)
    rows = []
    for lname, m, _, oshape, _ in records:
        rf, jump = rfs.get(m, (None, None))
        rows.append(Row(lname, type(m).__name__, oshape[1:], _own_params(m), rf, jump))
    total, trainable, non_trainable = count_params(model)
    final_rf = next((r.rf for r in reversed(rows) if r.rf is not None), None)
    return Summary(rows, total, trainable, non_trainable, sum(r[4] for r in records), input_shape, name, final_rf,
                   tuple(y.shape[1:]))


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
