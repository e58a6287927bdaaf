"""Mini-batch weight-gradient norms from the captured per-step adjoints: no extra passes.

For one layer and direction, with x_t its input, h_prev(t) the state step t started from
(t-1 forward, t+1 reverse, zero at the start) and dpre_t the adjoint of the pre-activation
(cells.StepOut.pre) that `replay.replay` captured at every step, the weight gradients are sums
over steps and examples of outer products:

    dW_hh = sum_{t,b} dpre_{t,b} h_prev(t),b^T      dW_ih = sum_{t,b} dx_{t,b} x_{t,b}^T

where the input-side adjoint dx, the biases and any further weights (a projection) are the
cell unit's to say (`CellUnit.weight_sq`, rnndiag.cells). Summing over the examples of
mini-batch k only gives k's gradient; for a loss that averages over examples, the gradient of
mini-batch k's own loss is that times B/B_k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from rnndiag.cells import GradTerms, unit
from rnndiag.records import Direction, ModuleSpec
from rnndiag.replay import ReplayResult, StepAdjoints


def previous(states: Tensor, direction: Direction) -> Tensor:
    """(T, B, W) states -> the state each step started from (zeros before the first step)."""
    zero = torch.zeros_like(states[:1])
    if direction is Direction.FORWARD:
        return torch.cat([zero, states[:-1]])
    return torch.cat([states[1:], zero])


def minibatch_sq_norms(spec: ModuleSpec, x: Tensor, hs: Tensor, ms: Tensor | None,
                       adj: StepAdjoints, groups: Sequence[Tensor]) -> list[float]:
    """||gradient of one layer/direction's weights||^2 restricted to each group of examples.

    x (T, B, I) is the layer's input, hs (T, B, P) its states, ms (T, B, H) a projected LSTM's
    unprojected outputs; `adj` must carry what the unit captures (`replay.replay`).
    """
    terms = GradTerms(x, previous(hs, adj.direction), hs, adj.dh, adj.dpre, adj.dxn, ms,
                      spec.bias, spec.nonlinearity)
    weight_sq = unit(spec.cell_type).weight_sq
    return [weight_sq(terms, rows) for rows in groups]


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
            sq = minibatch_sq_norms(spec, layer_input, hs, ms, adj, groups)
            totals = [a + b for a, b in zip(totals, sq, strict=True)]
            outputs.append(hs)
        layer_input = torch.cat(outputs, dim=2)
    return totals
