"""The tensors a cell's step and weight-gradient formula share, written without importing torch.

Shapes: x_t (B, I); h (B, P) with P = proj_size or hidden_size; c (B, H). Weights as PyTorch
stores them: W_ih (G*H, I), W_hh (G*H, P), b_ih and b_hh (G*H,), W_hr (P, H) for projected
LSTMs, G being the unit's gate multiple. Sequences of one layer and direction are (T, B, .)
by time index t, except the layer input `x` of `project_inputs`, which is batch-first.

Everything here (and in the units) calls Tensor methods, which run the same ATen ops as the
`torch.*` functions (`a.addmm(b, c)` is `torch.addmm(a, b, c)`): the cells package then needs
no torch import, so `rnndiag inspect` can use the registry without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from rnndiag.records import Direction, ModuleSpec

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class LayerWeights:
    """The weights of one layer and direction."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    w_hr: Tensor | None  # LSTM projection, (P, H)

    @staticmethod
    def of(
        spec: ModuleSpec, params: Mapping[str, Tensor], layer: int, direction: Direction
    ) -> LayerWeights:
        """Pick one layer's tensors out of `params` (keyed by local names, `weight_ih_l0`)."""

        def get(base: str) -> Tensor | None:
            return params.get(spec.local_name(base, layer, direction))

        w_ih, w_hh = get("weight_ih"), get("weight_hh")
        if w_ih is None or w_hh is None:
            raise KeyError(spec.local_name("weight_ih", layer, direction))
        return LayerWeights(w_ih, w_hh, get("bias_ih"), get("bias_hh"), get("weight_hr"))


class StepOut(NamedTuple):
    h: Tensor  # (B, P) the new state
    c: Tensor | None  # (B, H) LSTM cell state
    m: Tensor | None  # (B, H) a projected LSTM's output before the projection
    pre: Tensor  # (B, G*H) hidden-side pre-activation: a_t = xt + h W_hh^T (RNN, LSTM),
    #              h W_hh^T + b_hh (GRU); its gradient gives the weight gradients
    n_pre: Tensor | None  # (B, H) GRU: x_n + r * hn, whose gradient is the input-side n adjoint


def project_inputs(x: Tensor, w: LayerWeights, hidden_bias: bool) -> Tensor:
    """Every step's input term at once, (B, T, I) -> (B, T, G*H): x W_ih^T + b_ih, plus b_hh
    when `hidden_bias` (for cells whose gates only ever see the sum b_ih + b_hh)."""
    biases = [b for b in (w.b_ih, w.b_hh if hidden_bias else None) if b is not None]
    flat = x.reshape(-1, x.shape[-1])
    if not biases:
        return (flat @ w.w_ih.t()).view(*x.shape[:-1], -1)
    bias = biases[0] if len(biases) == 1 else biases[0] + biases[1]
    return bias.addmm(flat, w.w_ih.t()).view(*x.shape[:-1], -1)


@dataclass(frozen=True)
class GradTerms:
    """What one layer and direction's weight gradient is made of, (T, B, .) by time index t."""

    x: Tensor  # (T, B, I) the layer's input
    h_prev: Tensor  # (T, B, P) the state each step started from (zeros before the first)
    h: Tensor  # (T, B, P) the states
    dh: Tensor  # (T, B, P) dL/dh_t
    dpre: Tensor | None  # (T, B, G*H) captured adjoint of StepOut.pre (None: not captured)
    dxn: Tensor | None  # (T, B, H) captured adjoint of StepOut.n_pre (GRU)
    m: Tensor | None  # (T, B, H) a projected LSTM's outputs before the projection
    bias: bool
    nonlinearity: str | None


def summed_gates_sq(dpre: Tensor, g: GradTerms, rows: Tensor) -> float:
    """||dW||^2 of a cell whose W_ih and W_hh terms add up (dx = dpre): RNN and LSTM."""
    total = outer_sq(dpre, g.h_prev[:, rows])
    total += outer_sq(dpre, g.x[:, rows])
    if g.bias:
        total += 2 * sq(dpre.sum(dim=(0, 1)))
    return total


def outer_sq(delta: Tensor, values: Tensor) -> float:
    """||sum_{t,b} delta_{t,b} values_{t,b}^T||_F^2."""
    g = delta.reshape(-1, delta.shape[-1]).t() @ values.reshape(-1, values.shape[-1])
    return sq(g)


def sq(t: Tensor) -> float:
    """||t||_F^2, accumulated in float64."""
    return float(t.double().pow(2).sum())
