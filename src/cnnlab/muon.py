"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for the hidden layers' weights.

From Keller Jordan's description (2024, "Muon: An optimizer for hidden layers in neural
networks", and the airbench94_muon record): for a weight matrix (a conv kernel read as
``(out_channels, in_channels * kh * kw)``), keep SGD momentum of the gradient, replace the update
by the nearest semi-orthogonal matrix (every singular value moved toward 1, which a few steps of
a quintic Newton-Schulz iteration do without an SVD), and step along it. The update's size no
longer depends on the gradient's scale. The network's first layer, its classifier head, and the
vectors (biases, BatchNorm) keep plain SGD, as in airbench94_muon.

``Muon`` is one ``torch.optim.Optimizer`` for both kinds: a parameter group with ``muon=True``
takes the Muon step, the others torch's (fused) SGD step, so the training loop sees a single
optimizer (LR schedule through ``lr``, state_dict, resume). ``for_model`` builds it from the
parameter groups of ``train.build_optimizer`` and a recipe's ``[optim]`` table.
"""

from __future__ import annotations

import torch
from torch.optim.sgd import sgd

# the quintic's coefficients: the slope at zero as large as possible while the iteration still
# maps (0, 1] into about [0.7, 1.2] (Jordan 2024)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About ``U V^T`` for the 2-D ``g = U S V^T``: ``steps`` Newton-Schulz iterations
    ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, from ``X = g / ||g||_F`` (so every singular
    value starts in (0, 1]). Computed in float32 on the short side; returns g's shape, float32."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    x = x / (x.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for the groups with ``muon=True``, torch's SGD for the others.

    Muon group keys: ``lr``, ``muon_momentum``, ``muon_nesterov``, ``ns_steps``, ``normalize``
    (airbench94_muon: before each step the weight is rescaled to Frobenius norm sqrt(out_channels),
    which stands in for weight decay). The update of an ``(r, c)`` matrix is scaled by
    ``max(1, r / c) ** 0.5``, so tall matrices (depthwise kernels) take steps of the same RMS size.
    SGD group keys: ``lr``, ``momentum``, ``nesterov``, ``weight_decay`` (torch's SGD semantics).
    A schedule that cycles ``momentum`` moves the SGD groups only.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0,
                 muon_momentum: float = 0.95, muon_nesterov: bool = True, ns_steps: int = 5, normalize: bool = False):
        if lr <= 0 or not 0 <= momentum < 1 or not 0 <= muon_momentum < 1 or ns_steps < 1:
            raise ValueError(f"Muon: lr {lr} must be > 0, momenta {momentum}, {muon_momentum} in [0, 1), "
                             f"ns_steps {ns_steps} >= 1")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, muon=False,
                        muon_momentum=muon_momentum, muon_nesterov=muon_nesterov, ns_steps=ns_steps,
                        normalize=normalize)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon: a muon=True group holds a parameter with fewer than 2 dimensions")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._sgd_step(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        momentum = group["muon_momentum"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(p.grad)
            update = p.grad.add(buf, alpha=momentum) if group["muon_nesterov"] else buf
            rows = p.shape[0]
            ortho = orthogonalize(update.reshape(rows, -1), group["ns_steps"])
            if group["normalize"]:
                p.mul_(rows ** 0.5 / p.norm().clamp_min(1e-12))
            scale = max(1.0, rows / ortho.shape[1]) ** 0.5
            p.add_(ortho.reshape(p.shape).to(p.dtype), alpha=-group["lr"] * scale)

    def _sgd_step(self, group: dict, params: list[torch.Tensor]) -> None:
        if not params:
            return
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd(params, [p.grad for p in params], buffers, fused=True, weight_decay=group["weight_decay"], momentum=momentum,
            lr=group["lr"], dampening=0.0, nesterov=group["nesterov"] and momentum > 0, maximize=False)
        if momentum > 0:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable weights Muon takes: every parameter with 2 or more dimensions except the
    model's first and last such parameter (the input layer, e.g. airbench's frozen whitening
    conv, and the classifier head), in the model's order."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    return [p for p in matrices[1:-1] if p.requires_grad]


def for_model(model: torch.nn.Module, groups: list[dict], o) -> Muon:
    """A Muon optimizer from SGD-style parameter groups (``params``, ``weight_decay``,
    ``lr_scale``) and an ``[optim]`` table ``o``: the hidden matrices move into a Muon group of
    their own, whose ``lr_scale`` is ``o.muon_lr / o.lr`` so that an LR schedule scales both LRs
    alike; the rest stay SGD groups (``o.lr``, ``o.momentum``, ``o.nesterov``)."""
    hidden = {id(p) for p in hidden_matrices(model)}
    muon_group = {"params": [p for g in groups for p in g["params"] if id(p) in hidden], "muon": True,
                  "lr": o.muon_lr, "lr_scale": o.muon_lr / o.lr, "weight_decay": 0.0}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in hidden]} for g in groups]
    groups = [g for g in [muon_group, *rest] if g["params"]]
    return Muon(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, muon_momentum=o.muon_momentum,
                muon_nesterov=o.muon_nesterov, ns_steps=o.ns_steps, normalize=o.muon_normalize)
