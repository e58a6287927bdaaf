"""Test oracle: PyTorch's own fused modules built from a ModuleSpec and a checkpoint's weights.

The clip tests compute mini-batch gradient norms with these and plain autograd, as the oracle
of rnndiag.pergrad (which derives them from the replay's captured adjoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from rnndiag.records import ModuleKind, ModuleSpec
from rnndiag.replay import objective, unroll, zero_states


def build(spec: ModuleSpec, params: Mapping[str, Tensor]) -> nn.Module:
    """nn.RNN/LSTM/GRU (batch-first) or nn.*Cell holding `params` (local names) as parameters."""
    like = next(iter(params.values()))
    kw: dict[str, Any] = {"bias": spec.bias, "dtype": like.dtype}
    module: nn.Module
    if spec.kind.is_cell:
        cls = {ModuleKind.RNN_CELL: nn.RNNCell, ModuleKind.LSTM_CELL: nn.LSTMCell,
               ModuleKind.GRU_CELL: nn.GRUCell}[spec.kind]
        if spec.kind is ModuleKind.RNN_CELL:
            kw["nonlinearity"] = spec.nonlinearity or "tanh"
        module = cls(spec.input_size, spec.hidden_size, **kw)
    else:
        kw.update(num_layers=spec.num_layers, bidirectional=spec.bidirectional,
                  batch_first=True)
        if spec.kind is ModuleKind.RNN:
            module = nn.RNN(spec.input_size, spec.hidden_size,
                            nonlinearity=spec.nonlinearity or "tanh", **kw)
        elif spec.kind is ModuleKind.LSTM:
            module = nn.LSTM(spec.input_size, spec.hidden_size, proj_size=spec.proj_size, **kw)
        else:
            module = nn.GRU(spec.input_size, spec.hidden_size, **kw)
    module.load_state_dict(dict(params), strict=True)
    return module


def objective_on(spec: ModuleSpec, module: nn.Module, inputs: Tensor) -> Tensor:
    """The final-state objective of `module` on `inputs` (B, T, I)."""
    batch = inputs.shape[0]
    if spec.kind.is_cell:  # no fused kernel for a cell loop: unroll with the same weights
        h0, c0 = zero_states(spec, batch, inputs)
        run = unroll(spec, dict(module.named_parameters()), inputs, h0, c0)
        return objective(run.finals(spec), batch)
    _, state = module(inputs)
    h_n = state[0] if isinstance(state, tuple) else state
    return objective(list(h_n[-len(spec.directions):]), batch)

