"""What a cell kind is, as one record: `CellUnit` (torch-free; see rnndiag.cells.tensors).

A unit holds the facts the rest of rnndiag used to branch on: the gate multiple G and the
parameters of one layer and direction (by base name, `weight_ih`, ...), whether it carries a
cell state c_t or may be projected, how much memory its replay takes, and two functions: its
step equations and its data-free reading of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from rnndiag.records import CellType, ForgetBias, ModuleKind, ModuleSpec, PascanuReading

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from torch import Tensor

    from rnndiag.cells.tensors import LayerWeights, StepOut

Shape = tuple[int, ...]
Getter = Callable[[str], "ArrayLike | None"]  # base name (`bias_ih`) -> one layer's array


class StepFn(Protocol):
    def __call__(self, nonlinearity: str | None, xt: Tensor, h: Tensor, c: Tensor | None,
                 w: LayerWeights, /) -> StepOut:
        """One time step from this step's input term `xt` (B, G*H) and the state (h, c)."""
        ...


class StaticReading(NamedTuple):
    pascanu: PascanuReading
    forget_bias: ForgetBias | None


class StaticFn(Protocol):
    def __call__(self, spec: ModuleSpec, get: Getter, sigma: float, /) -> StaticReading:
        """Pascanu's reading and forget-gate statistics of one layer; sigma = sigma_max(W_hh)."""
        ...


@dataclass(frozen=True)
class CellUnit:
    """One cell kind: its shapes, step equations and static reading."""

    cell_type: CellType
    name: str  # how messages name the kind: "LSTM"
    gates: int  # G, the row multiple of W_ih, W_hh and the biases
    gate_order: tuple[str, ...]  # the G row blocks, top to bottom: ("i", "f", "g", "o")
    projection: bool  # may be projected: proj_size > 0, W_hr (P, H), h_t (B, P)
    has_cell_state: bool  # carries c_t (B, H) besides h_t
    nonlinearities: tuple[str, ...]  # choices of activation, the default first; () if fixed
    folds_hidden_bias: bool  # b_hh joins the input term (the gates see only b_ih + b_hh)
    memory_units: int  # replay bytes per T * B * max(H, P) * itemsize (rnndiag.resources)
    step: StepFn
    static: StaticFn

    @property
    def gated(self) -> bool:
        return self.gates > 1

    @property
    def default_nonlinearity(self) -> str | None:
        return self.nonlinearities[0] if self.nonlinearities else None

    def kind(self, stacked: bool) -> ModuleKind:
        """The nn.Module class: nn.LSTM when `stacked`, nn.LSTMCell otherwise."""
        return next(k for k in ModuleKind
                    if k.cell_type is self.cell_type and k.is_cell != stacked)

    def param_shapes(self, input_size: int, hidden: int, proj: int, bias: bool,
                     ) -> dict[str, Shape]:
        """Shapes of one layer and direction's parameters by base name, in PyTorch's order."""
        if proj and not self.projection:
            raise ValueError(f"{self.name} has no projection (proj_size {proj})")
        rows = self.gates * hidden
        shapes: dict[str, Shape] = {"weight_ih": (rows, input_size),
                                    "weight_hh": (rows, proj or hidden)}
        if bias:
            shapes |= {"bias_ih": (rows,), "bias_hh": (rows,)}
        if proj:
            shapes["weight_hr"] = (proj, hidden)
        return shapes

    def bases(self, stacked: bool) -> tuple[str, ...]:
        """Every base name a parameter may have (only nn.LSTM, not the cells, projects)."""
        proj = 1 if stacked and self.projection else 0
        return tuple(self.param_shapes(1, 1, proj, True))
