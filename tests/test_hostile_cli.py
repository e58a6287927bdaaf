"""Hostile command lines and outputs (issue 15, the CLI half): an output never replaces an
input, a device or a FIFO; a write error is one line with no temporary file left; bad option
values are one line, exit 2, and still one valid JSON (or SARIF) document; --max-memory is
enforced before the memory is spent; user code calling sys.exit() is an error, never exit 0;
file names that are not UTF-8 are reported in valid documents.

Device files are only ever reached through symlinks made in tmp_path: a broken fix replaces the
link (which the test sees), never /dev/null itself."""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import threading
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rnndiag.cli import main
from tests.conftest import ADDING_BATCH, ROOT, SAMPLES

SCHEMAS = {name: json.loads(files("rnndiag").joinpath(f"{name}.schema.json").read_text("utf-8"))
           for name in ("report", "inspect")}
VANISHING = SAMPLES / "rnn_tanh_vanishing.safetensors"


def _validate(text: str, schema: str = "report") -> dict[str, Any]:
    """One strict JSON document, valid against the shipped schema, valid UTF-8 text."""
    text.encode("utf-8")  # no lone surrogates
    doc: dict[str, Any] = json.loads(text, parse_constant=_no_constant)
    jsonschema.validate(doc, SCHEMAS[schema], cls=jsonschema.Draft202012Validator)
    return doc


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} in a JSON document")


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnndiag: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with a checkpoint (model.svg: a checkpoint named like a picture, for --plot)
    and a batch; the current directory, with no configuration above it."""
    (tmp_path / "model.safetensors").write_bytes(VANISHING.read_bytes())
    (tmp_path / "model.svg").write_bytes(VANISHING.read_bytes())
    (tmp_path / "batch.safetensors").write_bytes(ADDING_BATCH.read_bytes())
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- item 5: an output is never an input, never replaces a device, a FIFO or a link ----

SPELLINGS = ["same", "dotted", "symlink", "hardlink"]


def _spelled(folder: Path, name: str, how: str) -> str:
    if how == "same":
        return name
    if how == "dotted":
        return f"sub/../{name}"
    alias = folder / f"alias-{how}{Path(name).suffix}"
    (alias.symlink_to if how == "symlink" else alias.hardlink_to)(folder / name)
    return alias.name


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize(("option", "victim"), [
    ("--output", "model.safetensors"), ("--save-svg", "model.safetensors"),
    ("--save-html", "batch.safetensors"), ("--plot", "model.svg"),
    ("--output", "batch.safetensors")])
@pytest.mark.parametrize("fmt", ["text", "json", "sarif"])
def test_output_onto_an_input_is_refused(work: Path, option: str, victim: str, how: str,
                                         fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    target = _spelled(work, victim, how)
    model = "model.svg" if victim == "model.svg" else "model.safetensors"
    code = main(["check", model, "--batch", "batch.safetensors", "--format", fmt,
                 option, target])
    out, err = capsys.readouterr()
    assert code == 2
    line = _one_line(err)
    assert f"{option} {target}: refusing to overwrite an input file" in line
    if how != "same":
        assert victim in line  # names the input it is
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.name in before} == before
    assert _leftovers(work) == []
    if fmt == "json":
        assert _validate(out)["errors"][0]["message"] == line.removeprefix("rnndiag: error: ")
    elif fmt == "sarif":
        assert json.loads(out)["runs"][0]["invocations"][0]["executionSuccessful"] is False


def test_inspect_output_onto_an_input_is_refused(work: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    before = (work / "model.safetensors").read_bytes()
    code = main(["inspect", "model.safetensors", "--format", "json", "--output",
                 _spelled(work, "model.safetensors", "hardlink")])
    out, err = capsys.readouterr()
    assert code == 2 and "refusing to overwrite an input file" in _one_line(err)
    assert _validate(out, "inspect")["exit_code"] == 2
    assert (work / "model.safetensors").read_bytes() == before


def test_output_through_a_link_to_a_device_writes_into_it(
        work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    link = work / "null"
    link.symlink_to(os.devnull)
    assert main(["check", "model.safetensors", "--output", str(link), "--save-svg",
                 str(link), "--fail-on", "never"]) == 0
    assert capsys.readouterr().err == ""
    assert link.is_symlink() and os.readlink(link) == os.devnull
    assert _leftovers(work) == []


def test_output_into_a_fifo_writes_into_it(work: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fifo = work / "report.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code = main(["check", "model.safetensors", "--format", "json", "--output", str(fifo)])
    reader.join(timeout=30)
    assert code == 1 and not reader.is_alive()
    assert _validate(got[0].decode())["files"][0]["verdict"] == "vanishing"
    assert fifo.is_fifo() and _leftovers(work) == []


def test_output_through_a_link_to_a_file_replaces_the_target_keeps_the_link(
        work: Path) -> None:
    (work / "real.json").write_text("old")
    (work / "report.json").symlink_to("real.json")
    assert main(["check", "model.safetensors", "--format", "json", "--output",
                 "report.json"]) == 1
    assert (work / "report.json").is_symlink()
    assert _validate((work / "real.json").read_text())["exit_code"] == 1
    assert _leftovers(work) == []


def _run(args: list[str], cwd: Path, limit_mib: int | None = None, timeout: float = 120,
         **kw: Any) -> subprocess.CompletedProcess[str]:
    """rnndiag in a fresh process, its address space capped at `limit_mib` (a normal run
    needs about 800 MiB of address space, most of it torch's libraries)."""
    def cap() -> None:
        if limit_mib is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_mib * 2**20,) * 2)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "rnndiag", *args], cwd=cwd, text=True,
                          preexec_fn=cap, timeout=timeout, env=env, **kw)


def test_output_through_dev_stdout_style_link_goes_to_stdout(work: Path) -> None:
    link = work / "stdout-link"
    link.symlink_to("/proc/self/fd/1")
    with open(work / "captured.txt", "w") as stdout:
        done = _run(["check", "model.safetensors", "--format", "json", "--output", str(link)],
                    work, stdout=stdout, stderr=subprocess.PIPE)
    assert done.returncode == 1, done.stderr
    assert link.is_symlink() and os.readlink(link) == "/proc/self/fd/1"
    assert _validate((work / "captured.txt").read_text())["exit_code"] == 1


# ---- item 9: a full disk, a long name: one line, exit 2, no temporary file ----

@pytest.mark.parametrize("fmt", ["text", "json", "sarif"])
def test_full_disk_through_a_device(work: Path, fmt: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    full = work / "full"
    full.symlink_to("/dev/full")
    code = main(["check", "model.safetensors", "--format", fmt, "--output", str(full)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "cannot write (No space left on device)" in _one_line(err)
    assert full.is_symlink() and _leftovers(work) == []
    if fmt == "json":  # the document the file could not take goes to stdout
        assert _validate(out)["exit_code"] == 2


def test_full_disk_on_a_regular_file_keeps_the_old_one_and_no_temporary(
        work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "report.txt").write_text("old report")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    for extra in (["--output", "report.txt"], ["--save-html", "report.txt"]):
        assert main(["check", "model.safetensors", *extra]) == 2
        assert "report.txt: cannot write (No space left on device)" in \
            _one_line(capsys.readouterr().err)
        assert (work / "report.txt").read_text() == "old report"
        assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []


def test_stdout_on_a_full_disk_is_one_line_exit_2(work: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as stdout:
        done = _run(["check", "model.safetensors", "--format", "json"], work, stdout=stdout,
                    stderr=subprocess.PIPE)
    assert done.returncode == 2
    assert "cannot write the report to standard output (No space left on device)" in \
        _one_line(done.stderr)


def test_long_output_names(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    longest = "r" * 250  # fits NAME_MAX; a temporary name built from all of it would not
    assert main(["check", "model.safetensors", "--output", longest, "--fail-on", "never"]) == 0
    assert "VANISHING" in (work / longest).read_text()
    too_long = "r" * 300
    assert main(["check", "model.safetensors", "--output", too_long, "--format", "json"]) == 2
    out, err = capsys.readouterr()
    assert "cannot write (File name too long)" in _one_line(err)
    assert _validate(out)["exit_code"] == 2
    assert _leftovers(work) == []


@pytest.mark.parametrize("command", ["check", "inspect"])
def test_long_input_name_is_that_files_error(work: Path, command: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    long_name = "m" * 300 + ".safetensors"
    assert main([command, long_name, "model.safetensors", "--format", "json"]) == 2
    out, err = capsys.readouterr()
    doc = _validate(out, "report" if command == "check" else "inspect")
    assert [f["status"] for f in doc["files"]] == ["error", "ok"]
    assert "cannot open (File name too long)" in _one_line(err)


# ---- item 10: bad option values: one line, exit 2, one valid document ----

BAD_OPTIONS = {
    "vanish-nan": (["--vanish-threshold", "nan"], "thresholds must satisfy"),
    "explode-inf": (["--explode-threshold", "inf"], "thresholds must satisfy"),
    "out-of-order": (["--vanish-threshold", "0.5", "--explode-threshold", "0.7"],
                     "thresholds must satisfy"),
    "vanish-zero": (["--vanish-threshold", "0"], "thresholds must satisfy"),
    "explode-negative": (["--explode-threshold", "-3"], "thresholds must satisfy"),
    "dtype-float16": (["--dtype", "float16"], "Invalid value for '--dtype'"),
    "seed-2**64": (["--seed", str(2**64)], "--seed 18446744073709551616 is out of range"),
    "batch-size-10**30": (["--batch-size", str(10**30)], "--batch-size 1000000000000000000000000"
                                                         "000000 is too large"),
    "batch-size-1e30": (["--batch-size", "1e30"], "Invalid value for '--batch-size'"),
    "seq-len-zero": (["--seq-len", "0"], "--seq-len must be at least 1"),
    "max-memory-0": (["--max-memory", "0"], "--max-memory must be more than 0 bytes"),
    "max-memory-words": (["--max-memory", "lots"], "expected a size"),
    "clip-percentile": (["--clip-percentile", "nan"], "No such option: --clip-percentile"),
    "lr-nan": (["--lr", "nan"], "--lr must be a positive number"),
    "nested-model-kwargs": (["--model", "x:f", "--batch", str(ADDING_BATCH), "--model-kwargs",
                             "[" * 100_000 + "]" * 100_000], "nested too deeply"),
    "model-kwargs-list": (["--model", "x:f", "--batch", str(ADDING_BATCH), "--model-kwargs",
                           "[1]"], "must be a JSON object"),
}


@pytest.mark.parametrize("fmt", ["text", "json", "sarif"])
@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_values(case: str, fmt: str, work: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    args, fragment = BAD_OPTIONS[case]
    code = main(["check", "model.safetensors", "--format", fmt, *args])
    out, err = capsys.readouterr()
    assert code == 2
    if fmt == "text":
        assert fragment in err and "Traceback" not in err and "internal error" not in err
        return
    line = _one_line(err)
    assert fragment in line
    message = line.removeprefix("rnndiag: error: ")
    if fmt == "json":
        doc = _validate(out)
        assert doc["exit_code"] == 2 and doc["errors"] == [{"path": None, "message": message}]
        assert doc["files"] == []
    else:
        [run] = json.loads(out, parse_constant=_no_constant)["runs"]
        [invocation] = run["invocations"]
        assert invocation["executionSuccessful"] is False
        assert invocation["toolExecutionNotifications"][0]["message"]["text"] == message


def test_inspect_usage_error_in_json_mode(work: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "model.safetensors", "--format", "json", "--nonlinearity",
                 "sigmoid"]) == 2
    out, err = capsys.readouterr()
    assert "Invalid value for '--nonlinearity'" in _one_line(err)
    assert _validate(out, "inspect")["errors"][0]["path"] is None


def test_valid_options_stay_in_the_error_document(work: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "model.safetensors", "--format", "json", "--batch",
                 "missing.safetensors"]) == 2
    doc = _validate(capsys.readouterr().out)
    assert doc["options"]["batch"] == "missing.safetensors"


def test_max_memory_one_byte_says_what_to_do(work: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "model.safetensors", "--max-memory", "1"]) == 2
    line = _one_line(capsys.readouterr().err)
    # reading the file is the first allocation the limit refuses; it names the way out
    assert "above the 1 bytes limit on what reading may allocate (raise it with " \
        "--max-memory)" in line and "B=0" not in line


# ---- item 6: --max-memory is enforced before the memory is spent ----

def _wide_lstm(path: Path, input_size: int) -> None:
    torch.manual_seed(0)
    save_file({f"rnn.{k}": v.contiguous()
               for k, v in nn.LSTM(input_size, 2).state_dict().items()}, path)


@pytest.mark.parametrize(("setup", "args", "fragment"), [
    ("wide", ["--max-memory", "100M"], "(B=16, T=100) needs about 3.7"),
    ("wide", [], "needs about"),  # the default limit; the address space is smaller still
    ("plain", ["--seq-len", "20000000"], "(B=16, T=20000000) needs about"),
    ("plain", ["--seq-len", str(10**12)], "(B=16, T=1000000000000) needs about"),
], ids=["input-size-500k", "input-size-500k-default-limit", "seq-len-2e7", "seq-len-1e12"])
def test_memory_is_refused_before_it_is_spent(work: Path, setup: str, args: list[str],
                                              fragment: str) -> None:
    model = work / "model.safetensors"
    if setup == "wide":
        _wide_lstm(model, 500_000)  # 16 MB of weights; the synthetic batch would be 3.2 GB
    done = _run(["check", str(model), "--format", "json", *args], work, limit_mib=1500,
                capture_output=True)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    if setup == "wide" and not args and "above --max-memory" not in line:
        pytest.skip("this machine's default limit (half the RAM) fits 3.7 GB")
    assert fragment in line and "above --max-memory" in line
    assert _validate(done.stdout)["files"][0]["status"] == "error"


# ---- items 9, 11, 13: non-finite values, sys.exit in user code, names not UTF-8 ----

@pytest.mark.parametrize("fmt", ["text", "json", "sarif"])
def test_negative_infinite_forget_bias(work: Path, fmt: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    state = {f"rnn.{k}": v.detach().clone() for k, v in nn.LSTM(3, 8).state_dict().items()}
    state["rnn.bias_ih_l0"][8:16] = float("-inf")
    save_file(state, work / "neginf.safetensors")
    code = main(["check", "neginf.safetensors", "--format", fmt])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err and "internal error" not in err
    if fmt == "json":
        _validate(out)
    elif fmt == "sarif":
        results = json.loads(out, parse_constant=_no_constant)["runs"][0]["results"]
        assert {"RD005": "-inf"}.items() <= {r["ruleId"]: r["properties"]["value"]
                                             for r in results}.items()


USER_CODE = """
import sys
sys.path.insert(0, {samples!r})
from user_models import Tagger

def exits(**kwargs):
    sys.exit(0)

def loss(output, targets):
    raise SystemExit(0)
"""


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--model", "exiting_import:f"], "cannot import 'exiting_import' (SystemExit: 0)"),
    (["--model", "usercode:exits"], "calling it failed (SystemExit: 0)"),
    (["--model", "user_models:Tagger", "--loss", "usercode:loss"],
     "--loss usercode:loss: calling it raised SystemExit(0)"),
], ids=["module", "factory", "loss"])
def test_user_code_calling_sys_exit_is_an_error(work: Path, extra: list[str], fragment: str,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    (work / "exiting_import.py").write_text("import sys\nsys.exit(0)\n")
    (work / "usercode.py").write_text(USER_CODE.format(samples=str(SAMPLES)))
    monkeypatch.syspath_prepend(str(SAMPLES))
    code = main(["check", str(SAMPLES / "tagger.safetensors"), "--batch",
                 str(SAMPLES / "tagger_batch.safetensors"), "--format", "json", *extra])
    out, err = capsys.readouterr()
    assert code == 2
    assert fragment in _one_line(err)
    assert fragment in _validate(out)["errors"][0]["message"]


@pytest.fixture
def undecodable(work: Path) -> Path:
    name = os.fsdecode(b"m\xff.safetensors")
    try:
        (work / name).write_bytes(VANISHING.read_bytes())
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 names")
    return work / name


def test_name_not_utf8_is_checked_and_reported(undecodable: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", undecodable.name, "--format", "json"]) == 1
    doc = _validate(capsys.readouterr().out)
    assert doc["files"][0]["path"] == "m\\xff.safetensors"
    assert doc["files"][0]["verdict"] == "vanishing"
    assert main(["check", undecodable.name, "--format", "sarif"]) == 1
    out = capsys.readouterr().out
    out.encode("utf-8")
    uris = {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            for r in json.loads(out)["runs"][0]["results"]}
    assert uris == {"m%FF.safetensors"}
    assert main(["inspect", undecodable.name, "--format", "json"]) == 0
    assert _validate(capsys.readouterr().out, "inspect")["files"][0]["status"] == "ok"
    assert main(["check", undecodable.name, "--output", os.fsdecode(b"r\xfe.txt")]) == 1
    assert (undecodable.parent / os.fsdecode(b"r\xfe.txt")).read_text().count("VANISHING")


# ---- item 9: one bad file never kills the run ----

def test_an_override_error_is_its_files_error_only(work: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (work / "other.safetensors").write_bytes(VANISHING.read_bytes())
    (work / "pyproject.toml").write_text(
        '[tool.rnndiag]\nfail-on = "never"\n\n[[tool.rnndiag.overrides]]\n'
        'files = ["other.safetensors"]\nbatch = "missing.safetensors"\n')
    assert main(["check", "model.safetensors", "other.safetensors", "--format", "json"]) == 2
    out, err = capsys.readouterr()
    doc = _validate(out)
    assert [f["status"] for f in doc["files"]] == ["ok", "error"]
    assert "other.safetensors: batch" in _one_line(err)


def test_api_save_plot_refuses_an_input(work: Path) -> None:
    from rnndiag import check_files
    from rnndiag.errors import OptionError

    result = check_files(["model.svg"], batch="batch.safetensors")
    before = (work / "model.svg").read_bytes()
    with pytest.raises(OptionError, match="refusing to overwrite an input file"):
        result.save_plot(_spelled(work, "model.svg", "symlink"))
    assert (work / "model.svg").read_bytes() == before


def test_a_plot_error_after_the_report_adds_no_second_document(
        work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import rnndiag.plot

    def broken(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rnndiag.plot, "save_plot", broken)
    assert main(["check", "model.safetensors", "--format", "json", "--plot", "p.png"]) == 2
    out, err = capsys.readouterr()
    assert _validate(out)["files"][0]["verdict"] == "vanishing"  # one document: the report
    assert "No space left on device" in err
