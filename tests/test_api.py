"""The public Python API: same numbers and JSON as the CLI, any call structure, the model left
exactly as it was (also after an error)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

import rnndiag
from rnndiag.cli import main
from tests.conftest import ROOT, SAMPLES

sys.path.insert(0, str(ROOT))
from sample_models.user_models import Decoder, Tagger  # noqa: E402

B, T = 5, 7


def _snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything check_model promises to leave as it was."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "devices": {k: v.device for k, v in model.state_dict().items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "grads": {n: None if p.grad is None else p.grad.clone()
                  for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks),
                      len(m._backward_hooks)) for n, m in model.named_modules()},
        "patched": {n: "forward" in vars(m) for n, m in model.named_modules()},
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in ("dtypes", "devices", "modes", "requires_grad", "hooks", "patched"):
        assert a[key] == b[key], key
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    for k, g in a["grads"].items():
        assert (g is None) == (b["grads"][k] is None), k
        if g is not None:
            assert torch.equal(g, b["grads"][k]), k


def test_readme_example_runs() -> None:
    """The README's "Python API" example, as written there."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    code = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert code.returncode == 0, code.stderr
    assert code.stdout.strip().splitlines()[0] in ("healthy", "vanishing", "exploding")


def test_import_does_not_import_torch() -> None:
    code = "import sys, rnndiag; rnndiag.check_model; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_public_names() -> None:
    for name in rnndiag.__all__:
        assert getattr(rnndiag, name) is not None, name


def _normalised(doc: dict[str, Any]) -> dict[str, Any]:
    """Drop what names the source (path, format, batch file, options): the rest must agree."""
    doc = json.loads(json.dumps(doc))
    doc.pop("options")
    for f in doc["files"]:
        f.pop("path"), f.pop("format"), f["batch"].pop("source")
    for x in doc["findings"]:
        x.pop("path")
    for a in doc["advice"]:
        for ev in a["evidence"]:
            ev.pop("path")
    return doc


def test_check_model_json_equals_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = Tagger()
    tokens, labels = torch.randint(0, 20, (B, T)), torch.randint(0, 3, (B, T))
    path, batch = tmp_path / "tagger.safetensors", tmp_path / "batch.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    save_file({"inputs": tokens, "targets": labels}, batch)
    monkeypatch.chdir(ROOT)
    code = main(["check", str(path), "--batch", str(batch), "--model",
                 "sample_models.user_models:Tagger", "--format", "json"])
    cli = json.loads(capsys.readouterr().out)
    got = rnndiag.check_model(model, tokens, labels)
    assert got.exit_code == code == cli["exit_code"]
    assert got.verdict is not None and got.verdict.value == cli["verdict"]
    assert _normalised(json.loads(got.to_json())) == _normalised(cli)
    assert got.to_dict()["schema_version"] == cli["schema_version"]
    schema = json.loads((ROOT / "rnndiag" / "report.schema.json").read_text())
    for doc in (json.loads(got.to_json()), cli):  # the API's document ("format": "module") too
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def test_check_files_equals_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    sample = str(SAMPLES / "rnn_tanh_vanishing.safetensors")
    batch = str(SAMPLES / "adding_batch.safetensors")
    code = main(["check", sample, "--batch", batch, "--format", "json"])
    cli = capsys.readouterr().out
    got = rnndiag.check_files([sample], batch=batch)
    assert got.to_json() == cli and got.exit_code == code == 1
    assert "VANISHING" in got.to_text()
    main(["check", sample, "--batch", batch, "--format", "sarif"])
    assert got.to_sarif() == capsys.readouterr().out


def test_inspect_files_equals_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    sample = str(SAMPLES / "gru_bidir_2layer.pt")
    code = main(["inspect", sample, "--format", "json"])
    got = rnndiag.inspect_files([sample])
    assert got.to_json() == capsys.readouterr().out and got.exit_code == code == 0
    assert "GRU" in got.to_text()


class Seq2Seq(nn.Module):
    """`forward(src, tgt)`: an LSTM encoder whose final state starts an LSTMCell decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.LSTM(3, 6, batch_first=True)
        self.dec = nn.LSTMCell(2, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        _, (h, c) = self.enc(src)
        h, c = h[0], c[0]
        outs = []
        for t in range(tgt.shape[1]):
            h, c = self.dec(tgt[:, t], (h, c))
            outs.append(self.head(h))
        return torch.stack(outs, dim=1)


def _seq2seq_oracle(model: Seq2Seq, src: Tensor, tgt: Tensor, y: Tensor,
                    ) -> tuple[list[float], list[float]]:
    """Plain autograd on a hand-unrolled loop: ||dL/dh_t|| of the encoder and the decoder."""
    cell = nn.LSTMCell(3, 6, dtype=torch.float64)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        setattr(cell, name, getattr(model.enc, f"{name}_l0"))
    h = src.new_zeros(src.shape[0], 6)
    c = torch.zeros_like(h)
    enc = []
    for t in range(src.shape[1]):
        h, c = cell(src[:, t], (h, c))
        h.retain_grad()
        enc.append(h)
    dec, outs = [], []
    for t in range(tgt.shape[1]):
        h, c = model.dec(tgt[:, t], (h, c))
        h.retain_grad()
        dec.append(h)
        outs.append(model.head(h))
    F.mse_loss(torch.stack(outs, dim=1), y).backward()
    return ([float(x.grad.norm()) for x in enc],  # type: ignore[union-attr]
            [float(x.grad.norm()) for x in dec])  # type: ignore[union-attr]


def test_two_positional_inputs_and_a_cell_decoder() -> None:
    torch.manual_seed(1)
    model = Seq2Seq().double()
    src, tgt = torch.randn(B, T, 3, dtype=torch.float64), torch.randn(B, 4, 2,
                                                                      dtype=torch.float64)
    y = torch.randn(B, 4, 2, dtype=torch.float64)
    got = rnndiag.check_model(model, (src, tgt), y)
    enc, dec = got.files[0].modules
    assert (enc.spec.name, dec.spec.name) == ("enc", "dec") and dec.seq_len == 4
    want_enc, want_dec = _seq2seq_oracle(model, src, tgt, y)
    assert enc.layers[0].grad_norm == pytest.approx(want_enc, rel=1e-10)
    assert dec.layers[0].grad_norm == pytest.approx(want_dec, rel=1e-10)
    # the same call as keyword arguments
    again = rnndiag.check_model(model, {"src": src, "tgt": tgt}, y)
    assert again.to_json() == got.to_json()


def test_batch_file_positional_and_keyword_inputs(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`inputs.0`, `inputs.1` and `inputs.<name>` in a batch file call model(*args, **kw)."""
    torch.manual_seed(2)
    model = Seq2Seq()
    src, tgt, y = torch.randn(B, T, 3), torch.randn(B, 4, 2), torch.randn(B, 4, 2)
    path = tmp_path / "s2s.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    monkeypatch.chdir(ROOT)
    want = json.loads(rnndiag.check_model(model, (src, tgt), y).to_json())
    for i, tensors in enumerate(({"inputs.0": src, "inputs.1": tgt, "targets": y},
                                 {"inputs.0": src, "inputs.tgt": tgt, "targets": y},
                                 {"inputs.src": src, "inputs.tgt": tgt, "targets": y})):
        batch = tmp_path / f"b{i}.safetensors"
        save_file(tensors, batch)
        main(["check", str(path), "--batch", str(batch), "--model", "tests.test_api:Seq2Seq",
              "--format", "json"])
        got = json.loads(capsys.readouterr().out)
        assert got["files"][0]["status"] == "ok", got["errors"]
        assert _normalised(got) == _normalised(want)


class Siamese(nn.Module):
    """One LSTMCell run over two sequences, each from a zero state."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(2, 4)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        finals = []
        for x in (a, b):
            h = x.new_zeros(x.shape[0], 4)
            c = torch.zeros_like(h)
            for t in range(x.shape[1]):
                h, c = self.cell(x[:, t], (h, c))
            finals.append(h)
        return (finals[0] - finals[1]).pow(2).sum(1)


def test_a_shared_cell_on_two_sequences_is_two_chains() -> None:
    torch.manual_seed(3)
    model = Siamese()
    got = rnndiag.check_model(model, (torch.randn(B, 6, 2), torch.randn(B, 9, 2)),
                              torch.randn(B))
    first, second = got.files[0].modules
    assert (first.spec.name, first.seq_len) == ("cell", 6)
    assert (second.spec.name, second.seq_len) == ("cell#2", 9)


class Stateful(nn.Module):
    """Keeps its last hidden state between calls, as some streaming models do."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(2, 3, batch_first=True)
        self.hidden: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        out, self.hidden = self.rnn(x, self.hidden)
        return out[:, -1]


def test_stateful_model_is_restored() -> None:
    torch.manual_seed(4)
    model = Stateful()
    got = rnndiag.check_model(model, torch.randn(B, T, 2), torch.randn(B, 3))
    assert got.files[0].status.value == "ok"  # every call (replay, clip) started from None
    assert model.hidden is None
    model.hidden = torch.zeros(1, B, 3)
    before = model.hidden
    rnndiag.check_model(model, torch.randn(B, T, 2), torch.randn(B, 3))
    assert model.hidden is before


@pytest.mark.parametrize("dtype", [None, "float64"])
def test_model_untouched(dtype: str | None) -> None:
    torch.manual_seed(5)
    model = Tagger().train()
    model.head.eval()
    model.embed.weight.requires_grad_(False)
    model(torch.randint(0, 20, (2, 3))).sum().backward()  # leave .grad on the parameters
    handle = model.rnn.register_forward_hook(lambda *a: None)  # a user's own hook stays
    before = _snapshot(model)
    got = rnndiag.check_model(model, torch.randint(0, 20, (B, T)),
                              torch.randint(0, 3, (B, T)), dtype=dtype)
    assert got.files[0].modules[0].layers[0].verdict is not None
    _same(before, _snapshot(model))
    handle.remove()


def _raising_loss(output: Tensor, targets: Tensor) -> Tensor:
    raise ValueError("no")


@pytest.mark.parametrize("case", ["model-rejects-batch", "loss-raises", "targets-misfit"])
def test_model_untouched_after_an_error(case: str) -> None:
    torch.manual_seed(6)
    model = Decoder().train()
    before = _snapshot(model)
    x = torch.randn(B, T, 2)
    kwargs: dict[str, Any] = {
        "model-rejects-batch": {"inputs": torch.randn(B, T, 5), "targets": torch.randn(B)},
        "loss-raises": {"inputs": x, "targets": torch.randn(B), "loss": _raising_loss},
        "targets-misfit": {"inputs": x, "targets": torch.randn(B, 4)},
    }[case]
    with pytest.raises(rnndiag.RnnDiagError):
        rnndiag.check_model(model, **kwargs)
    _same(before, _snapshot(model))


def test_keyword_call_of_a_replayed_module() -> None:
    """`self.rnn(input=x, hx=h)` works while the module is replayed."""
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(2, 3, batch_first=True)

        def forward(self, x: Tensor) -> Tensor:
            out, _ = self.rnn(input=x, hx=x.new_zeros(1, x.shape[0], 3))
            return out

    got = rnndiag.check_model(Keyword(), torch.randn(B, T, 2))
    assert got.files[0].modules[0].seq_len == T


def test_system_exit_in_the_model_is_an_error_not_an_exit() -> None:
    class Exits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(2, 3)

        def forward(self, x: Tensor) -> Tensor:
            raise SystemExit(0)

    with pytest.raises(rnndiag.RnnDiagError, match="SystemExit"):
        rnndiag.check_model(Exits(), torch.randn(B, T, 2))
