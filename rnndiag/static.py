"""Data-free checks of recurrent weights.

Pascanu, Mikolov & Bengio 2013 (On the difficulty of training RNNs, sec. 3.1): for
h_t = sigma(W_hh h_{t-1} + ...) with |sigma'| <= gamma,
||dh_t/dh_{t-1}|| <= sigma_max(W_hh) * gamma.
So sigma_max < 1/gamma is sufficient for gradients to vanish over long spans, and
sigma_max > 1/gamma is necessary (not sufficient) for them to explode. gamma = 1 for tanh and
relu. The bound is stated for plain RNNs; for gated cells sigma_max is reported without it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnndiag.records import CellType, ForgetBias, PascanuReading

GAMMA = {"tanh": 1.0, "relu": 1.0}


def sigma_max(w_hh: Tensor) -> float:
    """Largest singular value (spectral norm) of W_hh as stored: (G*H, P), gates stacked."""
    return float(torch.linalg.matrix_norm(w_hh.double(), ord=2))


def pascanu(sigma: float, cell: CellType, nonlinearity: str | None) -> PascanuReading:
    if cell is not CellType.RNN or nonlinearity not in GAMMA:
        return PascanuReading.NOT_APPLICABLE
    bound = 1.0 / GAMMA[nonlinearity]
    if sigma < bound:
        return PascanuReading.VANISHING_GUARANTEED
    if sigma > bound:
        return PascanuReading.EXPLODING_POSSIBLE
    return PascanuReading.BOUNDARY


def forget_bias(b_ih: Tensor | None, b_hh: Tensor | None, hidden: int) -> ForgetBias | None:
    """Statistics of b_if + b_hf (rows H..2H of the LSTM biases, gate order i, f, g, o)."""
    if b_ih is None or b_hh is None:
        return None
    b = (b_ih[hidden : 2 * hidden] + b_hh[hidden : 2 * hidden]).double()
    return ForgetBias(mean=float(b.mean()), min=float(b.min()), max=float(b.max()),
                      mean_gate_at_rest=float(torch.sigmoid(b).mean()))
