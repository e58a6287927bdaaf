"""Exit codes: the one place that turns diagnoses into 0 / 1 / 2.

2: some input or option was unusable (a file that could not be read or replayed);
1: otherwise, some layer is vanishing or exploding;
0: every file is healthy or skipped (no recurrent layer, Git LFS pointer).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

from rnndiag.records import FileDiagnosis, FileStatus, Verdict


class ExitCode(IntEnum):
    OK = 0
    FINDINGS = 1
    UNUSABLE = 2


def exit_code(files: Sequence[FileDiagnosis]) -> ExitCode:
    if any(f.status is FileStatus.ERROR for f in files):
        return ExitCode.UNUSABLE
    if any(f.verdict not in (None, Verdict.HEALTHY) for f in files):
        return ExitCode.FINDINGS
    return ExitCode.OK
