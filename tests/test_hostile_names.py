"""Security: file names never become options, names never become markup, error messages never
echo another file's bytes, and a replaced output file keeps its permissions."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from rich.console import Console

from rnndiag.cli import hook_argv, main
from rnndiag.sink import Progress
from tests.conftest import SAMPLES

EVIL_MODULE = """
from pathlib import Path
Path("PWNED").write_text("evilmod ran")
def f():
    Path("PWNED").write_text("evilmod.f ran")
"""


def _hostile_repo(folder: Path) -> Path:
    """A checkout holding files named like options, as an attacker would commit them."""
    shutil.copy(SAMPLES / "rnn_tanh_vanishing.safetensors", folder / "model.safetensors")
    shutil.copy(SAMPLES / "adding_batch.safetensors", folder / "batch.safetensors")
    shutil.copy(SAMPLES / "adding_batch.safetensors", folder / "--batch=batch.safetensors")
    shutil.copy(SAMPLES / "lstm_healthy.safetensors", folder / "--model=evilmod:f.safetensors")
    shutil.copy(SAMPLES / "lstm_healthy.safetensors", folder / "victim.safetensors")
    shutil.copy(SAMPLES / "lstm_healthy.safetensors", folder / "--output=victim.safetensors")
    (folder / "evilmod.py").write_text(EVIL_MODULE)
    return folder


HOSTILE_FILES = ["--batch=batch.safetensors", "--model=evilmod:f.safetensors",
                 "--output=victim.safetensors", "model.safetensors", "victim.safetensors"]


@pytest.mark.parametrize("command", ["check", "inspect"])
def test_hook_never_parses_file_names_as_options(command: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo = _hostile_repo(tmp_path)
    monkeypatch.chdir(repo)
    victim = (repo / "victim.safetensors").read_bytes()
    code = main(["hook", command, *HOSTILE_FILES])
    out = capsys.readouterr().out
    assert not (repo / "PWNED").exists(), "a module named by a file name was imported"
    assert (repo / "victim.safetensors").read_bytes() == victim, "a file name chose --output"
    # every file was read as a checkpoint, the hostile names included
    for name in HOSTILE_FILES:
        assert name in out
    # check: model.safetensors vanishes; inspect: no NaN/Inf weights anywhere
    assert code == (1 if command == "check" else 0)


def test_hook_options_before_double_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    repo = _hostile_repo(tmp_path)
    monkeypatch.chdir(repo)
    shutil.copy(SAMPLES / "adding_batch.safetensors", repo / "val.safetensors")
    code = main(["hook", "check", "--format", "json", "--batch", "val.safetensors", "--",
                 "--model=evilmod:f.safetensors", "model.safetensors"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["options"]["batch"] == "val.safetensors"
    assert doc["options"]["model"] is None
    assert [f["path"] for f in doc["files"]] == ["--model=evilmod:f.safetensors",
                                                 "model.safetensors"]
    assert not (repo / "PWNED").exists()


def test_hook_refuses_an_option_that_is_an_existing_file(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str],
                                                         ) -> None:
    """If `files:` let a file named `--` through, files before it must still not be options."""
    repo = _hostile_repo(tmp_path)
    monkeypatch.chdir(repo)
    code = main(["hook", "check", "--model=evilmod:f.safetensors", "--", "model.safetensors"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--model=evilmod:f.safetensors" in err and "a file of that name exists" in err
    assert not (repo / "PWNED").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["hook", "check", "a.pt", "--x.pt"], ["check", "--", "a.pt", "--x.pt"]),
    (["hook", "inspect", "--format", "json", "--", "-h"], ["inspect", "--format", "json", "--",
                                                          "-h"]),
    (["hook", "check", "--", "--", "b.pt"], ["check", "--", "--", "b.pt"]),
    (["check", "a.pt"], None),
    (["hook", "--help"], None),
    (["hook"], None),
], ids=["files-only", "options-then-files", "dash-dash-file", "not-a-hook", "hook-help",
        "bare-hook"])
def test_hook_argv(argv: list[str], expected: list[str] | None) -> None:
    assert hook_argv(argv) == expected


def test_hook_without_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hook"]) == 2
    assert "usage: rnndiag hook check|inspect" in capsys.readouterr().err


def test_hook_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hook", "--help"]) == 0
    assert "no file name is ever parsed as an option" in " ".join(capsys.readouterr().out.split())


def test_every_shipped_hook_uses_the_hook_entry() -> None:
    import yaml

    from tests.conftest import ROOT

    for h in yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text()):
        assert h["entry"].split()[:2] == ["rnndiag", "hook"], h["id"]


@pytest.mark.parametrize("name", ["[link=https://evil.example/]click[/link]", "[/x]",
                                  "[bold red]x", "\x1b]8;;https://evil.example/\x1b\\y"])
def test_progress_line_renders_names_literally(name: str) -> None:
    progress = Progress()
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor",
                      width=200)
    progress.status = console.status("rnndiag: starting")
    progress.update(f"{name}: replaying rnn (LSTM)")  # must not raise MarkupError
    console.print(progress.status.renderable)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b]8;" not in text  # no OSC 8 hyperlink
    if name.startswith("["):
        assert name in text


def test_header_length_of_another_file_is_not_echoed(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "id_secret"
    secret.write_bytes(b"SeCrEt!!{" + b"x" * 40)
    link = tmp_path / "model.safetensors"
    link.symlink_to(secret)
    leaked = str(int.from_bytes(b"SeCrEt!!", "little"))
    for fmt in ("text", "json", "sarif"):
        code = main(["check", "--format", fmt, str(link)])
        captured = capsys.readouterr()
        assert code == 2
        assert leaked not in captured.out + captured.err
        assert "header length that fits" in captured.err
    assert main(["inspect", str(link)]) == 2
    captured = capsys.readouterr()
    assert leaked not in captured.out + captured.err


def test_undecodable_header_names_no_byte(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    body = b'{"\xfe\xff": 1}'
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(body).to_bytes(8, "little") + body)
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and "0xfe" not in err


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444])
def test_output_keeps_the_mode_of_the_file_it_replaces(mode: int, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    out.write_text("old")
    out.chmod(mode)
    assert main(["check", "--format", "json", "--output", str(out),
                 str(SAMPLES / "lstm_healthy.safetensors")]) in (0, 1)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert json.loads(out.read_text())["files"][0]["status"] == "ok"


def test_new_output_follows_the_umask(tmp_path: Path) -> None:
    out = tmp_path / "report.txt"
    old = os.umask(0o077)
    try:
        main(["check", "--output", str(out), str(SAMPLES / "lstm_healthy.safetensors")])
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_header_cap_is_the_safetensors_librarys(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """100,000,000 bytes (not 100 MiB); a sparse file keeps the test cheap."""
    path = tmp_path / "big.safetensors"
    with path.open("wb") as f:
        f.write((100_000_001).to_bytes(8, "little") + b"{")
        f.truncate(8 + 100_000_001 + 16)
    assert main(["inspect", str(path)]) == 2
    assert "longer than the 100,000,000-byte limit" in capsys.readouterr().err
