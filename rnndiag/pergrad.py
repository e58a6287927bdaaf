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
from collections.abc import Sequence

import torch
from torch import Tensor

from rnndiag.records import Direction, ModuleSpec
from rnndiag.replay import ReplayResult, StepAdjoints


def previous(states: Tensor, direction: Direction) -> Tensor:
    """(T, B, W) states -> the state each step started from (zeros before the first step)."""
    zero = torch.zeros_like(states[:1])
    if direction is Direction.FORWARD:
        return torch.cat([zero, states[:-1]])
    return torch.cat([states[1:], zero])


def minibatch_sq_norms(x: Tensor, hs: Tensor, ms: Tensor | None, adj: StepAdjoints,
                       bias: bool, groups: Sequence[Tensor]) -> list[float]:
    """||gradient of one layer/direction's weights||^2 restricted to each group of examples.

    x (T, B, I) is the layer's input, hs (T, B, P) its states, ms (T, B, H) a projected LSTM's
    unprojected outputs; `adj` must carry the pre-activation adjoints.
    """
    assert adj.dxin is not None and adj.dhin is not None
    h_prev = previous(hs, adj.direction)
    out = []
    for rows in groups:
        dx, dh = adj.dxin[:, rows], adj.dhin[:, rows]
        total = _outer_sq(dx, x[:, rows]) + _outer_sq(dh, h_prev[:, rows])
        if bias:
            total += _sq(dx.sum(dim=(0, 1))) + _sq(dh.sum(dim=(0, 1)))
        if ms is not None:
            total += _outer_sq(adj.dh[:, rows], ms[:, rows])
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


def replay_sq_norms(spec: ModuleSpec, inputs: Tensor, result: ReplayResult,
                    groups: Sequence[Tensor]) -> list[float]:
    """Squared mini-batch gradient norms over all of a replayed module's weights."""
    totals = [0.0] * len(groups)
    layer_input = inputs.transpose(0, 1)  # (T, B, I)
    per_layer = len(spec.directions)
    for layer in range(spec.num_layers):
        outputs = []
        for k in range(per_layer):
            adj = result.adjoints[layer * per_layer + k]
            hs, ms = result.states[layer * per_layer + k]
            sq = minibatch_sq_norms(layer_input, hs, ms, adj, spec.bias, groups)
            totals = [a + b for a, b in zip(totals, sq, strict=True)]
            outputs.append(hs)
        layer_input = torch.cat(outputs, dim=2)
    return totals
