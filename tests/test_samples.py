"""The sample models behave as sample_models/README.md says (its table is the contract)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rnndiag.diagnose import diagnose_files
from rnndiag.records import CheckOptions, FileStatus
from tests.conftest import ADDING_BATCH, SAMPLES


def _contract() -> list[tuple[str, str, str]]:
    """(file, verdict with the task batch, verdict with the synthetic batch) per table row."""
    rows = []
    for line in (SAMPLES / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and (m := re.fullmatch(r"`([^`]+)`", cells[0])):
            rows.append((m[1], cells[3], cells[4]))
    return rows


CONTRACT = _contract()


def test_contract_lists_every_checkpoint() -> None:
    listed = {name for name, _, _ in CONTRACT}
    present = {p.name for p in SAMPLES.iterdir() if p.suffix in {".safetensors", ".pt"}}
    examples = {"tagger.safetensors", "tagger_batch.safetensors"}  # the --model example
    assert listed == present - {ADDING_BATCH.name} - examples
    assert len(CONTRACT) == 4


@pytest.mark.parametrize(("name", "with_batch", "synthetic"), CONTRACT,
                         ids=[row[0] for row in CONTRACT])
def test_sample_verdicts(name: str, with_batch: str, synthetic: str) -> None:
    path = SAMPLES / name
    [task] = diagnose_files([path], CheckOptions(batch_path=str(ADDING_BATCH)))
    [noise] = diagnose_files([path], CheckOptions())
    assert task.status is FileStatus.OK, task.error
    assert (task.verdict, noise.verdict) == (with_batch, synthetic)


def test_samples_are_small() -> None:
    for path in SAMPLES.iterdir():
        assert path.stat().st_size < 1_000_000, path


def test_batch_file_is_skipped_as_a_checkpoint() -> None:
    [f] = diagnose_files([Path(ADDING_BATCH)], CheckOptions())
    assert f.status is FileStatus.SKIPPED and f.verdict is None
