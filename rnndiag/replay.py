"""Replay a recurrent module step by step and capture dL/dh_t (and dL/dc_t) at every step.

Conventions: inputs are batch-first (B, T, I). For direction `forward` the step order is
t = 0..T-1, for `reverse` t = T-1..0; adjoints are stored by time index t either way, so
`dh[t]` is the total derivative dL/dh_t of the state produced while reading x_t, summed over
every path: through later steps of the same direction and through the layer above.

The capture (rnndiag.capture): while unrolling, every h_t and c_t is watched by its layer and
direction's `Chain` (a tensor hook per state), and each `Capture.backward(loss, roots)` hands
out the total gradients by time index. With `graphed`, a layer runs as one autograd node
(`run_graphed`, rnndiag.cells.graphed: an LSTM or GRU always, an RNN on a GPU) that feeds its
chain whole.

Objective when no task loss applies:
    L = 1/(2B) * sum_b sum_d ||h_final^{top,d}_b||^2,
h_final being the last state each direction of the top layer produced (t = T-1 forward,
t = 0 reverse). The initial state is zero, as in PyTorch's default.

Checkpoint mode enters through rnndiag.routes.replay, which picks this step replay
(`replay_steps`) or a faster route with the same adjoints.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from rnndiag.capture import Capture, Chain, StepAdjoints
from rnndiag.cells import LayerWeights, graphed, graphed_fused, input_terms, unit
from rnndiag.records import CellType, Direction, ModuleSpec


@dataclass(frozen=True)
class DirectionStates:
    """The states one layer and direction produced, by time index t (graph attached)."""

    layer: int
    direction: Direction
    h: list[Tensor]  # T tensors (B, P)
    c: list[Tensor] | None  # T tensors (B, H), LSTM only
    sequence: Tensor | None  # (B, T, P): the h_t stacked, as the layer above reads them
    #                          ((T, B, P) from `run_graphed`, time-major)
    chain: Chain | None = None  # the hooks' bookkeeping when unrolled with a Capture


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
    adjoints: tuple[StepAdjoints, ...]  # layer-major, then direction


def final_step(direction: Direction, seq_len: int) -> int:
    """Time index of the last state a direction produces."""
    return seq_len - 1 if direction is Direction.FORWARD else 0


def zero_states(spec: ModuleSpec, batch: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
    """Zero (L*D, B, P) h0 and (L*D, B, H) c0 leaves that put every state on the graph."""
    n = spec.num_layers * len(spec.directions)
    h0 = like.new_zeros(n, batch, spec.output_size).requires_grad_()
    if not unit(spec.cell_type).has_cell_state:
        return h0, None
    return h0, like.new_zeros(n, batch, spec.hidden_size).requires_grad_()


def alive_mask(lengths: Tensor, steps: int) -> Tensor:
    """(T, B) bool: t < lengths[b]."""
    return torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


def unroll(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor, h0: Tensor,
           c0: Tensor | None, capture: Capture | None = None, top_output: bool = True,
           alive: Tensor | None = None, tap: list[Tapped] | None = None,
           graphed: bool = False, output_time_major: bool = False) -> Unrolled:
    """Run `spec` on `inputs` (B, T, I) from h0 (L*D, B, P) [and c0], keeping every state;
    with a `capture`, every state is watched by its hooks (one chain per layer and direction).
    Without `top_output` the top layer's outputs are not stacked (saving a copy while the
    graph is alive).

    Variable lengths, as a PackedSequence runs: with `alive` (T, B), a step that does not exist
    for an example keeps its state unchanged (h_t = h_{t-1} forward; reverse, the state stays
    h0 until the example's last step), so each example runs exactly on its own length, h_n
    holds its own final state, and the captured adjoints of such steps are zero.

    With a `tap`, each layer and direction appends what its per-example weight gradients are
    computed from (`Tapped`; rnndiag.pergrad).

    `graphed`: each layer and direction is one autograd node (`run_graphed`): an LSTM's or
    GRU's runs the hand-written loops, or the fused kernel on a GPU; an RNN's the fused
    kernel on a GPU (elsewhere it runs step by step). Same states and adjoints, but no
    gradient for W_hh / W_hr and no double backward. The nodes run time-major: the input is
    read as (T, B, I) (a view), each layer's input terms and outputs are (T, B, .) with each
    step's rows contiguous, and so are the gradients autograd hands between them (no
    transposing copies in either pass); the output is laid out as `output_time_major` asks
    (its values are the same either way: `output` is (B, T, W), a view when time-major), so
    that a time-major module's caller reads it without a copy."""
    kept: list[DirectionStates] = []
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_input: Tensor | None = inputs.transpose(0, 1) if graphed else inputs
    for layer in range(spec.num_layers):
        assert layer_input is not None  # every layer below the top is stacked
        outputs = []
        stack = top_output or layer < spec.num_layers - 1
        both = _pair(spec, params, layer_input, layer, h0, c0, capture, stack, alive, tap,
                     graphed)
        for k, direction in enumerate(spec.directions):
            index = layer * len(spec.directions) + k
            if both is not None:
                s = both[k]
            else:
                weights = LayerWeights.of(spec, params, layer, direction)
                run = run_graphed if graphed else _run_direction
                s = run(spec, weights, layer_input, layer, direction, h0[index],
                        None if c0 is None else c0[index], capture, stack, alive, tap)
            kept.append(s)
            last = final_step(direction, len(s.h))
            h_n.append(s.h[last])
            if s.c is not None:
                c_n.append(s.c[last])
            if s.sequence is not None:
                outputs.append(s.sequence)
        if graphed and layer == spec.num_layers - 1 and not output_time_major:
            outputs = [o.transpose(0, 1) for o in outputs]  # the top output batch-first
        layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else (
            outputs[0] if outputs else None)
    if graphed and layer_input is not None and output_time_major:
        layer_input = layer_input.transpose(0, 1)
    return Unrolled(layer_input, torch.stack(h_n), torch.stack(c_n) if c_n else None,
                    tuple(kept))


def _pair(spec: ModuleSpec, params: Mapping[str, Tensor], x: Tensor, layer: int, h0: Tensor,
          c0: Tensor | None, capture: Capture | None, stack: bool, alive: Tensor | None,
          tap: list[Tapped] | None, graphed: bool) -> list[DirectionStates] | None:
    """A bidirectional layer's two directions as one graphed node (`run_graphed_pair`), or
    None: run them one by one."""
    if not graphed or len(spec.directions) != 2:
        return None
    index = 2 * layer
    weights = (LayerWeights.of(spec, params, layer, Direction.FORWARD),
               LayerWeights.of(spec, params, layer, Direction.REVERSE))
    return run_graphed_pair(spec, weights, x, layer, (h0[index], h0[index + 1]),
                            None if c0 is None else (c0[index], c0[index + 1]), capture, stack,
                            alive, tap)


def _run_direction(spec: ModuleSpec, w: LayerWeights, x: Tensor, layer: int,
                   direction: Direction, h: Tensor, c: Tensor | None,
                   capture: Capture | None, stack: bool = True, alive: Tensor | None = None,
                   tap: list[Tapped] | None = None) -> DirectionStates:
    """Unroll one layer and direction from (h, c); states kept by time index t."""
    seq_len = x.shape[1]
    # (B, T, G*H): every step's input term in one matmul. unbind, not xp[:, t]: the backward
    # of a slice materialises a full (B, T, G*H) gradient per step (quadratic in T).
    terms = input_terms(x, w, spec.cell_type)
    h_init = h
    xs = terms.unbind(dim=1)
    chain = capture.chain(layer, direction, alive) if capture is not None else None
    keep = None if alive is None else alive.unsqueeze(2).unbind(0)  # T of (B, 1)
    step_fn, nonlinearity = unit(spec.cell_type).step, spec.nonlinearity  # once, not per step
    hs: list[Any] = [None] * seq_len
    cs: list[Any] | None = [None] * seq_len if c is not None else None
    order = range(seq_len) if direction is Direction.FORWARD else range(seq_len - 1, -1, -1)
    for t in order:
        out = step_fn(nonlinearity, xs[t], h, c, w)
        if keep is None:
            h, c = out.h, out.c
        else:
            h = torch.where(keep[t], out.h, h)
            c = None if c is None or out.c is None else torch.where(keep[t], out.c, c)
        hs[t] = h
        if cs is not None:
            cs[t] = c
        if chain is not None:
            chain.watch("dh", t, h)
            if c is not None:  # the step's own c_t: h_t is computed from it, not from the
                # masked state (whose gradient would miss the path c_t -> h_t)
                own = c if keep is None else out.c
                assert own is not None  # a cell with a state returns one
                chain.watch("dc", t, own)
    sequence = torch.stack(hs, dim=1) if stack else None
    if tap is not None:
        tap.append(Tapped(spec.cell_type, direction, w, x, terms, h_init, hs))
    return DirectionStates(layer, direction, hs, cs, sequence, chain)


def run_graphed(spec: ModuleSpec, w: LayerWeights, x: Tensor, layer: int,
                direction: Direction, h: Tensor, c: Tensor | None,
                capture: Capture | None, stack: bool = True, alive: Tensor | None = None,
                tap: list[Tapped] | None = None) -> DirectionStates:
    """`_run_direction` as one autograd node (rnndiag.cells.graphed): its chain is fed the
    adjoints by the node's backward instead of hooks. An LSTM and a GRU always (the
    hand-written loops, or the fused kernel on a GPU); an RNN where the fused kernel runs it
    (a GPU, packed prefixes at most), else step by step. Time-major: x (T, B, I), and the
    sequence (T, B, P)."""
    steps, reverse = x.shape[0], direction is Direction.REVERSE
    lengths = None
    if spec.cell_type is CellType.RNN:
        fits, lengths = graphed_fused.lengths_of(alive, steps)
        if not (fits and graphed.fused_for(x)):
            s = _run_direction(spec, w, x.transpose(0, 1), layer, direction, h, c, capture,
                               stack, alive, tap)
            seq = None if s.sequence is None else s.sequence.transpose(0, 1)
            return DirectionStates(s.layer, s.direction, s.h, s.c, seq, s.chain)
    node = _Node.of(spec, w, x, layer, direction, capture, alive)
    out: Sequence[Tensor]
    if spec.cell_type is CellType.LSTM:
        assert c is not None  # an LSTM has a cell state
        out = graphed.layer(node.terms, h, c, w, alive, reverse, node.feed)
    elif spec.cell_type is CellType.GRU:
        out = graphed.gru_layer(node.terms, h, w, alive, reverse, node.feed)
    else:
        out = graphed_fused.simple_layer(spec.cell_type, spec.nonlinearity,
                                         node.terms.transpose(0, 1), h, w, lengths, reverse,
                                         node.feed)
    return node.states(spec, h, out, stack, tap)


def run_graphed_pair(spec: ModuleSpec, weights: tuple[LayerWeights, LayerWeights], x: Tensor,
                     layer: int, h: tuple[Tensor, Tensor], c: tuple[Tensor, Tensor] | None,
                     capture: Capture | None, stack: bool = True,
                     alive: Tensor | None = None, tap: list[Tapped] | None = None,
                     ) -> list[DirectionStates] | None:
    """Both directions of a bidirectional LSTM or GRU layer as one node whose loops run side
    by side (rnndiag.cells.graphed.layer_pair): the same states and adjoints as two
    `run_graphed` calls, forward then reverse. None where the layer does not run so (an RNN,
    or the fused kernel on a GPU): run the directions one by one."""
    if spec.cell_type is CellType.RNN or not graphed.pairs(x):
        return None
    nodes = [_Node.of(spec, w, x, layer, d, capture, alive)
             for w, d in zip(weights, (Direction.FORWARD, Direction.REVERSE), strict=True)]
    terms = (nodes[0].terms, nodes[1].terms)
    feeds = (nodes[0].feed, nodes[1].feed)
    if spec.cell_type is CellType.LSTM:
        assert c is not None  # an LSTM has a cell state
        outs = graphed.layer_pair(terms, h, c, weights, alive, feeds)
    else:
        outs = graphed.gru_pair(terms, h, weights, alive, feeds)
    return [node.states(spec, h0, out, stack, tap)
            for node, h0, out in zip(nodes, h, outs, strict=True)]


@dataclass(frozen=True)
class _Node:
    """One layer and direction about to run as (part of) an autograd node: its input terms
    (T, B, G*H), and its chain with the receiver its node's backward feeds."""

    x: Tensor
    w: LayerWeights
    direction: Direction
    terms: Tensor
    chain: Chain | None
    layer: int

    @staticmethod
    def of(spec: ModuleSpec, w: LayerWeights, x: Tensor, layer: int, direction: Direction,
           capture: Capture | None, alive: Tensor | None) -> _Node:
        terms = input_terms(x, w, spec.cell_type)  # biases as the unit folds them
        chain = capture.chain(layer, direction, alive) if capture is not None else None
        return _Node(x, w, direction, terms, chain, layer)

    @property
    def feed(self) -> Callable[..., None] | None:
        chain = self.chain
        if chain is None:
            return None

        def receive(dh: Tensor, dc: Tensor | None = None) -> None:
            chain.receive("dh", dh)
            if dc is not None:
                chain.receive("dc", dc)

        return receive

    def states(self, spec: ModuleSpec, h: Tensor, out: Sequence[Tensor], stack: bool,
               tap: list[Tapped] | None) -> DirectionStates:
        """The DirectionStates of the node's outputs (h (T, B, P), h_n[, c_n, c (T, B, H)])."""
        steps = self.x.shape[0]
        # the states by time index: values only, but the last in run order is the node's own
        # output h_n (c_n), on the graph for whoever reads the final state
        last = final_step(self.direction, steps)
        hs = list(out[0].detach().unbind(0))
        hs[last] = out[1]
        cs = None
        if spec.cell_type is CellType.LSTM:
            cs = list(out[3].unbind(0))
            cs[last] = out[2]
        if self.chain is not None:
            self.chain.expect("dh", hs[0], steps)
            if cs is not None:
                self.chain.expect("dc", out[2], steps)
        if tap is not None:
            tap.append(Tapped(spec.cell_type, self.direction, self.w, self.x, self.terms, h,
                              hs, time_major=True))
        return DirectionStates(self.layer, self.direction, hs, cs,
                               out[0] if stack else None, self.chain)


@dataclass(frozen=True)
class Tapped:
    """One layer and direction as `unroll` ran it with a tap: the gradient of its input term,
    with the layer input x and the states, gives each example's weight gradients
    (rnndiag.pergrad)."""

    cell: CellType
    direction: Direction
    w: LayerWeights
    x: Tensor  # (B, T, I) the layer input
    terms: Tensor  # (B, T, G*H) input_terms(x, w): x W_ih^T + biases
    h_init: Tensor  # (B, P) the state before the first step in run order
    states: list[Tensor]  # T of (B, P), by time index t
    time_major: bool = False  # x and terms are (T, B, .) (the graphed nodes' layout)


def objective(finals: Sequence[Tensor], batch: int) -> Tensor:
    """L = 1/(2B) * sum over the given final states of ||h||^2."""
    return sum((h.pow(2).sum() for h in finals), finals[0].new_zeros(())) / (2 * batch)


DEEP_STACK = 512 * 2**20  # bytes of C stack for graph work (virtual: touched pages only)

R = TypeVar("R")


def with_deep_stack(fn: Callable[[], R]) -> R:
    """`fn()` in a thread with a DEEP_STACK C stack, its exception re-raised here.

    Freeing an autograd graph T steps deep recurses in C++ once per step where the nodes
    that the capture hooks exposed to Python follow one another (a GRU's h_t = lerp(n, h,
    z) reads h_{t-1} directly; so do the masked states of variable lengths): a bidirectional
    GRU of T = 15,000 crashed with a 1 MiB stack, and the main thread's 8 MiB ends at a few
    ten thousand steps. Where no such thread can start (an address-space limit), `fn` runs
    here."""
    found: dict[str, Any] = {}

    def run() -> None:
        try:
            found["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread as it was
            found["error"] = exc

    before = threading.stack_size()
    try:
        threading.stack_size(DEEP_STACK)
        thread = threading.Thread(target=run, name="rnndiag-graph", daemon=True)
        thread.start()
    except (RuntimeError, ValueError, MemoryError):
        return fn()
    finally:
        threading.stack_size(before)
    thread.join()
    if "error" in found:
        raise found["error"]
    return found["value"]  # type: ignore[no-any-return]


def replay_steps(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor,
                 lengths: Tensor | None, graphed: bool = False) -> ReplayResult:
    """`rnndiag.routes.replay` step by step: the step replay (see there); with `graphed`,
    each layer and direction as one node (`unroll`). Runs in the calling thread: wrap it in
    `with_deep_stack`."""
    torch.set_grad_enabled(True)  # grad mode is per thread
    batch = inputs.shape[0]
    h0, c0 = zero_states(spec, batch, inputs)
    capture = Capture(keep=False)  # one pass, freeing the graph as it goes
    alive = None if lengths is None else alive_mask(lengths.to(inputs.device), inputs.shape[1])
    run = unroll(spec, params, inputs, h0, c0, capture=capture, top_output=False, alive=alive,
                 graphed=graphed)
    loss = objective(run.finals(spec), batch)
    found = capture.backward(loss, [h0] if c0 is None else [h0, c0], capture.chains)
    top = run.states[-len(spec.directions):]
    output = torch.cat([torch.stack([h.detach() for h in s.h]) for s in top], dim=2)
    return ReplayResult(output.transpose(0, 1), run.h_n.detach(),
                        None if run.c_n is None else run.c_n.detach(), float(loss.item()),
                        found)
