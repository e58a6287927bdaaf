"""Exit codes: the one place that turns diagnoses into 0 / 1 / 2.

Precedence, first match wins:
2: some input or option was unusable (a file that could not be read or replayed);
1: some layer has a verdict selected by `--fail-on` (default `any`: vanishing or exploding);
0: otherwise (healthy, skipped: no recurrent layer or a Git LFS pointer, or not selected).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum, StrEnum

from rnndiag.records import FileDiagnosis, FileStatus, InspectDiagnosis, Verdict


class ExitCode(IntEnum):
    OK = 0
    FINDINGS = 1
    UNUSABLE = 2


class FailOn(StrEnum):
    """Which verdicts make the exit code 1."""

    ANY = "any"
    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NEVER = "never"

    def selects(self, verdict: Verdict) -> bool:
        if verdict is Verdict.HEALTHY or self is FailOn.NEVER:
            return False
        return self is FailOn.ANY or verdict.value == self.value


def exit_code(files: Sequence[FileDiagnosis], fail_on: FailOn = FailOn.ANY) -> ExitCode:
    if any(f.status is FileStatus.ERROR for f in files):
        return ExitCode.UNUSABLE
    verdicts = {layer.verdict for f in files for m in f.modules for layer in m.layers}
    if any(f.nonfinite_weights for f in files):  # NaN/Inf weights count as exploding
        verdicts.add(Verdict.EXPLODING)
    if any(fail_on.selects(v) for v in verdicts):
        return ExitCode.FINDINGS
    return ExitCode.OK


def inspect_exit_code(files: Sequence[InspectDiagnosis]) -> ExitCode:
    """`inspect`: 2 for an unusable file, 1 for NaN/Inf in weights, else 0."""
    if any(f.status is FileStatus.ERROR for f in files):
        return ExitCode.UNUSABLE
    if any(f.nonfinite_weights for f in files):
        return ExitCode.FINDINGS
    return ExitCode.OK
