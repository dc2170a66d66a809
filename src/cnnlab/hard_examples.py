"""Training on the hard images: ``train.hard_fraction`` (1 = off).

The first epoch trains on every image; every later epoch on the pool of the images that were
hardest in it: the fraction ``hard_fraction`` of the training set, and at least one batch. An
image's hardness is its training loss from the forward pass it went through anyway, so it costs no
extra pass. A loss depends on when in the epoch it was measured (the first batches, seen by an
untrained network, all have high losses), so an image is scored by its loss's rank within its own
batch, as a quantile: a score of 0.9 says "harder than about 90% of the training images". The pool
is chosen once, after the first epoch; it is a simple, one-shot form of the online batch selection
of Loshchilov and Hutter (2015), which ranks images by their latest known loss.

On MNIST most images are learnt in the first epoch: 4 more epochs over the hardest 10% end more
accurate than a second full epoch (BENCHMARKS.md, "Training on the hard images").
"""

from __future__ import annotations

import torch


def pool_size(n: int, fraction: float, batch_size: int) -> int:
    """Images in the pool: the hardest ``fraction`` of ``n``, at least one batch (at most all ``n``)."""
    return min(n, max(round(n * fraction), batch_size))


def batch_scores(losses: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Scores of an epoch's images from their ``losses`` and the ``batch`` (0, 1, ...) each was in: the
    k-th smallest of n losses in a batch is at the (k + 1) / (n + 1) quantile of the set the batch was
    drawn from (the expected quantile of the k-th of n random draws)."""
    by_loss = torch.argsort(losses, stable=True)
    order = by_loss[torch.argsort(batch[by_loss], stable=True)]  # grouped by batch, each group by loss
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    sizes = torch.bincount(batch)
    rank = position - (torch.cumsum(sizes, 0) - sizes)[batch]
    return (rank + 1).float() / (sizes[batch] + 1).float()


def scores_of(n: int, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """One score per training image (``n``): ``scores`` for the images ``indices``, 0 for the rest
    (images a dropped last batch left out)."""
    out = torch.zeros(n)
    out[indices.long().cpu()] = scores.float().cpu()
    return out


def hardest(scores: torch.Tensor, fraction: float, batch_size: int) -> torch.Tensor:
    """Indices of the ``pool_size`` images of highest score, in ascending order (ties: the lower index)."""
    k = pool_size(len(scores), fraction, batch_size)
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values
