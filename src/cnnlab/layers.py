"""Tiny building blocks shared by the models.

Everything here is either a small factory returning an ``nn.Sequential`` or a module whose
children run in registration order, so ``cnnlab.summary`` can walk the tree structurally
(Sequential = compose, ``Residual`` = max of identity and branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab import bnact, dwconv
from cnnlab.errors import CnnlabError


def conv_bn(
    c_in: int,
    c_out: int,
    k: int = 3,
    stride: int = 1,
    padding: int | None = None,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
    act: type[nn.Module] | None = nn.ReLU,
    dropout: float = 0.0,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
    pool: int = 0,
) -> ConvBlock:
    """Conv -> [MaxPool(pool)] -> BN -> act -> [Dropout], as a ``ConvBlock``.

    ``groups == c_in`` makes the conv depthwise (``DepthwiseConv2d``, depth multiplier ``c_out // c_in``).

    ``padding=None`` means 'same' for stride 1 (``dilation * (k // 2)``); pass 0 for 'valid'.
    ``bn_momentum`` is in PyTorch convention (weight of the new batch statistic).
    ``pool > 0`` puts a max-pool right after the conv (the ERA / airbench ordering).
    """
    if padding is None:
        padding = dilation * (k // 2)
    if groups == c_in > 1 and dilation == 1:  # depthwise
        conv = DepthwiseConv2d(c_in, c_out, k, stride=stride, padding=padding, bias=bias)
    else:
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    layers: list[nn.Module] = [conv]
    if pool:
        layers.append(nn.MaxPool2d(pool))
    layers.append(nn.BatchNorm2d(c_out, eps=bn_eps, momentum=bn_momentum))
    if act is not None:
        layers.append(ReLU() if act is nn.ReLU else act())
    if dropout > 0:
        layers.append(Dropout(dropout))
    return ConvBlock(*layers)


class ConvBlock(nn.Sequential):
    """A Sequential whose BatchNorm2d -> ReLU or GELU [-> Dropout] runs as one fused kernel in CPU training.

    In training mode, for a CPU input, channels_last or NCHW (``bnact.applies``), each BatchNorm2d
    followed by a ReLU or an exact ``nn.GELU()``, and that by an optional ``Dropout``, is computed by
    ``bnact.batch_norm_act``: the same values (up to rounding; another dropout mask) in a third of
    the memory traffic. In eval mode, elsewhere, or when one of those modules has hooks (which
    would not fire inside the fused kernel), the children run one by one as in ``nn.Sequential``;
    ``fused = False`` turns the kernel off. Same children, same state_dict keys as a plain
    Sequential. In training mode the fused path has no double backward (``create_graph=True``) and
    no ``torch.func`` rule, and the block cannot be scripted (``torch.jit.script``): set
    ``fused = False`` for those.
    """

    def __init__(self, *modules: nn.Module):
        super().__init__(*modules)
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.fused):
            return super().forward(x)
        mods = list(self)
        i = 0
        while i < len(mods):
            run = _bn_act_run(mods, i)
            if run and bnact.applies(x, mods[i]) and not any(_hooked(m) for m in run) and bnact.available():
                p = run[2].p if len(run) == 3 and run[2].training else 0.0
                act = "gelu" if type(run[1]) is nn.GELU else "relu"
                x = bnact.batch_norm_act(x, mods[i], act=act, p=p)
                i += len(run)
            else:
                x = mods[i](x)
                i += 1
        return x


def _fusable_act(m: nn.Module) -> bool:
    return type(m) in (ReLU, nn.ReLU) or (type(m) is nn.GELU and m.approximate == "none")


def _bn_act_run(mods: list[nn.Module], i: int) -> list[nn.Module]:
    """[BatchNorm2d, ReLU or GELU] or [BatchNorm2d, ReLU or GELU, Dropout] starting at ``mods[i]``, else []."""
    if not (type(mods[i]) is nn.BatchNorm2d and i + 1 < len(mods) and _fusable_act(mods[i + 1])):
        return []
    if i + 2 < len(mods) and type(mods[i + 2]) is Dropout:
        return mods[i:i + 3]
    return mods[i:i + 2]


def _hooked(m: nn.Module) -> bool:
    """Whether a forward or backward hook (the module's own or a global one) would see ``m`` run."""
    glob = nn.modules.module
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or glob._global_forward_hooks or glob._global_forward_pre_hooks or glob._global_backward_hooks
                or glob._global_backward_pre_hooks)


class ReLU(nn.ReLU):
    """The ReLU of ``conv_bn``: it overwrites its input while training, out of place in eval mode.

    Only safe where nothing else reads its input, as right after a BatchNorm (BN's backward needs
    its input, not its output); it saves a pass over a full-size tensor (a cifar_dw56k step on 2 CPU
    cores ran 1.07x faster). Eval mode leaves its input alone, so hooks that keep a layer's output
    (Grad-CAM, activation maps, which run in eval mode) see the values before the ReLU; a hook on
    the BatchNorm in training mode would see them after it.
    """

    def __init__(self):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(x) if self.training else torch.relu(x)

    def extra_repr(self) -> str:
        return "in place while training"


class Dropout(nn.Module):
    """Element-wise dropout, ~10x cheaper on CPU than ``nn.Dropout``.

    ``nn.Dropout`` draws one Bernoulli sample per element, which on a CPU costs about 40x a
    multiply and was ~45% of a training step of the seed MNIST net. Here one 64-bit random draw
    gives four 16-bit uniforms, compared against ``p`` (resolution 1/65536) in the tensor's own
    memory layout. Same semantics: zero with probability ``p``, scale the rest by 1/(1-p);
    identity in eval mode. Draws come from torch's global generator, so runs stay reproducible.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p = p

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # all 64 bits
        u = words.view(torch.int16)[:n]
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        u = torch.as_strided(u, x.shape, x.stride())  # dense layout: same order as x in memory
        threshold = int(round(self.p * 65536)) - 32768
        return torch.where(u >= threshold, x * (1.0 / (1.0 - self.p)), torch.zeros((), dtype=x.dtype, device=x.device))


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise kxk conv with depth multiplier ``c_out // c_in`` (``groups = c_in``; Keras
    ``DepthwiseConv2D``).

    On a CPU with a channels_last input, a 3x3 kernel, stride 1 or 2 and padding 0 or 1 run cnnlab's
    own kernels (``cnnlab.dwconv``, built on first use; ``fast = False`` turns them off). Elsewhere
    torch's kernel runs; oneDNN's fast depthwise kernel takes multiplier 1 only, so on a CPU with a
    channels_last input each channel is first repeated ``multiplier`` times and a multiplier-1 depthwise
    conv runs over the result: the same weights and the same sums, ~1.2x faster forward+backward for
    cifar_dw56k's 128 -> 256 layer than torch's multiplier-2 kernel."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, padding: int = 0, bias: bool = False):
        if c_out % c_in:
            raise ValueError(f"depthwise conv: {c_out} output channels is not a multiple of {c_in} input channels")
        super().__init__(c_in, c_out, k, stride=stride, padding=padding, groups=c_in, bias=bias)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.fast and self.padding_mode == "zeros"
                and dwconv.applies(x, self.weight, self.stride, self.padding, self.dilation, self.groups) and dwconv.available()):
            y = dwconv.depthwise_conv3x3(x, self.weight, self.stride[0], self.padding[0])
            return y if self.bias is None else y + self.bias.to(y.dtype).view(1, -1, 1, 1)
        m = self.out_channels // self.in_channels
        if (m == 1 or x.device.type != "cpu" or self.padding_mode != "zeros"
                or not x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        n, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1).unsqueeze(-1).expand(n, h, w, c, m).reshape(n, h, w, c * m).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.out_channels)


class SeparableConv2d(nn.Sequential):
    """Keras ``SeparableConv2D`` with depth multiplier 1: depthwise kxk (no bias) then pointwise 1x1 (bias)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, padding: int = 0, stride: int = 1,
                 dilation: int = 1, bias: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, k, stride=stride, padding=padding, dilation=dilation,
                                   groups=c_in, bias=False)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=bias)


def build_kernels(model: nn.Module, channels_last: bool, log=print) -> None:
    """Compile (or load from the cache) the C++ CPU kernels ``model``'s layers will call in training
    (``bnact`` where a block has a BatchNorm -> ReLU/GELU pair; ``dwconv`` for 3x3 depthwise convs
    on ``channels_last`` maps), now rather than inside the first training step, whose time would
    otherwise include the compiler's (~25 s on 2 cores, once per cache; ``log`` says so first). A
    failed build warns and falls back, as on first use. Both kernel modules have ``cached()`` and
    ``available()``."""
    mods = list(model.modules())
    kernels = []
    if any(isinstance(m, ConvBlock) and m.fused and any(_bn_act_run(list(m), i) for i in range(len(m)))
           for m in mods):
        kernels.append(bnact)
    if channels_last and any(isinstance(m, DepthwiseConv2d) and m.fast and m.padding_mode == "zeros"
                             and dwconv.covers(m.weight, m.stride, m.padding, m.dilation, m.groups) for m in mods):
        kernels.append(dwconv)
    if not all(k.cached() for k in kernels):
        log("compiling cnnlab's C++ CPU kernels (once per cache, 10-30 s)")
    for k in kernels:
        k.available()


class CenterCrop(nn.Module):
    """Keep the central ``size`` x ``size`` window of each map (a view: no copy).

    MNIST digits are scaled into a 20x20 box and centred by mass in the 28x28 image: a 24x24 crop
    keeps 99.8% of the ink (a 2-pixel random shift stays inside it too), and every later layer then
    works on (24/28)^2 = 0.73x the pixels.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def window(self, h: int, w: int) -> tuple[int, int]:
        """(top, left) of the kept window in an h x w map."""
        if h < self.size or w < self.size:
            raise CnnlabError(f"CenterCrop({self.size}) got a {h}x{w} image; use images of at least "
                              f"{self.size}x{self.size} or a smaller crop")
        return (h - self.size) // 2, (w - self.size) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, left = self.window(*x.shape[-2:])
        return x[..., top:top + self.size, left:left + self.size]

    def extra_repr(self) -> str:
        return f"size={self.size}"


class Residual(nn.Module):
    """``x + branch(x)``; the branch must keep the shape."""

    def __init__(self, branch: nn.Module):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class GlobalPool(nn.Module):
    """Global average or max pooling over H and W, flattened to (N, C) unless ``flatten=False``."""

    def __init__(self, kind: str = "avg", flatten: bool = True):
        super().__init__()
        if kind not in ("avg", "max"):
            raise ValueError(f"GlobalPool kind must be 'avg' or 'max', got {kind!r}")
        self.kind = kind
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=(2, 3), keepdim=True) if self.kind == "avg" else x.amax(dim=(2, 3), keepdim=True)
        return x.flatten(1) if self.flatten else x

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, flatten={self.flatten}"


class Mul(nn.Module):
    """Multiply by a fixed scale (e.g. DAWNBench's 0.125 logit scale)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Net(nn.Module):
    """A classifier split into ``features`` (spatial map) and ``head`` (map -> logits)."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
