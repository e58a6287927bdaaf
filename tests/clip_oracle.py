"""The clip rule's N_b from explicitly computed per-example gradients (README, "Clip-norm
suggestion"); nothing here imports rnndiag."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def expected_norm(per_example: Sequence[Sequence[Tensor]], b: int) -> float:
    """N_b = sqrt(G + (S - G)/b), S = mean ||g_i||^2, F = ||mean g_i||^2,
    G = max(0, (n F - S)/(n - 1)), each g_i given as its parameters' gradients."""
    flat = [torch.cat([g.reshape(-1).double() for g in grads]) for grads in per_example]
    n = len(flat)
    s = sum(float(g.pow(2).sum()) for g in flat) / n
    f = float(torch.stack(flat).mean(0).pow(2).sum())
    g = max(0.0, (n * f - s) / (n - 1))
    return math.sqrt(g + (s - g) / b)


def top_curvature(loss_of: Callable[[Tensor], Tensor], theta: Tensor) -> float:
    """The largest eigenvalue of the dense Hessian of `loss_of` at the flat parameter
    vector `theta` (torch.autograd.functional.hessian, then eigvalsh)."""
    hessian = torch.autograd.functional.hessian(loss_of, theta.detach().double())
    hessian = (hessian + hessian.T) / 2  # symmetric up to rounding
    return float(torch.linalg.eigvalsh(hessian).max())
