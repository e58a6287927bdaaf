"""Findings with stable rule ids, and the advice they lead to. Data only; nothing prints.

A finding is one fact worth acting on, located in a file/module/layer/direction (and a span
of steps where one applies). Rule ids are a contract: tools filter on them, so they never
change meaning; new rules get new ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from rnndiag.records import (
    CellType,
    FileDiagnosis,
    LayerDiagnosis,
    ModuleDiagnosis,
    PascanuReading,
    Span,
    SpanKind,
)


class Level(StrEnum):
    ERROR = "error"  # counts toward the exit code (vanishing/exploding verdicts)
    WARNING = "warning"  # a risk shown in the report; does not change the exit code
    NOTE = "note"


class Rule(StrEnum):
    VANISHING_SPAN = "RD001"
    EXPLODING_SPAN = "RD002"
    NONFINITE_GRADIENT = "RD003"
    PASCANU_VANISHING = "RD004"
    FORGET_BIAS_LOW = "RD005"
    SHORT_HORIZON = "RD006"
    NONFINITE_WEIGHTS = "RD007"

    @property
    def slug(self) -> str:
        return RULE_SLUGS[self]


RULE_SLUGS = {
    Rule.VANISHING_SPAN: "vanishing-span",
    Rule.EXPLODING_SPAN: "exploding-span",
    Rule.NONFINITE_GRADIENT: "nonfinite-gradient",
    Rule.PASCANU_VANISHING: "sigma-max-below-bound",
    Rule.FORGET_BIAS_LOW: "forget-bias-low",
    Rule.SHORT_HORIZON: "short-horizon",
    Rule.NONFINITE_WEIGHTS: "nonfinite-weights",
}
FORGET_BIAS_LOW = 0.5  # mean b_if + b_hf below this: the gate at rest keeps < ~62% per step


@dataclass(frozen=True)
class Finding:
    rule: Rule
    level: Level
    message: str
    path: str
    module: str  # module name; for RD007 the tensor's name
    layer: int | None
    direction: str | None
    span: Span | None = None
    value: float | None = None  # the number behind the finding (ratio, sigma, bias, steps)


@dataclass(frozen=True)
class Advice:
    """One thing to try, and the findings that triggered it."""

    action: str
    evidence: tuple[Finding, ...]


def findings(f: FileDiagnosis) -> tuple[Finding, ...]:
    weights = tuple(
        Finding(Rule.NONFINITE_WEIGHTS, Level.ERROR,
                f"weight tensor holds {t.nan} NaN and {t.inf} Inf values", f.path, t.name,
                None, None, value=t.nan + t.inf)
        for t in f.nonfinite_weights)
    return weights + tuple(x for m in f.modules for d in m.layers for x in _layer(f.path, m, d))


def _layer(path: str, m: ModuleDiagnosis, d: LayerDiagnosis) -> list[Finding]:
    def make(rule: Rule, level: Level, msg: str, value: float | None,
             span: Span | None = None) -> Finding:
        return Finding(rule, level, msg, path, m.spec.name, d.layer, d.direction.value, span,
                       value)

    out = [make(*_span_finding(s, d), span=s) for s in d.spans]
    if d.pascanu is PascanuReading.VANISHING_GUARANTEED:
        out.append(make(Rule.PASCANU_VANISHING, Level.WARNING,
                        f"sigma_max(W_hh) = {d.sigma_max_hh:.3g} < 1/gamma = 1: gradients "
                        "vanish over long spans for any input (Pascanu et al. 2013)",
                        d.sigma_max_hh))
    fb = d.forget_bias
    if fb is not None and fb.mean < FORGET_BIAS_LOW and d.verdict.value == "vanishing":
        out.append(make(Rule.FORGET_BIAS_LOW, Level.WARNING,
                        f"mean forget-gate bias {fb.mean:+.2f} (gate at rest "
                        f"{fb.mean_gate_at_rest:.2f}) while the gradient vanishes", fb.mean))
    if d.horizon is not None:
        out.append(make(Rule.SHORT_HORIZON, Level.NOTE,
                        f"gradient below the vanishing threshold {d.horizon} steps back "
                        f"(of {m.seq_len}): earlier inputs cannot be learned from", d.horizon))
    return out


def _span_finding(s: Span, d: LayerDiagnosis) -> tuple[Rule, Level, str, float | None]:
    steps = f"t={s.start}..{s.end}"
    if s.kind is SpanKind.VANISHING:
        return (Rule.VANISHING_SPAN, Level.ERROR,
                f"{steps}: gradient vanishes, r down to {_g(s.extreme_ratio)}", s.extreme_ratio)
    nonfinite = [t for t in range(s.start, s.end + 1) if not math.isfinite(d.state_grad_norm[t])]
    if nonfinite:
        return (Rule.NONFINITE_GRADIENT, Level.ERROR,
                f"{steps}: gradient overflows, non-finite at {len(nonfinite)} steps", None)
    return (Rule.EXPLODING_SPAN, Level.ERROR,
            f"{steps}: gradient explodes, r up to {_g(s.extreme_ratio)}", s.extreme_ratio)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def advice(files: Sequence[FileDiagnosis]) -> tuple[Advice, ...]:
    """What to try, from the findings of all files, in a fixed order; each with its evidence."""
    found = [x for f in files for x in findings(f)]
    by_rule = {r: [x for x in found if x.rule is r] for r in Rule}
    cells = {(f.path, m.spec.name): m.spec.cell_type for f in files for m in f.modules}
    plain_vanishing = [x for x in by_rule[Rule.VANISHING_SPAN]
                       if cells[(x.path, x.module)] is CellType.RNN]
    out: list[Advice] = []
    exploding = by_rule[Rule.EXPLODING_SPAN] + by_rule[Rule.NONFINITE_GRADIENT]
    if by_rule[Rule.NONFINITE_WEIGHTS]:
        out.append(Advice("The checkpoint holds NaN/Inf weights: training diverged before it "
                          "was saved. Resume from an earlier checkpoint with a lower learning "
                          "rate and gradient clipping.", tuple(by_rule[Rule.NONFINITE_WEIGHTS])))
    if exploding:
        out.append(Advice("Clip the gradient norm (torch.nn.utils.clip_grad_norm_) and check "
                          "the learning rate; exploding gradients through time make steps "
                          "unstable.", tuple(exploding)))
    if by_rule[Rule.NONFINITE_GRADIENT]:
        out.append(Advice("Rerun with --dtype float64 to measure gradients beyond float32's "
                          "range (about 3e38) where they overflowed.",
                          tuple(by_rule[Rule.NONFINITE_GRADIENT])))
    if plain_vanishing:
        out.append(Advice("Use a gated cell (nn.LSTM or nn.GRU) or an orthogonal/identity "
                          "initialisation of W_hh: a plain RNN loses its gradient within a "
                          "few steps here.", tuple(plain_vanishing)))
    if by_rule[Rule.PASCANU_VANISHING]:
        out.append(Advice("Raise sigma_max(W_hh) to about 1 (orthogonal init, or IRNN-style "
                          "identity init for ReLU): below 1 the gradient must vanish.",
                          tuple(by_rule[Rule.PASCANU_VANISHING])))
    if by_rule[Rule.FORGET_BIAS_LOW]:
        out.append(Advice("Initialise the LSTM forget-gate bias to 1 or more (Jozefowicz et "
                          "al. 2015) so the cell state is kept by default.",
                          tuple(by_rule[Rule.FORGET_BIAS_LOW])))
    if by_rule[Rule.SHORT_HORIZON]:
        shortest = min(by_rule[Rule.SHORT_HORIZON], key=lambda x: x.value or 0.0)
        out.append(Advice(f"Truncated BPTT longer than about {shortest.value:.0f} steps "
                          "adds cost without signal for this model as it is; to learn longer "
                          "dependencies, change the cell or initialisation first.",
                          (shortest,)))
    return tuple(out)

