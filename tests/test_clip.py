"""The clip rule (rnndiag.clip): N_b against the norms of real mini-batches, the step cap,
optimizer awareness, and where every input came from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema
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


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(3)
    rnn = {"tanh": lambda: nn.RNN(2, 3, batch_first=True),
           "relu": lambda: nn.RNN(2, 3, nonlinearity="relu", batch_first=True),
           "lstm": lambda: nn.LSTM(2, 2, batch_first=True),
           "gru": lambda: nn.GRU(2, 3, batch_first=True)}[kind]()

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = rnn
            self.head = nn.Linear(rnn.hidden_size, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out[:, -1]).squeeze(1)

    return Tiny().double()


@pytest.mark.parametrize("kind", ["tanh", "relu", "lstm", "gru"])
def test_top_curvature_matches_the_dense_hessian(kind: str) -> None:
    """Power iteration on Hessian-vector products through the model against the largest
    |eigenvalue| of the dense Hessian (torch.autograd.functional.hessian)."""
    model = _tiny(kind)
    x, y = _data(6, seed=4)
    x = x[:, :5]
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def flat_loss(theta: torch.Tensor) -> torch.Tensor:
        shaped, at = {}, 0
        for name, p in zip(names, params, strict=True):
            shaped[name] = theta[at:at + p.numel()].view_as(p)
            at += p.numel()
        return F.mse_loss(torch.func.functional_call(model, shaped, (x,)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    want = clip_oracle.top_curvature(flat_loss, theta)
    got = clip.top_curvature(lambda: F.mse_loss(model(x), y), params)
    assert got == pytest.approx(want, rel=1e-3), (got, want)


def test_top_curvature_is_the_largest_eigenvalue_and_zero_for_linear() -> None:
    """Closed form: loss = 0.5 θᵀAθ with eigenvalues -5, 1, 2 has lambda 2 (the most
    negative one is larger in magnitude, and irrelevant to stability); a loss linear in θ
    has none."""
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([-5.0, 1.0, 2.0], dtype=torch.float64)) @ q.T
    assert clip.top_curvature(lambda: 0.5 * theta @ a @ theta, [theta]) == \
        pytest.approx(2.0, rel=1e-9)
    assert clip.top_curvature(lambda: (3.0 * theta).sum(), [theta]) == 0.0


def test_curvature_cap_is_the_stability_edge() -> None:
    """c = min(N_b, step cap, 2 N_b/(lambda lr)); the curvature cap only for SGD-family."""
    gram = torch.eye(4, dtype=torch.float64) * 100.0  # N_1 = 10
    sgd = clip.suggest(gram, (), 1, "sgd", 0.01, 1e4, "model", 1, False, curvature=1e3)
    assert sgd.curvature_cap == pytest.approx(2 * 10.0 / (1e3 * 0.01))  # 2.0, below cap 5000
    assert sgd.suggested_max_norm == pytest.approx(2.0) and sgd.decided_by == "curvature_cap"
    assert "stability edge" in sgd.advice
    # lr * lambda <= 2: unclipped SGD is stable on the quadratic model, the cap is above N_b
    calm = clip.suggest(gram, (), 1, "sgd", 0.01, 1e4, "model", 1, False, curvature=100.0)
    assert calm.curvature_cap == pytest.approx(20.0) and calm.decided_by == "expected_norm"
    adam = clip.suggest(gram, (), 1, "adam", 0.01, 1e4, "model", 1, False, curvature=1e3)
    assert adam.curvature_cap is None and adam.suggested_max_norm == pytest.approx(10.0)


def test_an_exploding_model_under_the_step_cap_is_told_what_the_cap_cannot_do() -> None:
    gram = torch.eye(4, dtype=torch.float64) * 1e20  # N_1 = 1e10: the step cap decides
    hot = clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True)
    assert hot.decided_by == "step_cap" and "learned little" in hot.advice
    assert "change the cell" in hot.advice
    calm = clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, False)
    assert calm.decided_by == "step_cap" and "explodes" not in calm.advice
    settled = clip.suggest(torch.eye(4, dtype=torch.float64), (), 1, "sgd", 0.01, 10.0,
                           "model", 1, True)  # N_b decides: no caveat about the cap
    assert settled.decided_by == "expected_norm" and "step cap" not in settled.advice


def test_curvature_cap_only_near_a_stationary_point() -> None:
    """Examples that agree on a slope (G/S > 1/2: training in transit) get no curvature cap;
    G is measured (coherence = G/S reported)."""
    one = torch.tensor([3.0, 4.0], dtype=torch.float64)
    agree = torch.stack([one, one * 1.1, one * 0.9, one])  # G/S ~ 0.99
    transit = clip.suggest(agree @ agree.T, (), 1, "sgd", 0.01, 1e4, "model", 1, False,
                           curvature=1e3)
    assert transit.curvature_cap is None and transit.decided_by == "expected_norm"
    assert "in transit" in transit.advice
    coherence = {i.name: i.value for i in transit.inputs}["coherence"]
    assert isinstance(coherence, float) and coherence > 0.9
    near = clip.suggest(torch.eye(4, dtype=torch.float64), (), 1, "sgd", 0.01, 1e4, "model",
                        1, False, curvature=1e3)  # orthogonal examples: G = 0
    assert near.decided_by == "curvature_cap"
    assert {i.name: i.value for i in near.inputs}["coherence"] == 0.0


def test_model_mode_reports_the_curvature_it_measured() -> None:
    torch.manual_seed(0)
    model = Regressor().double()
    x, y = _data(16, seed=1)
    c = rnndiag.check_model(model, x, y, lr=50.0, optimizer="sgd").files[0].clip
    assert c is not None and c.curvature_cap is not None and c.expected_norm is not None
    found = {i.name: (i.value, i.source) for i in c.inputs}
    lam, source = found["curvature"]
    assert source == "measured" and isinstance(lam, float)
    assert lam == pytest.approx(clip.top_curvature(lambda: F.mse_loss(model(x), y),
                                                   list(model.parameters())), rel=1e-6)
    assert c.curvature_cap == pytest.approx(2 * c.expected_norm / (lam * 50.0))
    assert c.suggested_max_norm == pytest.approx(min(c.expected_norm, c.step_cap or math.inf,
                                                     c.curvature_cap))
    adam = rnndiag.check_model(model, x, y, lr=0.1, optimizer="adam").files[0].clip
    assert adam is not None and "curvature" not in {i.name for i in adam.inputs}


class _NoSecond(torch.autograd.Function):
    """g -> 2g whose own backward raises, as kernels without a double backward do (cuDNN's
    RNN: "derivative for _cudnn_rnn_backward is not implemented")."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> torch.Tensor:
        return 2 * g

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gg: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("derivative for _no_second is not implemented")


class _Once(torch.autograd.Function):
    """x -> 2x with a backward that cannot itself be differentiated."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return _NoSecond.apply(grad)  # type: ignore[no-any-return, no-untyped-call]


def test_curvature_without_double_backward_is_reported_missing() -> None:
    class Once(Regressor):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(_Once.apply(out[:, -1])).squeeze(1)  # type: ignore[no-untyped-call]

    torch.manual_seed(0)
    x, y = _data(8, seed=1)
    c = rnndiag.check_model(Once().double(), x, y, lr=0.1, optimizer="sgd").files[0].clip
    assert c is not None and c.curvature_cap is None and c.expected_norm is not None
    assert {i.name: i.source for i in c.inputs}["curvature"] == "missing"


def test_an_exploding_gradient_divides_the_step_cap_by_the_sequence_length() -> None:
    """A relative change e of W_hh moves a T-step product of Jacobians by about T e: for a
    recurrence whose gradient explodes, the step cap keeps that product, not the parameters,
    within 0.5% (rho / T); the input `steps` says so. Healthy models, Adam and an unknown
    length keep the plain cap."""
    gram = torch.eye(4, dtype=torch.float64) * 1e20  # N_1 = 1e10: the cap decides
    hot = clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True, steps=100)
    assert hot.step_cap == pytest.approx(0.005 * 10.0 / 0.01 / 100)
    assert hot.suggested_max_norm == pytest.approx(0.05) and hot.decided_by == "step_cap"
    assert ("steps", 100.0, "batch") in [(i.name, i.value, i.source) for i in hot.inputs]
    for calm in (clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, False, steps=100),
                 clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True)):
        assert calm.step_cap == pytest.approx(5.0)
        assert "steps" not in [i.name for i in calm.inputs]
    adam = clip.suggest(gram, (), 1, "adam", 0.01, 10.0, "model", 1, True, steps=100)
    assert adam.step_cap is None
    no_loss = clip.suggest(None, (), 16, "sgd", 0.1, 3.0, "recurrent", 10, True, steps=50)
    assert no_loss.suggested_max_norm == pytest.approx(0.005 * 3.0 / 0.1 / 50)


def test_an_exploding_gradient_is_capped_by_the_loss() -> None:
    """The loss cap L / (lr N_b): a step's first-order loss decrease lr c N_b may not exceed
    the loss (Polyak's step size, floor 0). It applies only to an exploding model under an
    SGD-family optimizer with a known rate and a loss known to be >= 0; the loss is an input."""
    gram = torch.eye(4, dtype=torch.float64) * 1e20  # N_1 = 1e10
    hot = clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True, steps=100, loss=1e5)
    assert hot.loss_cap == pytest.approx(1e5 / (0.01 * 1e10))
    assert hot.suggested_max_norm == pytest.approx(1e-3) and hot.decided_by == "loss_cap"
    assert ("loss", 1e5, "measured") in [(i.name, i.value, i.source) for i in hot.inputs]
    assert "Polyak" in hot.advice and "change the cell" in hot.advice
    assert "learned little" in hot.advice
    loose = clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True, steps=100, loss=1e9)
    assert loose.loss_cap == pytest.approx(10.0) and loose.decided_by == "step_cap"
    for none in (clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, False, loss=1e5),
                 clip.suggest(gram, (), 1, "adam", 0.01, 10.0, "model", 1, True, loss=1e5),
                 clip.suggest(gram, (), 1, "sgd", None, 10.0, "model", 1, True, loss=1e5),
                 clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True),
                 clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True, loss=0.0),
                 clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True, loss=-3.0),
                 clip.suggest(gram, (), 1, "sgd", 0.01, 10.0, "model", 1, True,
                              loss=math.nan)):
        assert none.loss_cap is None and none.decided_by != "loss_cap"
        assert "loss" not in [i.name for i in none.inputs]


class _Exploding(nn.Module):
    """An IRNN well above the identity: its gradient grows through time."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(2, 8, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(8, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(1.3 * torch.eye(8))
            self.rnn.bias_hh_l0.zero_()
            self.rnn.bias_ih_l0.fill_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(1)


def test_model_mode_caps_an_exploding_model_by_its_task_loss() -> None:
    """In `--model` mode the loss cap is the batch's task loss, computed here independently,
    over lr N_b; a custom loss (floor unknown) gets none, with the same numbers otherwise."""
    torch.manual_seed(0)
    model = _Exploding().double()
    x = torch.rand(16, 30, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = x[:, :, 0].sum(1)
    d = rnndiag.check_model(model, x, y, lr=0.1, optimizer="sgd", train_batch_size=16)
    c = d.files[0].clip
    assert d.files[0].verdict is rnndiag.Verdict.EXPLODING
    assert c is not None and c.expected_norm is not None and c.loss_cap is not None
    with torch.no_grad():
        loss = float(F.mse_loss(model(x), y))
    assert {i.name: i.value for i in c.inputs}["loss"] == pytest.approx(loss, rel=1e-9)
    assert c.loss_cap == pytest.approx(loss / (0.1 * c.expected_norm), rel=1e-9)
    assert c.suggested_max_norm == pytest.approx(min(c.expected_norm, c.step_cap or math.inf,
                                                     c.loss_cap))
    doc = d.to_dict()["files"][0]["clip"]  # the JSON document carries it, as the schema says
    assert doc["loss_cap"] == c.loss_cap and {"name": "loss", "value": loss,
                                              "source": "measured"} in doc["inputs"]
    jsonschema.validate(d.to_dict(), json.loads(
        (Path(rnndiag.__file__).parent / "report.schema.json").read_text()),
        cls=jsonschema.Draft202012Validator)
    custom = rnndiag.check_model(model, x, y, lr=0.1, optimizer="sgd", train_batch_size=16,
                                 loss=F.mse_loss).files[0].clip
    assert custom is not None and custom.loss_cap is None
    assert "loss cap L/(lr*N_b) is not applied" in custom.advice
    assert "is not applied" not in c.advice
    assert custom.expected_norm == pytest.approx(c.expected_norm, rel=1e-9)
