"""Mini-batch weight-gradient norms from the captured per-step adjoints: no extra passes.

For one layer and direction, with x_t its input, h_prev(t) the state step t started from
(t-1 forward, t+1 reverse, zero at the start) and dpre_t the adjoint of the pre-activation
(cells.StepOut.pre) that `replay.replay` captured at every step, the weight gradients are sums
over steps and examples of outer products:

    dW_hh = sum_{t,b} dpre_{t,b} h_prev(t),b^T      dW_ih = sum_{t,b} dx_{t,b} x_{t,b}^T

with dx = dpre for RNN and LSTM (their gates add the two terms), and for a GRU dpre's r and z
rows with the captured input-side n adjoint dxn. Biases get the sums of the same adjoints; a
projected LSTM adds dW_hr = sum dL/dh_t m_t^T (m_t its unprojected output). Summing over the
examples of mini-batch k only gives k's gradient; for a loss that averages over examples, the
gradient of mini-batch k's own loss is that times B/B_k.
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
                       bias: bool, groups: Sequence[Tensor],
                       nonlinearity: str | None = None) -> list[float]:
    """||gradient of one layer/direction's weights||^2 restricted to each group of examples.

    x (T, B, I) is the layer's input, hs (T, B, P) its states, ms (T, B, H) a projected LSTM's
    unprojected outputs; `adj` must carry the pre-activation adjoints (`replay.replay`).
    W_ih gets the input-side adjoint: dpre itself for RNN and LSTM; for a GRU dpre's r and z
    rows and dxn for the n rows (its n gate scales only the hidden term by r).
    """
    h_prev = previous(hs, adj.direction)
    out = []
    for rows in groups:
        x_k = x[:, rows]
        dpre = adj.dpre[:, rows] if adj.dpre is not None else _rnn_dpre(
            adj.dh[:, rows], hs[:, rows], nonlinearity)
        total = _outer_sq(dpre, h_prev[:, rows])
        if adj.dxn is None:
            total += _outer_sq(dpre, x_k)
        else:
            hidden = adj.dxn.shape[-1]
            dxn = adj.dxn[:, rows]
            total += _outer_sq(dpre[..., :2 * hidden], x_k) + _outer_sq(dxn, x_k)
        if bias:
            sums = dpre.sum(dim=(0, 1))
            total += 2 * _sq(sums) if adj.dxn is None else (
                _sq(sums) + _sq(sums[:2 * hidden]) + _sq(dxn.sum(dim=(0, 1))))
        if ms is not None:
            total += _outer_sq(adj.dh[:, rows], ms[:, rows])
        out.append(total)
    return out


def _rnn_dpre(dh: Tensor, h: Tensor, nonlinearity: str | None) -> Tensor:
    """A plain RNN's pre-activation adjoint: dh * tanh'(a) = dh (1 - h^2), or dh [h > 0]."""
    if nonlinearity == "relu":
        return dh * (h > 0).to(dh.dtype)
    return dh * (1 - h * h)


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
            sq = minibatch_sq_norms(layer_input, hs, ms, adj, spec.bias, groups,
                                    spec.nonlinearity)
            totals = [a + b for a, b in zip(totals, sq, strict=True)]
            outputs.append(hs)
        layer_input = torch.cat(outputs, dim=2)
    return totals
