"""The rule table (rnndiag.findings.RULES) is the one source of truth for rules.

Every other place that names rules (the JSON Schema, SARIF's rule list, the README's table)
must say what the table says, and nothing more; the exit code follows the table's levels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import replace
from importlib.resources import files

import pytest

from rnndiag import sarif
from rnndiag.findings import RULES, Level, Rule, advice, findings
from rnndiag.outcome import ExitCode, FailOn, exit_code, inspect_exit_code
from rnndiag.records import (
    Direction,
    FileDiagnosis,
    FileStatus,
    ForgetBias,
    InspectDiagnosis,
    LayerDiagnosis,
    ModuleDiagnosis,
    ModuleKind,
    ModuleSpec,
    NonFiniteTensor,
    PascanuReading,
    Span,
    SpanKind,
    Verdict,
)
from tests.conftest import ROOT

SCHEMA = json.loads(files("rnndiag").joinpath("report.schema.json").read_text("utf-8"))
FINDING = SCHEMA["$defs"]["finding"]["properties"]
README_HEADER = "| rule | name | level | when | `value` |"


def _readme_rules() -> list[tuple[str, ...]]:
    """Parse the README's rules table into (id, name, level, when, value) rows."""
    lines = (ROOT / "README.md").read_text("utf-8").splitlines()
    start = lines.index(README_HEADER) + 2  # skip the header and the |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(tuple(cell.strip() for cell in line.strip().strip("|").split("|")))
    return rows


def _markdown(rows: Sequence[Sequence[str]]) -> str:
    """Render rows as markdown table lines (what to paste when a comparison fails)."""
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def test_table_has_one_row_per_rule() -> None:
    assert list(RULES) == list(Rule)
    assert all(info.rule is rule and info.id == rule.value for rule, info in RULES.items())
    assert len({info.name for info in RULES.values()}) == len(RULES)
    ranks = [info.advice.rank for info in RULES.values() if info.advice is not None]
    assert len(set(ranks)) == len(ranks), "two advice texts share a rank"


def test_rule_slug_is_the_table_name() -> None:
    assert [r.slug for r in Rule] == [info.name for info in RULES.values()]


def test_schema_rule_enum_and_description() -> None:
    rule = SCHEMA["$defs"]["rule"]
    assert rule["enum"] == [info.id for info in RULES.values()]
    assert rule["description"] == ", ".join(f"{i.id} {i.name}" for i in RULES.values()) + "."


def test_schema_name_enum() -> None:
    assert FINDING["name"]["enum"] == [info.name for info in RULES.values()]


def test_schema_value_description() -> None:
    expected = "; ".join(f"{i.id} {i.value}" for i in RULES.values())
    assert FINDING["value"]["description"] == f"The number behind the finding: {expected}."


def test_schema_level_description_names_the_rules_each_fail_on_selects() -> None:
    errors = [i for i in RULES.values() if i.level is Level.ERROR]
    by = {v: ", ".join(i.id for i in errors if i.verdict is v) for v in Verdict}
    expected = ("error findings make the exit code 1 when --fail-on selects their rule (any: "
                f"all; vanishing: {by[Verdict.VANISHING]}; exploding: {by[Verdict.EXPLODING]}).")
    assert FINDING["level"]["description"] == expected
    assert FINDING["level"]["enum"] == [level.value for level in Level]


def test_sarif_rules_are_the_table() -> None:
    driver = sarif.document([])["runs"][0]["tool"]["driver"]
    assert driver["rules"] == [
        {"id": i.id, "name": i.name, "shortDescription": {"text": i.help}}
        for i in RULES.values()]


def test_readme_table_is_the_table() -> None:
    expected = [(i.id, i.name, i.level.value, i.when, i.value) for i in RULES.values()]
    found = _readme_rules()
    assert found == expected, f"README.md's rules table should read:\n{_markdown(expected)}"


def test_readme_has_no_rule_row_outside_the_table() -> None:
    text = (ROOT / "README.md").read_text("utf-8")
    rows = re.findall(r"^\| *RD\d+ *\|", text, flags=re.MULTILINE)
    assert len(rows) == len(RULES)


# Hand-built diagnoses: one file, one RNN module, one layer per case.

VANISH = Span(SpanKind.VANISHING, 0, 3, 1e-5)
EXPLODE = Span(SpanKind.EXPLODING, 6, 9, 1e5)


def _layer(spans: tuple[Span, ...] = (), *, nonfinite: bool = False, horizon: int | None = None,
           pascanu: PascanuReading = PascanuReading.BOUNDARY,
           forget_bias: ForgetBias | None = None, verdict: Verdict | None = None,
           first_only: bool = False) -> LayerDiagnosis:
    """Build one layer of 10 steps; the verdict follows the spans unless given. `first_only`:
    a reverse direction the loss reaches only at t = 9, the first step it processes."""
    norm = (float("inf") if nonfinite else 1.0,) * 10
    worst = Verdict.worst([Verdict(s.kind.value) for s in spans])
    ratio: tuple[float | None, ...] = (None,) * 9 + (1.0,) if first_only else norm
    return LayerDiagnosis(
        layer=0, direction=Direction.REVERSE if first_only else Direction.FORWARD,
        grad_norm=norm, cell_grad_norm=None, state_grad_norm=norm, ratio=ratio, final_step=9,
        growth_per_step=None, horizon=horizon, sigma_max_hh=0.5, pascanu=pascanu,
        forget_bias=forget_bias, spans=spans, verdict=verdict or worst, references=4)


def _file(*layers: LayerDiagnosis, kind: ModuleKind = ModuleKind.RNN, weights: int = 0,
          path: str = "x.pt", others: int = 0) -> FileDiagnosis:
    """Wrap layers (one module each) in an analysed file, with `weights` NaN recurrent weight
    tensors and `others` NaN tensors elsewhere."""
    spec = ModuleSpec("rnn", kind, 2, 4, 0, 1, False, True, "tanh")
    modules = tuple(ModuleDiagnosis(replace(spec, name=f"rnn{i}"), "synthetic", 0.0, (d,), 1, 10)
                    for i, d in enumerate(layers))
    nan = tuple(NonFiniteTensor(f"w{i}", 1, 0) for i in range(weights)) + tuple(
        NonFiniteTensor(f"mask{i}", 0, 1, recurrent=False, fatal=False) for i in range(others))
    return FileDiagnosis(path, "torch", FileStatus.OK, modules, nonfinite_weights=nan)


CASES = {
    "healthy": _file(_layer()),
    "vanishing": _file(_layer((VANISH,), horizon=4)),
    "exploding": _file(_layer((EXPLODE,))),
    "nonfinite-gradient": _file(_layer((EXPLODE,), nonfinite=True)),
    "nonfinite-weights": _file(_layer(), weights=1),
    "nonfinite-elsewhere": _file(_layer(), others=1),
    # A layer with both spans has the verdict exploding; its vanishing span still counts.
    "both-spans": _file(_layer((VANISH, EXPLODE))),
    "pascanu-only": _file(_layer(pascanu=PascanuReading.VANISHING_GUARANTEED)),
    "first-step-only": _file(_layer(first_only=True)),
}


@pytest.mark.parametrize(
    ("case", "any_", "vanishing", "exploding"),
    [("healthy", 0, 0, 0), ("vanishing", 1, 1, 0), ("exploding", 1, 0, 1),
     ("nonfinite-gradient", 1, 0, 1), ("nonfinite-weights", 1, 0, 1),
     ("nonfinite-elsewhere", 0, 0, 0), ("both-spans", 1, 1, 1),
     ("pascanu-only", 0, 0, 0), ("first-step-only", 0, 0, 0)])
def test_fail_on_selects_error_rules_by_verdict(case: str, any_: int, vanishing: int,
                                                exploding: int) -> None:
    f = CASES[case]
    got = [exit_code([f], fail_on) for fail_on in FailOn]
    assert got == [any_, vanishing, exploding, 0]


def test_exit_code_follows_the_table_level(monkeypatch: pytest.MonkeyPatch) -> None:
    f = CASES["vanishing"]  # RD001 (error) and RD006 (note)
    assert exit_code([f]) is ExitCode.FINDINGS
    monkeypatch.setitem(RULES, Rule.VANISHING_SPAN,
                        replace(RULES[Rule.VANISHING_SPAN], level=Level.WARNING))
    assert [x.level for x in findings(f)] == [Level.WARNING, Level.NOTE]
    assert exit_code([f]) is ExitCode.OK


def test_a_rule_raised_to_error_fails_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    f = CASES["pascanu-only"]  # RD004 only, a warning
    monkeypatch.setitem(RULES, Rule.PASCANU_VANISHING,
                        replace(RULES[Rule.PASCANU_VANISHING], level=Level.ERROR))
    assert [exit_code([f], fail_on) for fail_on in FailOn] == [1, 1, 0, 0]


def test_an_errored_file_wins() -> None:
    broken = FileDiagnosis("bad.pt", "unknown", FileStatus.ERROR, error="unreadable")
    assert exit_code([CASES["vanishing"], broken], FailOn.NEVER) is ExitCode.UNUSABLE


def test_inspect_exit_code_follows_rd007_level(monkeypatch: pytest.MonkeyPatch) -> None:
    nan = InspectDiagnosis("x.pt", "torch", FileStatus.OK,
                           nonfinite_weights=(NonFiniteTensor("w", 1, 0),))
    assert inspect_exit_code([nan]) is ExitCode.FINDINGS
    monkeypatch.setitem(RULES, Rule.NONFINITE_WEIGHTS,
                        replace(RULES[Rule.NONFINITE_WEIGHTS], level=Level.WARNING))
    assert inspect_exit_code([nan]) is ExitCode.OK


def test_every_advice_text_comes_from_the_table() -> None:
    lstm = _layer((VANISH,), horizon=2, forget_bias=ForgetBias(0.1, 0.0, 0.2, 0.52))
    everything = [
        _file(_layer((VANISH,), horizon=4, pascanu=PascanuReading.VANISHING_GUARANTEED),
              _layer((EXPLODE,)), _layer((EXPLODE,), nonfinite=True), _layer(first_only=True),
              weights=1, others=1),
        _file(lstm, kind=ModuleKind.LSTM, path="y.pt"),
    ]
    assert {x.rule for f in everything for x in findings(f)} == set(Rule)
    ranked = sorted((i.advice for i in RULES.values() if i.advice), key=lambda a: a.rank)
    assert [a.action for a in advice(everything)] == [a.action.format(value=2) for a in ranked]
