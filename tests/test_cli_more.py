"""CLI behaviour beyond exit codes: --fail-on, --output, exports, schema, inspect, safety."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rnndiag.cli import app, main
from tests.conftest import ADDING_BATCH, SAMPLES

runner = CliRunner()
VANISHING = str(SAMPLES / "rnn_tanh_vanishing.safetensors")
EXPLODING = str(SAMPLES / "rnn_relu_exploding.safetensors")
BATCH = ["--batch", str(ADDING_BATCH)]


@pytest.mark.parametrize(
    ("fail_on", "vanishing_code", "exploding_code"),
    [("any", 1, 1), ("vanishing", 1, 0), ("exploding", 0, 1), ("never", 0, 0)],
)
def test_fail_on(fail_on: str, vanishing_code: int, exploding_code: int) -> None:
    assert main(["check", VANISHING, *BATCH, "--fail-on", fail_on]) == vanishing_code
    assert main(["check", EXPLODING, *BATCH, "--fail-on", fail_on]) == exploding_code


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_output_file_is_written_whole(tmp_path: Path, fmt: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"report.{fmt}"
    out.write_text("old")
    assert main(["check", VANISHING, *BATCH, "--format", fmt, "--output", str(out)]) == 1
    assert capsys.readouterr().out == ""
    text = out.read_text()
    if fmt == "json":
        assert json.loads(text)["verdict"] == "vanishing"
    else:
        assert "VANISHING" in text and "\x1b[" not in text
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def test_output_into_missing_folder_is_exit_2(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", VANISHING, "--format", "json", "--output",
                 str(tmp_path / "no" / "r.json")])
    out, err = capsys.readouterr()
    assert code == 2 and "does not exist" in err
    assert json.loads(out)["exit_code"] == 2  # the document still reaches stdout


def test_svg_and_html_exports(tmp_path: Path) -> None:
    svg, html = tmp_path / "r.svg", tmp_path / "r.html"
    assert main(["check", VANISHING, *BATCH, "--save-svg", str(svg),
                 "--save-html", str(html)]) == 1
    assert svg.read_text().lstrip().startswith("<svg") and "VANISHING" in svg.read_text()
    assert "<html" in html.read_text().lower()


def test_schema_commands_print_valid_schemas(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["schema"], ["schema", "--command", "inspect"]):
        assert main(args) == 0
        jsonschema.Draft202012Validator.check_schema(json.loads(capsys.readouterr().out))


def test_inspect_json_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "--command", "inspect"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert main(["inspect", VANISHING, str(SAMPLES / "gru_bidir_2layer.pt"),
                 "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    assert [m["kind"] for f in doc["files"] for m in f["modules"]] == ["RNN", "GRU"]


def test_nonfinite_weights_are_a_finding(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    tensors = load_file(VANISHING)
    tensors["rnn.weight_hh_l0"][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(tensors, path)
    assert main(["inspect", str(path)]) == 1
    assert "rnn.weight_hh_l0: 1 NaN, 0 Inf" in capsys.readouterr().out
    assert main(["check", str(path), "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["findings"][0]["rule"] == "RD007"
    assert doc["files"][0]["nonfinite_weights"] == [{"name": "rnn.weight_hh_l0", "nan": 1,
                                                     "inf": 0, "recurrent": True,
                                                     "fatal": True}]


def test_nonfinite_outside_recurrent_weights_is_a_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An intentional -inf table (an attention mask, a CRF's forbidden transitions) must not
    make a healthy model "exploding"; --strict-nonfinite restores the error."""
    tensors = load_file(str(SAMPLES / "lstm_healthy.safetensors"))
    mask = torch.zeros(4, 4)
    mask[0, 1] = float("-inf")
    tensors["crf.transitions"] = mask
    path = tmp_path / "mask.safetensors"
    save_file(tensors, path)
    assert main(["check", str(path), "--format", "json", "--seq-len", "20"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "healthy"
    [finding] = [x for x in doc["findings"] if x["rule"].startswith("RD00") and
                 x["module"] == "crf.transitions"]
    assert finding["rule"] == "RD008" and finding["level"] == "warning"
    assert doc["files"][0]["nonfinite_weights"][0]["fatal"] is False
    assert main(["check", str(path), "--seq-len", "20"]) == 0
    assert "not recurrent" in capsys.readouterr().out
    assert main(["check", str(path), "--seq-len", "20", "--strict-nonfinite",
                 "--format", "json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "exploding"
    assert [x["rule"] for x in doc["findings"] if x["module"] == "crf.transitions"] == ["RD007"]
    assert main(["inspect", str(path)]) == 0  # inspect: the same rule, a warning
    capsys.readouterr()


def test_untrusted_names_reach_the_terminal_escaped(tmp_path: Path) -> None:
    name = "[bold red]x[/]\x1b[31m\nevil"
    rnn = torch.nn.RNN(2, 3)
    path = tmp_path / "m.safetensors"
    save_file({f"{name}.{k}": v.contiguous() for k, v in rnn.state_dict().items()}, path)
    result = runner.invoke(app, ["check", str(path)], color=True)
    assert "[bold red]x[/]" in result.output  # shown literally, not as markup
    assert "\x1b[31m" not in result.output and "\\x1b[31m\\nevil" in result.output


def test_inspect_of_safetensors_does_not_import_torch() -> None:
    code = (f"import sys\nfrom rnndiag.cli import main\nrc = main(['inspect', {VANISHING!r}])\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("NO-TORCH 0")


@pytest.mark.parametrize("command", ["check", "inspect", "schema"])
def test_every_command_has_help_and_is_documented(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
    assert f"rnndiag {command}" in (Path(__file__).parent.parent / "README.md").read_text()


def test_sarif(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", VANISHING, EXPLODING, *BATCH, "--format", "sarif"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["version"] == "2.1.0"
    [run] = doc["runs"]
    rules = [r["id"] for r in run["tool"]["driver"]["rules"]]
    results = run["results"]
    assert {r["ruleId"] for r in results} == {"RD001", "RD002", "RD006"}
    for r in results:
        assert rules[r["ruleIndex"]] == r["ruleId"]
        assert r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] in (
            VANISHING, EXPLODING)


def test_memory_estimate_refuses_with_sizes_that_fit(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", VANISHING, "--seq-len", "5000", "--max-memory", "64M"])
    err = capsys.readouterr().err
    assert code == 2 and "above --max-memory 64.00 MiB" in err
    fits = int(err.split("up to T=")[1].split()[0])
    assert 0 < fits < 5000
    assert main(["check", VANISHING, "--seq-len", str(fits), "--max-memory", "64M",
                 "--fail-on", "never"]) == 0


def test_max_memory_parsing(capsys: pytest.CaptureFixture[str]) -> None:
    from rnndiag.resources import parse_size

    assert parse_size("512M") == 512 * 2**20 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert main(["check", VANISHING, "--max-memory", "lots", "--format", "json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["exit_code"] == 2 and "expected a size" in err


def test_device_auto_runs_and_unavailable_cuda_is_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", VANISHING, *BATCH, "--device", "auto"]) == 1
    capsys.readouterr()
    if not torch.cuda.is_available():
        assert main(["check", VANISHING, "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(["check", VANISHING, "--device", "tpu"]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    for sample in ("rnn_tanh_vanishing.safetensors", "lstm_healthy.safetensors",
                   "gru_bidir_2layer.pt"):
        docs = []
        for device in ("cpu", "cuda"):
            main(["check", str(SAMPLES / sample), *BATCH, "--device", device, "--dtype",
                  "float64", "--format", "json"])
            docs.append(json.loads(capsys.readouterr().out))
        cpu, gpu = (d["files"][0] for d in docs)
        assert cpu["verdict"] == gpu["verdict"]
        for m_c, m_g in zip(cpu["modules"], gpu["modules"], strict=True):
            for l_c, l_g in zip(m_c["layers"], m_g["layers"], strict=True):
                assert l_g["state_grad_norm"] == pytest.approx(l_c["state_grad_norm"],
                                                               rel=1e-9, abs=1e-300)


def test_context_decides_which_steps_count(capsys: pytest.CaptureFixture[str]) -> None:
    """--context N: a gradient that vanishes only further back than N steps is healthy for a
    task that needs N steps; the synthetic batch is then N + 1 steps long."""
    horizon = None
    for context, want in ((3, 0), (60, 1)):
        code = main(["check", VANISHING, "--context", str(context), "--format", "json"])
        doc = json.loads(capsys.readouterr().out)
        assert code == want and doc["options"]["context"] == context
        assert doc["options"]["seq_len"] == context + 1
        layer = doc["files"][0]["modules"][0]["layers"][0]
        horizon = layer["horizon"] if layer["horizon"] is not None else horizon
    assert horizon is not None and 3 < horizon <= 60
    assert main(["check", VANISHING, "--context", "0"]) == 2
    assert "--context must be at least 1" in capsys.readouterr().err
    assert main(["check", VANISHING, "--context", "3", "--seq-len", "50"]) == 0
    out = capsys.readouterr().out
    assert "T=50" in out and "within 3 steps back" in out


def test_report_says_what_the_verdict_holds_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", VANISHING, "--seq-len", "20"]) == 1
    out = " ".join(capsys.readouterr().out.split())
    assert "verdict for T=20 on a synthetic batch" in out
