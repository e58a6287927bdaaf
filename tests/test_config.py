"""Project configuration: [tool.rnndiag] in pyproject.toml or --config; command-line options
win; per-file overrides; ignored findings reported but never failing the gate."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from rnndiag.cli import main
from tests.conftest import SAMPLES

VANISHING = "rnn_tanh_vanishing.safetensors"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copy(SAMPLES / VANISHING, tmp_path / VANISHING)
    (tmp_path / "ckpt").mkdir()
    shutil.copy(SAMPLES / "lstm_healthy.safetensors", tmp_path / "ckpt" / "lstm.safetensors")
    shutil.copy(SAMPLES / "adding_batch.safetensors", tmp_path / "adding.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _pyproject(root: Path, body: str) -> None:
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n\n" + textwrap.dedent(body))


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    code = main(["check", *args, "--format", "json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out else {}), err


def test_pyproject_settings_apply_and_the_command_line_wins(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _pyproject(project, """
        [tool.rnndiag]
        context = 3
        seq-len = 25
        vanish-threshold = 1e-4
    """)
    code, doc, err = _run([VANISHING], capsys)
    assert code == 0, err  # vanishing only further back than 3 steps
    o = doc["options"]
    assert (o["context"], o["seq_len"], o["vanish_threshold"]) == (3, 25, 1e-4)
    code, doc, _ = _run([VANISHING, "--context", "60", "--seq-len", "61"], capsys)
    assert code == 1 and doc["options"]["context"] == 60
    assert doc["options"]["vanish_threshold"] == 1e-4  # not given: still the file's
    code, doc, _ = _run([VANISHING, "--no-config", "--seq-len", "61"], capsys)
    assert code == 1 and doc["options"]["context"] is None


def test_config_found_from_a_subfolder(project: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _pyproject(project, """
        [tool.rnndiag]
        batch = "adding.safetensors"
    """)
    monkeypatch.chdir(project / "ckpt")
    code, doc, err = _run(["lstm.safetensors"], capsys)
    assert code == 0, err
    assert doc["files"][0]["batch"]["source"] == str(project / "adding.safetensors")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [("contxt = 3", "unknown key contxt"), ("context = 'long'", "context = 'long': expected int"),
     ("ignore = ['RD999']", "unknown rule 'RD999'"), ("fail-on = 'sometimes'", "fail-on"),
     ("[[tool.rnndiag.overrides]]\nbatch = 'x'", "needs files"),
     ("[[tool.rnndiag.overrides]]\nfiles = ['*']\nfail-on = 'never'", "top-level only"),
     ("strict-nonfinite = 1", "expected bool")],
    ids=["unknown-key", "wrong-type", "unknown-rule", "bad-fail-on", "override-files",
         "fail-on-in-override", "int-for-bool"],
)
def test_bad_configuration_is_one_line_and_exit_2(project: Path, body: str, fragment: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _pyproject(project, "[tool.rnndiag]\n" + body + "\n")
    code = main(["check", VANISHING])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_per_file_overrides(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _pyproject(project, """
        [tool.rnndiag]
        seq-len = 30

        [[tool.rnndiag.overrides]]
        files = ["ckpt/*.safetensors"]
        batch = "adding.safetensors"
    """)
    code, doc, err = _run([VANISHING, "ckpt/lstm.safetensors"], capsys)
    assert code == 1, err
    first, second = doc["files"]
    assert first["batch"]["source"] == "synthetic" and first["batch"]["seq_len"] == 30
    assert second["batch"]["source"] == str(project / "adding.safetensors")
    assert second["verdict"] == "healthy"


def test_ignored_findings_are_reported_and_never_fail(
        project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _pyproject(project, """
        [tool.rnndiag]
        seq-len = 40
        ignore = ["RD004", "RD006", {rule = "RD001", module = "rnn", direction = "forward"}]
    """)
    code, doc, err = _run([VANISHING], capsys)
    assert code == 0, err
    assert doc["verdict"] == "vanishing"  # the measurement is unchanged; the gate accepts it
    ignored = {x["rule"] for x in doc["findings"] if x["ignored"]}
    assert ignored == {"RD001", "RD006"}  # RD004 does not occur here: ignoring it is harmless
    assert not any(a["action"].startswith("Use a gated cell") for a in doc["advice"])
    assert main(["check", VANISHING]) == 0
    assert "ignored (config): RD001 rnn 0 forward" in capsys.readouterr().out
    assert main(["check", VANISHING, "--format", "sarif"]) == 0
    sarif = json.loads(capsys.readouterr().out)
    results = sarif["runs"][0]["results"]
    assert results and all(r["suppressions"][0]["kind"] == "external" for r in results)
    # a finding elsewhere is not covered: a module that is not "rnn"
    _pyproject(project, """
        [tool.rnndiag]
        seq-len = 40
        ignore = [{rule = "RD001", module = "encoder"}]
    """)
    assert main(["check", VANISHING]) == 1
    capsys.readouterr()


def test_explicit_config_file_and_fail_on(project: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (project / "gate.toml").write_text("fail-on = 'exploding'\nseq-len = 30\n")
    code, doc, err = _run([VANISHING, "--config", "gate.toml"], capsys)
    assert code == 0 and doc["verdict"] == "vanishing", err
    code, _, _ = _run([VANISHING, "--config", "gate.toml", "--fail-on", "any"], capsys)
    assert code == 1
    code, _, err = _run([VANISHING, "--config", "missing.toml"], capsys)
    assert code == 2 and "missing.toml: no such file" in err


def test_api_takes_the_same_config(project: Path) -> None:
    import rnndiag

    (project / "gate.toml").write_text("seq-len = 30\ncontext = 3\n")
    d = rnndiag.check_files([VANISHING], config="gate.toml")
    assert d.exit_code == 0 and d.files[0].batch is not None and d.files[0].batch.seq_len == 30
    assert rnndiag.check_files([VANISHING], config="gate.toml", seq_len=61,
                               thresholds=rnndiag.Thresholds()).exit_code == 1


@pytest.mark.parametrize("kind", ["fifo", "nested", "directory"])
def test_a_hostile_config_file_is_one_line_and_exit_2(
        kind: str, project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--config naming a FIFO (would block: nothing writes to it), TOML nested 100,000 deep
    (tomllib recurses) or a folder: one error line, exit 2, still one JSON document."""
    cfg = project / "gate.toml"
    if kind == "fifo":
        os.mkfifo(cfg)
    elif kind == "nested":
        cfg.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    else:
        cfg.mkdir()
    code, doc, err = _run([VANISHING, "--config", str(cfg)], capsys)
    assert code == 2
    assert doc["exit_code"] == 2 and doc["errors"], doc
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "gate.toml" in lines[0] and "Traceback" not in err, err
