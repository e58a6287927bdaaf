"""Fast paths against the slow paths they replace.

- Credit passes: `rnndiag.capture.batched_sq` runs K credit passes as one vmapped backward;
  the slow path runs them one by one through the capture hooks (`Capture.backward` of
  `Scored.term(mask)`), each reduced by `rnndiag.credit.state_sq`. Both must agree to
  float64 rounding, also in groups smaller than K (the memory cap) and with lengths.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from rnndiag import clip, credit, temporal
from rnndiag.losses import Loss, choose
from rnndiag.replay import DirectionStates
from rnndiag.routes import default_route, fused_applies, replay
from rnndiag.temporal import Scored, scored_sequences
from rnndiag.usermodel import call_model, capture, spec_of
from tests.realistic_models import PackedTagger


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def _one_by_one(scored: Scored, masks: list[Tensor], states: list[DirectionStates], cap: Any,
                roots: list[Tensor]) -> list[list[Tensor]]:
    """The slow path: one hooked backward pass per mask."""
    chains = [s.chain for s in states]
    return [[credit.state_sq(a) for a in cap.backward(scored.term(mask), roots, chains,
                                                      retain_graph=True)] for mask in masks]


def _tagger_run(packed: bool) -> tuple[Any, ...]:
    model = PackedTagger(hidden=7).double()
    tokens = torch.randint(1, 30, (5, 9))
    lengths = torch.tensor([9, 4, 9, 6, 1]) if packed else torch.full((5,), 9)
    targets = torch.randint(0, 5, (5, 9))
    return model, (tokens, lengths), targets


@pytest.mark.parametrize("packed", [False, True], ids=["equal-lengths", "packed"])
@pytest.mark.parametrize("budget", [1, 10**9], ids=["one-at-a-time", "all-at-once"])
def test_batched_credit_passes_equal_one_by_one(packed: bool, budget: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    model, args, targets = _tagger_run(packed)
    monkeypatch.setattr(temporal, "BATCH_BYTES", budget)
    with capture(model) as rec:
        output = call_model(model, args, {})
        seqs = rec.sequences()
        states = [s for seq in seqs for s in seq.states]
        roots = [r for seq in seqs for r in seq.roots if r.requires_grad]
        loss_def: Loss = choose(output, targets, None, None, None, -100)
        loss = loss_def(output, targets)
        scored = scored_sequences(loss, output, 5, {9: True}, None, True)
        assert scored is not None
        hit = scored.scored()
        masks = []
        for s in (0, 4, 8):
            mask = torch.zeros_like(hit)
            mask[:, s] = hit[:, s]
            masks.append(mask)
        for refs in temporal.assignments(hit, [0, 4, 8]):  # one position per example
            masks.append(torch.arange(9).unsqueeze(0) == torch.tensor(refs).unsqueeze(1))
        fast = temporal._passes(scored, masks, states, rec.capture, roots)
        slow = _one_by_one(scored, masks, states, rec.capture, roots)
    assert len(fast) == len(slow) == 3 + 2
    for f, one in zip(fast, slow, strict=True):
        assert len(f) == len(one) == len(states)
        for a, b in zip(f, one, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-300)
    nonzero = [float(sq.sum()) for f in fast for sq in f]
    assert all(v > 0 for v in nonzero)  # every pass reaches every layer: not vacuous


def test_group_size_respects_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    model, args, targets = _tagger_run(False)
    with capture(model) as rec:
        output = call_model(model, args, {})
        states = [s for seq in rec.sequences() for s in seq.states]
        loss = choose(output, targets, None, None, None, -100)(output, targets)
        scored = scored_sequences(loss, output, 5, {9: True}, None, True)
        assert scored is not None
        chains = [s.chain for s in states if s.chain is not None]
        monkeypatch.setattr(temporal, "BATCH_BYTES", 1)
        assert temporal._group_size(scored, chains) == 1
        monkeypatch.setattr(temporal, "BATCH_BYTES", 10**12)
        assert temporal._group_size(scored, chains) > 17


# --- the fused-kernel route (rnndiag.routes.replay_fused), run here on the CPU -------------

FUSED_CASES = [
    ("rnn-tanh", nn.RNN, {}, None),
    ("rnn-relu", nn.RNN, {"nonlinearity": "relu"}, "relu"),
    ("lstm", nn.LSTM, {}, None),
    ("lstm-bidir-3", nn.LSTM, {"bidirectional": True, "num_layers": 3}, None),
    ("lstm-proj", nn.LSTM, {"proj_size": 3, "num_layers": 2}, None),
    ("rnn-bidir-nobias", nn.RNN, {"bidirectional": True, "num_layers": 2, "bias": False},
     None),
    ("gru", nn.GRU, {}, None),
    ("gru-bidir-3", nn.GRU, {"bidirectional": True, "num_layers": 3}, None),
    ("gru-nobias", nn.GRU, {"bias": False, "num_layers": 2}, None),
]


def _same_replay(fast: Any, slow: Any) -> None:
    """Two routes' ReplayResults agree: outputs, final states, loss, every adjoint."""
    torch.testing.assert_close(fast.output, slow.output, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast.h_n, slow.h_n, rtol=1e-12, atol=1e-14)
    assert (fast.c_n is None) == (slow.c_n is None)
    if fast.c_n is not None and slow.c_n is not None:
        torch.testing.assert_close(fast.c_n, slow.c_n, rtol=1e-12, atol=1e-14)
    assert fast.loss == pytest.approx(slow.loss, rel=1e-12)
    for f, s in zip(fast.adjoints, slow.adjoints, strict=True):
        assert (f.layer, f.direction) == (s.layer, s.direction)
        torch.testing.assert_close(f.dh, s.dh, rtol=1e-10, atol=1e-14)
        assert (f.dc is None) == (s.dc is None)
        if f.dc is not None and s.dc is not None:
            torch.testing.assert_close(f.dc, s.dc, rtol=1e-10, atol=1e-14)
    assert all(float(a.dh.abs().sum()) > 0 for a in fast.adjoints)  # not vacuous


@pytest.mark.parametrize(("kind", "kwargs", "nonlinearity"),
                         [c[1:] for c in FUSED_CASES], ids=[c[0] for c in FUSED_CASES])
def test_fused_route_equals_the_step_replay(kind: Any, kwargs: dict[str, Any],
                                            nonlinearity: str | None) -> None:
    module = kind(4, 6, batch_first=True, **kwargs).double()
    spec = spec_of("", module)
    params = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(3, 11, 4, dtype=torch.float64)
    slow = replay(spec, params, x, route="steps")
    fast = replay(spec, params, x, route="fused")
    _same_replay(fast, slow)


# --- the graphed route (one node per layer and direction), a GPU's default with lengths ----

@pytest.mark.parametrize(("kind", "kwargs", "nonlinearity"),
                         [c[1:] for c in FUSED_CASES], ids=[c[0] for c in FUSED_CASES])
@pytest.mark.parametrize("lengths", [None, [9, 1, 4, 9, 6]], ids=["equal", "lengths"])
@pytest.mark.parametrize("node", ["always", "never"], ids=["fused-node", "cpu-node"])
def test_graphed_route_equals_the_step_replay(kind: Any, kwargs: dict[str, Any],
                                              nonlinearity: str | None,
                                              lengths: list[int] | None, node: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused-kernel nodes forced on the CPU ("always"; a GPU's default), and the CPU's
    own choice ("never": the hand-written LSTM node, an RNN or GRU step by step)."""
    from rnndiag.cells import graphed

    monkeypatch.setattr(graphed, "FUSED", node)
    module = kind(4, 6, batch_first=True, **kwargs).double()
    spec = spec_of("", module)
    params = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(5, 9, 4, dtype=torch.float64)
    given = None if lengths is None else torch.tensor(lengths)
    slow = replay(spec, params, x, given, route="steps")
    fast = replay(spec, params, x, given, route="graphed")
    _same_replay(fast, slow)
    if lengths is not None:
        assert all(float(f.dh[1:, 1].abs().sum()) == 0  # example 1 has one step
                   for f in fast.adjoints)


# --- the LSTM's hand-written backward (rnndiag.routes.replay_manual), the CPU default --------

MANUAL_CASES = [
    ("lstm", {}),
    ("lstm-bidir-3", {"bidirectional": True, "num_layers": 3}),
    ("lstm-proj", {"proj_size": 3, "num_layers": 2}),
    ("lstm-proj-bidir-nobias", {"proj_size": 4, "bidirectional": True, "bias": False}),
    ("lstm-nobias", {"bias": False, "num_layers": 2}),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in MANUAL_CASES], ids=[c[0] for c in MANUAL_CASES])
@pytest.mark.parametrize(("steps", "lengths"), [(1, None), (2, None), (13, None),
                                                (9, [9, 1, 4, 9, 6])],
                         ids=["T=1", "T=2", "T=13", "lengths"])
def test_manual_route_equals_the_step_replay(kwargs: dict[str, Any], steps: int,
                                             lengths: list[int] | None) -> None:
    module = nn.LSTM(4, 6, batch_first=True, **kwargs).double()
    spec = spec_of("", module)
    params = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(5, steps, 4, dtype=torch.float64)
    given = None if lengths is None else torch.tensor(lengths)
    slow = replay(spec, params, x, given, route="steps")
    fast = replay(spec, params, x, given, route="manual")
    torch.testing.assert_close(fast.output, slow.output, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fast.h_n, slow.h_n, rtol=1e-12, atol=1e-14)
    assert fast.c_n is not None and slow.c_n is not None
    torch.testing.assert_close(fast.c_n, slow.c_n, rtol=1e-12, atol=1e-14)
    assert fast.loss == pytest.approx(slow.loss, rel=1e-12)
    for f, s in zip(fast.adjoints, slow.adjoints, strict=True):
        assert (f.layer, f.direction) == (s.layer, s.direction)
        torch.testing.assert_close(f.dh, s.dh, rtol=1e-10, atol=1e-14)
        assert f.dc is not None and s.dc is not None
        torch.testing.assert_close(f.dc, s.dc, rtol=1e-10, atol=1e-14)
        assert float(f.dh.abs().sum()) > 0  # not vacuous
        if lengths is not None:
            assert f.alive is not None and s.alive is not None
            assert bool((f.alive == s.alive).all())
            assert float(f.dh[:, 1].abs().sum()) > 0  # example 1 (one step) has its gradient
            assert float(f.dh[1:, 1].abs().sum()) == 0  # and none past its length


def test_manual_route_is_the_cpu_default_for_lstms() -> None:
    x = torch.randn(2, 5, 4)
    assert default_route(spec_of("", nn.LSTM(4, 6)), x, None) == "manual"
    assert default_route(spec_of("", nn.LSTM(4, 6)), x, torch.tensor([5, 3])) == "manual"
    assert default_route(spec_of("", nn.GRU(4, 6)), x, None) == "steps"
    assert default_route(spec_of("", nn.RNN(4, 6)), x, None) == "steps"
    with pytest.raises(ValueError, match="equal lengths"):
        replay(spec_of("", nn.LSTM(4, 6)), {}, x, torch.tensor([5, 3]), route="fused")


def test_fused_route_is_the_default_on_cuda_only() -> None:
    module = nn.LSTM(4, 6)
    spec = spec_of("", module)
    x = torch.randn(2, 5, 4)
    assert not fused_applies(spec, x, None)
    if torch.cuda.is_available():
        assert fused_applies(spec, x.cuda(), None)
        assert not fused_applies(spec, x.cuda(), torch.tensor([5, 3]))
        assert fused_applies(spec_of("", nn.GRU(4, 6)), x.cuda(), None)
        for kind in (nn.RNN, nn.LSTM, nn.GRU):  # lengths: one fused node per layer instead
            assert default_route(spec_of("", kind(4, 6)), x.cuda(), torch.tensor([5, 3])) \
                == "graphed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", [nn.RNN, nn.LSTM, nn.GRU], ids=["rnn", "lstm", "gru"])
def test_graphed_route_on_cuda_with_lengths_matches_the_cpu_replay(kind: Any) -> None:
    module = kind(4, 6, num_layers=2, bidirectional=True, batch_first=True).double()
    spec = spec_of("", module)
    params = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(5, 9, 4, dtype=torch.float64)
    lengths = torch.tensor([9, 1, 4, 9, 6])
    cpu = replay(spec, params, x, lengths, route="steps")
    gpu = replay(spec, {k: v.cuda() for k, v in params.items()}, x.cuda(), lengths.cuda())
    for a, b in zip(gpu.adjoints, cpu.adjoints, strict=True):
        torch.testing.assert_close(a.dh.cpu(), b.dh, rtol=1e-9, atol=1e-12)
        assert (a.dc is None) == (b.dc is None)
        if a.dc is not None and b.dc is not None:
            torch.testing.assert_close(a.dc.cpu(), b.dc, rtol=1e-9, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_fused_route_on_cuda_matches_the_cpu_replay(kind: Any) -> None:
    module = kind(4, 6, num_layers=2, bidirectional=True, batch_first=True).double()
    spec = spec_of("", module)
    params = {k: v.detach() for k, v in module.named_parameters()}
    x = torch.randn(3, 9, 4, dtype=torch.float64)
    cpu = replay(spec, params, x)
    gpu = replay(spec, {k: v.cuda() for k, v in params.items()}, x.cuda(), route="fused")
    for a, b in zip(gpu.adjoints, cpu.adjoints, strict=True):
        torch.testing.assert_close(a.dh.cpu(), b.dh, rtol=1e-9, atol=1e-12)
        assert (a.dc is None) == (b.dc is None)
        if a.dc is not None and b.dc is not None:
            torch.testing.assert_close(a.dc.cpu(), b.dc, rtol=1e-9, atol=1e-12)


# --- per-example gradients on one CPU thread (rnndiag.clip.per_example_gram) ---------------


def test_per_example_passes_run_on_one_thread_and_restore_the_count() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    w = torch.randn(3, requires_grad=True)

    def loss_of(i: int) -> Tensor:
        seen.append(torch.get_num_threads())
        return (w * (i + 1)).pow(2).sum()

    gram = clip.per_example_gram(loss_of, [w], 2)
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
    g = torch.stack([2 * w.detach() * 1, 2 * w.detach() * 4]).double()  # d/dw of each loss
    torch.testing.assert_close(gram, g @ g.T)

    def failing(i: int) -> Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        clip.per_example_gram(failing, [w], 1)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("steps", [1, 2, 7, 64, 100])
def test_linear_scan_matches_the_sequential_recurrence(steps: int) -> None:
    """The fused route's log-depth scan against the loop it replaces, in float64, with
    factors that underflow (0) and exceed 1."""
    from rnndiag.cells.fused import linear_scan

    gen = torch.Generator().manual_seed(steps)
    a = torch.rand(3, steps, 5, generator=gen, dtype=torch.float64) * 1.5
    a[:, ::3, 0] = 0.0
    b = torch.randn(3, steps, 5, generator=gen, dtype=torch.float64)
    y, expected = torch.zeros(3, 5, dtype=torch.float64), []
    for t in range(steps):
        y = a[:, t] * y + b[:, t]
        expected.append(y)
    torch.testing.assert_close(linear_scan(a, b), torch.stack(expected, 1), rtol=1e-12,
                               atol=1e-14)
