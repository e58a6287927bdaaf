"""The clip rule (rnndiag.clip): N_b against the norms of real mini-batches, the step cap,
optimizer awareness, and where every input came from."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnndiag
from rnndiag import clip
from rnndiag.records import CheckOptions, TrainingState
from tests import clip_oracle


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 8, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(1)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, 2, generator=gen, dtype=torch.float64)
    return x, x[:, :, 0].sum(1) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("b", [1, 8, 32])
def test_expected_norm_matches_real_minibatches(b: int) -> None:
    """N_b from 64 examples predicts the RMS gradient norm of fresh training batches of b."""
    torch.manual_seed(0)
    model = Regressor().double()
    x, y = _data(64, seed=1)
    d = rnndiag.check_model(model, x, y, train_batch_size=b)
    nb = d.files[0].clip.expected_norm  # type: ignore[union-attr]
    assert nb is not None
    squares = []
    for k in range(300):  # fresh batches of b from the same distribution
        xb, yb = _data(b, seed=100 + k)
        grads = torch.autograd.grad(F.mse_loss(model(xb), yb), list(model.parameters()))
        squares.append(sum(float(g.pow(2).sum()) for g in grads))
    rms = math.sqrt(sum(squares) / len(squares))
    assert nb == pytest.approx(rms, rel=0.25), (nb, rms)


def test_expected_norm_formula_and_resampling() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(5, generator=gen, dtype=torch.float64) + 1.0] for _ in range(40)]
    flat = torch.stack([g[0] for g in grads])
    gram = flat @ flat.T
    for b in (1, 4, 16):
        nb, _, _ = clip.expected_norm(gram, b)
        assert nb == pytest.approx(clip_oracle.expected_norm(grads, b), rel=1e-12)
        norms = clip.resampled_norms(gram, b)
        # resampled batches (with replacement) have the right mean square, near N_b
        assert math.sqrt(float(norms.pow(2).mean())) == pytest.approx(nb, rel=0.15)


def test_rule_takes_the_smaller_of_norm_and_cap() -> None:
    gram = torch.eye(4, dtype=torch.float64) * 100.0  # S = 100, G = 0: N_1 = 10
    inputs = ()
    sgd = clip.suggest(gram, inputs, 1, "sgd", 0.01, 10.0, "model", 1, False)
    assert sgd.step_cap == pytest.approx(0.005 * 10.0 / 0.01)  # 5.0
    assert sgd.suggested_max_norm == pytest.approx(5.0) and sgd.decided_by == "step_cap"
    slow = clip.suggest(gram, inputs, 1, "sgd", 1e-5, 10.0, "model", 1, False)
    assert slow.suggested_max_norm == pytest.approx(10.0) and slow.decided_by == "expected_norm"
    adam = clip.suggest(gram, inputs, 1, "adam", 0.01, 10.0, "model", 1, True)
    assert adam.step_cap is None and adam.suggested_max_norm == pytest.approx(10.0)
    assert "not the fix" in adam.advice and "slows training" in adam.advice


def test_without_a_task_loss_only_the_cap_or_nothing() -> None:
    none = clip.suggest(None, (), 16, None, None, 3.0, "recurrent", 10, False)
    assert none.suggested_max_norm is None and none.decided_by == "none"
    assert "--lr" in none.advice and "--model with targets" in none.advice
    cap = clip.suggest(None, (), 16, "sgd", 0.1, 3.0, "recurrent", 10, False)
    assert cap.suggested_max_norm == pytest.approx(0.15) and cap.expected_norm is None


def test_inputs_say_where_they_came_from() -> None:
    chosen = clip.clip_inputs(CheckOptions(), None, 16)
    assert [(i.name, i.value, i.source) for i in chosen.inputs] == [
        ("train_batch_size", 16, "batch"), ("optimizer", None, "missing"),
        ("lr", None, "missing")]
    chosen = clip.clip_inputs(CheckOptions(lr=0.5, train_batch_size=64,
                                           from_config=("train_batch_size",)),
                              TrainingState("adam", 1e-3), 16)
    assert [(i.name, i.value, i.source) for i in chosen.inputs] == [
        ("train_batch_size", 64, "config"), ("optimizer", "adam", "checkpoint"),
        ("lr", 0.5, "option")]


def test_checkpoint_mode_reports_no_norm_from_the_objective(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import SAMPLES

    d = rnndiag.check_files([SAMPLES / "rnn_tanh_vanishing.safetensors"], seq_len=20)
    c = d.files[0].clip
    assert c is not None and c.suggested_max_norm is None and c.expected_norm is None
    d = rnndiag.check_files([SAMPLES / "rnn_tanh_vanishing.safetensors"], seq_len=20,
                            lr=0.01, optimizer="sgd")
    c = d.files[0].clip
    assert c is not None and c.decided_by == "step_cap" and c.suggested_max_norm is not None
    assert {i.name: i.source for i in c.inputs}["lr"] == "option"
