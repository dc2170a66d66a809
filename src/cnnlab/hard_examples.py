"""Training on the hard images: ``train.hard_fraction`` (1 = off).

The first epoch trains on every image; each later epoch on the fraction ``hard_fraction`` of them
that were hardest when last seen. An image's hardness is its training loss from the forward pass it
went through anyway, so it costs no extra pass. A loss depends on when in the run it was measured
(early batches of the first epoch all have high losses), so an image is scored by its loss's rank
within its own batch, scaled into the share of the training set that batch was drawn from: a score
of 0.9 says "harder than about 90% of the training images". This is a simple form of the online
batch selection of Loshchilov and Hutter (2015), which ranks images by their latest known loss.

On MNIST most images are learnt in the first epoch; a second epoch on the hardest half gives the
accuracy of a full second epoch (BENCHMARKS.md, "Training on the hard images").
"""

from __future__ import annotations

import torch


def pool_size(n: int, fraction: float) -> int:
    """Images in an epoch over the hardest ``fraction`` of ``n``."""
    return max(1, round(n * fraction))


def batch_scores(losses: torch.Tensor, batch: torch.Tensor, share: float) -> torch.Tensor:
    """Scores of an epoch's images from their ``losses`` and the ``batch`` (0, 1, ...) each was in.
    The k-th smallest of n losses in a batch is at the (k + 1) / (n + 1) quantile of the set the batch
    was drawn from (the expected quantile of the k-th of n random draws): that, scaled into the top
    ``share`` of the training set the epoch was drawn from (1: all of it), is the score."""
    by_loss = torch.argsort(losses, stable=True)
    order = by_loss[torch.argsort(batch[by_loss], stable=True)]  # grouped by batch, each group by loss
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order))
    sizes = torch.bincount(batch)
    rank = position - (torch.cumsum(sizes, 0) - sizes)[batch]
    return (1 - share) + share * (rank + 1).float() / (sizes[batch] + 1).float()


def updated(scores: torch.Tensor | None, n: int, indices: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """A copy of ``scores`` (one per training image; None: all 0) with the images ``indices`` scored ``new``."""
    out = torch.zeros(n) if scores is None else scores.clone()
    out[indices.long().cpu()] = new.float().cpu()
    return out


def hardest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``pool_size`` images of highest score, in ascending order (ties: the lower index)."""
    k = pool_size(len(scores), fraction)
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values
