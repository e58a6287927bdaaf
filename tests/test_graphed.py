"""The model-mode LSTM replay as one autograd node per layer (rnndiag.cells.graphed) against the
step replay it replaces (`modelcheck.GRAPHED = False`), in float64.

Each case diagnoses the same model and batch both ways and compares everything the diagnosis
reports: every layer's per-step norms, ratios, references and credit matrix, and the clip
suggestion (whose per-example gradients come from the node's delta). The cases are the ways an
nn.LSTM's states enter and leave a user's model: packed sequences, a bidirectional stack, a
projection without biases, an encoder handing (h_n, c_n) to a decoder, given initial states,
a loss on the final states, and the final-state objective without targets."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnndiag
from rnndiag import modelcheck, replay
from rnndiag.cells import graphed, graphed_fused
from tests.test_pergrad import Packed, Tagger, _labels, _tokens

B, T, V, D = 5, 7, 11, 6


class EncoderDecoder(nn.Module):
    """The encoder's (h_n, c_n) start the decoder: gradients reach c_n from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.LSTM(D, 8, num_layers=2, batch_first=True)
        self.decoder = nn.LSTM(D, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, V)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        _, state = self.encoder(self.embed(src))
        out, _ = self.decoder(self.embed(tgt), state)
        return self.head(out)  # type: ignore[no-any-return]


class PackedEncoderDecoder(nn.Module):
    """Bidirectional and packed both: a short example's reverse direction starts with missing
    steps, so the decoder's given initial state passes its gradient back unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.LSTM(D, 8, bidirectional=True, batch_first=True)
        self.decoder = nn.LSTM(D, 8, bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, V)

    def forward(self, src: Tensor, tgt: Tensor, lengths: Tensor) -> Tensor:
        _, state = self.encoder(self.embed(src))
        packed = pack_padded_sequence(self.embed(tgt), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = pad_packed_sequence(self.decoder(packed, state)[0], batch_first=True,
                                     total_length=tgt.shape[1])
        return self.head(out)  # type: ignore[no-any-return]


class GivenState(nn.Module):
    """Time-major, a learned initial state, a loss on h_n and c_n."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 8, bidirectional=True)
        self.h0 = nn.Parameter(torch.randn(2, 1, 8))
        self.c0 = nn.Parameter(torch.randn(2, 1, 8))
        self.head = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:  # (T, B, 3) -> (B, 3)
        batch = x.shape[1]
        _, (h, c) = self.rnn(x, (self.h0.expand(-1, batch, -1).contiguous(),
                                 self.c0.expand(-1, batch, -1).contiguous()))
        return self.head(torch.cat([h[0], h[1], c[0], c[1]], dim=1))  # type: ignore[no-any-return]


class PackedSeq(nn.Module):
    """A packed bidirectional stack of any cell, from a learned initial state, with a loss on
    the outputs and on h_n."""

    def __init__(self, cell: type[nn.Module], **kw: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.rnn = cell(D, 8, num_layers=2, bidirectional=True, batch_first=True, **kw)
        self.h0 = nn.Parameter(torch.randn(4, 1, 8))
        self.head = nn.Linear(16, V)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, h_n = self.rnn(packed, self.h0.expand(-1, tokens.shape[0], -1).contiguous())
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        top = torch.cat([h_n[-2], h_n[-1]], dim=1).unsqueeze(1)  # both directions' final
        return self.head(out + top)  # type: ignore[no-any-return]


class TimeMajorFinal(nn.Module):
    """Time-major, no biases, scored on h_n alone."""

    def __init__(self, cell: type[nn.Module], **kw: Any) -> None:
        super().__init__()
        self.rnn = cell(3, 8, bias=False, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:  # (T, B, 3) -> (B, 3)
        return self.head(self.rnn(x)[1][-1])  # type: ignore[no-any-return]


def _packed_labels(lengths: Tensor) -> Tensor:
    y = torch.randint(0, V, (B, T))
    y[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
    return y


def _case(name: str) -> tuple[nn.Module, Any, Tensor | None]:
    torch.manual_seed(7)
    tokens = _tokens()
    lengths = torch.tensor([7, 3, 5, 7, 2])
    if name == "gru-tagger":
        return Tagger(nn.GRU), tokens, _labels()
    if name == "gru-packed":
        return PackedSeq(nn.GRU), (tokens, lengths), _packed_labels(lengths)
    if name == "gru-final":
        return TimeMajorFinal(nn.GRU), torch.randn(T, B, 3), torch.randint(0, 3, (B,))
    if name == "rnn-tanh-packed":
        return PackedSeq(nn.RNN), (tokens, lengths), _packed_labels(lengths)
    if name == "rnn-relu-final":
        return (TimeMajorFinal(nn.RNN, nonlinearity="relu", num_layers=2),
                torch.randn(T, B, 3), torch.randint(0, 3, (B,)))
    if name == "rnn-objective":
        return Tagger(nn.RNN), tokens, None
    if name == "bidirectional-tagger":
        return Tagger(), tokens, _labels()
    if name == "projection-no-bias":
        return Tagger(proj_size=4, bias=False), tokens, _labels()
    if name == "packed":
        lengths = torch.tensor([7, 3, 5, 7, 2])
        y = _labels(padded=False)
        y[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
        return Packed(), (tokens, lengths), y
    if name == "encoder-decoder":
        return EncoderDecoder(), (tokens, tokens.flip(1)), torch.randint(0, V, (B, T))
    if name == "packed-encoder-decoder":
        lengths = torch.tensor([7, 3, 5, 7, 2])
        y = torch.randint(0, V, (B, T))
        y[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
        return PackedEncoderDecoder(), (tokens, tokens.flip(1), lengths), y
    if name == "given-state":
        return GivenState(), torch.randn(T, B, 3), torch.randint(0, 3, (B,))
    assert name == "objective"
    return Tagger(), tokens, None


def _run(model: nn.Module, inputs: Any, y: Tensor | None, graphed: bool,
         monkeypatch: pytest.MonkeyPatch) -> tuple[rnndiag.Diagnosis, int]:
    calls = []
    real, real_pair = replay.run_graphed, replay.run_graphed_pair

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    def counted_pair(*args: Any, **kwargs: Any) -> Any:
        found = real_pair(*args, **kwargs)
        calls.extend([] if found is None else [1, 1])  # both directions ran graphed
        return found

    with monkeypatch.context() as m:
        m.setattr(modelcheck, "GRAPHED", graphed)
        m.setattr(replay, "run_graphed", counted)
        m.setattr(replay, "run_graphed_pair", counted_pair)
        found = rnndiag.check_model(model, inputs, y, dtype="float64", lr=0.1,
                                    optimizer="sgd", train_batch_size=8)
    return found, len(calls)


def _same(a: Any, b: Any, what: str) -> None:
    if isinstance(a, float) and isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-300), \
            f"{what}: {a} != {b}"
    elif isinstance(a, tuple | list):
        assert isinstance(b, tuple | list) and len(a) == len(b), what
        for i, (x, z) in enumerate(zip(a, b, strict=True)):
            _same(x, z, f"{what}[{i}]")
    else:
        assert a == b, f"{what}: {a} != {b}"


CASES = ["bidirectional-tagger", "projection-no-bias", "packed", "encoder-decoder",
         "packed-encoder-decoder", "given-state", "objective"]


SIMPLE = ["gru-tagger", "gru-packed", "gru-final", "rnn-tanh-packed", "rnn-relu-final",
          "rnn-objective"]


@pytest.mark.parametrize("name", SIMPLE)
@pytest.mark.parametrize("node", ["never", "always"])
def test_rnn_and_gru_nodes_equal_the_step_replay(name: str, node: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """RNN and GRU layers as one node against the step replay: the fused kernel
    (rnndiag.cells.graphed_fused.simple_layer; a GPU's default, forced here: "always"), and
    the CPU's choice ("never": the GRU's hand-written loops, rnndiag.cells.manual_gru; an RNN
    step by step)."""
    monkeypatch.setattr(graphed, "FUSED", node)
    fused, manual = [], []
    real_fused, real_manual = graphed_fused.simple_layer, graphed._GruLayer.apply
    real_pair = graphed._GruPair.apply  # a bidirectional layer's two directions at once
    monkeypatch.setattr(graphed_fused, "simple_layer",
                        lambda *a, **k: fused.append(1) or real_fused(*a, **k))
    monkeypatch.setattr(graphed._GruLayer, "apply",
                        lambda *a, **k: manual.append(1) or real_manual(*a, **k))
    monkeypatch.setattr(graphed._GruPair, "apply",
                        lambda *a, **k: manual.append(2) or real_pair(*a, **k))
    _compare(name, monkeypatch, "cpu")
    assert bool(fused) == (node == "always")
    assert bool(manual) == (node == "never" and name.startswith("gru"))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("node", ["never", "always"])
def test_graphed_lstm_equals_the_step_replay(name: str, node: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Both nodes: the hand-written loops ("never") and the fused kernel on the augmented
    input (rnndiag.cells.graphed_fused, "always"; on a GPU by default)."""
    monkeypatch.setattr(graphed, "FUSED", node)
    calls = []
    real = graphed_fused.layer
    monkeypatch.setattr(graphed_fused, "layer",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    _compare(name, monkeypatch, "cpu")
    assert bool(calls) == (node == "always")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", CASES + SIMPLE)
def test_graphed_lstm_on_cuda_equals_the_step_replay(name: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _compare(name, monkeypatch, "cuda")


def _on(x: Any, device: str) -> Any:
    """Inputs on `device`; lengths (1-D) stay on the CPU, as pack_padded_sequence wants."""
    if isinstance(x, tuple):
        return tuple(_on(v, device) for v in x)
    return x.to(device) if isinstance(x, Tensor) and x.dim() > 1 else x


def _compare(name: str, monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    model, inputs, y = _case(name)
    model = model.double().to(device)  # on the device already: check_model moves nothing
    inputs = _on(inputs, device)
    y = None if y is None else y.to(device)
    slow, none = _run(model, inputs, y, False, monkeypatch)
    fast, used = _run(model, inputs, y, True, monkeypatch)
    assert none == 0 and used > 0  # each route really ran
    [fs] = fast.files
    [ss] = slow.files
    assert fs.verdict == ss.verdict
    assert len(fs.modules) == len(ss.modules)
    for fm, sm in zip(fs.modules, ss.modules, strict=True):
        assert len(fm.layers) == len(sm.layers)
        for fl, sl in zip(fm.layers, sm.layers, strict=True):
            what = f"{name} {fm.spec.name} {fl.layer}/{fl.direction.value}"
            for field in ("grad_norm", "cell_grad_norm", "state_grad_norm", "ratio",
                          "final_step", "growth_per_step", "horizon", "basis", "references",
                          "skipped_references", "verdict"):
                _same(getattr(fl, field), getattr(sl, field), f"{what} {field}")
            assert (fl.credit is None) == (sl.credit is None), what
            if fl.credit is not None and sl.credit is not None:
                assert fl.credit.positions == sl.credit.positions, what
                assert fl.credit.examples == sl.credit.examples, what
                _same(fl.credit.norms, sl.credit.norms, f"{what} credit")
            assert any(x > 0 for x in fl.grad_norm), what  # a gradient reached every layer
    fc, sc = fs.clip, ss.clip
    assert fc is not None and sc is not None
    for field in ("suggested_max_norm", "expected_norm", "decided_by", "spread",
                  "fraction_clipped", "curvature_cap", "examples"):
        _same(getattr(fc, field), getattr(sc, field), f"{name} clip {field}")


class Regression(nn.Module):
    def __init__(self, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.rnn = cell(4, 5, batch_first=True)
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 3) -> (B, T)
        return self.head(self.rnn(self.inp(x))[0]).squeeze(-1)  # type: ignore[no-any-return]


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_a_custom_loss_that_differentiates_twice_falls_back_to_the_step_replay(
        cell: type[nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom loss may differentiate through the recurrence twice (a gradient penalty): the
    node refuses, the diagnosis runs again step by step, and the numbers are the
    second-order-correct ones."""
    torch.manual_seed(0)
    model = Regression(cell).double()
    x, y = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)

    def penalised(out: Tensor, target: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(out.sum(), [model.inp.weight], create_graph=True)
        return ((out - target) ** 2).mean() + 0.1 * g.pow(2).sum()

    calls = []
    real = replay.run_graphed
    monkeypatch.setattr(replay, "run_graphed", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = rnndiag.check_model(model, x, y, loss=penalised)
    assert calls  # tried first
    monkeypatch.setattr(modelcheck, "GRAPHED", False)
    want = rnndiag.check_model(model, x, y, loss=penalised)
    [gl] = got.files[0].modules[0].layers
    [wl] = want.files[0].modules[0].layers
    _same(gl.grad_norm, wl.grad_norm, "grad_norm")
    _same(gl.ratio, wl.ratio, "ratio")


def test_a_custom_first_order_loss_takes_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A custom loss that differentiates once, or twice but not through the recurrence (a
    penalty on the head only), keeps the node: equal to the step replay."""
    torch.manual_seed(0)
    model = Regression().double()
    x, y = torch.randn(4, 6, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)

    def masked(out: Tensor, target: Tensor) -> Tensor:
        (g,) = torch.autograd.grad(out.sum(), [model.head.weight], create_graph=True)
        return ((out - target).abs() * (target > -1)).mean() + 0.1 * g.pow(2).sum()

    found = []
    for graphed_ in (True, False):
        calls = []
        real = replay.run_graphed
        with monkeypatch.context() as m:
            m.setattr(modelcheck, "GRAPHED", graphed_)
            m.setattr(replay, "run_graphed",
                      lambda *a, **k: calls.append(1) or real(*a, **k))  # noqa: B023
            found.append(rnndiag.check_model(model, x, y, loss=masked))
        assert bool(calls) == graphed_
    [gl] = found[0].files[0].modules[0].layers
    [wl] = found[1].files[0].modules[0].layers
    for field in ("grad_norm", "cell_grad_norm", "ratio", "verdict"):
        _same(getattr(gl, field), getattr(wl, field), field)
    fc, wc = found[0].files[0].clip, found[1].files[0].clip
    assert fc is not None and wc is not None
    _same(fc.suggested_max_norm, wc.suggested_max_norm, "clip")


def test_the_node_refuses_a_second_derivative() -> None:
    from rnndiag.usermodel import call_model, capture

    torch.manual_seed(0)
    model = Regression().double()
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    with capture(model, graphed=True):
        out = call_model(model, (x,), {})
        (g,) = torch.autograd.grad(out.sum(), [model.inp.weight], create_graph=False)
        assert g.abs().sum() > 0  # one derivative: fine
        out = call_model(model, (x,), {})
        with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
            torch.autograd.grad(out.sum(), [model.inp.weight], create_graph=True)


def _node_run(fused: bool, w: Any, alive: Tensor | None, reverse: bool, width: int,
              hidden: int) -> tuple[Tensor, ...]:
    """One node's outputs, the gradients of (terms, h0, c0) under random cotangents on every
    output, and the totals it hands its receiver."""
    def draw(*shape: int, seed: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed)).requires_grad_()

    terms, h0, c0 = draw(B, T, 16, seed=2), draw(B, width, seed=3), draw(B, hidden, seed=4)
    received: list[Tensor] = []

    def receive(dh: Tensor, dc: Tensor) -> None:
        received.extend([dh, dc])

    if fused:
        fits, count = graphed_fused.lengths_of(alive, T)
        assert fits
        out = graphed_fused.layer(terms, h0, c0, w, count, reverse, receive)
    else:
        out = graphed._Layer.apply(  # type: ignore[no-untyped-call]
            terms.transpose(0, 1), h0, c0, w, alive, reverse, receive)  # time-major terms
    gen = torch.Generator().manual_seed(5)
    loss = sum((torch.randn(x.shape, dtype=x.dtype, generator=gen) * x).sum() for x in out[:3])
    return (*out, *torch.autograd.grad(loss, [terms, h0, c0]), *received)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("proj", [0, 3])
@pytest.mark.parametrize("lengths", [None, (7, 3, 5, 7, 1)])
def test_the_fused_node_equals_the_hand_written_one(reverse: bool, proj: int,
                                                    lengths: tuple[int, ...] | None) -> None:
    """Node level, every output and every gradient, with gradients arriving at every output
    (the states at missing steps, h_n and c_n too) and a receiver for the totals."""
    from rnndiag.cells.tensors import LayerWeights

    torch.manual_seed(1)
    hidden, width = 4, proj or 4
    w = LayerWeights(torch.randn(16, 2, dtype=torch.float64),
                     torch.randn(16, width, dtype=torch.float64), None, None,
                     torch.randn(width, hidden, dtype=torch.float64) if proj else None)
    alive = None if lengths is None else torch.arange(T).unsqueeze(1) < torch.tensor(lengths)
    want, got = (_node_run(fused, w, alive, reverse, width, hidden) for fused in (False, True))
    names = ["states", "h_n", "c_n", "cells", "d terms", "d h0", "d c0", "dh", "dc"]
    assert len(want) == len(got) == len(names)
    for name, a, b in zip(names, want, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)


def test_only_a_prefix_mask_takes_the_fused_node() -> None:
    prefix = torch.arange(T).unsqueeze(1) < torch.tensor([7, 3, 5, 7, 1])
    assert graphed_fused.lengths_of(prefix, T)[0]
    assert graphed_fused.lengths_of(None, T) == (True, None)
    gap = prefix.clone()
    gap[1, 0] = False  # a hole: not a packed sequence's mask
    assert not graphed_fused.lengths_of(gap, T)[0]
    empty = prefix.clone()
    empty[:, 4] = False  # an example without steps
    assert not graphed_fused.lengths_of(empty, T)[0]


def _unrolled(cell: Any, nonlinearity: str | None, terms: Tensor, h0: Tensor, w: Any,
              alive: Tensor | None, reverse: bool) -> tuple[Tensor, list[Tensor]]:
    """The oracle: one cell step at a time with autograd, a missing step keeping its state;
    (states (T, B, P) by time index, the state tensors themselves, each retaining its grad)."""
    from rnndiag.cells import step

    hs: list[Any] = [None] * T
    h = h0
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        new = step(cell, nonlinearity, terms[:, t], h, None, w).h
        h = new if alive is None else torch.where(alive[t].unsqueeze(1), new, h)
        h.retain_grad()
        hs[t] = h
    return torch.stack(hs), hs


@pytest.mark.parametrize("cell", ["GRU", "GRU-manual", "RNN-tanh", "RNN-relu"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("lengths", [None, (7, 3, 5, 7, 1)])
def test_the_rnn_and_gru_nodes_equal_a_hand_unrolled_loop(
        cell: str, reverse: bool, lengths: tuple[int, ...] | None) -> None:
    """Node level against plain autograd on a hand-unrolled loop: states, h_n, the
    gradients of the terms and of h0, and the totals dL/dh_t handed to the receiver (zero at
    missing steps), with cotangents on every output (missing steps' states included)."""
    from rnndiag.cells.tensors import LayerWeights
    from rnndiag.records import CellType

    kind = CellType.GRU if cell.startswith("GRU") else CellType.RNN
    nonlinearity = None if kind is CellType.GRU else cell.split("-")[1]
    gates = 3 if kind is CellType.GRU else 1
    torch.manual_seed(1)
    w = LayerWeights(*(torch.randn(*shape, dtype=torch.float64) for shape in
                       ((8 * gates, 2), (8 * gates, 8), (8 * gates,), (8 * gates,))), None)
    alive = None if lengths is None else torch.arange(T).unsqueeze(1) < torch.tensor(lengths)
    terms = torch.randn(B, T, 8 * gates, dtype=torch.float64)
    if kind is CellType.RNN:  # an RNN's terms hold both biases; a GRU's b_hh is the cell's
        w = LayerWeights(w.w_ih, w.w_hh, None, None, None)
    h0 = torch.randn(B, 8, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    g_out = torch.randn(T, B, 8, dtype=torch.float64, generator=gen)
    g_h = torch.randn(B, 8, dtype=torch.float64, generator=gen)
    last = 0 if reverse else T - 1

    a, b = terms.clone().requires_grad_(), h0.clone().requires_grad_()
    states, hs = _unrolled(kind, nonlinearity, a, b, w, alive, reverse)
    ((states * g_out).sum() + (hs[last] * g_h).sum()).backward()
    want_dh = torch.stack([h.grad for h in hs])  # type: ignore[misc]
    if alive is not None:
        want_dh = want_dh * alive.unsqueeze(2)  # the capture's convention: zero when missing

    c, d = terms.clone().requires_grad_(), h0.clone().requires_grad_()
    received: list[Tensor] = []
    if cell == "GRU-manual":  # the CPU's node: rnndiag.cells.manual_gru's loops
        out, h_n = graphed._GruLayer.apply(  # type: ignore[no-untyped-call]
            c.transpose(0, 1), d, w, alive, reverse, received.append)  # time-major terms
    else:
        fits, count = graphed_fused.lengths_of(alive, T)
        assert fits
        out, h_n = graphed_fused.simple_layer(kind, nonlinearity, c, d, w, count, reverse,
                                              received.append)
    ((out * g_out).sum() + (h_n * g_h).sum()).backward()
    for name, got, want in (("states", out, states), ("h_n", h_n, hs[last]),
                            ("d terms", c.grad, a.grad), ("d h0", d.grad, b.grad),
                            ("dh", received[0], want_dh)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
