"""Fast paths against the slow paths they replace.

- Credit passes: `rnndiag.replay.batched_sq` runs K credit passes as one vmapped backward;
  the slow path runs them one by one through the capture hooks (`Capture.backward` of
  `Scored.term(mask)`), each reduced by `rnndiag.credit.state_sq`. Both must agree to
  float64 rounding, also in groups smaller than K (the memory cap) and with lengths.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

from rnndiag import credit, temporal
from rnndiag.losses import Loss, choose
from rnndiag.replay import DirectionStates
from rnndiag.temporal import Scored, scored_sequences
from rnndiag.usermodel import call_model, capture
from tests.realistic_models import PackedTagger


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def _one_by_one(scored: Scored, wanted: Any, states: list[DirectionStates], cap: Any,
                roots: list[Tensor]) -> list[dict[int, tuple[Tensor, Tensor | None]]]:
    """The slow path: one hooked backward pass per plan."""
    out = []
    for mask, picked in wanted:
        order = sorted(picked)
        chains = [states[i].chain for i in order]
        adjoints = cap.backward(scored.term(mask), roots, chains, retain_graph=True)
        out.append({i: (credit.state_sq(a), a.alive) for i, a in zip(order, adjoints,
                                                                     strict=True)})
    return out


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
        wanted = []
        for s in (0, 4, 8):
            mask = torch.zeros_like(hit)
            mask[:, s] = hit[:, s]
            wanted.append((mask, list(range(len(states)))))
        fast = temporal._passes(scored, wanted, states, rec.capture, roots)
        slow = _one_by_one(scored, wanted, states, rec.capture, roots)
    assert len(fast) == len(slow) == 3
    for f, s in zip(fast, slow, strict=True):
        assert f.keys() == s.keys()
        for i in f:
            torch.testing.assert_close(f[i][0], s[i][0], rtol=1e-12, atol=1e-300)
            assert (f[i][1] is None) == (s[i][1] is None)
    nonzero = [float(f[i][0].sum()) for f in fast for i in f]
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
