"""Golden files: the text report (100 columns, no colour) and the JSON of every sample model.

Regenerate after an intended change with `pytest tests/test_golden.py --regen-golden` and
review the diff. JSON floats are compared to 1e-5 relative (thread counts may change the last
bits of float32 sums); everything else must match exactly. Every JSON output is validated
against the shipped schema.
"""

from __future__ import annotations

import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from rnndiag.cli import main
from tests.conftest import ROOT

GOLDEN = Path(__file__).parent / "golden"
SAMPLES = ["rnn_tanh_vanishing.safetensors", "lstm_healthy.safetensors",
           "rnn_relu_exploding.safetensors", "gru_bidir_2layer.pt"]
BATCH = ["--batch", "sample_models/adding_batch.safetensors"]
SCHEMA = json.loads(files("rnndiag").joinpath("report.schema.json").read_text("utf-8"))


def _run(args: list[str], capsys: pytest.CaptureFixture[str],
         monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("NO_COLOR", "1")
    code = main(args)
    return code, capsys.readouterr().out


def _close(a: Any, b: Any, where: str = "$") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), where
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-300), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("sample", SAMPLES)
def test_text_report(sample: str, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch, regen_golden: bool) -> None:
    _, out = _run(["check", f"sample_models/{sample}", *BATCH], capsys, monkeypatch)
    golden = GOLDEN / f"{sample}.txt"
    if regen_golden:
        golden.write_text(out)
    assert "\x1b[" not in out  # NO_COLOR and a pipe: no escape codes
    assert out == golden.read_text()


@pytest.mark.parametrize("sample", SAMPLES)
def test_json(sample: str, capsys: pytest.CaptureFixture[str],
              monkeypatch: pytest.MonkeyPatch, regen_golden: bool) -> None:
    code, out = _run(["check", f"sample_models/{sample}", *BATCH, "--format", "json"],
                     capsys, monkeypatch)
    doc = json.loads(out)
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
    golden = GOLDEN / f"{sample}.json"
    if regen_golden:
        golden.write_text(out)
    _close(doc, json.loads(golden.read_text()))
    assert doc["exit_code"] == code


def test_summary_counts_match_the_files(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, out = _run(["check", *[f"sample_models/{s}" for s in SAMPLES], *BATCH], capsys,
                  monkeypatch)
    assert "4 files checked: 1 exploding, 1 healthy, 2 vanishing" in out
    assert out.count("VANISHING  sample_models/") == 2


def test_failure_json_is_valid(capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    code, out = _run(["check", "nope.safetensors", "--format", "json"], capsys, monkeypatch)
    doc = json.loads(out)
    jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
    assert code == doc["exit_code"] == 2 and doc["files"][0]["status"] == "error"
