"""An independent, loop-by-loop oracle of rnndiag's ratio definition (README, "What is measured").

Inputs come from plain autograd on a hand-unrolled model: for each backward pass ("row"), the
gradient reaching every state, grads[t] of shape (B, H) (an LSTM's cell-state gradient is
passed as a second list and added), and each example's reference step (-1: none). Nothing here
imports rnndiag.

    r(k)^2 = sum over rows and examples b reaching k of ||g[ref_b -+ k][b]||^2
             / sum of ||g[ref_b][b]||^2          (references with a zero gradient skipped)

ratio[t] = r(|t - final|) on the side looked back on (t <= final forward, t >= final
reverse), final being the latest (forward) / earliest (reverse) reference used; None elsewhere
and where no reference reaches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Row = tuple[Sequence[int], Sequence[Tensor], Sequence[Tensor] | None]  # refs, dh[t], dc[t]


def _sq(dh: Sequence[Tensor], dc: Sequence[Tensor] | None, t: int, b: int) -> float:
    total = float(dh[t][b].double().pow(2).sum())
    if dc is not None:
        total += float(dc[t][b].double().pow(2).sum())
    return total


def ratio(rows: Sequence[Row], forward: bool, steps: int,
          alive: Sequence[Sequence[bool]] | None = None,
          ) -> tuple[list[float | None], int, int, int]:
    """(ratio by t, final_step, references used, references skipped)."""
    num, den = [0.0] * steps, [0.0] * steps
    used, skipped, finals = 0, 0, []
    for refs, dh, dc in rows:
        for b, s in enumerate(refs):
            if s < 0:
                continue
            ref = _sq(dh, dc, s, b)
            if ref == 0.0:
                skipped += 1
                continue
            used += 1
            finals.append(s)
            for t in range(steps):
                k = s - t if forward else t - s
                if k < 0 or (alive is not None and not alive[t][b]):
                    continue
                num[k] += _sq(dh, dc, t, b)
                den[k] += ref
    if not finals:
        return [None] * steps, steps - 1 if forward else 0, used, skipped
    final = max(finals) if forward else min(finals)
    r = [None if d == 0.0 else math.sqrt(n / d) for n, d in zip(num, den, strict=True)]
    out: list[float | None] = []
    for t in range(steps):
        k = final - t if forward else t - final
        out.append(r[k] if k >= 0 else None)
    return out, final, used, skipped


def positions(steps: int, count: int = 16) -> list[int]:
    """The sampled positions: up to 16 spread evenly over 0..steps-1, both ends included."""
    n = min(count, steps)
    if n == 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (n - 1)) for i in range(n)})


def norms(dh: Sequence[Tensor], dc: Sequence[Tensor] | None = None) -> list[float]:
    """||.||_2 over the batch at each t (state incl. cell)."""
    return [math.sqrt(sum(_sq(dh, dc, t, b) for b in range(dh[t].shape[0])))
            for t in range(len(dh))]


def zeros_for_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like, strict=True)]


PER_POSITION = 2  # references per sampled position the credit passes aim for


def assignments(hit: Sequence[Sequence[bool]], sampled: Sequence[int]) -> list[list[int]]:
    """The credit passes (README, "What is measured"): hit[b][t] says example b scores
    position t. ceil(n * 2 / B) passes (n sampled positions, B examples), at most n; in each,
    example after example takes, of the sampled positions it scores and has not had, the one
    with the fewest references so far (the earliest on a tie). An example that scores none
    of the sampled positions is referenced once, at its last scored position. Per pass, each
    example's reference position (-1: none)."""
    batch, n = len(hit), len(sampled)
    count = dict.fromkeys(sampled, 0)
    had: list[list[int]] = [[] for _ in range(batch)]
    out = []
    for j in range(min(n, math.ceil(n * PER_POSITION / batch))):
        refs = []
        for b in range(batch):
            options = [s for s in sampled if hit[b][s] and s not in had[b]]
            if options:
                best = options[0]
                for s in options[1:]:
                    if count[s] < count[best]:
                        best = s
                count[best] += 1
                had[b].append(best)
                refs.append(best)
            elif j == 0 and not any(hit[b][s] for s in sampled) and any(hit[b]):
                refs.append(max(t for t, x in enumerate(hit[b]) if x))
            else:
                refs.append(-1)
        out.append(refs)
    return out


def position_norms(rows: Sequence[Row], s: int) -> list[float]:
    """||dL_s/ds_t|| over the examples referenced at s (in whichever row), at each t."""
    steps = len(rows[0][1])
    return [math.sqrt(sum(_sq(dh, dc, t, b) for refs, dh, dc in rows
                          for b, x in enumerate(refs) if x == s)) for t in range(steps)]
