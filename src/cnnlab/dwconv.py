"""A fast depthwise 3x3 convolution for CPU channels_last tensors, forward and backward.

PyTorch's CPU depthwise kernels are slow, in backward most of all (pytorch issue 13716). The C++
kernels in ``dwconv.cpp`` work row by row on the channels_last layout, with the depth multiplier
folded in, and give the same sums as ``F.conv2d`` (float32 or float64 accumulation). They cover a
3x3 kernel, stride 1 or 2, padding 0 or 1, any depth multiplier, float32, bfloat16 and float64.

The extension is built on first use (``cnnlab.ext``); where it cannot be, ``available()`` is False
and ``layers.DepthwiseConv2d`` uses torch's kernel.
"""

from __future__ import annotations

import torch

from cnnlab import ext

DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def available() -> bool:
    """Whether the fast kernels can run in this process (builds them on the first call)."""
    return ext.load("cnnlab_dwconv", "dwconv.cpp", "depthwise convolution")


def cached() -> bool:
    """Whether the kernels are built in the cache already (``available`` will not compile)."""
    return ext.cached("cnnlab_dwconv", "dwconv.cpp")


def covers(weight: torch.Tensor, stride: tuple, padding: tuple, dilation: tuple, groups: int) -> bool:
    """Whether the kernels cover a layer with these settings: a 3x3 depthwise weight (any channel
    multiplier), stride 1 or 2, padding 0 or 1, no dilation."""
    return (tuple(weight.shape[1:]) == (1, 3, 3) and weight.shape[0] % groups == 0
            and tuple(dilation) == (1, 1) and tuple(stride) in ((1, 1), (2, 2)) and tuple(padding) in ((0, 0), (1, 1)))


def applies(x: torch.Tensor, weight: torch.Tensor, stride: tuple, padding: tuple, dilation: tuple,
            groups: int) -> bool:
    """Whether the kernels cover this call (checked before anything is built): a layer they
    ``covers``, on a CPU channels_last input of a supported dtype with ``groups`` channels, outside
    torch.compile and tracing (they do not know the op)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] == groups and compute_dtype(x) in DTYPES
            and covers(weight, stride, padding, dilation, groups)
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolution runs in: autocast's lower precision for float32 inputs, as F.conv2d."""
    if x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype


class DepthwiseConv3x3(torch.autograd.Function):
    """``F.conv2d(x, weight, None, stride, padding, groups=x.shape[1])`` for a (Co, 1, 3, 3) weight,
    x channels_last on the CPU. The weight is used in float32 (float64 for float64 inputs) and its
    gradient comes back in the weight's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        co = weight.shape[0]
        w9 = weight.detach().to(acc).reshape(co, 9).t().contiguous()
        n, _, h, w = x.shape
        out = torch.empty(n, co, (h + 2 * padding - 3) // stride + 1, (w + 2 * padding - 3) // stride + 1,
                          dtype=x.dtype, memory_format=torch.channels_last)
        torch.ops.cnnlab_dwconv.forward(x, w9, out, stride, padding)
        ctx.save_for_backward(x, w9)
        ctx.conv = (stride, padding, weight.dtype)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w9 = ctx.saved_tensors
        stride, padding, weight_dtype = ctx.conv
        want_x, want_w = ctx.needs_input_grad[:2]
        grad_x = torch.empty_like(x) if want_x else x.new_empty(0)
        grad_w9 = torch.empty_like(w9) if want_w else w9.new_empty(0)
        torch.ops.cnnlab_dwconv.backward(grad.contiguous(memory_format=torch.channels_last), x, w9, grad_x, grad_w9,
                                         stride, padding)
        grad_w = grad_w9.t().reshape(-1, 1, 3, 3).to(weight_dtype) if want_w else None
        return (grad_x if want_x else None), grad_w, None, None


def depthwise_conv3x3(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 1) -> torch.Tensor:
    """The fast kernel (call only where ``applies`` and ``available``); under autocast the input
    is cast to autocast's dtype first, as F.conv2d would."""
    return DepthwiseConv3x3.apply(x.to(compute_dtype(x)), weight, stride, padding)
