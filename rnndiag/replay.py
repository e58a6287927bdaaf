"""Replay a recurrent module step by step and capture dL/dh_t (and dL/dc_t) at every step.

Conventions: inputs are batch-first (B, T, I). For direction `forward` the step order is
t = 0..T-1, for `reverse` t = T-1..0; adjoints are stored by time index t either way, so
`dh[t]` is the total derivative dL/dh_t of the state produced while reading x_t, summed over
every path: through later steps of the same direction and through the layer above.

Objective when no task loss applies:
    L = 1/(2B) * sum_b sum_d ||h_final^{top,d}_b||^2,
h_final being the last state each direction of the top layer produced (t = T-1 forward,
t = 0 reverse). The initial state is zero, as in PyTorch's default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from rnndiag.cells import LayerWeights, input_projection, step
from rnndiag.records import CellType, Direction, ModuleSpec


@dataclass(frozen=True)
class StepAdjoints:
    """Per-step adjoints of one layer and direction, indexed by time step t."""

    layer: int
    direction: Direction
    dh: Tensor  # (T, B, P): dL/dh_t
    dc: Tensor | None  # (T, B, H): dL/dc_t, LSTM only


@dataclass(frozen=True)
class ReplayResult:
    output: Tensor  # (B, T, D*P): top-layer outputs, as nn.RNN/LSTM/GRU return them
    h_n: Tensor  # (L*D, B, P)
    c_n: Tensor | None  # (L*D, B, H), LSTM only
    loss: float
    adjoints: tuple[StepAdjoints, ...]  # layer-major, then direction


def final_step(direction: Direction, seq_len: int) -> int:
    """Time index of the last state a direction produces."""
    return seq_len - 1 if direction is Direction.FORWARD else 0


def replay(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor) -> ReplayResult:
    """Run `spec` on `inputs` (B, T, I) with `params` (local names) and backpropagate the objective.

    Weights are used as given (no gradient is taken for them); the zero initial state of each
    layer and direction is the leaf that puts every h_t on the autograd graph.
    """
    batch, seq_len, _ = inputs.shape
    captured: list[StepAdjoints] = []
    finals_h: list[Tensor] = []
    finals_c: list[Tensor] = []
    layer_input = inputs
    for layer in range(spec.num_layers):
        outputs = []
        for direction in spec.directions:
            weights = LayerWeights.of(spec, params, layer, direction)
            states, h_last, c_last, adj = _run_direction(spec, weights, layer_input, direction)
            outputs.append(states)
            finals_h.append(h_last)
            if c_last is not None:
                finals_c.append(c_last)
            captured.append(StepAdjoints(layer, direction, *adj))
        layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]

    top = finals_h[-len(spec.directions) :]
    loss = sum((h.pow(2).sum() for h in top), torch.zeros((), dtype=inputs.dtype)) / (2 * batch)
    loss.backward()
    return ReplayResult(
        output=layer_input.detach(),
        h_n=torch.stack([h.detach() for h in finals_h]),
        c_n=torch.stack([c.detach() for c in finals_c]) if finals_c else None,
        loss=float(loss.item()),
        adjoints=tuple(captured),
    )


def _run_direction(
    spec: ModuleSpec, w: LayerWeights, x: Tensor, direction: Direction
) -> tuple[Tensor, Tensor, Tensor | None, tuple[Tensor, Tensor | None]]:
    """Unroll one layer and direction; register a hook on every h_t (and c_t) by time index.

    Returns the (B, T, P) state sequence, the final h and c, and the (dh, dc) buffers that the
    hooks fill during the backward pass.
    """
    batch, seq_len, _ = x.shape
    cell = spec.cell_type
    dh = x.new_zeros(seq_len, batch, spec.output_size)
    dc = x.new_zeros(seq_len, batch, spec.hidden_size) if cell is CellType.LSTM else None
    h = x.new_zeros(batch, spec.output_size).requires_grad_()
    c = x.new_zeros(batch, spec.hidden_size).requires_grad_() if dc is not None else None
    xp = input_projection(x, w)
    states: list[Tensor | None] = [None] * seq_len
    order = range(seq_len) if direction is Direction.FORWARD else range(seq_len - 1, -1, -1)
    for t in order:
        h, c = step(cell, spec.nonlinearity, xp[:, t], h, c, w)
        h.register_hook(_writer(dh, t))
        if c is not None and dc is not None:
            c.register_hook(_writer(dc, t))
        states[t] = h
    return torch.stack(states, dim=1), h, c, (dh, dc)  # type: ignore[arg-type]


def _writer(buffer: Tensor, t: int):  # type: ignore[no-untyped-def]
    """A tensor hook that copies the incoming gradient into buffer[t]."""

    def hook(grad: Tensor) -> None:
        buffer[t].copy_(grad)

    return hook
