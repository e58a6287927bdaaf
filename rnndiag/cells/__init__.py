"""One unit per cell kind, and the registry the rest of rnndiag dispatches through.

A `CellUnit` (rnndiag.cells.base) holds everything that differs between RNN, LSTM and GRU:
gate multiple and parameter shapes, step equations, the memory estimate and the static
reading. Each kind has its module (rnn, lstm, gru) ending in `UNIT = CellUnit(...)`; adding a
kind is one more module and one more entry in `REGISTRY` (plus its CellType and ModuleKind
members in rnndiag.records).

Shapes and the step conventions are in rnndiag.cells.tensors. Nothing here imports torch:
the units call Tensor methods only, so `rnndiag inspect` reads the registry without torch.
In a step loop, look the step up once (`step_fn = unit(cell).step`) rather than per step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rnndiag.cells import gru, lstm, rnn
from rnndiag.cells.base import CellUnit, StaticReading
from rnndiag.cells.tensors import LayerWeights, StepOut, project_inputs
from rnndiag.records import CellType

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["REGISTRY", "CellUnit", "LayerWeights", "StaticReading", "StepOut", "all_bases",
           "by_gates", "input_terms", "step", "unit", "units"]

REGISTRY: dict[CellType, CellUnit] = {u.cell_type: u for u in (rnn.UNIT, lstm.UNIT, gru.UNIT)}


def unit(cell: CellType) -> CellUnit:
    """The unit of `cell`."""
    return REGISTRY[cell]


def units() -> tuple[CellUnit, ...]:
    """Every registered unit, by gate multiple."""
    return tuple(sorted(REGISTRY.values(), key=lambda u: u.gates))


def by_gates(gates: int) -> CellUnit | None:
    """The unit whose W_hh has `gates` * H rows, if any (gate multiples are unique)."""
    return next((u for u in REGISTRY.values() if u.gates == gates), None)


def all_bases(stacked: bool) -> tuple[str, ...]:
    """Every parameter base name of any unit, nn.RNN-style modules (`stacked`) or cells."""
    return tuple(dict.fromkeys(b for u in REGISTRY.values() for b in u.bases(stacked)))


def input_terms(x: Tensor, w: LayerWeights, cell: CellType) -> Tensor:
    """Every step's input term at once, (B, T, I) -> (B, T, G*H): x W_ih^T + b_ih, plus b_hh
    where the unit folds it in (RNN and LSTM, whose gates only ever see the sum; a GRU's n
    gate scales the hidden term, so its b_hh stays on the hidden side)."""
    return project_inputs(x, w, REGISTRY[cell].folds_hidden_bias)


def step(
    cell: CellType,
    nonlinearity: str | None,
    xt: Tensor,
    h: Tensor,
    c: Tensor | None,
    w: LayerWeights,
) -> StepOut:
    """One time step of `cell` from this step's input term `xt` (B, G*H) (see `input_terms`)."""
    return REGISTRY[cell].step(nonlinearity, xt, h, c, w)
