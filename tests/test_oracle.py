"""Replay vs an independent oracle: PyTorch's own nn.*Cell modules unrolled by hand, with
retain_grad() on every state, for every architecture the replay supports (float64).

Conventions checked: dh[t] (T, B, P) is the total dL/dh_t of a layer/direction by time index,
dc[t] the same for the LSTM cell state; L = 1/(2B) sum_b sum_d ||h_final^{top,d}_b||^2.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from rnndiag.records import Direction, ModuleKind, ModuleSpec
from rnndiag.routes import replay

IN, H, PROJ, T, B = 3, 5, 2, 7, 4


@dataclass(frozen=True)
class Case:
    kind: ModuleKind
    nonlinearity: str | None = None
    layers: int = 1
    bidirectional: bool = False
    bias: bool = True
    proj: int = 0
    steps: int = T
    batch: int = B

    @property
    def id(self) -> str:
        parts = [self.kind.value, self.nonlinearity or "", f"L{self.layers}",
                 "bi" if self.bidirectional else "", "nobias" if not self.bias else "",
                 f"proj{self.proj}" if self.proj else "", f"T{self.steps}", f"B{self.batch}"]
        return "-".join(p for p in parts if p)


STACKED = [
    Case(kind, nl, layers, bi, bias, proj)
    for kind, nl, proj in [(ModuleKind.RNN, "tanh", 0), (ModuleKind.RNN, "relu", 0),
                           (ModuleKind.LSTM, None, 0), (ModuleKind.LSTM, None, PROJ),
                           (ModuleKind.GRU, None, 0)]
    for layers in (1, 3) for bi in (False, True) for bias in (True, False)
]
CELLS = [Case(kind, nl, bias=bias) for kind, nl in [(ModuleKind.RNN_CELL, "tanh"),
                                                   (ModuleKind.RNN_CELL, "relu"),
                                                   (ModuleKind.LSTM_CELL, None),
                                                   (ModuleKind.GRU_CELL, None)]
         for bias in (True, False)]
EDGES = [Case(ModuleKind.LSTM, None, 2, True, proj=PROJ, steps=1),
         Case(ModuleKind.GRU, None, 2, True, steps=T, batch=1),
         Case(ModuleKind.LSTM_CELL, None, steps=1)]
ALL = STACKED + CELLS + EDGES


def build(case: Case) -> nn.Module:
    torch.manual_seed(zlib.crc32(case.id.encode()))
    kw = {"bias": case.bias, "dtype": torch.float64}
    if case.kind is ModuleKind.RNN:
        return nn.RNN(IN, H, case.layers, nonlinearity=case.nonlinearity or "tanh",
                      bidirectional=case.bidirectional, batch_first=True, **kw)
    if case.kind is ModuleKind.LSTM:
        return nn.LSTM(IN, H, case.layers, bidirectional=case.bidirectional, proj_size=case.proj,
                       batch_first=True, **kw)
    if case.kind is ModuleKind.GRU:
        return nn.GRU(IN, H, case.layers, bidirectional=case.bidirectional, batch_first=True,
                      **kw)
    if case.kind is ModuleKind.RNN_CELL:
        return nn.RNNCell(IN, H, nonlinearity=case.nonlinearity or "tanh", **kw)
    if case.kind is ModuleKind.LSTM_CELL:
        return nn.LSTMCell(IN, H, **kw)
    return nn.GRUCell(IN, H, **kw)


def spec_of(case: Case) -> ModuleSpec:
    return ModuleSpec("", case.kind, IN, H, case.proj, case.layers, case.bidirectional,
                      case.bias, case.nonlinearity)


def cell_for(case: Case, sd: dict[str, Tensor], suffix: str, width: int) -> nn.Module:
    """A PyTorch cell holding the weights of one layer/direction (suffix `_l0_reverse`, ...)."""
    kw = {"bias": case.bias, "dtype": torch.float64}
    cell_type = case.kind.cell_type.value
    hidden_in = case.proj or H
    if cell_type == "rnn":
        cell: nn.Module = nn.RNNCell(width, H, nonlinearity=case.nonlinearity or "tanh", **kw)
    elif cell_type == "lstm":
        cell = nn.LSTMCell(width, H, **kw)
        if hidden_in != H:  # LSTMCell has no projection: give it a (4H, P) W_hh by hand below
            cell.weight_hh = nn.Parameter(torch.zeros(4 * H, hidden_in, dtype=torch.float64))
    else:
        cell = nn.GRUCell(width, H, **kw)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            if f"{name}{suffix}" in sd:
                getattr(cell, name).copy_(sd[f"{name}{suffix}"])
    return cell


def lstm_step(cell: nn.Module, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTMCell's equations written out (needed when W_hh is (4H, P) for a projected LSTM)."""
    gates = x @ cell.weight_ih.t() + h @ cell.weight_hh.t()
    if cell.bias_ih is not None:
        gates = gates + cell.bias_ih + cell.bias_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def oracle(case: Case, sd: dict[str, Tensor], x: Tensor) -> dict[tuple[int, str], tuple]:
    """Hand-unrolled BPTT with retain_grad: {(layer, direction): (dh (T,B,P), dc or None)}."""
    steps, batch = x.shape[1], x.shape[0]
    is_cell = case.kind.is_cell
    dirs = ["forward", "reverse"] if case.bidirectional else ["forward"]
    layer_in, kept, finals = x, {}, []
    for layer in range(case.layers):
        outs = []
        for d in dirs:
            suffix = "" if is_cell else f"_l{layer}{'_reverse' if d == 'reverse' else ''}"
            cell = cell_for(case, sd, suffix, layer_in.shape[2])
            w_hr = sd.get(f"weight_hr{suffix}")
            h = torch.zeros(batch, case.proj or H, dtype=torch.float64)
            c = torch.zeros(batch, H, dtype=torch.float64)
            hs, cs = [None] * steps, [None] * steps
            order = range(steps) if d == "forward" else range(steps - 1, -1, -1)
            for t in order:
                if case.kind.cell_type.value == "lstm":
                    h, c = lstm_step(cell, layer_in[:, t], h, c)
                    if w_hr is not None:
                        h = h @ w_hr.t()
                    c.retain_grad()
                    cs[t] = c
                else:
                    h = cell(layer_in[:, t], h)
                h.retain_grad()
                hs[t] = h
            kept[(layer, d)] = (hs, cs)
            outs.append(torch.stack(hs, dim=1))
            finals.append(h)
        layer_in = torch.cat(outs, dim=2)
    top = finals[-len(dirs):]
    loss = sum(f.pow(2).sum() for f in top) / (2 * batch)
    loss.backward()
    result = {}
    for key, (hs, cs) in kept.items():
        dh = torch.stack([h.grad if h.grad is not None else torch.zeros_like(h) for h in hs])
        dc = None
        if cs[0] is not None:
            dc = torch.stack([c.grad if c.grad is not None else torch.zeros_like(c) for c in cs])
        result[key] = (dh, dc)
    return result


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_adjoints_equal_hand_unrolled_autograd(case: Case) -> None:
    module = build(case)
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    x = torch.randn(case.batch, case.steps, IN, dtype=torch.float64)
    got = replay(spec_of(case), sd, x)
    want = oracle(case, sd, x)
    assert len(got.adjoints) == len(want)
    for adj in got.adjoints:
        dh, dc = want[(adj.layer, adj.direction.value)]
        torch.testing.assert_close(adj.dh, dh, rtol=1e-10, atol=1e-13)
        if dc is None:
            assert adj.dc is None
        else:
            assert adj.dc is not None
            torch.testing.assert_close(adj.dc, dc, rtol=1e-10, atol=1e-13)
        assert adj.dh.abs().sum() > 0  # a test that compares zeros proves nothing


@pytest.mark.parametrize("case", STACKED + EDGES[:2], ids=[c.id for c in STACKED + EDGES[:2]])
def test_forward_equals_fused_module(case: Case) -> None:
    module = build(case)
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    x = torch.randn(case.batch, case.steps, IN, dtype=torch.float64)
    got = replay(spec_of(case), sd, x)
    with torch.no_grad():
        out, state = module(x)
    torch.testing.assert_close(got.output, out, rtol=1e-12, atol=1e-13)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    torch.testing.assert_close(got.h_n, h_n, rtol=1e-12, atol=1e-13)
    if c_n is not None:
        torch.testing.assert_close(got.c_n, c_n, rtol=1e-12, atol=1e-13)


def test_reverse_final_step_is_time_zero() -> None:
    """For a 1-layer reverse direction, dL/dh_0 = h_0 / B (the objective's direct term)."""
    case = Case(ModuleKind.GRU, bidirectional=True)
    module = build(case)
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    x = torch.randn(B, T, IN, dtype=torch.float64)
    got = replay(spec_of(case), sd, x)
    reverse = next(a for a in got.adjoints if a.direction is Direction.REVERSE)
    h0_reverse = got.output[:, 0, H:]
    torch.testing.assert_close(reverse.dh[0], h0_reverse / B, rtol=1e-12, atol=1e-14)
