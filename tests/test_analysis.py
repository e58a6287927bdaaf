"""Definitions of the per-step analysis, case by case (see rnndiag/analysis.py)."""

from __future__ import annotations

import math

import pytest

from rnndiag import analysis
from rnndiag.records import Span, SpanKind, Thresholds, Verdict

TH = Thresholds()
V, E = SpanKind.VANISHING, SpanKind.EXPLODING


def test_none_breaks_spans_and_is_ignored() -> None:
    th = Thresholds()
    r = [1e-5, None, 1e-5, 1.0, None]
    assert analysis.spans(r, th) == (Span(SpanKind.VANISHING, 0, 0, 1e-5),
                                     Span(SpanKind.VANISHING, 2, 2, 1e-5))
    assert analysis.horizon(r, final=3, th=th) == 1
    assert analysis.growth_per_step([None, 0.25, 0.5, 1.0, None], final=3) == 0.5


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        ([1.0, 1.0, 1.0], ()),
        ([1e-4, 1e-5, 0.5, 1.0], (Span(V, 0, 1, 1e-5),)),
        ([2e3, 1.0, 1e-4, 1.0], (Span(E, 0, 0, 2e3), Span(V, 2, 2, 1e-4))),
        ([math.nan, math.inf, 5e3, 1.0], (Span(E, 0, 2, 5e3),)),
        ([math.inf, 1.0], (Span(E, 0, 0, None),)),
        ([1e-3, 1e3], ()),  # thresholds are strict
        ([1.0, 1e-9], (Span(V, 1, 1, 1e-9),)),
    ],
    ids=["flat", "vanish-run", "both-kinds", "nonfinite-joins-run", "only-nonfinite",
         "at-threshold", "last-step"],
)
def test_spans(r: list[float], expected: tuple[Span, ...]) -> None:
    assert analysis.spans(r, TH) == expected


def test_custom_thresholds() -> None:
    assert analysis.spans([0.05, 1.0], Thresholds(vanish=0.1, explode=10)) == (
        Span(V, 0, 0, 0.05),)


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [((), Verdict.HEALTHY), ((V,), Verdict.VANISHING), ((V, E), Verdict.EXPLODING)],
    ids=["none", "vanishing", "exploding-wins"],
)
def test_verdict(kinds: tuple[SpanKind, ...], expected: Verdict) -> None:
    assert analysis.verdict([Span(k, 0, 0, 1.0) for k in kinds]) is expected


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.0, 1.3])
def test_growth_is_exact_on_geometric_series(rho: float) -> None:
    forward = [rho ** (9 - t) for t in range(10)]  # final step t = 9
    assert analysis.growth_per_step(forward, final=9) == pytest.approx(rho, rel=1e-12)
    reverse = list(reversed(forward))  # final step t = 0
    assert analysis.growth_per_step(reverse, final=0) == pytest.approx(rho, rel=1e-12)


def test_growth_ignores_final_zero_and_nonfinite_steps() -> None:
    s = [0.0, math.inf, 0.25, 0.5, 1.0, 123.0]  # final step t = 5 is excluded from the fit
    assert analysis.growth_per_step(s, final=5) == pytest.approx(0.5)
    assert analysis.growth_per_step([1.0, 1.0], final=1) is None  # one point: no line


def test_horizon_counts_steps_back_from_final() -> None:
    r = [1e-6, 1e-4, 0.5, 1.0]
    assert analysis.horizon(r, final=3, th=TH) == 2
    assert analysis.horizon(list(reversed(r)), final=0, th=TH) == 2
    assert analysis.horizon([1.0, 1.0], final=1, th=TH) is None


def test_sigma_max_equals_the_svd() -> None:
    import numpy as np

    from rnndiag.static import sigma_max

    rng = np.random.default_rng(0)
    for shape in [(12, 3), (3, 12), (64, 16), (5, 5)]:
        w = rng.standard_normal(shape)
        assert sigma_max(w) == pytest.approx(float(np.linalg.svd(w, compute_uv=False)[0]),
                                             rel=1e-10)
    assert sigma_max(np.zeros((4, 2))) == 0.0


def test_context_leaves_far_steps_out() -> None:
    th = Thresholds(context=2)
    r = [1e-6, 1e-4, 0.5, 0.9, 1.0]  # vanishing 3 and 4 steps back, not within 2
    kept = analysis.within(r, final=4, context=th.context)
    assert kept == [None, None, 0.5, 0.9, 1.0]
    assert analysis.spans(kept, th) == ()
    assert analysis.spans(analysis.within(r, 4, 3), th)[0].start == 1
