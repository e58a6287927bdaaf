"""Mini-batch weight-gradient norms from the captured per-step adjoints: no extra passes.

For one layer and direction with states s_t = (h_t, c_t), inputs x_t and previous states
s_prev(t) (t-1 forward, t+1 reverse, zero at the start), the weight gradients are sums over
steps and examples of outer products of pre-activation adjoints with x_t or h_prev(t):

    dW_ih = sum_{t,b} dx_{t,b} x_{t,b}^T     dW_hh = sum_{t,b} dh'_{t,b} h_prev(t),b^T

with dx (input side) and dh' (hidden side) the adjoints of the pre-activations
a^x_t = W_ih x_t + b_ih and a^h_t = W_hh h_prev(t) + b_hh. They follow from the captured total
adjoints by one vector-Jacobian product of the cell equations, batched over all steps:
RNN and GRU take dL/dh_t as the cotangent of h_t; an LSTM takes dL/dc_t (total) for c_t through
the gates i, f, g, and dL/dh_t for h_t = o * tanh(c_t) through o only (c_t held fixed, its own
path already being in dL/dc_t). A projected LSTM adds dW_hr = sum dL/dh_t m_t^T, m_t its
unprojected output. Summing over the examples of mini-batch k only gives k's gradient; for a
loss that averages over examples, the gradient of mini-batch k's own loss is that times B/B_k.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from rnndiag.cells import LayerWeights
from rnndiag.records import CellType, Direction, ModuleSpec
from rnndiag.replay import ReplayResult, StepAdjoints


def previous(states: Tensor, direction: Direction) -> Tensor:
    """(T, B, W) states -> the state each step started from (zeros before the first step)."""
    zero = torch.zeros_like(states[:1])
    if direction is Direction.FORWARD:
        return torch.cat([zero, states[:-1]])
    return torch.cat([states[1:], zero])


def preactivation_adjoints(spec: ModuleSpec, w: LayerWeights, x: Tensor, hs: Tensor,
                           cs: Tensor | None, adj: StepAdjoints,
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dx, dh', h_prev, m): adjoints of the input- and hidden-side pre-activations (T, B, GH),
    the previous hidden states (T, B, P) and, for a projected LSTM, m_t (T, B, H)."""
    h_prev = previous(hs, adj.direction)
    xp = (x @ w.w_ih.t() + (w.b_ih if w.b_ih is not None else 0.0)).detach().requires_grad_()
    hp = (h_prev @ w.w_hh.t() + (w.b_hh if w.b_hh is not None else 0.0)).detach()
    hp.requires_grad_()
    m = None
    with torch.enable_grad():
        if spec.cell_type is CellType.RNN:
            pre = xp + hp
            out = torch.relu(pre) if spec.nonlinearity == "relu" else torch.tanh(pre)
            dx, dh = torch.autograd.grad(out, (xp, hp), adj.dh)
        elif spec.cell_type is CellType.LSTM:
            assert cs is not None and adj.dc is not None
            i, f, g, o = (xp + hp).chunk(4, dim=2)
            c = torch.sigmoid(f) * previous(cs, adj.direction) + torch.sigmoid(i) * torch.tanh(g)
            m_t = torch.sigmoid(o) * torch.tanh(cs)
            dm = adj.dh @ w.w_hr if w.w_hr is not None else adj.dh
            dx, dh = torch.autograd.grad((c, m_t), (xp, hp), (adj.dc, dm))
            m = m_t.detach() if w.w_hr is not None else None
        else:
            x_r, x_z, x_n = xp.chunk(3, dim=2)
            h_r, h_z, h_n = hp.chunk(3, dim=2)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            out = n + z * (h_prev - n)
            dx, dh = torch.autograd.grad(out, (xp, hp), adj.dh)
    return dx, dh, h_prev, m


def minibatch_sq_norms(spec: ModuleSpec, w: LayerWeights, x: Tensor, hs: Tensor,
                       cs: Tensor | None, adj: StepAdjoints, groups: Sequence[Tensor],
                       ) -> list[float]:
    """||gradient of this layer/direction's weights||^2 restricted to each group of examples.

    x (T, B, I) is the layer's input, hs (T, B, P) and cs (T, B, H) its states.
    """
    dx, dh, h_prev, m = preactivation_adjoints(spec, w, x, hs, cs, adj)
    out = []
    for rows in groups:
        total = _outer_sq(dx[:, rows], x[:, rows]) + _outer_sq(dh[:, rows], h_prev[:, rows])
        if w.b_ih is not None:
            total += _sq(dx[:, rows].sum(dim=(0, 1))) + _sq(dh[:, rows].sum(dim=(0, 1)))
        if m is not None:
            total += _outer_sq(adj.dh[:, rows], m[:, rows])
        out.append(total)
    return out


def _outer_sq(delta: Tensor, values: Tensor) -> float:
    """||sum_{t,b} delta_{t,b} values_{t,b}^T||_F^2."""
    g = delta.reshape(-1, delta.shape[-1]).t() @ values.reshape(-1, values.shape[-1])
    return _sq(g)


def _sq(t: Tensor) -> float:
    return float(t.double().pow(2).sum())


def scale_to_minibatch_loss(sq_norms: Sequence[float], groups: Sequence[Tensor],
                            batch: int) -> list[float]:
    """Norms of each mini-batch's own mean loss: sqrt(sq) * B / B_k."""
    return [math.sqrt(s) * batch / len(rows) for s, rows in zip(sq_norms, groups, strict=True)]


def replay_sq_norms(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor,
                    result: ReplayResult, groups: Sequence[Tensor]) -> list[float]:
    """Squared mini-batch gradient norms over all of a replayed module's weights."""
    totals = [0.0] * len(groups)
    layer_input = inputs.transpose(0, 1)  # (T, B, I)
    per_layer = len(spec.directions)
    for layer in range(spec.num_layers):
        outputs = []
        for k in range(per_layer):
            adj = result.adjoints[layer * per_layer + k]
            hs, cs = result.states[layer * per_layer + k]
            w = LayerWeights.of(spec, params, layer, adj.direction)
            sq = minibatch_sq_norms(spec, w, layer_input, hs, cs, adj, groups)
            totals = [a + b for a, b in zip(totals, sq, strict=True)]
            outputs.append(hs)
        layer_input = torch.cat(outputs, dim=2)
    return totals
