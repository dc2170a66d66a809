"""A fast 2x2, stride 2 max-pool for CPU training, forward and backward.

torch's CPU max-pool keeps an int64 index per output value (a fresh allocation every step, four
times the bytes of a bfloat16 output) and its backward zero-fills the input gradient before
scattering into it. ``maxpool.cpp`` keeps one byte per output value (which of
the window's four values won) and writes each input gradient once. Same values and gradients as
``F.max_pool2d`` (first of equal values wins, NaN wins), channels_last or NCHW.

``layers.MaxPool2d`` calls ``max_pool2x2`` where ``applies``; elsewhere (GPU, other windows,
no gradient needed, torch.compile, no compiler) it is ``nn.MaxPool2d``.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab import ext

DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def available() -> bool:
    """Whether the kernels can run in this process (builds them on the first call)."""
    return ext.load("cnnlab_maxpool", "maxpool.cpp", "max-pool")


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def applies(x: torch.Tensor, pool: nn.MaxPool2d) -> bool:
    """Whether the kernels cover this call (checked before anything is built): a 2x2 window with
    stride 2, no padding or dilation (ceil_mode only where it changes nothing), no indices returned,
    a CPU input that needs a gradient, channels_last or NCHW, outside torch.compile and tracing."""
    if isinstance(x, torch.fx.Proxy):
        return False
    return (x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4
            and x.dtype in DTYPES and x.shape[2] >= 2 and x.shape[3] >= 2
            and _pair(pool.kernel_size) == (2, 2) and _pair(pool.stride or pool.kernel_size) == (2, 2)
            and _pair(pool.padding) == (0, 0) and _pair(pool.dilation) == (1, 1) and not pool.return_indices
            and not (pool.ceil_mode and (x.shape[2] % 2 or x.shape[3] % 2))
            and (x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous())
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


class MaxPool2x2(torch.autograd.Function):
    """``F.max_pool2d(x, 2)`` for a CPU tensor, channels_last or NCHW; the output has x's layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        # the strides torch gives the output; they differ from ``cl`` only for C = 1, where both
        # layouts hold the same bytes (and the kernel takes the faster NCHW path)
        cl_strides = x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if cl_strides else torch.contiguous_format
        n, c, h, w = x.shape
        out = torch.empty(n, c, h // 2, w // 2, dtype=x.dtype, device=x.device, memory_format=layout)
        idx = torch.empty(n, c, h // 2, w // 2, dtype=torch.uint8, device=x.device, memory_format=layout)
        torch.ops.cnnlab_maxpool.forward(x, out, idx, cl)
        ctx.save_for_backward(idx)
        ctx.pool = (tuple(x.shape), cl, layout)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        shape, cl, layout = ctx.pool
        grad_x = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
        torch.ops.cnnlab_maxpool.backward(grad.contiguous(memory_format=layout), idx.contiguous(memory_format=layout),
                                          grad_x, cl)
        return grad_x


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """The fast kernel (call only where ``applies`` and ``available``)."""
    return MaxPool2x2.apply(x)
