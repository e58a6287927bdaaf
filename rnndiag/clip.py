"""A gradient-clipping threshold from measured mini-batch gradient norms.

The replayed batch is split into K consecutive mini-batches (`torch.tensor_split`); for each,
the total L2 norm over all diagnosed parameters of the gradient of the loss on that
mini-batch alone, before any clipping. The suggestion is a percentile of those K norms
(linear interpolation; default the median: Pascanu et al. 2013 advise a threshold around the
average norm). Also reported: the mean, Pascanu's band (0.5x to 10x the mean), the AutoClip
10th percentile (Seetharaman et al. 2020), the max, and the fraction of mini-batches whose
norm the suggestion would clip (norm > suggestion).

Checkpoint mode derives the K norms from the adjoints the replay captured (rnndiag.pergrad);
`minibatch_norms` (K forward/backward passes on B/K examples each, about one training step in
all) serves user models and the tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rnndiag.errors import OptionError
from rnndiag.records import ClipSuggestion


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def suggest(norms: Sequence[float], q: float, parameters: str, count: int) -> ClipSuggestion:
    value = percentile(norms, q)
    mean = sum(norms) / len(norms)
    return ClipSuggestion(
        suggested_max_norm=value, percentile=q, norms=tuple(norms), mean=mean,
        pascanu_band=(0.5 * mean, 10.0 * mean), autoclip_p10=percentile(norms, 10.0),
        max=max(norms), fraction_clipped=sum(n > value for n in norms) / len(norms),
        batches=len(norms), parameters=parameters, parameter_count=count)


def batches_for(option: int | None, batch_size: int) -> int:
    k = min(8, batch_size) if option is None else option
    if not 1 <= k <= batch_size:
        raise OptionError(f"--clip-batches must be between 1 and the batch size {batch_size}, "
                          f"got {k}")
    return k


def minibatch_norms(loss_of: Callable[[Tensor], Tensor], params: Sequence[Tensor],
                    batch_size: int, k: int) -> list[float]:
    """||grad of loss_of(indices) w.r.t. params||_2 for each of k consecutive index groups."""
    norms = []
    for idx in torch.tensor_split(torch.arange(batch_size), k):
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of(idx), list(params), allow_unused=True)
        total = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None)
        norms.append(math.sqrt(total))
    return norms
