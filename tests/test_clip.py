"""Clip suggestion: the statistics, and checkpoint-mode mini-batch norms vs plain autograd."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rnndiag import clip
from rnndiag.diagnose import diagnose_files
from rnndiag.errors import OptionError
from rnndiag.records import CheckOptions


@pytest.mark.parametrize("q", [0, 10, 37.5, 50, 90, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    assert clip.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_suggestion_fields() -> None:
    s = clip.suggest([1.0, 2.0, 3.0, 10.0], 50, "model", 7)
    assert s.suggested_max_norm == 2.5 and s.mean == 4.0
    assert s.pascanu_band == (2.0, 40.0) and s.max == 10.0
    assert s.autoclip_p10 == pytest.approx(1.3)
    assert s.fraction_clipped == 0.5 and s.batches == 4 and s.parameter_count == 7


def test_batches_option_bounds() -> None:
    assert clip.batches_for(None, 5) == 5 and clip.batches_for(None, 32) == 8
    with pytest.raises(OptionError, match="between 1 and the batch size 4"):
        clip.batches_for(5, 4)


@pytest.mark.parametrize("kind", ["lstm-proj-bi", "gru-2layer", "rnn-relu"])
def test_checkpoint_mode_norms_equal_autograd(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    module: nn.Module = {
        "lstm-proj-bi": lambda: nn.LSTM(3, 6, proj_size=2, bidirectional=True,
                                        batch_first=True, dtype=torch.float64),
        "gru-2layer": lambda: nn.GRU(3, 5, num_layers=2, batch_first=True,
                                     dtype=torch.float64),
        "rnn-relu": lambda: nn.RNN(3, 4, nonlinearity="relu", batch_first=True,
                                   dtype=torch.float64),
    }[kind]()
    path, batch = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    save_file({f"net.{k}": v.contiguous() for k, v in module.state_dict().items()}, path)
    x = torch.randn(10, 7, 3, dtype=torch.float64)
    save_file({"inputs": x}, batch)
    nl = "relu" if kind == "rnn-relu" else None
    [f] = diagnose_files([path], CheckOptions(batch_path=str(batch), dtype="float64",
                                              clip_batches=4, nonlinearity=nl))
    assert f.clip is not None and f.clip.parameters == "recurrent"
    want = []
    for idx in torch.tensor_split(torch.arange(10), 4):
        _, state = module(x[idx])
        h_n = state[0] if isinstance(state, tuple) else state
        top = h_n[-(2 if kind == "lstm-proj-bi" else 1):]
        loss = top.pow(2).sum() / (2 * len(idx))
        grads = torch.autograd.grad(loss, list(module.parameters()))
        want.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
    assert list(f.clip.norms) == pytest.approx(want, rel=1e-10)
    assert f.clip.parameter_count == sum(p.numel() for p in module.parameters())


CELL_CASES = {
    "lstmcell": lambda: nn.LSTMCell(3, 5, dtype=torch.float64),
    "grucell-nobias": lambda: nn.GRUCell(3, 4, bias=False, dtype=torch.float64),
    "rnncell": lambda: nn.RNNCell(3, 4, dtype=torch.float64),
    "lstm-nobias-2layer-bi": lambda: nn.LSTM(3, 4, num_layers=2, bias=False, bidirectional=True,
                                             batch_first=True, dtype=torch.float64),
    "rnn-tanh-bi": lambda: nn.RNN(3, 4, bidirectional=True, batch_first=True,
                                  dtype=torch.float64),
}


@pytest.mark.parametrize("kind", list(CELL_CASES))
def test_fast_norms_equal_fused_autograd(tmp_path: Path, kind: str) -> None:
    """The adjoint-derived norms vs autograd on rnndiag.fused's modules (cells: unrolled)."""
    from rnndiag.checkpoint import load_checkpoint
    from rnndiag.diagnose import checkpoint_modules
    from tests import fused_oracle as fused

    torch.manual_seed(1)
    module = CELL_CASES[kind]()
    path, batch = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    save_file({f"m.{k}": v.contiguous() for k, v in module.state_dict().items()}, path)
    x = torch.randn(7, 6, 3, dtype=torch.float64)
    save_file({"inputs": x}, batch)
    [f] = diagnose_files([path], CheckOptions(batch_path=str(batch), dtype="float64",
                                              clip_batches=3))
    [spec] = checkpoint_modules(load_checkpoint(path), None)
    params = {k.removeprefix("m."): v for k, v in module.state_dict().items()}
    built = fused.build(spec, params)
    want = clip.minibatch_norms(lambda rows: fused.objective_on(spec, built, x[rows]),
                                list(built.parameters()), 7, 3)
    assert f.clip is not None
    assert list(f.clip.norms) == pytest.approx(want, rel=1e-10)
