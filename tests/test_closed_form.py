"""Closed-form cases through the whole pipeline (file -> discovery -> replay -> analysis).

A tanh RNN with W_hh = rho * Q (Q orthogonal), zero biases and tiny inputs stays in tanh's
linear regime, so dL/dh_{t-1} = W_hh^T dL/dh_t exactly scales the norm by rho per step: the
ratio of consecutive norms and growth_per_step are rho. A ReLU RNN with W_hh = IN and positive
pre-activations passes the gradient back unchanged: growth_per_step is 1, verdict healthy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rnndiag.diagnose import diagnose_files
from rnndiag.records import CheckOptions, LayerDiagnosis

H, IN = 6, 3


def _single_layer(path: Path, options: CheckOptions) -> LayerDiagnosis:
    [f] = diagnose_files([path], options)
    assert f.error is None
    [module] = f.modules
    [layer] = module.layers
    return layer


@pytest.mark.parametrize("rho", [0.5, 0.9, 1.1])
def test_linear_regime_growth_is_rho(tmp_path: Path, rho: float) -> None:
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(H, H, dtype=torch.float64, generator=gen))
    tensors = {"rnn.weight_ih_l0": 1e-7 * torch.randn(H, IN, dtype=torch.float64, generator=gen),
               "rnn.weight_hh_l0": (rho * q).contiguous(),
               "rnn.bias_ih_l0": torch.zeros(H, dtype=torch.float64),
               "rnn.bias_hh_l0": torch.zeros(H, dtype=torch.float64)}
    path = tmp_path / "linear.safetensors"
    save_file(tensors, path)
    d = _single_layer(path, CheckOptions(dtype="float64", seq_len=40, batch_size=4))
    assert d.growth_per_step == pytest.approx(rho, rel=1e-6)
    s = d.state_grad_norm
    for t in range(1, len(s)):
        assert s[t - 1] / s[t] == pytest.approx(rho, rel=1e-6)
    assert d.sigma_max_hh == pytest.approx(rho, rel=1e-12)


def test_identity_relu_rnn_has_growth_one(tmp_path: Path) -> None:
    tensors = {"rnn.weight_ih_l0": torch.full((H, IN), 0.1, dtype=torch.float64),
               "rnn.weight_hh_l0": torch.eye(H, dtype=torch.float64)}
    path, batch = tmp_path / "irnn.safetensors", tmp_path / "batch.safetensors"
    save_file(tensors, path)
    save_file({"inputs": torch.rand(4, 50, IN, dtype=torch.float64) + 0.1}, batch)
    d = _single_layer(path, CheckOptions(batch_path=str(batch), nonlinearity="relu",
                                         dtype="float64"))
    assert d.growth_per_step == pytest.approx(1.0, abs=1e-9)
    assert d.verdict == "healthy" and d.horizon is None and d.spans == ()
    assert all(r == pytest.approx(1.0, abs=1e-12) for r in d.ratio)
