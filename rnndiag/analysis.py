"""Ratio series -> spans, growth per step, horizon, verdict (pure Python).

`r` is a layer's `ratio` series by time step t = 0..T-1 (rnndiag.credit computes it):
r_t is the gradient reaching a state k = |t - final| steps back from a reference, relative to
the gradient at the reference itself; None where no reference reaches t.

- vanishing span: maximal run of steps with r_t < vanish; exploding span: maximal run of steps
  with r_t > explode or r_t not finite (NaN: a non-finite gradient). None ends a span.
- verdict: exploding if any exploding span, else vanishing if any vanishing span, else healthy.
  With a context N (`--context`), spans use only the steps k <= N: vanishing means the
  gradient cannot reach N steps back; exploding, that it grows beyond the threshold within N.
- growth_per_step = exp(slope) of the least-squares line ln r_t = a + slope * k over the steps
  k >= 1 with finite, non-zero r_t (at least two); < 1 shrinks going back in time.
- horizon: the smallest k >= 1 with r_t < vanish; None when no step is below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rnndiag.records import Span, SpanKind, Thresholds, Verdict

Ratios = Sequence[float | None]


def _kind(r: float | None, th: Thresholds) -> SpanKind | None:
    if r is None:
        return None
    if not math.isfinite(r) or r > th.explode:
        return SpanKind.EXPLODING
    if r < th.vanish:
        return SpanKind.VANISHING
    return None


def within(r: Ratios, final: int, context: int | None) -> Ratios:
    """`r` with the steps more than `context` steps from `final` left out (None)."""
    if context is None:
        return r
    return [x if abs(t - final) <= context else None for t, x in enumerate(r)]


def spans(r: Ratios, th: Thresholds) -> tuple[Span, ...]:
    """Maximal runs of consecutive steps of one kind, in time order."""
    found: list[Span] = []
    start = 0
    for t in range(1, len(r) + 1):
        kind = _kind(r[start], th)
        if t < len(r) and _kind(r[t], th) is kind:
            continue
        if kind is not None:
            found.append(Span(kind, start, t - 1, _extreme(r[start:t], kind)))
        start = t
    return tuple(found)


def _extreme(r: Ratios, kind: SpanKind) -> float | None:
    if kind is SpanKind.VANISHING:
        return min(x for x in r if x is not None)
    finite = [x for x in r if x is not None and math.isfinite(x)]
    return max(finite) if finite else None


def verdict(found: Sequence[Span]) -> Verdict:
    kinds = {s.kind for s in found}
    if SpanKind.EXPLODING in kinds:
        return Verdict.EXPLODING
    if SpanKind.VANISHING in kinds:
        return Verdict.VANISHING
    return Verdict.HEALTHY


def growth_per_step(r: Ratios, final: int) -> float | None:
    points = [
        (abs(t - final), math.log(x))
        for t, x in enumerate(r)
        if t != final and x is not None and math.isfinite(x) and x > 0.0
    ]
    if len(points) < 2:
        return None
    mean_k = sum(k for k, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((k - mean_k) ** 2 for k, _ in points)
    sxy = sum((k - mean_k) * (y - mean_y) for k, y in points)
    try:
        return math.exp(sxy / sxx)
    except OverflowError:
        return math.inf


def horizon(r: Ratios, final: int, th: Thresholds) -> int | None:
    steps_back = sorted(range(len(r)), key=lambda t: abs(t - final))
    for t in steps_back[1:]:
        x = r[t]
        if x is not None and x < th.vanish:
            return abs(t - final)
    return None
