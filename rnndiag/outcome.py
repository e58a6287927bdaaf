"""Exit codes: the one place that turns diagnoses into 0 / 1 / 2.

Precedence, first match wins:
2: some input or option was unusable (a file that could not be read or replayed);
1: some finding of level `error` has a rule selected by `--fail-on` (default `any`; each rule's
   level and verdict are in `rnndiag.findings.RULES`, so a new error rule fails the gate);
0: otherwise (healthy, skipped: no recurrent layer or a Git LFS pointer, or not selected).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum, StrEnum

from rnndiag.findings import Finding, Level, Rule, findings
from rnndiag.records import FileDiagnosis, FileStatus, InspectDiagnosis


class ExitCode(IntEnum):
    OK = 0
    FINDINGS = 1
    UNUSABLE = 2


class FailOn(StrEnum):
    """Which error findings make the exit code 1, by the verdict their rule stands behind."""

    ANY = "any"
    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NEVER = "never"

    def selects(self, x: Finding) -> bool:
        """Say whether finding `x` makes the exit code 1: an error this choice covers."""
        if x.level is not Level.ERROR or self is FailOn.NEVER or x.ignored:
            return False
        verdict = x.rule.info.verdict
        return self is FailOn.ANY or (verdict is not None and verdict.value == self.value)


def exit_code(files: Sequence[FileDiagnosis], fail_on: FailOn = FailOn.ANY) -> ExitCode:
    """Map `check`'s diagnoses to 2 (an unusable file), 1 (a selected finding) or 0."""
    if any(f.status is FileStatus.ERROR for f in files):
        return ExitCode.UNUSABLE
    if any(fail_on.selects(x) for f in files for x in findings(f)):
        return ExitCode.FINDINGS
    return ExitCode.OK


def inspect_exit_code(files: Sequence[InspectDiagnosis]) -> ExitCode:
    """`inspect`: 2 for an unusable file, 1 for NaN/Inf in weights (while RD007 is an error)."""
    if any(f.status is FileStatus.ERROR for f in files):
        return ExitCode.UNUSABLE
    if Rule.NONFINITE_WEIGHTS.info.level is Level.ERROR and any(
            t.fatal for f in files for t in f.nonfinite_weights):
        return ExitCode.FINDINGS
    return ExitCode.OK
