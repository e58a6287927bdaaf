"""Loading and discovery end to end: containers and wrapper prefixes as training code writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rnndiag.checkpoint import load_checkpoint
from rnndiag.diagnose import checkpoint_modules
from rnndiag.errors import CheckpointError
from rnndiag.records import ModuleKind


class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.encoder = nn.ModuleDict({"rnn": nn.GRU(4, 6, 2, bidirectional=True)})
        self.decoder = nn.LSTMCell(12, 5)
        self.lstm = nn.LSTM(3, 7, proj_size=2, bias=False)
        self.head = nn.Linear(5, 11)


def _sd(prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in Seq2Seq().state_dict().items()}


CONTAINERS: dict[str, Any] = {
    "bare": lambda: _sd(),
    "dataparallel": lambda: _sd("module."),
    "compiled": lambda: {k.replace("encoder.", "encoder._orig_mod."): v
                         for k, v in _sd("_orig_mod.").items()},
    "lightning": lambda: {"epoch": 3, "global_step": 10, "state_dict": _sd(),
                          "hyper_parameters": {"lr": 0.1}, "optimizer_states": []},
    "model_state_dict": lambda: {"model_state_dict": _sd("module."), "epoch": 1},
    "model": lambda: {"model": _sd(), "args": {"hidden": 6}},
    "nested": lambda: {"encoder": {"rnn": {k.removeprefix("encoder.rnn."): v
                                           for k, v in _sd().items()
                                           if k.startswith("encoder.rnn.")}},
                       **{k: v for k, v in _sd().items() if not k.startswith("encoder.")}},
}


@pytest.mark.parametrize("layout", list(CONTAINERS))
def test_torch_containers_and_prefixes(tmp_path: Path, layout: str) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(CONTAINERS[layout](), path)
    specs = {s.name: s for s in checkpoint_modules(load_checkpoint(path), None)}
    assert sorted(specs) == ["decoder", "encoder.rnn", "lstm"]
    gru, cell, lstm = specs["encoder.rnn"], specs["decoder"], specs["lstm"]
    assert (gru.kind, gru.input_size, gru.hidden_size, gru.num_layers, gru.bidirectional,
            gru.bias, gru.embedding) == (ModuleKind.GRU, 4, 6, 2, True, True, "embed.weight")
    assert (cell.kind, cell.input_size, cell.hidden_size) == (ModuleKind.LSTM_CELL, 12, 5)
    assert (lstm.kind, lstm.proj_size, lstm.bias) == (ModuleKind.LSTM, 2, False)


def test_safetensors_with_metadata(tmp_path: Path) -> None:
    rnn = nn.RNN(3, 4, nonlinearity="relu")
    path = tmp_path / "m.safetensors"
    save_file({f"net.rnn.{k}": v.contiguous() for k, v in rnn.state_dict().items()}, path,
              metadata={"rnndiag.nonlinearity.net.rnn": "relu"})
    [spec] = checkpoint_modules(load_checkpoint(path), None)
    assert (spec.name, spec.nonlinearity) == ("net.rnn", "relu")
    [spec] = checkpoint_modules(load_checkpoint(path), "tanh")  # the option wins
    assert spec.nonlinearity == "tanh"


def test_wrapper_collision_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"module.w": torch.zeros(1), "w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="collide"):
        load_checkpoint(path)


def test_unsafe_pickle_is_refused_without_side_effect(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"rnn.weight_ih_l0": torch.zeros(4, 3), "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_passes_weights_only_explicitly(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Any]] = []
    real = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tmp_path / "m.pt"
    torch.save(_sd(), path)
    before = path.read_bytes()
    load_checkpoint(path)
    assert seen and all(kw.get("weights_only") is True for kw in seen)
    assert path.read_bytes() == before
