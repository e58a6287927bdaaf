"""How checkpoint mode feeds each module: the embedding chosen only when certain (or an
announced guess), --embedding, stacked modules chained, synthetic inputs said so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rnndiag.cli import main
from rnndiag.routes import replay
from rnndiag.usermodel import spec_of


class EncoderDecoder(nn.Module):
    """Two same-width embeddings: each feeds the LSTM beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"embed": nn.Embedding(7, 4), "rnn": nn.LSTM(4, 5)})
        self.dec = nn.ModuleDict({"embed": nn.Embedding(9, 4), "rnn": nn.LSTM(4, 5)})


class Stacked(nn.Module):
    """Single-layer LSTMs stacked by hand, fed token ids: only the first reads the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn_1 = nn.LSTM(6, 8, batch_first=True)
        self.rnn_2 = nn.LSTM(8, 8, batch_first=True)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return str(path)


def _json(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    code = main(["check", *args, "--format", "json", "--seq-len", "12", "--batch-size", "3"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_same_width_embeddings_feed_their_own_module(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    path = _save(EncoderDecoder().state_dict(), tmp_path / "m.safetensors")
    code, doc, err = _json([path], capsys)
    assert code in (0, 1), err
    got = {m["name"]: (m["embedding"], m["embedding_wiring"]) for m in doc["files"][0]["modules"]}
    assert got == {"enc.rnn": ("enc.embed.weight", "same-parent"),
                   "dec.rnn": ("dec.embed.weight", "same-parent")}


def test_equals_are_refused_and_the_option_chooses(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    tensors = {"embed_a.weight": torch.randn(7, 4), "embed_b.weight": torch.randn(9, 4),
               **{f"rnn.{k}": v for k, v in nn.GRU(4, 5).state_dict().items()}}
    path = _save(tensors, tmp_path / "m.safetensors")
    code, doc, err = _json([path], capsys)
    [m] = doc["files"][0]["modules"]
    assert m["embedding"] is None and m["embedding_candidates"] == ["embed_a.weight",
                                                                    "embed_b.weight"]
    assert "no embedding chosen" in m["inputs"] and "--embedding rnn=TENSOR" in m["inputs"]
    batch = _save({"inputs": torch.randint(0, 7, (3, 12))}, tmp_path / "b.safetensors")
    code, doc, err = _json([path, "--batch", batch], capsys)
    assert code == 2 and "does not guess between embed_a.weight, embed_b.weight" in err
    code, doc, err = _json([path, "--batch", batch, "--embedding", "rnn=embed_b.weight"], capsys)
    assert code in (0, 1), err
    [m] = doc["files"][0]["modules"]
    assert (m["embedding"], m["embedding_wiring"]) == ("embed_b.weight", "option")
    for bad, fragment in (("rnn=nope.weight", "not in the file"), ("gru=embed_a.weight",
                                                                  "no recurrent module"),
                          ("rnn", "MODULE=TENSOR")):
        code, _, err = _json([path, "--embedding", bad], capsys)
        assert code == 2 and fragment in err and err.count("\n") == 1


def test_an_embedding_feeding_a_convolution_is_not_the_rnns_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    tensors = {"embed.weight": torch.randn(20, 16),
               **{f"conv.{k}": v for k, v in nn.Conv1d(16, 16, 3).state_dict().items()},
               **{f"lstm.{k}": v for k, v in nn.LSTM(16, 8).state_dict().items()}}
    path = _save(tensors, tmp_path / "m.safetensors")
    code, doc, err = _json([path], capsys)
    [m] = doc["files"][0]["modules"]
    assert m["embedding"] is None and m["inputs"].startswith("synthetic N(0, 1)")
    batch = _save({"inputs": torch.randint(0, 20, (3, 12))}, tmp_path / "b.safetensors")
    code, _, err = _json([path, "--batch", batch], capsys)
    assert code == 2 and "may feed a convolution" in err


def test_stacked_modules_with_a_token_batch_are_chained(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = Stacked().double()
    path = _save(model.state_dict(), tmp_path / "m.safetensors")
    tokens = torch.randint(0, 11, (3, 12))
    batch = _save({"inputs": tokens}, tmp_path / "b.safetensors")
    code, doc, err = _json([path, "--batch", batch, "--dtype", "float64"], capsys)
    assert code in (0, 1), err
    f = doc["files"][0]
    first, second = f["modules"]
    assert first["embedding"] == "embed.weight"
    assert second["inputs"].startswith("outputs of module 'rnn_1'")
    assert any("rnn_2: fed the outputs of 'rnn_1'" in n for n in f["notes"])
    # oracle: rnn_2 replayed on rnn_1's own outputs
    with torch.no_grad():
        out1, _ = model.rnn_1(model.embed(tokens))
    params = dict(model.rnn_2.named_parameters())
    want = replay(spec_of("rnn_2", model.rnn_2), params, out1)
    norms = [float(x) for x in want.adjoints[0].dh.norm(dim=(1, 2))]
    assert second["layers"][0]["grad_norm"] == pytest.approx(norms, rel=1e-10)


def test_unchainable_module_gets_synthetic_inputs_said_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    tensors = {"embed.weight": torch.randn(11, 6),
               **{f"a.{k}": v for k, v in nn.GRU(6, 8).state_dict().items()},
               **{f"b.{k}": v for k, v in nn.GRU(6, 8).state_dict().items()},
               **{f"c.{k}": v for k, v in nn.GRU(8, 8).state_dict().items()}}
    path = _save(tensors, tmp_path / "m.safetensors")
    batch = _save({"inputs": torch.randint(0, 11, (3, 12))}, tmp_path / "b.safetensors")
    code, doc, err = _json([path, "--batch", batch], capsys)
    assert code in (0, 1), err
    f = doc["files"][0]
    c = next(m for m in f["modules"] if m["name"] == "c")
    assert c["inputs"].startswith("synthetic N(0, 1)") and c["batch_size"] == 3
    assert any(n.startswith("c: fed synthetic N(0, 1)") and "several modules" in n
               for n in f["notes"])
