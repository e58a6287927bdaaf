"""The GRU (nn.GRU, nn.GRUCell): G = 3, gates (r, z, n); b_hh stays on the hidden side.

Step (PyTorch's docs), with xt = x_t W_ih^T + b_ih split into (x_rz, x_n) and the hidden term
hp = h_{t-1} W_hh^T + b_hh into (h_rz, h_n):
    r, z = sigmoid(x_rz + h_rz)
    n = tanh(x_n + r * h_n)
    h_t = (1 - z) * n + z * h_{t-1}  (lerp(n, h, z))

Static reading: sigma_max(W_hh) only; the Pascanu bound is for plain RNNs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rnndiag.cells.base import CellUnit, Getter, StaticReading
from rnndiag.cells.tensors import LayerWeights, StepOut
from rnndiag.records import CellType, ModuleSpec, PascanuReading

if TYPE_CHECKING:
    from torch import Tensor


def step(nonlinearity: str | None, xt: Tensor, h: Tensor, c: Tensor | None,
         w: LayerWeights) -> StepOut:
    """h_t from xt and h; fused ops (addmm, addcmul, lerp) keep the op count low."""
    hp = w.b_hh.addmm(h, w.w_hh.t()) if w.b_hh is not None else h @ w.w_hh.t()
    hidden = xt.shape[1] // 3
    x_rz, x_n = xt.split([2 * hidden, hidden], dim=1)
    h_rz, h_n = hp.split([2 * hidden, hidden], dim=1)
    r, z = (x_rz + h_rz).sigmoid().chunk(2, dim=1)
    n = x_n.addcmul(r, h_n).tanh()
    return StepOut(n.lerp(h, z), None)


def static(spec: ModuleSpec, get: Getter, sigma: float) -> StaticReading:
    """No Pascanu bound (gated) and no forget gate."""
    return StaticReading(PascanuReading.NOT_APPLICABLE, None)


UNIT = CellUnit(
    cell_type=CellType.GRU, name="GRU", gates=3, gate_order=("r", "z", "n"), projection=False,
    has_cell_state=False, nonlinearities=(), folds_hidden_bias=False,
    memory_units=16, step=step, static=static,
)
