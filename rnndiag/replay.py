"""Replay a recurrent module step by step and capture dL/dh_t (and dL/dc_t) at every step.

Conventions: inputs are batch-first (B, T, I). For direction `forward` the step order is
t = 0..T-1, for `reverse` t = T-1..0; adjoints are stored by time index t either way, so
`dh[t]` is the total derivative dL/dh_t of the state produced while reading x_t, summed over
every path: through later steps of the same direction and through the layer above.

Two ways to capture them, both exact:
- `replay` (checkpoint mode) registers a tensor hook on every h_t, c_t and pre-activation
  while unrolling; one backward pass to the zero initial states fires each hook once with its
  total gradient, written into a (T, B, .) buffer by time index. Nothing else is retained.
- `adjoints` (user models) asks `torch.autograd.grad` for the gradient of every kept state.

Objective when no task loss applies:
    L = 1/(2B) * sum_b sum_d ||h_final^{top,d}_b||^2,
h_final being the last state each direction of the top layer produced (t = T-1 forward,
t = 0 reverse). The initial state is zero, as in PyTorch's default.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    # From `replay` only (LSTM, GRU): dL/d(pre) of the hidden-side pre-activation (T, B, G*H),
    # see cells.StepOut.pre (for LSTM also the input side's), and for a GRU the input-side
    # n-gate adjoint dL/d(x_n + r * hn) (T, B, H). A plain RNN's is dh * phi'(a), computed
    # from dh and h where needed (rnndiag.pergrad).
    dpre: Tensor | None = None
    dxn: Tensor | None = None


@dataclass(frozen=True)
class DirectionStates:
    """The states one layer and direction produced, by time index t (graph attached)."""

    layer: int
    direction: Direction
    h: list[Tensor]  # T tensors (B, P)
    c: list[Tensor] | None  # T tensors (B, H), LSTM only
    sequence: Tensor | None  # (B, T, P): the h_t stacked, as the layer above reads them
    m: Tensor | None = None  # (T, B, H) a projected LSTM's unprojected outputs, detached
    captured: StepAdjoints | None = None  # buffers the hooks fill (capture=True)


@dataclass(frozen=True)
class Unrolled:
    output: Tensor | None  # (B, T, D*P): top-layer outputs as nn.RNN/LSTM/GRU return them
    #                        (None when unrolled with top_output=False)
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
    adjoints: tuple[StepAdjoints, ...]  # layer-major, then direction, with dpre (and dxn)
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
           c0: Tensor | None, capture: bool = False, top_output: bool = True) -> Unrolled:
    """Run `spec` on `inputs` (B, T, I) from h0 (L*D, B, P) [and c0], keeping every state;
    with `capture`, hooks write every adjoint into buffers during the backward pass. Without
    `top_output` the top layer's outputs are not stacked (saving a copy while the graph is
    alive)."""
    kept: list[DirectionStates] = []
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_input: Tensor | None = inputs
    for layer in range(spec.num_layers):
        assert layer_input is not None  # every layer below the top is stacked
        outputs = []
        for k, direction in enumerate(spec.directions):
            index = layer * len(spec.directions) + k
            weights = LayerWeights.of(spec, params, layer, direction)
            stack = top_output or layer < spec.num_layers - 1
            s = _run_direction(spec, weights, layer_input, layer, direction, h0[index],
                               None if c0 is None else c0[index], capture, stack)
            kept.append(s)
            last = final_step(direction, len(s.h))
            h_n.append(s.h[last])
            if s.c is not None:
                c_n.append(s.c[last])
            if s.sequence is not None:
                outputs.append(s.sequence)
        layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else (
            outputs[0] if outputs else None)
    return Unrolled(layer_input, torch.stack(h_n), torch.stack(c_n) if c_n else None,
                    tuple(kept))


def _run_direction(spec: ModuleSpec, w: LayerWeights, x: Tensor, layer: int,
                   direction: Direction, h: Tensor, c: Tensor | None,
                   capture: bool, stack: bool = True) -> DirectionStates:
    """Unroll one layer and direction from (h, c); states kept by time index t."""
    seq_len, batch = x.shape[1], x.shape[0]
    # (B, T, G*H): every step's input term in one matmul. unbind, not xp[:, t]: the backward
    # of a slice materialises a full (B, T, G*H) gradient per step (quadratic in T).
    xs = input_terms(x, w, spec.cell_type).unbind(dim=1)
    buf = _buffers(spec, w, layer, direction, seq_len, batch, x) if capture else None
    hs: list[Any] = [None] * seq_len
    cs: list[Any] | None = [None] * seq_len if c is not None else None
    ms: list[Any] | None = [None] * seq_len if w.w_hr is not None else None
    order = range(seq_len) if direction is Direction.FORWARD else range(seq_len - 1, -1, -1)
    for t in order:
        out = step(spec.cell_type, spec.nonlinearity, xs[t], h, c, w)
        h, c = out.h, out.c
        hs[t] = h
        if cs is not None:
            cs[t] = c
        if ms is not None:
            ms[t] = out.m
        if buf is not None:
            _hook(h, buf.dh, t)
            _hook(out.pre, buf.dpre, t)
            if c is not None and buf.dc is not None:
                _hook(c, buf.dc, t)
            if out.n_pre is not None and buf.dxn is not None:
                _hook(out.n_pre, buf.dxn, t)
    m = torch.stack(ms).detach() if ms is not None else None
    sequence = torch.stack(hs, dim=1) if stack else None
    return DirectionStates(layer, direction, hs, cs, sequence, m, buf)


def _buffers(spec: ModuleSpec, w: LayerWeights, layer: int, direction: Direction,
             seq_len: int, batch: int, like: Tensor) -> StepAdjoints:
    """Uninitialised buffers, filled row by row by the hooks (`_written` tracks the rows; the
    rest are zeroed after the backward pass). Untouched memory is not resident yet, so the
    buffers grow while the backward pass frees the graph instead of adding to its peak."""
    def zeros(width: int) -> Tensor:
        buffer = like.new_empty(seq_len, batch, width)
        _written[id(buffer)] = [False] * seq_len
        return buffer

    lstm, gru = spec.cell_type is CellType.LSTM, spec.cell_type is CellType.GRU
    # a plain RNN's pre-activation adjoint is dh * phi'(a), recoverable from dh and h later
    dpre = None if spec.cell_type is CellType.RNN else zeros(w.w_hh.shape[0])
    return StepAdjoints(layer, direction, zeros(spec.output_size),
                        zeros(spec.hidden_size) if lstm else None, dpre,
                        zeros(spec.hidden_size) if gru else None)


def _hook(tensor: Tensor, buffer: Tensor | None, t: int) -> None:
    if buffer is not None and tensor.requires_grad:
        tensor.register_hook(_writer(buffer, t))


_written: dict[int, list[bool]] = {}  # id(buffer) -> rows written, while a replay runs


def _writer(buffer: Tensor, t: int) -> Callable[[Tensor], None]:
    rows = _written[id(buffer)]

    def write(grad: Tensor) -> None:
        buffer[t].copy_(grad)
        rows[t] = True
    return write


def _finish(buffers: StepAdjoints) -> None:
    """Zero the rows no gradient reached (a state with no path to L has gradient zero)."""
    for buffer in (buffers.dh, buffers.dc, buffers.dpre, buffers.dxn):
        if buffer is None:
            continue
        for t, done in enumerate(_written.pop(id(buffer), [])):
            if not done:
                buffer[t].zero_()


def objective(finals: Sequence[Tensor], batch: int) -> Tensor:
    """L = 1/(2B) * sum over the given final states of ||h||^2."""
    return sum((h.pow(2).sum() for h in finals), finals[0].new_zeros(())) / (2 * batch)


def adjoints(loss: Tensor, states: Sequence[DirectionStates], retain_graph: bool = False,
             ) -> tuple[StepAdjoints, ...]:
    """dL/dh_t (and dL/dc_t) of every kept state: one backward pass for all of them."""
    flat: list[Tensor] = []
    for s in states:
        flat.extend(s.h)
        flat.extend(s.c or [])
    grads = torch.autograd.grad(loss, flat, allow_unused=True, retain_graph=retain_graph)
    out, i = [], 0
    for s in states:
        dh = _stack(grads[i:i + len(s.h)], s.h)
        i += len(s.h)
        dc = None
        if s.c is not None:
            dc = _stack(grads[i:i + len(s.c)], s.c)
            i += len(s.c)
        out.append(StepAdjoints(s.layer, s.direction, dh, dc))
    return tuple(out)


def _stack(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Unused states (no path to L) have a zero gradient."""
    return torch.stack([g if g is not None else torch.zeros_like(t)
                        for g, t in zip(grads, like, strict=True)]).detach()


def replay(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor) -> ReplayResult:
    """Run `spec` on `inputs` (B, T, I) with `params` (local names) and backpropagate the objective.

    Weights are used as given (no gradient is taken for them); the zero initial state of each
    layer and direction is the leaf that puts every state on the autograd graph, and the one
    backward pass runs to those leaves, firing the capture hooks on the way.
    """
    batch = inputs.shape[0]
    h0, c0 = zero_states(spec, batch, inputs)
    run = unroll(spec, params, inputs, h0, c0, capture=True, top_output=False)
    loss = objective(run.finals(spec), batch)
    try:
        torch.autograd.grad(loss, [h0] if c0 is None else [h0, c0])
    finally:
        found = tuple(s.captured for s in run.states if s.captured is not None)
        for buffers in found:
            _finish(buffers)
    kept = tuple((torch.stack([h.detach() for h in s.h]), s.m) for s in run.states)
    top = kept[-len(spec.directions):]
    output = torch.cat([h for h, _ in top], dim=2).transpose(0, 1)
    return ReplayResult(output, run.h_n.detach(),
                        None if run.c_n is None else run.c_n.detach(), float(loss.item()),
                        found, kept)
