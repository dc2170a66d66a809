"""BatchNorm (training mode) fused with the ReLU or GELU and the dropout after it, for CPU tensors.

On a CPU the small nets of the seeds spend half a training step in element-wise passes over
full-size maps: BatchNorm's statistics, normalisation and two backward passes, the ReLU and its
backward, dropout's random numbers, mask and multiplies. The kernels in ``bnact.cpp`` do the same
arithmetic in two passes forward (statistics; normalise + activation + dropout) and two backward,
and store no masks: dropout keeps an element when a hash of its position and a seed clears p, so
backward recomputes the mask from the seed, which is drawn from torch's generator (runs stay
reproducible). GELU is the exact one (``nn.GELU()``, z * Phi(z)); in float32 and bfloat16 the
kernel's Phi comes from a polynomial erf (error < 1.5e-7), so GELU is within ~4e-7 of the exact
value (a few float32 ulp; torch's own float32 GELU is off by up to 1e-6).

``layers.ConvBlock`` calls ``batch_norm_act`` where ``applies`` (channels_last or NCHW input);
elsewhere (GPU, eval mode, other dtypes or layouts, torch.compile, no compiler) its children run
one by one, with the same result up to rounding and a different, equally distributed, dropout mask.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnlab import ext

DTYPES = (torch.float32, torch.bfloat16, torch.float64)
ACTS = {"": 0, "relu": 1, "gelu": 2}  # the activation after BN ("" = none), as the kernels number them


def available() -> bool:
    """Whether the fused kernels can run in this process (builds them on the first call)."""
    return ext.load("cnnlab_bnact", "bnact.cpp", "BatchNorm + activation + dropout")


def cached() -> bool:
    """Whether the kernels are built in the cache already (``available`` will not compile)."""
    return ext.cached("cnnlab_bnact", "bnact.cpp")


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def applies(x: torch.Tensor, bn: nn.BatchNorm2d) -> bool:
    """Whether the kernels cover this call (checked before anything is built): a BatchNorm2d in
    training mode on a CPU input, channels_last or NCHW, of a supported dtype, more than one value per
    channel, parameters in the accumulation dtype, outside torch.compile and any tracing."""
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing (torch.fx) records the modules one by one
        return False
    acc = accumulation_dtype(x)
    return (bn.training and x.device.type == "cpu" and x.dim() == 4 and x.dtype in DTYPES
            and x.shape[1] == bn.num_features and x.numel() > x.shape[1]
            and (x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous())
            and all(t is None or t.dtype == acc for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing())


def random_seed() -> int:
    """A 64-bit seed from torch's global generator."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


def batch_norm_act(x: torch.Tensor, bn: nn.BatchNorm2d, act: str, p: float) -> torch.Tensor:
    """``dropout(act(bn(x)), p)`` (``act``: "relu", "gelu" or "" for none; no dropout if ``p == 0``)
    for a BatchNorm2d in training mode, updating its running statistics as ``bn(x)`` would. Call
    where ``applies`` and ``available``."""
    counting = bn.track_running_stats and bn.num_batches_tracked is not None
    momentum = bn.momentum
    if momentum is None and counting:  # cumulative moving average
        momentum = 1.0 / (float(bn.num_batches_tracked) + 1)
    acc = accumulation_dtype(x)
    weight = bn.weight if bn.weight is not None else torch.ones(x.shape[1], dtype=acc)
    bias = bn.bias if bn.bias is not None else torch.zeros(x.shape[1], dtype=acc)
    seed = random_seed() if p > 0 else 0
    out = BatchNormAct.apply(x, weight, bias, bn.running_mean, bn.running_var, momentum or 0.0, bn.eps, ACTS[act], p,
                             seed)
    if counting:
        bn.num_batches_tracked.add_(1)
    return out


class BatchNormAct(torch.autograd.Function):
    """The fused forward and backward; ``act`` is a number of ``ACTS``; ``running_mean`` and
    ``running_var`` (or None) are updated in place and carry no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, act: int, p: float,
                seed: int) -> torch.Tensor:
        w, b = weight.detach(), bias.detach()
        cl = x.is_contiguous(memory_format=torch.channels_last)  # else NCHW (applies() checked)
        out, mean, invstd = torch.ops.cnnlab_bnact.forward(x, w, b, running_mean, running_var, momentum, eps, act,
                                                           p, seed, cl)
        ctx.save_for_backward(x, w, b, mean, invstd)
        ctx.act = (act, p, seed, cl)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        act, p, seed, cl = ctx.act
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        # the forward's layout (a saved-tensor hook may give x back in another): the dropout masks depend on it
        layout = torch.channels_last if cl else torch.contiguous_format
        grad_x, grad_w, grad_b = torch.ops.cnnlab_bnact.backward(
            grad.contiguous(memory_format=layout), x.contiguous(memory_format=layout), weight, bias, mean, invstd,
            act, p, seed, want_x, cl)
        return ((grad_x if want_x else None), (grad_w if want_w else None), (grad_b if want_b else None),
                None, None, None, None, None, None, None)


def keep_mask(shape: tuple, p: float, seed: int, channels_last: bool = True) -> torch.Tensor:
    """The dropout mask (True = kept) the kernels use for a tensor of ``shape`` in that layout."""
    n, c, h, w = shape
    if channels_last:
        flat = torch.empty(n * h * w, c, dtype=torch.bool)
        torch.ops.cnnlab_bnact.keep_mask(flat, p, seed, True)
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    flat = torch.empty(n * c, h * w, dtype=torch.bool)
    torch.ops.cnnlab_bnact.keep_mask(flat, p, seed, False)
    return flat.view(n, c, h, w)
