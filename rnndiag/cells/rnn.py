"""The plain RNN (nn.RNN, nn.RNNCell): G = 1, no gates, activation tanh or relu.

Step (PyTorch's docs): a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh, h_t = phi(a_t); the
input term xt = x_t W_ih^T + b_ih + b_hh comes precomputed for every step.

Static reading, Pascanu, Mikolov & Bengio 2013 (On the difficulty of training RNNs, sec. 3.1):
with |phi'| <= gamma, ||dh_t/dh_{t-1}|| <= sigma_max(W_hh) * gamma. So sigma_max < 1/gamma is
sufficient for gradients to vanish over long spans, and sigma_max > 1/gamma is necessary (not
sufficient) for them to explode. gamma = 1 for tanh and relu.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rnndiag.cells.base import CellUnit, Getter, StaticReading
from rnndiag.cells.tensors import LayerWeights, StepOut
from rnndiag.records import CellType, ModuleSpec, PascanuReading

if TYPE_CHECKING:
    from torch import Tensor

GAMMA = {"tanh": 1.0, "relu": 1.0}  # sup |phi'|


def step(nonlinearity: str | None, xt: Tensor, h: Tensor, c: Tensor | None,
         w: LayerWeights) -> StepOut:
    """h_t = phi(xt + h W_hh^T)."""
    a = xt.addmm(h, w.w_hh.t())
    out = a.relu() if nonlinearity == "relu" else a.tanh()
    return StepOut(out, None)


def pascanu(sigma: float, nonlinearity: str | None) -> PascanuReading:
    """Read sigma_max(W_hh) against the bound 1/gamma."""
    if nonlinearity not in GAMMA or not math.isfinite(sigma):
        return PascanuReading.NOT_APPLICABLE
    bound = 1.0 / GAMMA[nonlinearity]
    if sigma < bound:
        return PascanuReading.VANISHING_GUARANTEED
    if sigma > bound:
        return PascanuReading.EXPLODING_POSSIBLE
    return PascanuReading.BOUNDARY


def static(spec: ModuleSpec, get: Getter, sigma: float) -> StaticReading:
    """Pascanu's bound; a plain RNN has no forget gate."""
    return StaticReading(pascanu(sigma, spec.nonlinearity), None)


UNIT = CellUnit(
    cell_type=CellType.RNN, name="RNN", gates=1, gate_order=("a",), projection=False,
    has_cell_state=False, nonlinearities=("tanh", "relu"), folds_hidden_bias=True,
    memory_units=6, step=step, static=static,
)
