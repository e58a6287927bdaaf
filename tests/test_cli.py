"""The command line: exit codes, JSON on stdout, one-line errors, light start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from rnndiag.cli import app, main
from tests.conftest import ADDING_BATCH, SAMPLES

runner = CliRunner()
HEALTHY = str(SAMPLES / "lstm_healthy.safetensors")
VANISHING = str(SAMPLES / "rnn_tanh_vanishing.safetensors")
EXPLODING = str(SAMPLES / "rnn_relu_exploding.safetensors")
BATCH = ["--batch", str(ADDING_BATCH)]


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("paths", "code"),
    [([HEALTHY], 0), ([VANISHING], 1), ([EXPLODING], 1), ([HEALTHY, VANISHING], 1),
     ([str(ADDING_BATCH)], 0)],
    ids=["healthy", "vanishing", "exploding", "worst-of-two", "skipped-no-rnn"],
)
def test_exit_codes(paths: list[str], code: int, capsys: pytest.CaptureFixture[str]) -> None:
    got, out, err = run(["check", *paths, *BATCH], capsys)
    assert got == code, out + err
    assert err == ""


def test_text_report_names_module_and_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", VANISHING, *BATCH], capsys)
    assert code == 1
    assert "VANISHING" in out and "RNN(tanh)" in out
    assert "t=0..88" in out and "vanishing, r down to 6.9e-27" in out


def test_json_document(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", VANISHING, HEALTHY, *BATCH, "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == doc["exit_code"] == 1
    assert doc["schema_version"] == "0.5.0" and doc["tool"]["name"] == "rnndiag"
    assert [f["verdict"] for f in doc["files"]] == ["vanishing", "healthy"]
    module = doc["files"][0]["modules"][0]
    assert {k: module[k] for k in ("name", "kind", "input_size", "hidden_size", "proj_size",
                                   "num_layers", "bidirectional", "bias", "nonlinearity")} == {
        "name": "rnn", "kind": "RNN", "input_size": 2, "hidden_size": 32, "proj_size": 0,
        "num_layers": 1, "bidirectional": False, "bias": True, "nonlinearity": "tanh"}
    layer = module["layers"][0]
    assert len(layer["grad_norm"]) == len(layer["state_grad_norm"]) == 100
    assert layer["cell_grad_norm"] is None
    assert layer["spans"][0] | {"extreme_ratio": None} == {
        "kind": "vanishing", "start": 0, "end": 88, "steps": 89, "extreme_ratio": None}
    lstm = doc["files"][1]["modules"][0]["layers"][0]
    assert len(lstm["cell_grad_norm"]) == 100 and lstm["forget_bias"]["mean"] > 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["check", "/no/such.safetensors"], "no such file"),
     (["check", VANISHING, "--seq-len", "0"], "--seq-len must be at least 1"),
     (["check", VANISHING, "--batch", VANISHING], "no 'inputs' tensor"),
     (["check", VANISHING, "--vanish-threshold", "2"], "thresholds must satisfy")],
    ids=["missing-file", "zero-steps", "batch-without-inputs", "bad-threshold"],
)
def test_unusable_input_is_one_line_exit_2(args: list[str], fragment: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(args, capsys)
    assert code == 2
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err
    code, out, err = run([*args, "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == doc["exit_code"] == 2 and fragment in doc["errors"][0]["message"]


def test_bad_file_does_not_hide_the_others(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, out, err = run(["check", str(bad), HEALTHY, *BATCH, "--format", "json"], capsys)
    doc = json.loads(out)
    assert code == 2 and [f["status"] for f in doc["files"]] == ["error", "ok"]
    assert str(bad) in err


def test_wrong_input_size_in_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = tmp_path / "b.safetensors"
    save_file({"inputs": torch.zeros(2, 5, 3)}, batch)
    code, _, err = run(["check", VANISHING, "--batch", str(batch)], capsys)
    assert code == 2 and "takes input_size 2" in err


def test_nonlinearity_option_overrides_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["check", EXPLODING, "--nonlinearity", "tanh", "--format", "json"],
                       capsys)
    assert json.loads(out)["files"][0]["modules"][0]["nonlinearity"] == "tanh"


def test_usage_errors_exit_2() -> None:
    result = runner.invoke(app, ["check", VANISHING, "--format", "xml"])
    assert result.exit_code == 2


@pytest.mark.parametrize("args", [["--help"], ["check", "--help"]], ids=["root", "check"])
def test_help(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Exit codes" in result.output


def test_help_does_not_import_torch() -> None:
    """Nor numpy (through the rule table): `--help` costs what typer costs (bench_startup)."""
    code = ("import sys\nfrom rnndiag.cli import main\nmain(['--help'])\n"
            "print([m for m in ('torch', 'numpy', 'rich') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_fail_on_choices_are_the_outcome_values() -> None:
    from rnndiag import cli, outcome

    assert [c.value for c in cli.FailOn] == [f.value for f in outcome.FailOn]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.startswith("rnndiag ")
