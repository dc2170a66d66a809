"""Networks written as a list of layers in a recipe: ``[model] layers = [...]``.

Each entry is a short string, ``WORD [NUMBER] [SETTINGS]``, read left to right like the seeds'
own notes ("Conv(32)->DepthConv(64)->MaxPool(2)->Transition(Conv(32,1))"), or a nested list
``["res", ...]`` for a residual block around the layers it holds::

    [model]
    name = "tiny"          # a label for tables (optional with layers)
    dropout = 0.05         # after every conv / dw / sep block (not after trans)
    layers = ["conv 16", "conv 24", "maxpool 2", "trans 16", "conv 16", "conv 16 p1",
              ["res", "conv 16 p1", "conv 16 p1"], "gap", "conv classes k1 plain", "flatten"]

====================  =======================================================================
``conv C``            3x3 conv (no bias) -> BatchNorm -> ReLU [-> Dropout]; settings ``kK`` kernel
                      (3), ``pP`` padding (0, 'valid' as in Keras), ``sS`` stride (1), ``dD``
                      dilation (1), ``gG`` groups (1); switches ``bias`` (conv bias), ``plain``
                      (the conv alone: no BatchNorm, ReLU or dropout)
``dw [C]``            depthwise conv with depth multiplier C / input channels (C defaults to the
                      input channels), then BatchNorm -> ReLU [-> Dropout]; ``k p s d bias plain``
``sep C``             separable conv (depthwise kxk, pointwise 1x1), then BatchNorm -> ReLU
                      [-> Dropout]; ``k p s d bias plain`` (``bias``: on the pointwise, as Keras)
``trans C``           1x1 transition conv -> BatchNorm -> ReLU, never dropout; ``bias``
``maxpool K``         max pooling, stride K; ``sS`` stride, ``pP`` padding, ``ceil`` (Keras 'same')
``avgpool K``         average pooling; same settings
``gap`` / ``gmp``     global average / max pooling to C x 1 x 1 (the head starts here)
``flatten``           C x H x W -> C*H*W (the head starts here if no global pool came before)
``linear N``          fully connected to N features (with bias; ``nobias``); a C x 1 x 1 input
                      is flattened first (the head starts there)
``dropout P``         dropout with probability P
``bn``                BatchNorm (2d on maps, 1d on vectors)
``relu`` / ``gelu``   activation
``scale X``           multiply by a fixed X (e.g. DAWNBench's 0.125 on the logits)
``s2d F``             space-to-depth: C x H x W -> C*F*F x H/F x W/F
``crop S``            keep the central S x S window
``["res", ...]``      x + block(x): the block must keep the shape
====================  =======================================================================

``C`` or ``N`` may be the word ``classes`` (the dataset's number of classes). ``[model]`` keys of a
design: ``layers``, ``dropout`` (0), ``bn_eps`` (1e-5) and ``bn_momentum`` (0.1, PyTorch
convention: the weight of the new batch). The result is a ``layers.Net`` whose ``head`` starts at
the first global pool or flatten, built from the same factories as the zoo (``conv_bn``,
``SeparableConv2d``, ``Residual``...), so a design and its zoo twin count the same.

Shapes are worked out while building, so a mistake is a one-line ``CnnlabError`` naming the layer
("layer 6 'conv 32 k3' gets 2x2 and would output 0x0; ...") before any data is loaded.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.layers import (CenterCrop, ConvBlock, Dropout, GlobalPool, Mul, Net, ReLU, Residual, SeparableConv2d,
                           conv_bn)


@dataclass(frozen=True)
class Word:
    arg: str  # what the number is: "channels", "kernel", "probability", "factor", "size", or "" for none
    required: bool = True
    settings: str = ""  # letters of the K/P/S/D/G settings it takes
    switches: tuple[str, ...] = ()
    example: str = ""


CONV_SETTINGS = "kpsd"
WORDS: dict[str, Word] = {
    "conv": Word("channels", settings="kpsdg", switches=("bias", "plain"), example="conv 32 k3 p1"),
    "dw": Word("channels", required=False, settings=CONV_SETTINGS, switches=("bias", "plain"), example="dw 64 p1"),
    "sep": Word("channels", settings=CONV_SETTINGS, switches=("bias", "plain"), example="sep 64 p1"),
    "trans": Word("channels", switches=("bias",), example="trans 32"),
    "maxpool": Word("kernel", settings="sp", switches=("ceil",), example="maxpool 2"),
    "avgpool": Word("kernel", settings="sp", switches=("ceil",), example="avgpool 2"),
    "gap": Word(""),
    "gmp": Word(""),
    "flatten": Word(""),
    "linear": Word("channels", switches=("nobias",), example="linear 10"),
    "dropout": Word("probability", example="dropout 0.1"),
    "bn": Word(""),
    "relu": Word(""),
    "gelu": Word(""),
    "scale": Word("factor", example="scale 0.125"),
    "s2d": Word("size", example="s2d 2"),
    "crop": Word("size", example="crop 24"),
    "res": Word(""),  # only as the first item of a nested list
}
SETTING_NAMES = {"k": "kernel", "p": "padding", "s": "stride", "d": "dilation", "g": "groups"}
HEAD_STARTS = ("gap", "gmp", "flatten")


@dataclass
class Layer:
    """One parsed entry: ``conv 32 k3 p1 bias`` -> word, value 32, settings {k: 3, p: 1}, switches {bias}."""

    where: str  # "layer 6 'conv 32 k3'", for error messages
    word: str
    value: float | str | None
    settings: dict
    switches: set

    def fail(self, problem: str) -> CnnlabError:
        return CnnlabError(f"{self.where}: {problem}")

    def get(self, key: str, default: int) -> int:
        return self.settings.get(key, default)


@dataclass
class Options:
    num_classes: int
    dropout: float
    bn_eps: float
    bn_momentum: float


def build_design(layers: list, num_classes: int, input_shape: tuple, dropout: float = 0.0,
                 bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> Net:
    """A ``Net`` from a layer list for images of ``input_shape`` (C, H, W); bad entries raise ``CnnlabError``."""
    if not isinstance(layers, list) or not layers:
        raise CnnlabError('[model] layers must be a non-empty list such as ["conv 16", "maxpool 2", "gap", '
                          '"linear classes"]')
    for key, value, ok, expect in (("dropout", dropout, lambda v: 0 <= v < 1, "a probability in [0, 1)"),
                                   ("bn_eps", bn_eps, lambda v: v > 0, "a number > 0, e.g. 1e-5"),
                                   ("bn_momentum", bn_momentum, lambda v: 0 <= v <= 1, "a number in [0, 1]")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise CnnlabError(f"[model] {key} = {value!r}: expected {expect}")
    opts = Options(num_classes, float(dropout), float(bn_eps), float(bn_momentum))
    modules, shape, head_at = _build_list(layers, tuple(input_shape), opts, prefix="")
    head_at = len(modules) if head_at is None else head_at
    return Net(nn.Sequential(*modules[:head_at]), nn.Sequential(*modules[head_at:]))


def _build_list(entries: list, shape: tuple, opts: Options, prefix: str) -> tuple[list, tuple, int | None]:
    """Modules for a list of entries, the shape after them, and where the head starts (top level)."""
    modules: list[nn.Module] = []
    head_at = None
    for i, entry in enumerate(entries, 1):
        index = f"{prefix}{i}"
        if isinstance(entry, list):
            module, shape = _residual(entry, shape, opts, index)
            modules.append(module)
            continue
        layer = parse(entry, index)
        built, shape = BUILDERS[layer.word](layer, shape, opts)
        if head_at is None and (layer.word in HEAD_STARTS or (layer.word == "linear" and len(built) == 2)):
            head_at = len(modules)
        modules += built
    return modules, shape, head_at


def parse(entry, index: str) -> Layer:
    """``"conv 32 k3 p1"`` -> Layer; unknown words, settings and missing numbers raise ``CnnlabError``."""
    if not isinstance(entry, str) or not entry.split():
        raise CnnlabError(f"layer {index}: expected a string such as 'conv 32 k3' or a list ['res', ...], "
                          f"got {entry!r}")
    word, *tokens = entry.split()
    where = f"layer {index} {entry!r}"
    if word not in WORDS:
        near = difflib.get_close_matches(word, list(WORDS), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise CnnlabError(f"{where}: unknown layer '{word}'; {hint}valid layers: {', '.join(WORDS)}")
    spec = WORDS[word]
    if word == "res":
        raise CnnlabError(f'{where}: write a residual block as a nested list, e.g. ["res", "conv 64 p1", "conv 64 p1"]')
    layer = Layer(where, word, None, {}, set())
    for token in tokens:
        _read_token(layer, spec, token)
    if spec.arg and spec.required and layer.value is None:
        raise layer.fail(f"missing the {spec.arg}, e.g. '{spec.example}'")
    return layer


def _read_token(layer: Layer, spec: Word, token: str) -> None:
    setting = re.fullmatch(r"([a-z])([0-9]{1,5})", token)
    if spec.arg and layer.value is None and (_is_number(token) or (token == "classes" and spec.arg == "channels")):
        layer.value = token if token == "classes" else float(token)
    elif setting and setting.group(1) in spec.settings and setting.group(1) not in layer.settings:
        layer.settings[setting.group(1)] = int(setting.group(2))
    elif token in spec.switches and token not in layer.switches:
        layer.switches.add(token)
    else:
        raise layer.fail(f"unexpected '{token}'; {layer.word} takes {_takes(spec)}")


def _is_number(token: str) -> bool:
    return re.fullmatch(r"[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]{1,3})?|\.[0-9]+", token) is not None


def _takes(spec: Word) -> str:
    parts = [f"the {spec.arg}" + (" (optional)" if not spec.required else "")] if spec.arg else []
    parts += [f"{c}N ({SETTING_NAMES[c]})" for c in spec.settings] + list(spec.switches)
    return ", ".join(parts) if parts else "nothing more"


# ----------------------------------------------------------------------------- numbers and shapes


MAX_COUNT = 65536  # channels, kernels and sizes above this are a typo, not a network
MAX_WEIGHTS = 2 ** 28  # one layer's weights (1 GiB of float32): more is a typo too


def _count(layer: Layer, opts: Options) -> int:
    """The whole number a layer was given (channels, kernel, size), 'classes' resolved."""
    v = opts.num_classes if layer.value == "classes" else layer.value
    if v is None or not 1 <= v <= MAX_COUNT or v != int(v):
        raise layer.fail(f"the {WORDS[layer.word].arg} must be a whole number from 1 to {MAX_COUNT}, e.g. "
                         f"'{WORDS[layer.word].example}'")
    return int(v)


def _map(layer: Layer, shape: tuple) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise layer.fail(f"needs a C x H x W map but gets a vector of {shape[0]} (after flatten or linear); "
                         f"move it before 'flatten'")
    return shape


def _out_size(size: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    """PyTorch's output length of a conv or pool along one axis."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil else span // s) + 1
    if ceil and out > 0 and (out - 1) * s >= size + p:  # the last window may not start in the padding
        out -= 1
    return out


def _spatial(layer: Layer, shape: tuple, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> tuple[int, int]:
    """(H, W) after a kxk window; a map that would vanish is an error naming the layer."""
    c, h, w = _map(layer, shape)
    for name, v in (("kernel", k), ("stride", s), ("dilation", d)):
        if v < 1:
            raise layer.fail(f"the {name} must be >= 1")
    if p > d * (k - 1):
        raise layer.fail(f"padding p{p} reaches past the kernel (at most p{d * (k - 1)}; 'same' is p{d * (k // 2)})")
    oh, ow = _out_size(h, k, s, p, d, ceil), _out_size(w, k, s, p, d, ceil)
    if oh < 1 or ow < 1:
        raise layer.fail(f"gets {h}x{w} and would output {max(oh, 0)}x{max(ow, 0)}; pad it (p{d * (k // 2)}), "
                         f"use a smaller kernel, or remove a pooling or strided layer before it")
    return oh, ow


# ----------------------------------------------------------------------------- builders, one per word


def _conv(layer: Layer, shape: tuple, opts: Options):
    c_in = _map(layer, shape)[0]
    c_out, k, g = _count(layer, opts), layer.get("k", 3), layer.get("g", 1)
    if g < 1 or c_in % g or c_out % g:
        raise layer.fail(f"groups g{g} must divide both the {c_in} input and the {c_out} output channels")
    return _conv_block(layer, shape, opts, c_out, groups=g)


def _dw(layer: Layer, shape: tuple, opts: Options):
    c_in = _map(layer, shape)[0]
    c_out = c_in if layer.value is None else _count(layer, opts)
    if c_out % c_in:
        raise layer.fail(f"a depthwise conv gives a multiple of its {c_in} input channels; use e.g. "
                         f"'dw {2 * c_in}' (multiplier 2) or 'dw' (multiplier 1)")
    return _conv_block(layer, shape, opts, c_out, groups=c_in)


def _check_weights(layer: Layer, n: int) -> None:
    if n > MAX_WEIGHTS:
        raise layer.fail(f"would hold {n:,} weights in one layer; use fewer channels")


def _conv_block(layer: Layer, shape: tuple, opts: Options, c_out: int, groups: int):
    k, s, p, d = layer.get("k", 3), layer.get("s", 1), layer.get("p", 0), layer.get("d", 1)
    h, w = _spatial(layer, shape, k, s, p, d)
    _check_weights(layer, shape[0] // groups * c_out * k * k)
    bias = "bias" in layer.switches
    if "plain" in layer.switches:
        module = nn.Conv2d(shape[0], c_out, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    else:
        module = conv_bn(shape[0], c_out, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias,
                         dropout=opts.dropout, bn_momentum=opts.bn_momentum, bn_eps=opts.bn_eps)
    return [module], (c_out, h, w)


def _sep(layer: Layer, shape: tuple, opts: Options):
    c_out = _count(layer, opts)
    k, s, p, d = layer.get("k", 3), layer.get("s", 1), layer.get("p", 0), layer.get("d", 1)
    h, w = _spatial(layer, shape, k, s, p, d)
    _check_weights(layer, shape[0] * (k * k + c_out))
    conv = SeparableConv2d(shape[0], c_out, k, padding=p, stride=s, dilation=d, bias="bias" in layer.switches)
    if "plain" in layer.switches:
        return [conv], (c_out, h, w)
    block = [conv, nn.BatchNorm2d(c_out, eps=opts.bn_eps, momentum=opts.bn_momentum), ReLU()]
    return [ConvBlock(*block, *([Dropout(opts.dropout)] if opts.dropout else []))], (c_out, h, w)


def _trans(layer: Layer, shape: tuple, opts: Options):
    c_in, h, w = _map(layer, shape)
    c_out = _count(layer, opts)
    _check_weights(layer, c_in * c_out)
    return [conv_bn(c_in, c_out, k=1, padding=0, bias="bias" in layer.switches, bn_momentum=opts.bn_momentum,
                    bn_eps=opts.bn_eps)], (c_out, h, w)


def _pool(layer: Layer, shape: tuple, opts: Options):
    k = _count(layer, opts)
    s, p, ceil = layer.get("s", k), layer.get("p", 0), "ceil" in layer.switches
    if p > k // 2:
        raise layer.fail(f"padding p{p} must be at most half the kernel ({k // 2})")
    h, w = _spatial(layer, shape, k, s, p, ceil=ceil)
    cls = nn.MaxPool2d if layer.word == "maxpool" else nn.AvgPool2d
    return [cls(k, stride=s, padding=p, ceil_mode=ceil)], (shape[0], h, w)


def _global_pool(layer: Layer, shape: tuple, opts: Options):
    c = _map(layer, shape)[0]
    return [GlobalPool("avg" if layer.word == "gap" else "max", flatten=False)], (c, 1, 1)


def _flatten(layer: Layer, shape: tuple, opts: Options):
    return [nn.Flatten()], (_numel(shape),)


def _numel(shape: tuple) -> int:
    n = 1
    for v in shape:
        n *= v
    return n


def _linear(layer: Layer, shape: tuple, opts: Options):
    n = _count(layer, opts)
    flatten = []
    if len(shape) == 3:
        if shape[1:] != (1, 1):
            raise layer.fail(f"gets a {'x'.join(map(str, shape))} map; put 'flatten' or 'gap' before it")
        flatten = [nn.Flatten()]
    _check_weights(layer, _numel(shape) * n)
    return [*flatten, nn.Linear(_numel(shape), n, bias="nobias" not in layer.switches)], (n,)


def _dropout(layer: Layer, shape: tuple, opts: Options):
    p = layer.value
    if not 0 <= p < 1:
        raise layer.fail("the probability must be in [0, 1), e.g. 'dropout 0.1'")
    return ([Dropout(p)] if p else []), shape


def _bn(layer: Layer, shape: tuple, opts: Options):
    cls = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
    return [cls(shape[0], eps=opts.bn_eps, momentum=opts.bn_momentum)], shape


def _act(layer: Layer, shape: tuple, opts: Options):
    return [nn.ReLU() if layer.word == "relu" else nn.GELU()], shape


def _scale(layer: Layer, shape: tuple, opts: Options):
    return [Mul(layer.value)], shape


def _s2d(layer: Layer, shape: tuple, opts: Options):
    c, h, w = _map(layer, shape)
    f = _count(layer, opts)
    if h % f or w % f:
        raise layer.fail(f"gets {h}x{w}, which does not divide into {f}x{f} blocks; crop first (e.g. "
                         f"'crop {h - h % f}') or use another factor")
    return [nn.PixelUnshuffle(f)], (c * f * f, h // f, w // f)


def _crop(layer: Layer, shape: tuple, opts: Options):
    c, h, w = _map(layer, shape)
    s = _count(layer, opts)
    if s > h or s > w:
        raise layer.fail(f"gets {h}x{w}, smaller than the {s}x{s} window; use a crop of at most {min(h, w)}")
    return [CenterCrop(s)], (c, s, s)


BUILDERS = {"conv": _conv, "dw": _dw, "sep": _sep, "trans": _trans, "maxpool": _pool, "avgpool": _pool,
            "gap": _global_pool, "gmp": _global_pool, "flatten": _flatten, "linear": _linear, "dropout": _dropout,
            "bn": _bn, "relu": _act, "gelu": _act, "scale": _scale, "s2d": _s2d, "crop": _crop}


def _residual(entry: list, shape: tuple, opts: Options, index: str):
    """``["res", layer, ...]`` -> ``Residual(Sequential(...))``; the block must give back its input's shape."""
    if not entry or entry[0] != "res" or len(entry) < 2:
        raise CnnlabError(f'layer {index}: a nested list is a residual block and starts with "res", e.g. '
                          f'["res", "conv 64 p1", "conv 64 p1"]; got {entry!r}')
    modules, out, _ = _build_list(entry[1:], shape, opts, prefix=f"{index}.")
    if out != shape:
        fix = (f"make its last layer give {shape[0]} channels" if out[1:] == shape[1:] else
               "pad its convs (p1 for k3) and keep stride 1 and no pooling inside")
        raise CnnlabError(f"layer {index} 'res': the block turns {_fmt(shape)} into {_fmt(out)}, so x + block(x) "
                          f"cannot be added; {fix}")
    return Residual(nn.Sequential(*modules)), shape


def _fmt(shape: tuple) -> str:
    return "x".join(map(str, shape))
