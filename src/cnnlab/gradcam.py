"""Grad-CAM and feature maps, with hooks that live only inside a ``with`` block.

``GradCAM(model, layer)`` is a context manager: entering it registers one forward hook (keeps the
target layer's output) and one full backward hook (keeps the gradient of the score with respect to
that output); leaving it removes both, also when an exception is raised inside the block.

    with GradCAM(model) as cam:
        maps = cam(x, classes)  # [N, H, W] in [0, 1], upsampled to the input size

Grad-CAM (Selvaraju et al. 2017): weight each channel of the target layer's output A_k by the
spatial mean of d score_c / d A_k, sum, ReLU, then scale each map by its maximum.

The default target layer is the last child of ``model.features`` whose output is still spatial
(H and W > 1), found with a dry forward pass; for a model without ``features`` (any
``nn.Sequential``), the last layer with a spatial output. ``layer="features.3"`` names one from
``dict(model.named_modules())``. The model's parameters get no gradients (backward runs only to
a private copy of the input), its train/eval mode is restored, and the input is not modified.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.layers import CenterCrop
from cnnlab import models
from cnnlab.models import model_device


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool):
    """Put the model in train/eval mode for the block; restore its mode after."""
    was = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def _output_hooks(modules: dict[str, nn.Module]):
    """Forward hooks keeping each named module's output (detached); always removed on exit."""
    outputs: dict[str, torch.Tensor] = {}
    order: list[str] = []
    handles = []

    def keep(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                if name not in outputs:
                    order.append(name)
                outputs[name] = out.detach()
        return hook

    try:
        for name, m in modules.items():
            handles.append(m.register_forward_hook(keep(name)))
        yield outputs, order
    finally:
        for h in handles:
            h.remove()


def output_shapes(model: nn.Module, input_shape) -> tuple[dict[str, tuple], list[str]]:
    """Output shape of every named submodule for one zero image, and the order they ran in."""
    modules = {n: m for n, m in model.named_modules() if n}
    x = torch.zeros(1, *input_shape, device=model_device(model))
    with _output_hooks(modules) as (outputs, order), _mode(model, False), torch.no_grad():
        model(x)
    return {n: tuple(outputs[n].shape) for n in order}, order


def _is_spatial(shape: tuple) -> bool:
    return len(shape) == 4 and shape[2] > 1 and shape[3] > 1


def spatial_layers(model: nn.Module, input_shape) -> list[str]:
    """Names of the submodules whose output is a spatial map [N, C, H>1, W>1], in run order."""
    shapes, order = output_shapes(model, input_shape)
    return [n for n in order if _is_spatial(shapes[n])]


def default_layer(model: nn.Module, input_shape) -> str:
    """The last child of ``model.features`` with a spatial output (else the last spatial module)."""
    spatial = spatial_layers(model, input_shape)
    if not spatial:
        raise CnnlabError(f"{type(model).__name__} has no layer with a spatial output for input "
                          f"{tuple(input_shape)}; Grad-CAM needs a convolutional layer")
    in_features = [n for n in blocks(model) if n in spatial] if models.body(model) is not model else []
    return in_features[-1] if in_features else spatial[-1]


def blocks(model: nn.Module) -> list[str]:
    """Names of the children of the model's ``features`` (of the model itself when it has none)."""
    part = models.body(model)
    prefix = "" if part is model else next(n for n, m in model.named_modules() if m is part) + "."
    return [prefix + n for n, _ in part.named_children()]


def resolve_layer(model: nn.Module, layer: str | None, input_shape) -> str:
    """Check a layer name (or pick the default) against the model's spatial layers."""
    if layer is None:
        return default_layer(model, input_shape)
    valid = spatial_layers(model, input_shape)
    if layer not in valid:
        listed = ", ".join(valid) if valid else "(none)"
        raise CnnlabError(f"layer {layer!r} is not a spatial layer of {type(model).__name__}; "
                          f"choose one of: {listed}")
    return layer


class GradCAM:
    """Grad-CAM maps for a model; use as ``with GradCAM(model, layer) as cam: cam(x, classes)``.

    ``input_shape`` (C, H, W) is needed to find layers before the first call; it defaults to the
    registered model's shape, and otherwise the first call's input decides.
    """

    def __init__(self, model: nn.Module, layer: str | None = None, input_shape=None):
        self.model = model
        self.requested = layer
        self.input_shape = tuple(input_shape) if input_shape is not None else models.input_shape(model)
        self.layer: str | None = None
        self._handles: list = []
        self._activation: torch.Tensor | None = None
        self._gradient: torch.Tensor | None = None
        self._entered = False

    # -- hooks

    def __enter__(self) -> "GradCAM":
        self._entered = True
        if self.input_shape is not None:
            self._attach(self.input_shape)
        return self

    def __exit__(self, *exc) -> bool:
        self._release()
        self._entered = False
        return False

    def _attach(self, input_shape) -> None:
        self.layer = resolve_layer(self.model, self.requested, input_shape)
        module = dict(self.model.named_modules())[self.layer]
        try:
            self._handles.append(module.register_forward_hook(self._keep_activation))
            self._handles.append(module.register_full_backward_hook(self._keep_gradient))
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._activation = self._gradient = None

    def _keep_activation(self, module, args, out) -> None:
        self._activation = out.detach()

    def _keep_gradient(self, module, grad_input, grad_output) -> None:
        self._gradient = grad_output[0].detach()

    # -- maps

    def __call__(self, x: torch.Tensor, classes=None) -> torch.Tensor:
        """Maps [N, H, W] in [0, 1] for ``classes`` (one per image; default: the predicted class)."""
        if not self._entered:
            raise CnnlabError("GradCAM hooks are not registered; use it as `with GradCAM(model) as cam: cam(x)`")
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            raise CnnlabError(f"GradCAM input has shape {tuple(x.shape)}; expected [N, C, H, W] or [C, H, W]")
        if not self._handles:
            self._attach(tuple(x.shape[1:]))
        inp = x.detach().clone().to(model_device(self.model)).float().requires_grad_(True)
        with _mode(self.model, False), torch.enable_grad():
            logits = self.model(inp)
            if classes is None:
                classes = logits.argmax(1)
            classes = torch.as_tensor(classes, device=logits.device).long().reshape(-1)
            if classes.numel() == 1 and len(inp) > 1:
                classes = classes.expand(len(inp))
            if classes.numel() != len(inp):
                raise CnnlabError(f"GradCAM got {classes.numel()} classes for {len(inp)} images; pass one per image")
            score = logits.gather(1, classes[:, None]).sum()
            # Only the private input copy receives .grad: the model's parameters stay untouched.
            torch.autograd.backward(score, inputs=[inp])
        act, grad = self._activation, self._gradient
        self._activation = self._gradient = None
        if act is None or grad is None:
            raise CnnlabError(f"layer {self.layer!r} did not take part in the forward pass; choose another --layer")
        weights = grad.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act.float()).sum(1, keepdim=True))
        cam = _onto_input(cam, self.model, tuple(x.shape[-2:]))[:, 0]
        peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        return (cam / peak).clamp(0, 1).cpu()


def _onto_input(cam: torch.Tensor, model: nn.Module, size: tuple[int, int]) -> torch.Tensor:
    """Upsample maps [N, 1, h, w] onto the input: over the whole image, or, for a model whose
    features (or its first layer) start with a ``CenterCrop``, over the window it keeps (zero outside it)."""
    first = next(iter(models.body(model).children()), None)
    if not isinstance(first, CenterCrop):
        return F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    (h, w), s = size, first.size
    top, left = first.window(h, w)
    cam = F.interpolate(cam, size=(s, s), mode="bilinear", align_corners=False)
    return F.pad(cam, (left, w - s - left, top, h - s - top))


def activations(model: nn.Module, x: torch.Tensor, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Feature maps of ``layers`` (default: each child of ``model.features``, or of the model itself
    when it has no ``features``) for input ``x``.

    Returns name -> tensor (CPU, detached) in the order given; hooks are removed before returning.
    """
    named = dict(model.named_modules())
    if layers is None:
        layers = blocks(model)
    unknown = [n for n in layers if n not in named or not n]
    if unknown:
        valid = ", ".join(n for n in named if n)
        raise CnnlabError(f"unknown layer {unknown[0]!r}; valid layers: {valid}")
    x = x[None] if x.dim() == 3 else x
    inp = x.detach().to(model_device(model)).float()
    with _output_hooks({n: named[n] for n in layers}) as (outputs, _), _mode(model, False), torch.no_grad():
        model(inp)
    return {n: outputs[n].cpu() for n in layers if n in outputs}
