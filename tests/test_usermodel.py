"""`--model`: user-style models vs plain autograd on hand-unrolled loops (float64).

The oracles rebuild each model's computation with nn.*Cell modules (or the user's own loop),
call retain_grad() on every state and backpropagate the same loss; per-step norms and the
mini-batch clip norms must match. The model must be untouched by the diagnosis.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from rnndiag import check_model
from rnndiag.cli import main
from rnndiag.records import FileDiagnosis
from rnndiag.usermodel import capture
from tests import clip_oracle, credit_oracle
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT))
from sample_models.user_models import Decoder, Tagger  # noqa: E402

B, T = 6, 9


class TwoModules(nn.Module):
    """An LSTM encoder feeding a GRU decoder: two recurrent submodules, no task loss."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.LSTM(3, 5, batch_first=True)
        self.dec = nn.GRU(5, 4, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.enc(x)
        out, _ = self.dec(out)
        return out


def _norms(grads: list[Tensor]) -> list[float]:
    return [float(g.double().norm()) for g in grads]


def _run(model: nn.Module, inputs: Tensor, targets: Tensor | None, tmp_path: Path,
         ) -> FileDiagnosis:
    """The live-model API on a float64 model; the clip rule at a training batch size of 4."""
    return check_model(model, inputs, targets, dtype="float64", train_batch_size=4).files[0]


def _gru_unrolled(gru: nn.GRU, x: Tensor) -> tuple[Tensor, dict[tuple[int, str], list[Tensor]]]:
    """A batch-first GRU through GRUCell copies, keeping every state by time index."""
    states: dict[tuple[int, str], list[Tensor]] = {}
    layer_in = x
    for layer in range(gru.num_layers):
        outs = []
        for d, suffix in (("forward", ""), ("reverse", "_reverse"))[: 1 + gru.bidirectional]:
            cell = nn.GRUCell(layer_in.shape[2], gru.hidden_size, dtype=torch.float64)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                setattr(cell, name, getattr(gru, f"{name}_l{layer}{suffix}"))
            h = x.new_zeros(x.shape[0], gru.hidden_size)
            hs: list[Tensor] = [h] * x.shape[1]
            order = range(x.shape[1]) if d == "forward" else range(x.shape[1] - 1, -1, -1)
            for t in order:
                h = cell(layer_in[:, t], h)
                h.retain_grad()
                hs[t] = h
            states[(layer, d)] = hs
            outs.append(torch.stack(hs, dim=1))
        layer_in = torch.cat(outs, dim=2)
    return layer_in, states


def test_tagger_per_step_cross_entropy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tagger().double()
    tokens, labels = torch.randint(0, 20, (B, T)), torch.randint(0, 3, (B, T))
    got = _run(model, tokens, labels, tmp_path)
    [module] = got.modules
    assert module.spec.name == "rnn" and got.loss == "cross_entropy"
    # oracle 1: the total gradient of the mean cross-entropy over every step
    out, states = _gru_unrolled(model.rnn, model.embed(tokens))
    logits = model.head(out)
    F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1)).backward(retain_graph=True)
    for d in module.layers:
        want = _norms([h.grad for h in states[(d.layer, d.direction.value)]])
        assert d.grad_norm == pytest.approx(want, rel=1e-9)
        assert d.basis.value == "credit"
    # oracle 2: temporal credit. g = dL/dlogits; one row per credit pass, each example at
    # its assigned position (credit_oracle.assignments: 3 passes of 6 examples over the 9
    # positions), from <g at (b, s_b) for every b, logits>
    g = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1)),
                            logits, retain_graph=True)[0]
    everyone = [h for hs in states.values() for h in hs]

    def row(refs: list[int]) -> dict[tuple[int, str], list[Tensor]]:
        mask = torch.zeros(B, T, 1, dtype=torch.float64)
        for b, s in enumerate(refs):
            mask[b, s] = 1
        grads = torch.autograd.grad((logits * g * mask).sum(), everyone, retain_graph=True,
                                    allow_unused=True)
        flat = credit_oracle.zeros_for_none(grads, everyone)
        return {key: flat[i * T:(i + 1) * T] for i, key in enumerate(states)}

    passes = credit_oracle.assignments([[True] * T] * B, credit_oracle.positions(T))
    assert len(passes) == 3 and all(-1 not in refs for refs in passes)
    found = [(refs, row(refs)) for refs in passes]
    for d in module.layers:
        forward = d.direction.value == "forward"
        rows = [(refs, by_key[(d.layer, d.direction.value)], None) for refs, by_key in found]
        want, final, used, skipped = credit_oracle.ratio(rows, forward, T)
        assert d.final_step == final and (d.references, d.skipped_references) == (used, skipped)
        assert (used, skipped) == (3 * B, 0)
        assert d.ratio == pytest.approx(want, rel=1e-9)
        assert d.credit is not None and list(d.credit.positions) == credit_oracle.positions(T)
        assert sum(d.credit.examples) == 3 * B
        for s, got_norms in zip(d.credit.positions, d.credit.norms, strict=True):
            want_norms = credit_oracle.position_norms(rows, s)
            assert got_norms == pytest.approx(want_norms, rel=1e-9, abs=1e-300), s


def test_lstmcell_loop_with_mse(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = Decoder().double()
    x, y = torch.randn(B, T, 2, dtype=torch.float64), torch.randn(B, dtype=torch.float64)
    got = _run(model, x, y, tmp_path)
    [module] = got.modules
    [d] = module.layers
    assert module.spec.name == "cell" and module.seq_len == T and d.credit is None
    assert d.basis.value == "loss"
    hs, cs = [], []
    h = x.new_zeros(B, 12)
    c = torch.zeros_like(h)
    for t in range(T):
        h, c = model.cell(x[:, t], (h, c))
        h.retain_grad()
        c.retain_grad()
        hs.append(h)
        cs.append(c)
    F.mse_loss(model.head(h).squeeze(1), y).backward()
    assert d.grad_norm == pytest.approx(_norms([h.grad for h in hs]), rel=1e-9)
    assert d.cell_grad_norm == pytest.approx(_norms([c.grad for c in cs]), rel=1e-9)
    # clip: N_b at b = 4 from plain-autograd per-example gradients
    per_example = [torch.autograd.grad(F.mse_loss(model(x[[i]]), y[[i]]),
                                       list(model.parameters())) for i in range(B)]
    assert got.clip is not None and got.clip.parameters == "model" and got.clip.examples == B
    assert got.clip.expected_norm == pytest.approx(clip_oracle.expected_norm(per_example, 4),
                                                   rel=1e-9)


def test_two_modules_without_targets_use_the_objective(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = TwoModules().double()
    x = torch.randn(B, T, 3, dtype=torch.float64)
    got = _run(model, x, None, tmp_path)
    assert [m.spec.name for m in got.modules] == ["enc", "dec"]
    assert got.loss == "final_state_energy"
    enc_out, (h_enc, _) = model.enc(x)
    _, h_dec = model.dec(enc_out)
    want_loss = (h_enc.pow(2).sum() + h_dec.pow(2).sum()) / (2 * B)
    assert got.modules[0].loss == pytest.approx(float(want_loss.detach()), rel=1e-12)


def test_model_is_untouched(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = Tagger().double().train()
    model.head.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    tokens = torch.randint(0, 20, (B, T))
    with capture(model) as recording:
        model(tokens).sum().backward()
    assert recording.records[0].calls
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert "forward" not in vars(model.rnn) and not model.rnn._forward_hooks


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(["--model", "no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
     (["--model", "math:pi"], "is not callable"),
     (["--model", "collections:OrderedDict"], "not a torch.nn.Module"),
     (["--model", "sample_models.user_models:Decoder"], "does not fit the model: missing keys"),
     (["--model", "sample_models.user_models:Tagger", "--model-kwargs", "[1]"], "JSON object")],
    ids=["import", "not-callable", "not-a-module", "state-dict", "kwargs"],
)
def test_model_errors(args: list[str], fragment: str, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path, batch = tmp_path / "t.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in Tagger().state_dict().items()}, path)
    save_file({"inputs": torch.randint(0, 20, (2, 5))}, batch)
    code = main(["check", str(path), "--batch", str(batch), *args, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 2 and fragment in err and err.count("\n") == 1
    assert json.loads(out)["exit_code"] == 2


def test_model_rejecting_the_batch_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path, batch = tmp_path / "t.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in Tagger().state_dict().items()}, path)
    save_file({"inputs": torch.randint(0, 99, (2, 5))}, batch)  # ids beyond the vocabulary
    code = main(["check", str(path), "--batch", str(batch), "--model",
                 "sample_models.user_models:Tagger"])
    err = capsys.readouterr().err
    assert code == 2 and "the model rejected the batch: IndexError" in err


def l1_loss(output: Tensor, targets: Tensor) -> Tensor:
    """A custom loss for the --loss test (importable as tests.test_usermodel:l1_loss)."""
    return (output - targets).abs().mean()


def test_custom_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    torch.manual_seed(4)
    model = Decoder()
    path, batch = tmp_path / "d.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    x, y = torch.randn(4, 6, 2), torch.randn(4)
    save_file({"inputs": x, "targets": y}, batch)
    code = main(["check", str(path), "--batch", str(batch), "--model",
                 "sample_models.user_models:Decoder", "--loss", "tests.test_usermodel:l1_loss",
                 "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and doc["files"][0]["loss"] == "custom:tests.test_usermodel:l1_loss"
    want = float(l1_loss(model(x), y).detach())
    assert doc["files"][0]["modules"][0]["objective"]["value"] == pytest.approx(want, rel=1e-6)


def test_loss_without_model_is_an_option_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", str(ROOT / "sample_models" / "lstm_healthy.safetensors"), "--loss",
                 "tests.test_usermodel:l1_loss"])
    assert code == 2 and "--loss needs --model" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("targets", "fragment"),
    [(torch.randn(4, 3), "do not fit the model output"),
     (torch.randint(0, 3, (4,)), "cross-entropy needs"),
     (torch.randint(0, 3, (2,)), "differ in batch size")],
    ids=["float-shape", "int-shape", "batch-size"],
)
def test_targets_that_do_not_fit(targets: Tensor, fragment: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path, batch = tmp_path / "d.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in Decoder().state_dict().items()}, path)
    save_file({"inputs": torch.randn(4, 6, 2), "targets": targets}, batch)
    for fmt in ("text", "json"):
        code = main(["check", str(path), "--batch", str(batch), "--model",
                     "sample_models.user_models:Decoder", "--format", fmt])
        out, err = capsys.readouterr()
        assert code == 2 and fragment in err and err.count("\n") == 1


def test_model_mode_skips_lfs_pointers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    pointer, batch = tmp_path / "big.pt", tmp_path / "b.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    save_file({"inputs": torch.randn(2, 4, 2)}, batch)
    code = main(["check", str(pointer), "--batch", str(batch), "--model",
                 "sample_models.user_models:Decoder", "--format", "json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["files"][0]["status"] == "skipped"


def failing_loss(output: Tensor, targets: Tensor) -> Tensor:
    raise ValueError("shapes disagree")


def test_custom_loss_that_fails_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path, batch = tmp_path / "d.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in Decoder().state_dict().items()}, path)
    save_file({"inputs": torch.randn(4, 6, 2), "targets": torch.randn(4)}, batch)
    code = main(["check", str(path), "--batch", str(batch), "--model",
                 "sample_models.user_models:Decoder", "--loss",
                 "tests.test_usermodel:failing_loss"])
    err = capsys.readouterr().err
    assert code == 2 and "failed: ValueError: shapes disagree" in err
    assert err.count("\n") == 1


def test_a_state_hook_given_no_gradient_counts_it_as_zero() -> None:
    """Autograd may hand a tensor hook None (no gradient reached the state, as seen on a GPU):
    the row is zero, not a crash."""
    from rnndiag.records import Direction
    from rnndiag.replay import Chain

    chain = Chain(0, Direction.FORWARD)
    states = [torch.ones(2, 3, requires_grad=True) * k for k in (1.0, 2.0)]
    for t, h in enumerate(states):
        chain.watch("dh", t, h)
    chain.open()
    chain._write("dh", 0, None)
    chain._write("dh", 1, torch.full((2, 3), 5.0))
    found = chain.close()
    assert found.dh[0].abs().sum() == 0 and bool((found.dh[1] == 5.0).all())
