"""Step equations of PyTorch's RNN, LSTM and GRU, in one place.

Follows the equations in the docs of `torch.nn.RNN`, `torch.nn.LSTM` and `torch.nn.GRU`.
Shapes: x_t (B, I); h (B, P) with P = proj_size or hidden_size; c (B, H).
Weights as PyTorch stores them: W_ih (G*H, I), W_hh (G*H, P), b_ih and b_hh (G*H,),
W_hr (P, H) for projected LSTMs. Gate order: LSTM (i, f, g, o); GRU (r, z, n).

The input projection x_t W_ih^T + b_ih does not depend on the state, so it is computed for all
steps at once (`input_terms`) and `step` only adds the recurrent part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rnndiag.records import CellType, Direction, ModuleSpec


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


def input_terms(x: Tensor, w: LayerWeights, cell: CellType) -> Tensor:
    """Every step's input term at once, (B, T, I) -> (B, T, G*H): x W_ih^T + b_ih, plus b_hh
    for RNN and LSTM (whose gates only ever see the sum; a GRU's n gate scales the hidden
    term, so its b_hh stays on the hidden side)."""
    biases = [b for b in (w.b_ih, w.b_hh if cell is not CellType.GRU else None) if b is not None]
    flat = x.reshape(-1, x.shape[-1])
    if not biases:
        return (flat @ w.w_ih.t()).view(*x.shape[:-1], -1)
    bias = biases[0] if len(biases) == 1 else biases[0] + biases[1]
    return torch.addmm(bias, flat, w.w_ih.t()).view(*x.shape[:-1], -1)


class StepOut(NamedTuple):
    h: Tensor  # (B, P) the new state
    c: Tensor | None  # (B, H) LSTM cell state
    m: Tensor | None  # (B, H) a projected LSTM's output before the projection
    pre: Tensor  # (B, G*H) hidden-side pre-activation: a_t = xt + h W_hh^T (RNN, LSTM),
    #              h W_hh^T + b_hh (GRU); its gradient gives the weight gradients
    n_pre: Tensor | None  # (B, H) GRU: x_n + r * hn, whose gradient is the input-side n adjoint


def step(
    cell: CellType,
    nonlinearity: str | None,
    xt: Tensor,
    h: Tensor,
    c: Tensor | None,
    w: LayerWeights,
) -> StepOut:
    """One time step from this step's input term `xt` (B, G*H) (see `input_terms`).

    Written with fused ops (addmm, addcmul, lerp) to keep the per-step op count low.
    """
    if cell is CellType.RNN:
        a = torch.addmm(xt, h, w.w_hh.t())
        out = torch.relu(a) if nonlinearity == "relu" else torch.tanh(a)
        return StepOut(out, None, None, a, None)
    if cell is CellType.LSTM:
        assert c is not None
        a = torch.addmm(xt, h, w.w_hh.t())
        i, f, g, o = a.chunk(4, dim=1)
        # three sigmoids, not one over all four gates: each saves its output for the backward
        c_new = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        m = torch.sigmoid(o) * torch.tanh(c_new)
        if w.w_hr is not None:
            return StepOut(m @ w.w_hr.t(), c_new, m, a, None)
        return StepOut(m, c_new, None, a, None)
    hp = torch.addmm(w.b_hh, h, w.w_hh.t()) if w.b_hh is not None else h @ w.w_hh.t()
    hidden = xt.shape[1] // 3
    x_rz, x_n = xt.split([2 * hidden, hidden], dim=1)
    h_rz, h_n = hp.split([2 * hidden, hidden], dim=1)
    r, z = torch.sigmoid(x_rz + h_rz).chunk(2, dim=1)
    n_pre = torch.addcmul(x_n, r, h_n)
    n = torch.tanh(n_pre)
    return StepOut(torch.lerp(n, h, z), None, None, hp, n_pre)
