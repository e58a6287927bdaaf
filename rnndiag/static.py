"""Data-free checks of recurrent weights.

Pascanu, Mikolov & Bengio 2013 (On the difficulty of training RNNs, sec. 3.1): for
h_t = sigma(W_hh h_{t-1} + ...) with |sigma'| <= gamma,
||dh_t/dh_{t-1}|| <= sigma_max(W_hh) * gamma.
So sigma_max < 1/gamma is sufficient for gradients to vanish over long spans, and
sigma_max > 1/gamma is necessary (not sufficient) for them to explode. gamma = 1 for tanh and
relu. The bound is stated for plain RNNs; for gated cells sigma_max is reported without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from rnndiag.records import CellType, Direction, ForgetBias, ModuleSpec, PascanuReading, StaticLayer

GAMMA = {"tanh": 1.0, "relu": 1.0}


def sigma_max(w_hh: ArrayLike | None) -> float:
    """Largest singular value (spectral norm) of W_hh as stored: (G*H, P), gates stacked.

    NaN when W_hh holds a non-finite value (the SVD is undefined then).
    """
    w = np.asarray(w_hh, dtype=np.float64)
    if w_hh is None or w.size == 0:
        return 0.0
    if not np.isfinite(w).all():
        return math.nan
    # sigma_max^2 is the largest eigenvalue of the smaller Gram matrix (P x P for a (G*H, P)
    # W_hh): an eigh of P x P instead of an SVD of (G*H, P), same result to ~1e-12 relative.
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return math.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0))


def pascanu(sigma: float, cell: CellType, nonlinearity: str | None) -> PascanuReading:
    if cell is not CellType.RNN or nonlinearity not in GAMMA or not math.isfinite(sigma):
        return PascanuReading.NOT_APPLICABLE
    bound = 1.0 / GAMMA[nonlinearity]
    if sigma < bound:
        return PascanuReading.VANISHING_GUARANTEED
    if sigma > bound:
        return PascanuReading.EXPLODING_POSSIBLE
    return PascanuReading.BOUNDARY


def forget_bias(b_ih: ArrayLike | None, b_hh: ArrayLike | None,
                hidden: int) -> ForgetBias | None:
    """Statistics of b_if + b_hf (rows H..2H of the LSTM biases, gate order i, f, g, o)."""
    if b_ih is None or b_hh is None:
        return None
    b = (np.asarray(b_ih, dtype=np.float64)[hidden : 2 * hidden]
         + np.asarray(b_hh, dtype=np.float64)[hidden : 2 * hidden])
    with np.errstate(over="ignore"):
        gate = 1.0 / (1.0 + np.exp(-b))
    return ForgetBias(mean=float(b.mean()), min=float(b.min()), max=float(b.max()),
                      mean_gate_at_rest=float(gate.mean()))


def static_layer(spec: ModuleSpec, arrays: Mapping[str, ArrayLike], layer: int,
                 direction: Direction) -> StaticLayer:
    """sigma_max, Pascanu's reading and forget-gate bias of one layer; `arrays` by local name."""

    def get(base: str) -> ArrayLike | None:
        return arrays.get(spec.local_name(base, layer, direction))

    sigma = sigma_max(get("weight_hh"))
    fb = None
    if spec.cell_type is CellType.LSTM:
        fb = forget_bias(get("bias_ih"), get("bias_hh"), spec.hidden_size)
    return StaticLayer(layer, direction, sigma, pascanu(sigma, spec.cell_type, spec.nonlinearity),
                       fb)
