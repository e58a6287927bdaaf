"""The scored output's batch and time axes, and the temporal credit passes over it (model mode).

Axes: the batch size B is the recurrent states' own (h_t is (B, H)), never a guess from the
inputs. A scored output tensor has a time axis when one of its first two axes is B and the
other is the step count T of a recorded recurrent sequence: (B, T, ...) batch-first or
(T, B, ...) time-major; a leading (T*B, ...) or (B*T, ...) axis, as code that flattens for a
Linear head makes, is unflattened following the recurrent module's `batch_first`. When B == T
the sizes cannot tell: `--time-axis` must. Under cross-entropy the last axis holds classes and
is never the time axis.

The credit passes (definitions in rnndiag.credit): with g = dL/d(output), up to `SAMPLES`
positions s spread over the sequence, and each example b referenced at one of them, s_b, per
pass: a pass is one backward pass of <g restricted to (b, s_b) for every b, output>. The
recurrence never mixes examples, so one pass measures B references, each example's own credit
dL_{s_b}[b]/dh_t[b]; enough passes run for PER_POSITION references per position
(`assignments`: one pass from B = 2 * SAMPLES examples up). A position is scored by an example
when g is non-zero there and the example has that step (a PackedSequence's padding is scored by
nobody); positions scored by no example are skipped and listed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rnndiag.capture import Capture, Chain, batched_sq
from rnndiag.credit import state_sq
from rnndiag.errors import BatchError
from rnndiag.replay import DirectionStates
from rnndiag.series import Row

SAMPLES = 16  # sampled positions per credit matrix

View = Callable[[Tensor], Tensor]  # a scored tensor (or its gradient) -> (B, T, ...)


def tensors_of(output: Any) -> list[Tensor]:
    """Every tensor in a (nested) tuple, list or dict output, in order."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in tensors_of(v)]
    if isinstance(output, tuple | list):
        return [t for v in output for t in tensors_of(v)]
    return []


def sequence_view(x: Tensor, batch: int, steps: Mapping[int, bool | None],
                  time_axis: int | None, classes_last: bool) -> tuple[int, View, bool] | None:
    """(T, a view to (B, T, ...), time-major) when `x` has a batch and a time axis; `steps`
    maps each recorded sequence length T to its module's batch_first (None for cells)."""
    usable = x.dim() - (1 if classes_last else 0)  # axes that may be batch or time
    if usable >= 2:
        d0, d1 = x.shape[0], x.shape[1]
        if time_axis is not None:
            t = x.shape[time_axis]
            if x.shape[1 - time_axis] == batch and t in steps:
                return t, _identity if time_axis == 1 else _swap, time_axis == 0
            return None
        if d0 == batch and d1 == batch and batch in steps:
            raise BatchError(f"the scored output {tuple(x.shape)} has batch size and sequence "
                             f"length both {batch}: say which axis is time with --time-axis 0 "
                             "(time-major) or 1 (batch-first)")
        if d0 == batch and d1 in steps:
            return d1, _identity, False
        if d1 == batch and d0 in steps:
            return d0, _swap, True
    if usable >= 1:
        for t, batch_first in steps.items():
            if batch_first is not None and t > 1 and x.shape[0] == t * batch:
                return t, _unflatten(batch, t, batch_first), not batch_first
    return None


def _identity(v: Tensor) -> Tensor:
    return v


def _swap(v: Tensor) -> Tensor:
    return v.transpose(0, 1)


def _unflatten(batch: int, steps: int, batch_first: bool) -> View:
    if batch_first:
        return lambda v: v.unflatten(0, (batch, steps))
    return lambda v: v.unflatten(0, (steps, batch)).transpose(0, 1)


@dataclass(frozen=True)
class Scored:
    """The scored output's tensors that have a time axis of length `steps`, viewed (B, T, ...),
    with the loss's gradient g for each (same views)."""

    steps: int
    views: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    time_major: bool

    def scored(self) -> Tensor:
        """(B, T) bool: example b has a loss term at position s (g non-zero there)."""
        found = torch.zeros(self.grads[0].shape[:2], dtype=torch.bool,
                            device=self.grads[0].device)
        for g in self.grads:
            found |= (g != 0).flatten(2).any(2) if g.dim() > 2 else g != 0
        return found

    def cotangents(self, masks: Sequence[Tensor]) -> list[Tensor]:
        """For each view, (K, ...) the gradients of the K terms `term(masks[k])` on it."""
        out = []
        for g in self.grads:
            shape = [1] * (g.dim() - 2)
            out.append(torch.stack([(g * m.reshape(*m.shape, *shape).to(g.dtype)).detach()
                                    for m in masks]))
        return out

    def term(self, mask: Tensor) -> Tensor:
        """<g restricted to `mask` (B, T), output>: the loss's terms at those positions."""
        total = self.views[0].new_zeros(())
        for v, g in zip(self.views, self.grads, strict=True):
            m = mask.reshape(*mask.shape, *[1] * (g.dim() - 2)).to(g.dtype)
            total = total + (v * (g * m).detach()).sum()
        return total


def scored_sequences(loss: Tensor, output: Any, batch: int,
                     steps: Mapping[int, bool | None], time_axis: int | None,
                     classes_last: bool) -> Scored | None:
    """The scored output's sequence tensors and their gradients; None when none has a time
    axis (a loss on a pooled output: the whole loss is the last step's term)."""
    found: list[tuple[Tensor, int, View, bool]] = []
    for x in tensors_of(output):
        if x.requires_grad and x.is_floating_point():
            seen = sequence_view(x, batch, steps, time_axis, classes_last)
            if seen is not None:
                found.append((x, *seen))
    if not found:
        return None
    length = found[0][1]
    found = [f for f in found if f[1] == length]
    grads = torch.autograd.grad(loss, [x for x, *_ in found], retain_graph=True,
                                allow_unused=True)
    kept = [(view(x), view(g)) for (x, _, view, _), g in zip(found, grads, strict=True)
            if g is not None]
    if not kept:
        return None
    return Scored(length, tuple(v for v, _ in kept), tuple(g for _, g in kept), found[0][3])


def positions(steps: int, count: int = SAMPLES) -> list[int]:
    """Up to `count` positions spread evenly over 0..steps-1, both ends included."""
    n = min(count, steps)
    if n == 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (n - 1)) for i in range(n)})


@dataclass
class CreditRows:
    """The credit rows of every aligned state (by index into the flat list of states), one per
    referenced position, in order of position."""

    rows: dict[int, list[Row]] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)  # sampled positions no example scores
    unscored: int = 0  # examples that score no position at all


PER_POSITION = 2  # references per sampled position that the passes aim for


def assignments(hit: Tensor, sampled: Sequence[int]) -> list[list[int]]:
    """The credit passes' references: per pass, each example's position (-1: none).

    ceil(n * PER_POSITION / B) passes (n sampled positions, B examples; at most n), each
    example at a different sampled position in each pass, chosen greedily in example order: of
    the positions it scores and has not had yet, the one with the fewest references so far
    (the earliest on a tie). An example that scores none of the sampled positions is
    referenced once, at its last scored position (so every scoring example counts)."""
    batch, n = hit.shape[0], len(sampled)
    count = dict.fromkeys(sampled, 0)
    scores = hit[:, list(sampled)].tolist()
    had: list[set[int]] = [set() for _ in range(batch)]
    out = []
    for j in range(min(n, -(-n * PER_POSITION // batch))):
        refs = []
        for b in range(batch):
            free = [s for s, ok in zip(sampled, scores[b], strict=True) if ok and s not in had[b]]
            if not free:
                last = -1 if j or any(scores[b]) else _last(hit[b])
                refs.append(last)
                continue
            s = min(free, key=lambda s: (count[s], s))
            count[s] += 1
            had[b].add(s)
            refs.append(s)
        out.append(refs)
    return out


def _last(row: Tensor) -> int:
    found = row.nonzero()
    return -1 if found.numel() == 0 else int(found[-1])


def credit_rows(scored: Scored, states: Sequence[DirectionStates], capture: Capture,
                roots: Sequence[Tensor], batch: int) -> CreditRows:
    """Run the credit passes (`assignments`) for every state whose steps are the scored
    positions; one row per referenced position (its examples' sq, every other example's
    column zero)."""
    aligned = [i for i, s in enumerate(states) if s.chain is not None
               and s.chain.steps == scored.steps and s.h[0].shape[0] == batch]
    out = CreditRows({i: [] for i in aligned})
    if not aligned:
        return out
    hit = scored.scored()  # (B, T)
    chain = states[aligned[0]].chain
    alive = None if chain is None else chain.alive
    if alive is not None:  # a padded position is no example's to score (packed sequences)
        hit = hit & alive.t().to(hit.device)
    out.unscored = int((~hit.any(1)).sum())
    sampled = positions(scored.steps)
    out.skipped = [s for s in sampled if not bool(hit[:, s].any())]
    plans = [torch.tensor(refs) for refs in assignments(hit, sampled)]
    plans = [refs for refs in plans if bool((refs >= 0).any())]
    steps = torch.arange(scored.steps, device=hit.device)
    masks = [steps.unsqueeze(0) == refs.to(hit.device).unsqueeze(1)  # refs -1: no column
             for refs in plans]
    found = _passes(scored, masks, [states[i] for i in aligned], capture, roots)
    # the rows' bookkeeping on the CPU: a few (T, B) tables, dozens of tiny ops on each, which
    # on a GPU would each wait for the device
    found = [[sq.cpu() for sq in got] for got in found]
    referenced = sorted({int(s) for refs in plans for s in refs.tolist() if s >= 0})
    for k, i in enumerate(aligned):
        watched = states[i].chain
        assert watched is not None  # aligned states are watched
        alive = None if watched.alive is None else watched.alive.cpu()
        out.rows[i] = [_row(s, plans, [got[k] for got in found], alive) for s in referenced]
    return out


def _row(s: int, plans: Sequence[Tensor], sqs: Sequence[Tensor], alive: Tensor | None) -> Row:
    """Position s's row: the columns of the examples referenced at s in each pass (an example
    is referenced at s in one pass at most)."""
    sq, refs = None, torch.full_like(plans[0], -1)
    for plan, got in zip(plans, sqs, strict=True):
        mine = plan == s
        if bool(mine.any()):
            part = got * mine.to(got.device, got.dtype).unsqueeze(0)
            sq = part if sq is None else sq + part
            refs = torch.where(mine, s, refs)
    assert sq is not None  # s was referenced in some pass
    return Row(sq, refs, alive, s)


def _passes(scored: Scored, masks: Sequence[Tensor], states: Sequence[DirectionStates],
            capture: Capture, roots: Sequence[Tensor]) -> list[list[Tensor]]:
    """One backward pass per mask of <g restricted to the mask, output>; per pass, sq
    (rnndiag.credit.state_sq) of each state, in order.

    The passes run batched (`rnndiag.capture.batched_sq`), as many at once as BATCH_BYTES of
    cotangents and state gradients allow; one by one, through the capture, where a state's
    adjoints come whole from an autograd node (rnndiag.cells.graphed), not from watched
    states."""
    chains = [s.chain for s in states if s.chain is not None]
    assert len(chains) == len(states)  # aligned states are watched
    if any(c.fed for c in chains):
        return [[state_sq(a) for a in capture.backward(scored.term(mask), roots, chains,
                                                       retain_graph=True)] for mask in masks]
    done: list[list[Tensor]] = []
    group = _group_size(scored, chains)
    for start in range(0, len(masks), group):
        part = masks[start:start + group]
        found = batched_sq(scored.views, scored.cotangents(part), chains)
        done.extend([sq[k] for sq in found] for k in range(len(part)))
    return done


BATCH_BYTES = 256 * 2**20  # cotangents and state gradients of the batched passes, at most


def _group_size(scored: Scored, chains: Sequence[Chain]) -> int:
    """How many credit passes to batch: their cotangents and the gradients of every watched
    state, K copies of each, within BATCH_BYTES."""
    views = sum(v.numel() * v.element_size() for v in scored.views)
    watched = sum(x.numel() * x.element_size() for c in chains for by_t in c.watched.values()
                  for x in by_t.values())
    return max(1, BATCH_BYTES // max(1, 2 * (views + watched)))
