"""Step equations of PyTorch's RNN, LSTM and GRU, in one place.

Follows the equations in the docs of `torch.nn.RNN`, `torch.nn.LSTM` and `torch.nn.GRU`.
Shapes: x_t (B, I); h (B, P) with P = proj_size or hidden_size; c (B, H).
Weights as PyTorch stores them: W_ih (G*H, I), W_hh (G*H, P), b_ih and b_hh (G*H,),
W_hr (P, H) for projected LSTMs. Gate order: LSTM (i, f, g, o); GRU (r, z, n).

The input projection x_t W_ih^T + b_ih does not depend on the state, so it is computed for all
steps at once (`input_projection`) and `step` only adds the recurrent part.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


def input_projection(x: Tensor, w: LayerWeights) -> Tensor:
    """x W_ih^T + b_ih for every step at once: (B, T, I) -> (B, T, G*H)."""
    out = torch.matmul(x, w.w_ih.t())
    return out + w.b_ih if w.b_ih is not None else out


def recurrent(h: Tensor, w: LayerWeights) -> Tensor:
    """h W_hh^T + b_hh: (B, P) -> (B, G*H)."""
    if w.b_hh is None:
        return h @ w.w_hh.t()
    return torch.addmm(w.b_hh, h, w.w_hh.t())


def step(
    cell: CellType,
    nonlinearity: str | None,
    xp: Tensor,
    h: Tensor,
    c: Tensor | None,
    w: LayerWeights,
) -> tuple[Tensor, Tensor | None]:
    """One time step. `xp` is this step's input projection (B, G*H). Returns (h_t, c_t)."""
    h_new, c_new, _ = step_from(cell, nonlinearity, xp, recurrent(h, w), h, c, w)
    return h_new, c_new


def step_from(
    cell: CellType,
    nonlinearity: str | None,
    xp: Tensor,
    hp: Tensor,
    h: Tensor,
    c: Tensor | None,
    w: LayerWeights,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One time step from both pre-activation terms: xp = x W_ih^T + b_ih and
    hp = h W_hh^T + b_hh, each (B, G*H). Returns (h_t, c_t, m_t), m_t being a projected
    LSTM's output before the projection (None otherwise)."""
    if cell is CellType.RNN:
        pre = xp + hp
        return (torch.relu(pre) if nonlinearity == "relu" else torch.tanh(pre)), None, None
    if cell is CellType.LSTM:
        assert c is not None
        i, f, g, o = (xp + hp).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        m = torch.sigmoid(o) * torch.tanh(c_new)
        if w.w_hr is not None:
            return m @ w.w_hr.t(), c_new, m
        return m, c_new, None
    x_r, x_z, x_n = xp.chunk(3, dim=1)
    h_r, h_z, h_n = hp.chunk(3, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return n + z * (h - n), None, None
