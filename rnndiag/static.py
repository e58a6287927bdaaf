"""Data-free checks of recurrent weights.

sigma_max(W_hh), the spectral norm of the recurrent weights as stored ((G*H, P), gates
stacked), is computed for every cell; what it means is the unit's to say (rnndiag.cells):
the plain RNN reads it against Pascanu et al.'s bound 1/gamma, the LSTM adds its forget-gate
bias statistics, the GRU reports it without a reading.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from rnndiag.cells import unit
from rnndiag.records import Direction, ModuleSpec, StaticLayer


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
    # W is scaled to max |w| = 1 first: squaring weights of 1e200 would overflow float64.
    scale = float(np.abs(w).max())
    if scale == 0.0:
        return 0.0
    return scale * math.sqrt(max(_largest_gram_eigenvalue(w / scale), 0.0))


def _largest_gram_eigenvalue(w: np.ndarray) -> float:
    """Through torch's BLAS and LAPACK when torch is loaded already (every replay): numpy's
    threaded OpenBLAS spin-waits against torch's threads on a busy machine (a 256 x 256
    eigvalsh took 1.3 s instead of 3 ms on 2 shared cores); torch-free otherwise (`inspect`)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        t = torch.from_numpy(w)
        gram = t.T @ t if t.shape[0] >= t.shape[1] else t @ t.T
        return float(torch.linalg.eigvalsh(gram)[-1])
    gram_np = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    return float(np.linalg.eigvalsh(gram_np)[-1])


def static_layer(spec: ModuleSpec, arrays: Mapping[str, ArrayLike], layer: int,
                 direction: Direction) -> StaticLayer:
    """sigma_max and the unit's reading of one layer (Pascanu, forget-gate bias); `arrays` by
    local name."""

    def get(base: str) -> ArrayLike | None:
        return arrays.get(spec.local_name(base, layer, direction))

    sigma = sigma_max(get("weight_hh"))
    reading = unit(spec.cell_type).static(spec, get, sigma)
    return StaticLayer(layer, direction, sigma, reading.pascanu, reading.forget_bias)
