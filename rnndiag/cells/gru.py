"""The GRU (nn.GRU, nn.GRUCell): G = 3, gates (r, z, n); b_hh stays on the hidden side.

Step (PyTorch's docs), with xt = x_t W_ih^T + b_ih split into (x_rz, x_n) and the hidden term
hp = h_{t-1} W_hh^T + b_hh into (h_rz, h_n):
    r, z = sigmoid(x_rz + h_rz)
    n = tanh(x_n + r * h_n)          (n_pre = x_n + r * h_n)
    h_t = (1 - z) * n + z * h_{t-1}  (lerp(n, h, z))

Weight gradient: the replay captures dpre_t = dL/dhp_t and dxn_t = dL/dn_pre_t. The hidden
side gives dW_hh = sum_{t,b} dpre h_prev^T and db_hh = sum dpre; the input side sees dpre's
(r, z) rows but dxn for the n rows (r scales only the hidden term):
dW_ih = sum [dpre_rz, dxn] x^T and db_ih = sum [dpre_rz, dxn].

Static reading: sigma_max(W_hh) only; the Pascanu bound is for plain RNNs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rnndiag.cells.base import CellUnit, Getter, StaticReading
from rnndiag.cells.tensors import GradTerms, LayerWeights, StepOut, outer_sq, sq
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
    n_pre = x_n.addcmul(r, h_n)
    n = n_pre.tanh()
    return StepOut(n.lerp(h, z), None, None, hp, n_pre)


def weight_sq(g: GradTerms, rows: Tensor) -> float:
    """||dW_ih||^2 + ||dW_hh||^2 (+ biases) over the examples `rows`."""
    assert g.dpre is not None and g.dxn is not None
    x_k, dpre = g.x[:, rows], g.dpre[:, rows]
    total = outer_sq(dpre, g.h_prev[:, rows])
    hidden = g.dxn.shape[-1]
    dxn = g.dxn[:, rows]
    total += outer_sq(dpre[..., :2 * hidden], x_k) + outer_sq(dxn, x_k)
    if g.bias:
        sums = dpre.sum(dim=(0, 1))
        total += sq(sums) + sq(sums[:2 * hidden]) + sq(dxn.sum(dim=(0, 1)))
    return total


def static(spec: ModuleSpec, get: Getter, sigma: float) -> StaticReading:
    """No Pascanu bound (gated) and no forget gate."""
    return StaticReading(PascanuReading.NOT_APPLICABLE, None)


UNIT = CellUnit(
    cell_type=CellType.GRU, name="GRU", gates=3, gate_order=("r", "z", "n"), projection=False,
    has_cell_state=False, nonlinearities=(), folds_hidden_bias=False,
    captures_pre=True, captures_n_pre=True, memory_units=16,
    step=step, weight_sq=weight_sq, static=static,
)
