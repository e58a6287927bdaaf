"""End to end through the real `pre-commit` tool: `pre-commit try-repo` on a temporary repo."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import ROOT, SAMPLES

HOOKS = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "ml-project"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.com")
    _git(repo, "config", "user.name", "t")
    return repo


def _try_repo(repo: Path, hook: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    bin_dir = str(Path(sys.executable).parent)  # the venv running the tests has `rnndiag`
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home")}
    return subprocess.run([str(Path(bin_dir) / "pre-commit"), "try-repo", str(ROOT), hook],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)


def _stage(repo: Path, sample: str, name: str | None = None) -> None:
    shutil.copy(SAMPLES / sample, repo / (name or sample))
    _git(repo, "add", name or sample)


def test_hook_ids_are_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    for hook in HOOKS:
        assert f"id: {hook['id']}" in readme or f"`{hook['id']}`" in readme, hook["id"]


@pytest.mark.slow
def test_vanishing_checkpoint_fails_the_commit(repo: Path, tmp_path: Path) -> None:
    _stage(repo, "rnn_tanh_vanishing.safetensors")
    result = _try_repo(repo, "rnndiag-system", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Failed" in result.stdout and "VANISHING" in result.stdout


def _save_healthy_lstm(path: Path) -> None:
    """An LSTM with forget and output gates ~1 and small cell inputs: the cell state carries
    the gradient back undiminished (r_t ~ 0.7 at every step)."""
    lstm = torch.nn.LSTM(2, 8)
    with torch.no_grad():
        for p in lstm.parameters():
            p.zero_()
        lstm.bias_ih_l0[8:16].fill_(12.0)  # forget gate
        lstm.bias_ih_l0[24:32].fill_(12.0)  # output gate
        lstm.weight_ih_l0[16:24].fill_(0.01)  # cell input g
    save_file({f"rnn.{k}": v.detach().contiguous() for k, v in lstm.state_dict().items()}, path)


@pytest.mark.slow
def test_healthy_checkpoint_passes(repo: Path, tmp_path: Path) -> None:
    _save_healthy_lstm(repo / "model.safetensors")
    _git(repo, "add", "model.safetensors")
    # a Git LFS pointer is skipped, not failed
    (repo / "big.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    _git(repo, "add", "big.safetensors")
    result = _try_repo(repo, "rnndiag-system", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed" in result.stdout


@pytest.mark.slow
def test_hostile_file_names_are_files_not_options(repo: Path, tmp_path: Path) -> None:
    """Committed files named like options neither import code nor choose the output."""
    from tests.test_hostile_names import EVIL_MODULE

    (repo / "evilmod.py").write_text(EVIL_MODULE)
    _stage(repo, "lstm_healthy.safetensors", "victim.safetensors")
    _stage(repo, "adding_batch.safetensors", "batch.safetensors")  # what --batch= would name
    for name, sample in (("--batch=batch.safetensors", "adding_batch.safetensors"),
                         ("--model=evilmod:f.safetensors", "lstm_healthy.safetensors"),
                         ("--output=victim.safetensors", "lstm_healthy.safetensors")):
        shutil.copy(SAMPLES / sample, repo / name)
        _git(repo, "add", "--", name)
    _git(repo, "add", "evilmod.py")
    victim = (repo / "victim.safetensors").read_bytes()
    # rnndiag-system only: the other two hooks install their own environment (torch from PyPI);
    # they share its `rnndiag hook` entry (test_hostile_names checks the entries, in-process)
    result = _try_repo(repo, "rnndiag-system", tmp_path)
    log = result.stdout + result.stderr
    assert not (repo / "PWNED").exists(), log
    assert (repo / "victim.safetensors").read_bytes() == victim, log
    assert "--model=evilmod:f.safetensors" in log, log  # reported as a file
    assert result.returncode == 1, log  # the LSTM vanishes on the synthetic batch


@pytest.mark.slow
def test_project_config_per_file_batch_and_ignored_finding(repo: Path, tmp_path: Path) -> None:
    """[tool.rnndiag] in the repository's pyproject.toml, through the real pre-commit: a
    legacy checkpoint's known vanishing is accepted, another file gets its own batch; a new
    vanishing checkpoint still fails the commit."""
    (repo / "models").mkdir()
    (repo / "data").mkdir()
    shutil.copy(SAMPLES / "rnn_tanh_vanishing.safetensors", repo / "models" / "legacy.safetensors")
    shutil.copy(SAMPLES / "lstm_healthy.safetensors", repo / "models" / "lstm.safetensors")
    shutil.copy(SAMPLES / "adding_batch.safetensors", repo / "data" / "adding.safetensors")
    (repo / "pyproject.toml").write_text(
        "[tool.rnndiag]\nseq-len = 40\n\n"
        "[[tool.rnndiag.overrides]]\nfiles = [\"models/legacy*.safetensors\"]\n"
        "ignore = [{rule = \"RD001\", module = \"rnn\"}]\n\n"
        "[[tool.rnndiag.overrides]]\nfiles = [\"models/lstm.safetensors\"]\n"
        "batch = \"data/adding.safetensors\"\n")
    _git(repo, "add", "models", "data", "pyproject.toml")
    result = _try_repo(repo, "rnndiag-system", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ignored (config): RD001" in result.stdout or "Passed" in result.stdout
    shutil.copy(SAMPLES / "rnn_tanh_vanishing.safetensors", repo / "models" / "new.safetensors")
    _git(repo, "add", "models/new.safetensors")
    result = _try_repo(repo, "rnndiag-system", tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "models/new.safetensors" in result.stdout
