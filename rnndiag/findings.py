"""Findings with stable rule ids, and the advice they lead to. Data only; nothing prints.

A finding is one fact worth acting on, located in a file/module/layer/direction (and a span
of steps where one applies). Rule ids are a contract: tools filter on them, so they never
change meaning; new rules get new ids.

`RULES` is the one table of rules: each finding's level, the JSON `name`, SARIF's rule list,
the advice texts and the exit code (`rnndiag.outcome`) come from it, and tests/test_rules.py
checks that the JSON Schema and the README's table say the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from rnndiag.cells import unit
from rnndiag.records import (
    FileDiagnosis,
    Ignore,
    LayerDiagnosis,
    ModuleDiagnosis,
    PascanuReading,
    RatioBasis,
    Span,
    SpanKind,
    Verdict,
)


class Level(StrEnum):
    ERROR = "error"  # counts toward exit code 1 when `--fail-on` selects the rule's verdict
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
    NONFINITE_OTHER = "RD008"
    FIRST_STEP_ONLY = "RD009"

    @property
    def info(self) -> RuleInfo:
        return RULES[self]

    @property
    def slug(self) -> str:
        return RULES[self].name


class Pick(StrEnum):
    """Which findings of its rules an advice names as evidence."""

    ALL = "all"
    PLAIN_RNN = "plain_rnn"  # only findings in plain (ungated) RNN modules
    SHORTEST = "shortest"  # the one finding with the smallest value


@dataclass(frozen=True)
class AdviceInfo:
    """What a rule's findings suggest trying; `{value}` in `action` is the first evidence's."""

    rank: int  # advice is listed by rank, the most urgent first
    action: str
    also: tuple[Rule, ...] = ()  # other rules whose findings are evidence for it too
    pick: Pick = Pick.ALL


@dataclass(frozen=True)
class RuleInfo:
    """One row of the rule table: what every output says about a rule."""

    rule: Rule
    name: str  # the slug: JSON `name`, SARIF `name`
    level: Level
    verdict: Verdict | None  # the verdict it stands behind: `--fail-on` selects by it
    help: str  # SARIF shortDescription
    when: str  # README: when a finding is made
    value: str  # README and schema: what `Finding.value` holds
    advice: AdviceInfo | None = None

    @property
    def id(self) -> str:
        return self.rule.value


RULES: dict[Rule, RuleInfo] = {i.rule: i for i in (
    RuleInfo(
        Rule.VANISHING_SPAN, "vanishing-span", Level.ERROR, Verdict.VANISHING,
        help="The gradient reaching these steps is below the vanishing threshold.",
        when="a vanishing span", value="smallest r_t in the span",
        advice=AdviceInfo(5, "Use a gated cell (nn.LSTM or nn.GRU) or an orthogonal/identity "
                             "initialisation of W_hh: a plain RNN loses its gradient within a "
                             "few steps here.", pick=Pick.PLAIN_RNN)),
    RuleInfo(
        Rule.EXPLODING_SPAN, "exploding-span", Level.ERROR, Verdict.EXPLODING,
        help="The gradient reaching these steps is above the exploding threshold.",
        when="an exploding span with finite gradients", value="largest finite r_t in the span",
        advice=AdviceInfo(3, "Clip the gradient norm (torch.nn.utils.clip_grad_norm_) and check "
                             "the learning rate; exploding gradients through time make steps "
                             "unstable.", also=(Rule.NONFINITE_GRADIENT,))),
    RuleInfo(
        Rule.NONFINITE_GRADIENT, "nonfinite-gradient", Level.ERROR, Verdict.EXPLODING,
        help="The gradient becomes NaN/Inf during backpropagation through time.",
        when="an exploding span where the gradient is NaN/Inf", value="null",
        advice=AdviceInfo(4, "Rerun with --dtype float64 to measure gradients beyond float32's "
                             "range (about 3e38) where they overflowed.")),
    RuleInfo(
        Rule.PASCANU_VANISHING, "sigma-max-below-bound", Level.WARNING, Verdict.VANISHING,
        help="sigma_max(W_hh) < 1/gamma: gradients must vanish over long spans.",
        when="plain RNN with sigma_max(W_hh) < 1/γ", value="sigma_max(W_hh)",
        advice=AdviceInfo(6, "Raise sigma_max(W_hh) to about 1 (orthogonal init, or IRNN-style "
                             "identity init for ReLU): below 1 the gradient must vanish.")),
    RuleInfo(
        Rule.FORGET_BIAS_LOW, "forget-bias-low", Level.WARNING, Verdict.VANISHING,
        help="A low LSTM forget-gate bias with a vanishing gradient.",
        when="vanishing LSTM layer with mean forget bias < 0.5", value="mean forget bias",
        advice=AdviceInfo(7, "Initialise the LSTM forget-gate bias to 1 or more (Jozefowicz et "
                             "al. 2015) so the cell state is kept by default.")),
    RuleInfo(
        Rule.SHORT_HORIZON, "short-horizon", Level.NOTE, Verdict.VANISHING,
        help="Steps back until the gradient drops below the vanishing threshold.",
        when="r_t drops below the vanishing threshold", value="horizon (steps)",
        advice=AdviceInfo(8, "Truncated BPTT longer than about {value:.0f} steps adds cost "
                             "without signal for this model as it is; to learn longer "
                             "dependencies, change the cell or initialisation first.",
                          pick=Pick.SHORTEST)),
    RuleInfo(
        Rule.NONFINITE_WEIGHTS, "nonfinite-weights", Level.ERROR, Verdict.EXPLODING,
        help="A recurrent weight tensor holds NaN or Inf values.",
        when="a recurrent module's weight holds NaN/Inf (any tensor with `--strict-nonfinite`; "
             "`module` is the tensor name)",
        value="NaN + Inf count",
        advice=AdviceInfo(1, "The checkpoint holds NaN/Inf weights: training diverged before "
                             "it was saved. Resume from an earlier checkpoint with a lower "
                             "learning rate and gradient clipping.")),
    RuleInfo(
        Rule.NONFINITE_OTHER, "nonfinite-other-tensor", Level.WARNING, None,
        help="A tensor outside the recurrent modules holds NaN or Inf values.",
        when="another tensor holds NaN/Inf, e.g. a -inf mask table (`module` is the tensor name)",
        value="NaN + Inf count"),
    RuleInfo(
        Rule.FIRST_STEP_ONLY, "first-step-only", Level.WARNING, None,
        help="The loss reaches this direction only at its first step: its recurrence carries "
             "nothing to the loss.",
        when="the loss's gradient reaches a direction of more than one step only at each "
             "example's first processed step (`out[:, -1]` of a reverse direction; basis loss)",
        value="that step (the earliest, with variable lengths)",
        advice=AdviceInfo(2, "Read each direction where it has seen the whole sequence: for a "
                             "bidirectional RNN, the reverse half of out[:, 0] or h_n, not "
                             "out[:, -1], where the reverse direction has seen one input.")),
)}
FORGET_BIAS_LOW = 0.5  # mean b_if + b_hf below this: the gate at rest keeps < ~62% per step


@dataclass(frozen=True)
class Finding:
    """One fact worth acting on; its level is its rule's, from `RULES`."""

    rule: Rule
    message: str
    path: str
    module: str  # module name; for RD007 the tensor's name
    layer: int | None
    direction: str | None
    span: Span | None = None
    value: float | None = None  # the number behind the finding (ratio, sigma, bias, steps)
    ignored: bool = False  # accepted by the configuration (`ignore`): never changes the exit

    @property
    def level(self) -> Level:
        return RULES[self.rule].level


@dataclass(frozen=True)
class Advice:
    """One thing to try, and the findings that triggered it."""

    action: str
    evidence: tuple[Finding, ...]


def findings(f: FileDiagnosis) -> tuple[Finding, ...]:
    """List the findings of one file: NaN/Inf weights first, then layer by layer; those the
    file's `ignores` accept are marked ignored."""
    found = _findings(f)
    if not f.ignores:
        return found
    return tuple(replace(x, ignored=True) if any(_accepts(i, x) for i in f.ignores) else x
                 for x in found)


def _accepts(i: Ignore, x: Finding) -> bool:
    return i.rule == x.rule.value and i.module in (None, x.module) \
        and i.layer in (None, x.layer) and i.direction in (None, x.direction)


def _findings(f: FileDiagnosis) -> tuple[Finding, ...]:
    weights = tuple(
        Finding(Rule.NONFINITE_WEIGHTS if t.fatal else Rule.NONFINITE_OTHER,
                f"{'recurrent weight' if t.recurrent else 'tensor'} holds {t.nan} NaN and "
                f"{t.inf} Inf values", f.path, t.name, None, None, value=t.nan + t.inf)
        for t in f.nonfinite_weights)
    return weights + tuple(x for m in f.modules for d in m.layers for x in _layer(f.path, m, d))


def _layer(path: str, m: ModuleDiagnosis, d: LayerDiagnosis) -> list[Finding]:
    def make(rule: Rule, msg: str, value: float | None, span: Span | None = None) -> Finding:
        return Finding(rule, msg, path, m.spec.name, d.layer, d.direction.value, span, value)

    out = [make(*_span_finding(s, d), span=s) for s in d.spans]
    if d.pascanu is PascanuReading.VANISHING_GUARANTEED:
        out.append(make(Rule.PASCANU_VANISHING,
                        f"sigma_max(W_hh) = {d.sigma_max_hh:.3g} < 1/gamma = 1: gradients "
                        "vanish over long spans for any input (Pascanu et al. 2013)",
                        d.sigma_max_hh))
    fb = d.forget_bias
    if fb is not None and fb.mean < FORGET_BIAS_LOW and d.verdict.value == "vanishing":
        out.append(make(Rule.FORGET_BIAS_LOW,
                        f"mean forget-gate bias {fb.mean:+.2f} (gate at rest "
                        f"{fb.mean_gate_at_rest:.2f}) while the gradient vanishes", fb.mean))
    # basis loss only: its references are each example's last step (reverse: first) that the
    # loss's gradient reaches, so a ratio at the reference alone means no other step of the
    # direction gets any; temporal credit arriving from behind a reference is not measured
    reached = [t for t, r in enumerate(d.ratio) if r is not None]
    if d.basis is RatioBasis.LOSS and m.seq_len > 1 and d.references \
            and reached == [d.final_step]:
        out.append(make(Rule.FIRST_STEP_ONLY,
                        "the loss reaches this direction only at the first step it processes "
                        f"(t={d.final_step}): its recurrence carries nothing to the loss",
                        d.final_step))
    if d.horizon is not None:
        out.append(make(Rule.SHORT_HORIZON,
                        f"gradient below the vanishing threshold {d.horizon} steps back "
                        f"(of {m.seq_len}): earlier inputs cannot be learned from", d.horizon))
    return out


def _span_finding(s: Span, d: LayerDiagnosis) -> tuple[Rule, str, float | None]:
    steps = f"t={s.start}..{s.end}"
    if s.kind is SpanKind.VANISHING:
        return (Rule.VANISHING_SPAN,
                f"{steps}: gradient vanishes, r down to {_g(s.extreme_ratio)}", s.extreme_ratio)
    nonfinite = [t for t in range(s.start, s.end + 1) if not math.isfinite(d.state_grad_norm[t])]
    if nonfinite:
        return (Rule.NONFINITE_GRADIENT,
                f"{steps}: gradient overflows, non-finite at {len(nonfinite)} steps", None)
    return (Rule.EXPLODING_SPAN,
            f"{steps}: gradient explodes, r up to {_g(s.extreme_ratio)}", s.extreme_ratio)


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def advice(files: Sequence[FileDiagnosis]) -> tuple[Advice, ...]:
    """List what to try, from the findings of all files, by rank; each with its evidence."""
    found = [x for f in files for x in findings(f) if not x.ignored]
    plain = {(f.path, m.spec.name) for f in files for m in f.modules
             if not unit(m.spec.cell_type).gated}
    out: list[Advice] = []
    for rule, a in _advised():
        evidence = _evidence(a.pick, [x for r in (rule, *a.also) for x in found if x.rule is r],
                             plain)
        if evidence:
            out.append(Advice(a.action.format(value=evidence[0].value), evidence))
    return tuple(out)


def _advised() -> list[tuple[Rule, AdviceInfo]]:
    """Pair each rule that leads to advice with its advice, by rank."""
    pairs = [(r, i.advice) for r, i in RULES.items() if i.advice is not None]
    return sorted(pairs, key=lambda p: p[1].rank)


def _evidence(pick: Pick, found: list[Finding],
              plain: set[tuple[str, str]]) -> tuple[Finding, ...]:
    """Pick an advice's evidence from the findings of its rules, as its `pick` says."""
    if pick is Pick.PLAIN_RNN:
        return tuple(x for x in found if (x.path, x.module) in plain)
    if pick is Pick.SHORTEST and found:
        return (min(found, key=lambda x: x.value or 0.0),)
    return tuple(found)
