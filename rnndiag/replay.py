"""Replay a recurrent module step by step and capture dL/dh_t (and dL/dc_t) at every step.

Conventions: inputs are batch-first (B, T, I). For direction `forward` the step order is
t = 0..T-1, for `reverse` t = T-1..0; adjoints are stored by time index t either way, so
`dh[t]` is the total derivative dL/dh_t of the state produced while reading x_t, summed over
every path: through later steps of the same direction and through the layer above.

One capture mechanism for every mode (`Capture`): while unrolling, a tensor hook is registered
on every h_t and c_t; each `Capture.backward(loss, roots)` runs one backward pass from the loss
to the roots (the zero initial states, or the first states of a chain) and the hooks write
each total gradient into fresh (T, B, .) buffers by time index. Buffers start untouched (not
resident yet), so they fill while the backward pass frees the graph instead of adding to its
peak. Several backward passes over one graph (a per-step loss and its final-step term) each
get their own buffers.

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
from functools import partial
from typing import Any, TypeVar

import torch
from torch import Tensor

from rnndiag.cells import LayerWeights, graphed, input_terms, unit
from rnndiag.records import CellType, Direction, ModuleSpec


@dataclass(frozen=True)
class StepAdjoints:
    """Per-step adjoints of one layer and direction, indexed by time step t."""

    layer: int
    direction: Direction
    dh: Tensor  # (T, B, P): dL/dh_t
    dc: Tensor | None  # (T, B, H): dL/dc_t, LSTM only
    alive: Tensor | None = None  # (T, B) bool: step t exists for example b (variable lengths)


@dataclass(frozen=True)
class DirectionStates:
    """The states one layer and direction produced, by time index t (graph attached)."""

    layer: int
    direction: Direction
    h: list[Tensor]  # T tensors (B, P)
    c: list[Tensor] | None  # T tensors (B, H), LSTM only
    sequence: Tensor | None  # (B, T, P): the h_t stacked, as the layer above reads them
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
           graphed: bool = False) -> Unrolled:
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

    `graphed` (LSTM only): each layer and direction is one autograd node running the
    hand-written loops (`run_graphed`), not a step-by-step graph; same states and adjoints,
    but no gradient for W_hh / W_hr and no double backward."""
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
            run = run_graphed if graphed and spec.cell_type is CellType.LSTM else _run_direction
            s = run(spec, weights, layer_input, layer, direction, h0[index],
                    None if c0 is None else c0[index], capture, stack, alive, tap)
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
    """`_run_direction` for an LSTM as one autograd node (rnndiag.cells.graphed): its chain is
    fed the adjoints by the node's backward instead of hooks."""
    assert c is not None  # an LSTM has a cell state
    terms = input_terms(x, w, spec.cell_type)  # (B, T, 4H), biases included
    chain = capture.chain(layer, direction, alive) if capture is not None else None
    steps = x.shape[1]

    def receive(dh: Tensor, dc: Tensor) -> None:
        assert chain is not None
        chain.receive("dh", dh)
        chain.receive("dc", dc)

    out, h_n, c_n, c_all = graphed.layer(terms, h, c, w, alive,
                                         direction is Direction.REVERSE,
                                         receive if chain is not None else None)
    # the states by time index: values only, but the last in run order is the node's own
    # output h_n (c_n), on the graph for whoever reads the final state
    last = final_step(direction, steps)
    hs, cs = list(out.detach().unbind(0)), list(c_all.unbind(0))
    hs[last], cs[last] = h_n, c_n
    if chain is not None:
        chain.expect("dh", hs[0], steps)
        chain.expect("dc", c_n, steps)
    if tap is not None:
        tap.append(Tapped(spec.cell_type, direction, w, x, terms, h, hs))
    return DirectionStates(layer, direction, hs, cs, out.transpose(0, 1) if stack else None,
                           chain)


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


class Chain:
    """One layer and direction's watched states, by time index t.

    `watch` registers a hook on a state; during a backward pass opened by `Capture`, the hook
    copies the state's total gradient into row t of that pass's buffer for its slot ("dh" or
    "dc", the StepAdjoints field it fills).
    """

    def __init__(self, layer: int, direction: Direction, alive: Tensor | None = None,
                 keep: bool = True) -> None:
        self.layer, self.direction, self.alive, self.keep = layer, direction, alive, keep
        self.steps = 0  # T: one more than the largest t watched
        self._like: dict[str, tuple[Tensor, tuple[int, ...]]] = {}  # slot -> (empty, (B, W))
        self._buffers: dict[str, Tensor] = {}  # slot -> (T, B, W), while a pass is open
        self._written: dict[str, list[bool]] = {}
        self.watched: dict[str, dict[int, Tensor]] = {}  # slot -> t -> the state itself
        self.fed = False  # fed by `receive`: no states watched, `batched_sq` cannot serve it

    def watch(self, slot: str, t: int, tensor: Tensor) -> None:
        self.steps = max(self.steps, t + 1)
        if slot not in self._like:  # dtype, device and shape only: no graph kept alive
            self._like[slot] = (tensor.new_empty(0), tuple(tensor.shape))
        if tensor.requires_grad:
            tensor.register_hook(partial(self._write, slot, t))
            if self.keep:  # for batched passes (`batched_sq`), which ask autograd for these
                # states' gradients directly (the retained graph holds them anyway)
                self.watched.setdefault(slot, {})[t] = tensor

    def expect(self, slot: str, like: Tensor, steps: int) -> None:
        """A slot fed whole by `receive` (rnndiag.cells.graphed), not by hooks."""
        self.steps = max(self.steps, steps)
        self._like.setdefault(slot, (like.new_empty(0), tuple(like.shape)))
        self.fed = True

    def receive(self, slot: str, grads: Tensor) -> None:
        """Every step's total gradient at once (T, B, W), by time index, while a pass is open."""
        buffer = self._buffers.get(slot)
        if buffer is not None:
            buffer.copy_(grads)
            self._written[slot] = [True] * self.steps

    def _write(self, slot: str, t: int, grad: Tensor | None) -> None:
        buffer = self._buffers.get(slot)
        if buffer is not None and grad is not None:  # None: no gradient reached it (zero)
            buffer[t].copy_(grad)
            self._written[slot][t] = True

    def open(self) -> None:
        """Fresh, untouched buffers for one backward pass."""
        for slot, (like, shape) in self._like.items():
            self._buffers[slot] = like.new_empty(self.steps, *shape)
            self._written[slot] = [False] * self.steps

    def close(self) -> StepAdjoints:
        """Zero the rows no gradient reached (no path to L: gradient zero) and the steps past an
        example's length; hand them out."""
        for slot, buffer in self._buffers.items():
            for t, done in enumerate(self._written[slot]):
                if not done:
                    buffer[t].zero_()
            if self.alive is not None:
                buffer.mul_(self.alive.reshape(*self.alive.shape, *[1] * (buffer.dim() - 2)))
        dh, dc = self._buffers.get("dh"), self._buffers.get("dc")
        self._buffers, self._written = {}, {}
        assert dh is not None  # every chain watches its states
        return StepAdjoints(self.layer, self.direction, dh, dc, self.alive)


class Capture:
    """The hooks of every chain of one forward pass; `backward` returns their adjoints."""

    def __init__(self, keep: bool = True) -> None:
        self.chains: list[Chain] = []
        self.keep = keep  # the chains keep their states for `batched_sq`

    def chain(self, layer: int, direction: Direction, alive: Tensor | None = None) -> Chain:
        self.chains.append(Chain(layer, direction, alive, self.keep))
        return self.chains[-1]

    def backward(self, loss: Tensor, roots: Sequence[Tensor], chains: Sequence[Chain],
                 retain_graph: bool = False) -> tuple[StepAdjoints, ...]:
        """One backward pass from `loss` to `roots`; the adjoints of `chains`, in order.

        Every watched state between the loss and a root fires its hook once with its total
        gradient dL/dh_t, summed over every path (a state passed as a root too).
        """
        return self.backward_with(loss, roots, chains, retain_graph)[0]

    def backward_with(self, loss: Tensor, roots: Sequence[Tensor], chains: Sequence[Chain],
                      retain_graph: bool = False, extra: Sequence[Tensor] = (),
                      ) -> tuple[tuple[StepAdjoints, ...], tuple[Tensor | None, ...]]:
        """`backward`, also returning dL/d(extra) from the same pass (parameters)."""
        for c in chains:
            c.open()
        try:
            grads = torch.autograd.grad(loss, [*roots, *extra], allow_unused=True,
                                        retain_graph=retain_graph)
        finally:
            found = tuple(c.close() for c in chains)
        return found, tuple(grads[len(roots):])


def batched_sq(outputs: Sequence[Tensor], cotangents: Sequence[Tensor],
               chains: Sequence[Chain]) -> list[Tensor]:
    """K backward passes in one: sq[k] (T, B) float64 of every chain (rnndiag.credit.state_sq:
    ||dL_k/dh_t[b]||^2 + ||dL_k/dc_t[b]||^2, steps past an example's length zero), L_k being
    <cotangents[j][k], outputs[j]> summed over j; returns (K, T, B) per chain, in order.

    One vmapped backward (`is_grads_batched`) over the retained graph asks autograd for the
    watched states' total gradients directly (the same sums the hooks receive), so the
    per-step work is dispatched once for the K passes instead of K times.
    """
    passes = cotangents[0].shape[0]
    wanted = [(i, slot, t, x) for i, c in enumerate(chains)
              for slot, by_t in c.watched.items() for t, x in by_t.items()]
    if passes == 1:  # a plain backward: vmap's batching costs without a batch to share
        grads = tuple(g if g is None else g.unsqueeze(0) for g in torch.autograd.grad(
            list(outputs), [x for *_, x in wanted], [c[0] for c in cotangents],
            retain_graph=True, allow_unused=True))
    else:
        grads = torch.autograd.grad(list(outputs), [x for *_, x in wanted], list(cotangents),
                                    retain_graph=True, allow_unused=True, is_grads_batched=True)
    found = []
    for c in chains:
        like, shape = c._like["dh"]
        found.append(torch.zeros(passes, c.steps, shape[0], dtype=torch.float64,
                                 device=like.device))
    for (i, _, t, _), g in zip(wanted, grads, strict=True):
        if g is not None:  # (K, B, W): no path to L_k leaves the row zero
            found[i][:, t] += g.detach().flatten(2).double().pow(2).sum(2)
    for c, sq in zip(chains, found, strict=True):
        if c.alive is not None:
            sq.mul_(c.alive.to(sq.device))
    return found


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
                  lengths: Tensor | None) -> ReplayResult:
    """`rnndiag.routes.replay` step by step: the step replay (see there). Runs in the calling
    thread: wrap it in `with_deep_stack`."""
    torch.set_grad_enabled(True)  # grad mode is per thread
    batch = inputs.shape[0]
    h0, c0 = zero_states(spec, batch, inputs)
    capture = Capture(keep=False)  # one pass, freeing the graph as it goes
    alive = None if lengths is None else alive_mask(lengths.to(inputs.device), inputs.shape[1])
    run = unroll(spec, params, inputs, h0, c0, capture=capture, top_output=False, alive=alive)
    loss = objective(run.finals(spec), batch)
    found = capture.backward(loss, [h0] if c0 is None else [h0, c0], capture.chains)
    top = run.states[-len(spec.directions):]
    output = torch.cat([torch.stack([h.detach() for h in s.h]) for s in top], dim=2)
    return ReplayResult(output.transpose(0, 1), run.h_n.detach(),
                        None if run.c_n is None else run.c_n.detach(), float(loss.item()),
                        found)
