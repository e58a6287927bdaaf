"""References, ratios by distance, and the temporal credit of per-position loss terms.

Notation (one layer and direction; t = 0..T-1 the time index, b the example):

- sq[t, b] = ||dL/dh_t[b]||^2 + ||dL/dc_t[b]||^2 (the cell state for LSTM only), from one
  backward pass; steps past an example's length are zero (rnndiag.replay masks them).
- A *reference* is an example b and a step s_b where its gradient is measured from. Forward
  directions look back, k = s_b - t >= 0 steps; reverse directions look ahead, k = t - s_b.
- Pooled over every reference (b, s_b) of every pass that reaches k steps:

      r(k)^2 = sum ||dL/dh_{s_b -+ k}[b]||^2 / sum ||dL/dh_{s_b}[b]||^2

  A reference whose own gradient is zero is skipped (never divided by); a non-finite one
  makes r NaN. With one reference per example at its last step and equal lengths, r(k) is
  simply state_grad_norm[T-1-k] / state_grad_norm[T-1].

Passes and their references (rnndiag.modelcheck decides which apply):

- the loss itself (basis `loss`): each example's last step (first, reverse) that its gradient
  reaches, among the steps it is alive;
- credit (basis `credit`, a layer whose steps are the scored output's positions): with g the
  cotangent dL/d(output), L_s = <g restricted to position s, output> is the loss's term at s,
  and dL_s/dh_t its credit to h_t. References (b, s_b): each example at one of the sampled
  positions per pass (rnndiag.temporal.assignments), all of them in one backward pass of
  sum_b L_{s_b}[b] (examples do not mix, so example b's gradients are its own term's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from rnndiag.capture import StepAdjoints
from rnndiag.records import Direction


def state_sq(adj: StepAdjoints) -> Tensor:
    """sq[t, b] (T, B) in float64, 32 steps at a time (never a float64 copy of all of dh)."""
    out = [part.mul_(part).flatten(2).sum(2) for part in float64_chunks(adj.dh.detach())]
    if adj.dc is not None:
        for i, part in enumerate(float64_chunks(adj.dc.detach())):
            out[i] += part.mul_(part).flatten(2).sum(2)
    return torch.cat(out)


CHUNK_STEPS = 32  # steps per float64 chunk


def float64_chunks(x: Tensor, steps: int = CHUNK_STEPS) -> Iterator[Tensor]:
    """x (T, ...) in float64, `steps` rows at a time, each chunk in one reused buffer that the
    caller may overwrite but not keep (a fresh float64 copy per chunk faults its pages in
    anew: in a process holding a large graph, 16x slower than the arithmetic)."""
    buffer = torch.empty((min(steps, x.shape[0]), *x.shape[1:]), dtype=torch.float64,
                         device=x.device)
    for chunk in x.split(steps):
        part = buffer[:chunk.shape[0]]
        part.copy_(chunk)
        yield part


def norms_over_batch(sq: Tensor) -> tuple[float, ...]:
    """||.||_2 over the batch at each t."""
    return tuple(sq.sum(1).sqrt().tolist())


def reached(sq: Tensor, direction: Direction) -> Tensor:
    """(B,) the last step (forward) or first (reverse) with a non-zero gradient; -1: none."""
    steps = torch.arange(sq.shape[0], device=sq.device).unsqueeze(1).expand_as(sq)
    hit = sq != 0  # NaN counts as reached: it is reported, not skipped
    if direction is Direction.FORWARD:
        return torch.where(hit, steps, -1).amax(0)
    first = torch.where(hit, steps, sq.shape[0]).amin(0)
    return torch.where(first == sq.shape[0], -1, first)


@dataclass(frozen=True)
class Pool:
    """Sums over references, by distance k (float64, length T)."""

    num: Tensor
    den: Tensor
    references: int
    skipped: int
    final: int | None  # the latest reference step (forward), the earliest (reverse)


def pool(sq: Tensor, refs: Tensor, direction: Direction, alive: Tensor | None) -> Pool:
    """Pool one pass: `refs` (B,) the reference step of each example, -1 for none."""
    steps, batch = sq.shape
    refs = refs.to(sq.device)
    has = refs >= 0
    ref_sq = sq.gather(0, refs.clamp(min=0).unsqueeze(0)).squeeze(0)  # (B,)
    used = has & (ref_sq != 0)
    t = torch.arange(steps, device=sq.device).unsqueeze(1)
    k = refs.unsqueeze(0) - t if direction is Direction.FORWARD else t - refs.unsqueeze(0)
    valid = used.unsqueeze(0) & (k >= 0)
    if alive is not None:
        valid = valid & alive.to(sq.device)
    num = sq.new_zeros(steps).index_add_(0, k[valid], sq[valid])
    den = sq.new_zeros(steps).index_add_(0, k[valid], ref_sq.expand(steps, batch)[valid])
    chosen = refs[used]
    final = None if chosen.numel() == 0 else int(
        chosen.max() if direction is Direction.FORWARD else chosen.min())
    return Pool(num, den, int(used.sum()), int((has & ~used).sum()), final)


def by_distance(p: Pool) -> tuple[float | None, ...]:
    """r(k) for k = 0..T-1; None where no reference reaches k; NaN where a sum is not finite."""
    out: list[float | None] = []
    for num, den in zip(p.num.tolist(), p.den.tolist(), strict=True):
        if den == 0.0:
            out.append(None)
        elif not (math.isfinite(num) and math.isfinite(den)):
            out.append(math.nan)
        else:
            out.append(math.sqrt(num / den))
    return tuple(out)


def ratio_series(p: Pool, direction: Direction) -> tuple[tuple[float | None, ...], int]:
    """(ratio by time step t, final_step): r_t = r(|t - final|) on the side looked back on."""
    steps = p.num.shape[0]
    r = by_distance(p)
    if p.final is None:
        return (None,) * steps, steps - 1 if direction is Direction.FORWARD else 0
    if direction is Direction.FORWARD:
        return tuple(r[p.final - t] if t <= p.final else None for t in range(steps)), p.final
    return tuple(r[t - p.final] if t >= p.final else None for t in range(steps)), p.final
