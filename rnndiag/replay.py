"""Replay a recurrent module step by step and capture dL/dh_t (and dL/dc_t) at every step.

Conventions: inputs are batch-first (B, T, I). For direction `forward` the step order is
t = 0..T-1, for `reverse` t = T-1..0; adjoints are stored by time index t either way, so
`dh[t]` is the total derivative dL/dh_t of the state produced while reading x_t, summed over
every path: through later steps of the same direction and through the layer above. They are
obtained with `torch.autograd.grad(L, [every h_t and c_t])`, which returns exactly that total
derivative for each intermediate tensor and leaves parameters' `.grad` untouched.

Objective when no task loss applies:
    L = 1/(2B) * sum_b sum_d ||h_final^{top,d}_b||^2,
h_final being the last state each direction of the top layer produced (t = T-1 forward,
t = 0 reverse). The initial state is zero, as in PyTorch's default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rnndiag.cells import LayerWeights, input_terms, step
from rnndiag.records import CellType, Direction, ModuleSpec


@dataclass(frozen=True)
class StepAdjoints:
    """Per-step adjoints of one layer and direction, indexed by time step t."""

    layer: int
    direction: Direction
    dh: Tensor  # (T, B, P): dL/dh_t
    dc: Tensor | None  # (T, B, H): dL/dc_t, LSTM only
    # With preactivations=True: dL/d(x W_ih^T + b_ih) and dL/d(h_prev W_hh^T + b_hh) per step,
    # (T, B, G*H) each (the same tensor for RNN and LSTM, whose gates add the two terms).
    dxin: Tensor | None = None
    dhin: Tensor | None = None


@dataclass(frozen=True)
class DirectionStates:
    """The states one layer and direction produced, by time index t (graph attached)."""

    layer: int
    direction: Direction
    h: list[Tensor]  # T tensors (B, P)
    c: list[Tensor] | None  # T tensors (B, H), LSTM only
    # The pre-activation terms of every step (for mini-batch weight gradients): x W_ih^T + b_ih
    # and h_prev W_hh^T + b_hh, (B, G*H) each; m: a projected LSTM's unprojected outputs.
    xin: list[Tensor] = field(default_factory=list)
    hin: list[Tensor] = field(default_factory=list)
    m: list[Tensor] | None = None
    cell: CellType | None = None


@dataclass(frozen=True)
class Unrolled:
    output: Tensor  # (B, T, D*P): top-layer outputs, as nn.RNN/LSTM/GRU return them
    h_n: Tensor  # (L*D, B, P)
    c_n: Tensor | None  # (L*D, B, H), LSTM only
    states: tuple[DirectionStates, ...]  # layer-major, then direction

    def finals(self, spec: ModuleSpec) -> list[Tensor]:
        """h_final of each direction of the top layer."""
        return list(self.h_n[-len(spec.directions):])


@dataclass(frozen=True)
class ReplayResult:
    output: Tensor
    h_n: Tensor
    c_n: Tensor | None
    loss: float
    adjoints: tuple[StepAdjoints, ...]  # layer-major, then direction
    # per layer/direction: (T, B, P) states h and, for a projected LSTM, (T, B, H) outputs m
    # before the projection; detached
    states: tuple[tuple[Tensor, Tensor | None], ...]


def final_step(direction: Direction, seq_len: int) -> int:
    """Time index of the last state a direction produces."""
    return seq_len - 1 if direction is Direction.FORWARD else 0


def zero_states(spec: ModuleSpec, batch: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
    """Zero (L*D, B, P) h0 and (L*D, B, H) c0 leaves that put every state on the graph."""
    n = spec.num_layers * len(spec.directions)
    h0 = like.new_zeros(n, batch, spec.output_size).requires_grad_()
    if spec.cell_type is not CellType.LSTM:
        return h0, None
    return h0, like.new_zeros(n, batch, spec.hidden_size).requires_grad_()


def unroll(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor, h0: Tensor,
           c0: Tensor | None) -> Unrolled:
    """Run `spec` on `inputs` (B, T, I) from h0 (L*D, B, P) [and c0], keeping every state."""
    kept: list[DirectionStates] = []
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_input = inputs
    for layer in range(spec.num_layers):
        outputs = []
        for k, direction in enumerate(spec.directions):
            index = layer * len(spec.directions) + k
            weights = LayerWeights.of(spec, params, layer, direction)
            kept.append(_run_direction(spec, weights, layer_input, layer, direction, h0[index],
                                       None if c0 is None else c0[index]))
            hs, cs = kept[-1].h, kept[-1].c
            last = final_step(direction, len(hs))
            h_n.append(hs[last])
            if cs is not None:
                c_n.append(cs[last])
            outputs.append(torch.stack(hs, dim=1))
        layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return Unrolled(layer_input, torch.stack(h_n), torch.stack(c_n) if c_n else None,
                    tuple(kept))


def _run_direction(spec: ModuleSpec, w: LayerWeights, x: Tensor, layer: int,
                   direction: Direction, h: Tensor, c: Tensor | None) -> DirectionStates:
    """Unroll one layer and direction from (h, c); everything kept by time index t."""
    seq_len = x.shape[1]
    # (B, T, G*H): every step's input term in one matmul. unbind, not xp[:, t]: the backward
    # of a slice materialises a full (B, T, G*H) gradient per step (quadratic in T).
    proj = input_terms(x, w, spec.cell_type)
    if spec.cell_type is CellType.GRU and not proj.requires_grad:
        proj.requires_grad_()  # a GRU's input-side adjoints are wanted for weight gradients
    xs = list(proj.unbind(dim=1))
    hs: list[Any] = [None] * seq_len
    hin: list[Any] = [None] * seq_len
    cs: list[Any] | None = [None] * seq_len if c is not None else None
    ms: list[Any] | None = [None] * seq_len if w.w_hr is not None else None
    order = range(seq_len) if direction is Direction.FORWARD else range(seq_len - 1, -1, -1)
    for t in order:
        h, c, m, hin[t] = step(spec.cell_type, spec.nonlinearity, xs[t], h, c, w)
        hs[t] = h
        if cs is not None:
            cs[t] = c
        if ms is not None:
            ms[t] = m
    return DirectionStates(layer, direction, hs, cs, xs, hin, ms, spec.cell_type)


def objective(finals: Sequence[Tensor], batch: int) -> Tensor:
    """L = 1/(2B) * sum over the given final states of ||h||^2."""
    return sum((h.pow(2).sum() for h in finals), finals[0].new_zeros(())) / (2 * batch)


def adjoints(loss: Tensor, states: Sequence[DirectionStates], retain_graph: bool = False,
             preactivations: bool = False) -> tuple[StepAdjoints, ...]:
    """dL/dh_t (and dL/dc_t; with `preactivations` also the pre-activation adjoints) of every
    kept state: one backward pass for all of them."""
    groups: list[list[list[Tensor]]] = []
    for s in states:
        wanted = [s.h, s.c or []]
        if preactivations:  # GRU: its n gate scales only the hidden term, so both differ
            wanted += [s.hin, s.xin if s.cell is CellType.GRU else []]
        groups.append(wanted)
    flat = [t for g in groups for part in g for t in part]
    grads = torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=retain_graph)
    out, i = [], 0
    for s, wanted in zip(states, groups, strict=True):
        stacked: list[Tensor | None] = []
        for part in wanted:
            stacked.append(_stack(grads[i:i + len(part)], part) if part else None)
            i += len(part)
        dh, dc = stacked[0], stacked[1]
        assert dh is not None
        dhin = stacked[2] if preactivations else None
        dxin = (stacked[3] if stacked[3] is not None else dhin) if preactivations else None
        out.append(StepAdjoints(s.layer, s.direction, dh, dc, dxin, dhin))
    return tuple(out)



def _stack(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Unused states (no path to L) have a zero gradient."""
    return torch.stack([g if g is not None else torch.zeros_like(t)
                        for g, t in zip(grads, like, strict=True)]).detach()


def replay(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor) -> ReplayResult:
    """Run `spec` on `inputs` (B, T, I) with `params` (local names) and backpropagate the objective.

    Weights are used as given (no gradient is taken for them); the zero initial state of each
    layer and direction is the leaf that puts every h_t on the autograd graph.
    """
    batch = inputs.shape[0]
    h0, c0 = zero_states(spec, batch, inputs)
    run = unroll(spec, params, inputs, h0, c0)
    loss = objective(run.finals(spec), batch)
    found = adjoints(loss, run.states, preactivations=True)
    kept = tuple((torch.stack(s.h).detach(), None if s.m is None else torch.stack(s.m).detach())
                 for s in run.states)
    return ReplayResult(run.output.detach(), run.h_n.detach(),
                        None if run.c_n is None else run.c_n.detach(), float(loss.item()),
                        found, kept)
