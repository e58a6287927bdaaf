"""The LSTM (nn.LSTM, nn.LSTMCell): G = 4, gates (i, f, g, o), a cell state, optional projection.

Step (PyTorch's docs), with a_t = xt + h_{t-1} W_hh^T split into (i, f, g, o):
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    m_t = sigmoid(o) * tanh(c_t)
    h_t = m_t W_hr^T (proj_size > 0, h_t (B, P)), else h_t = m_t

Static reading: sigma_max(W_hh) has no Pascanu bound for a gated cell; instead the effective
forget-gate bias b_if + b_hf (rows H..2H) says how much of c_t is kept at rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from rnndiag.cells.base import CellUnit, Getter, StaticReading
from rnndiag.cells.tensors import LayerWeights, StepOut
from rnndiag.records import CellType, ForgetBias, ModuleSpec, PascanuReading

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from torch import Tensor


def step(nonlinearity: str | None, xt: Tensor, h: Tensor, c: Tensor | None,
         w: LayerWeights) -> StepOut:
    """(h_t, c_t) from xt + h W_hh^T; fused ops (addmm, addcmul) keep the op count low."""
    assert c is not None
    a = xt.addmm(h, w.w_hh.t())
    i, f, g, o = a.chunk(4, dim=1)
    # three sigmoids, not one over all four gates: each saves its output for the backward
    c_new = (f.sigmoid() * c).addcmul(i.sigmoid(), g.tanh())
    m = o.sigmoid() * c_new.tanh()
    return StepOut(m if w.w_hr is None else m @ w.w_hr.t(), c_new)


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


def static(spec: ModuleSpec, get: Getter, sigma: float) -> StaticReading:
    """No Pascanu bound (gated); the forget-gate bias statistics."""
    return StaticReading(PascanuReading.NOT_APPLICABLE,
                         forget_bias(get("bias_ih"), get("bias_hh"), spec.hidden_size))


UNIT = CellUnit(
    cell_type=CellType.LSTM, name="LSTM", gates=4, gate_order=("i", "f", "g", "o"),
    projection=True, has_cell_state=True, nonlinearities=(), folds_hidden_bias=True,
    memory_units=18, step=step, static=static,
)
