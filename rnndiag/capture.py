"""The capture: per-step adjoints dL/dh_t (and dL/dc_t) of every recurrent state, by time index.

One mechanism for every replay (rnndiag.replay): a `Chain` per layer and direction receives
the total gradient of each state it watches, either from a tensor hook on that state (the step
replay) or whole from an autograd node that computed them (`Chain.receive`,
rnndiag.cells.graphed); each `Capture.backward(loss, roots)` runs one backward pass from the
loss to the roots and hands out the chains' buffers, rows indexed by time step t whatever the
order the backward pass reached them in. Buffers start untouched (not resident yet), so they
fill while the backward pass frees the graph instead of adding to its peak. Several backward
passes over one graph (a per-step loss and its credit terms) each get their own buffers.
`batched_sq` runs K passes at once for watched states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from rnndiag.records import Direction


@dataclass(frozen=True)
class StepAdjoints:
    """Per-step adjoints of one layer and direction, indexed by time step t."""

    layer: int
    direction: Direction
    dh: Tensor  # (T, B, P): dL/dh_t
    dc: Tensor | None  # (T, B, H): dL/dc_t, LSTM only
    alive: Tensor | None = None  # (T, B) bool: step t exists for example b (variable lengths)


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
        """Every step's total gradient at once (T, B, W), by time index, while a pass is open.
        The tensor becomes the pass's buffer itself, not copied into it (a node hands over
        tensors it no longer uses; at T = 1600 the copies cost a second of a 26 s run)."""
        if slot in self._buffers:
            self._buffers[slot] = grads.contiguous()
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
        """`backward`, also returning dL/d(extra) from the same pass (any tensors on the graph:
        rnndiag.pergrad's recorded input terms and module outputs)."""
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
