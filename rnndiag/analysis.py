"""Per-step gradient series -> spans, growth per step, horizon, verdict.

Definitions (all series indexed by time step t = 0..T-1; `final` is the last step the
direction produced: T-1 forward, 0 reverse; k = |t - final| counts steps back from it):

- s_t = state_grad_norm[t]; r_t = s_t / s_final. When s_final is 0, r_t is 0 where s_t is 0
  and +inf elsewhere; when s_final is not finite, every r_t is NaN.
- vanishing span: maximal run of steps with r_t < vanish; exploding span: maximal run of steps
  with r_t > explode or r_t not finite.
- verdict: exploding if any exploding span, else vanishing if any vanishing span, else healthy.
- growth_per_step = exp(slope) of the least-squares line ln s_t = a + slope * k over the steps
  k >= 1 with finite, non-zero s_t (at least two); < 1 shrinks going back in time.
- horizon: the smallest k >= 1 with r_t < vanish; None when no step is below it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rnndiag.records import Span, SpanKind, Thresholds, Verdict


def ratios(state_norms: Sequence[float], final: int) -> tuple[float, ...]:
    ref = state_norms[final]
    if not math.isfinite(ref):
        return tuple(math.nan for _ in state_norms)
    if ref == 0.0:
        return tuple(0.0 if s == 0.0 else math.inf for s in state_norms)
    return tuple(s / ref for s in state_norms)


def _kind(r: float, th: Thresholds) -> SpanKind | None:
    if not math.isfinite(r) or r > th.explode:
        return SpanKind.EXPLODING
    if r < th.vanish:
        return SpanKind.VANISHING
    return None


def spans(r: Sequence[float], th: Thresholds) -> tuple[Span, ...]:
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


def _extreme(r: Sequence[float], kind: SpanKind) -> float | None:
    if kind is SpanKind.VANISHING:
        return min(r)
    finite = [x for x in r if math.isfinite(x)]
    return max(finite) if finite else None


def verdict(found: Sequence[Span]) -> Verdict:
    kinds = {s.kind for s in found}
    if SpanKind.EXPLODING in kinds:
        return Verdict.EXPLODING
    if SpanKind.VANISHING in kinds:
        return Verdict.VANISHING
    return Verdict.HEALTHY


def growth_per_step(state_norms: Sequence[float], final: int) -> float | None:
    points = [
        (abs(t - final), math.log(s))
        for t, s in enumerate(state_norms)
        if t != final and math.isfinite(s) and s > 0.0
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


def horizon(r: Sequence[float], final: int, th: Thresholds) -> int | None:
    steps_back = sorted(range(len(r)), key=lambda t: abs(t - final))
    for t in steps_back[1:]:
        if r[t] < th.vanish:
            return abs(t - final)
    return None
