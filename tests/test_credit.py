"""The pieces of the temporal credit measurement, each against a hand computation: pooling of
references (rnndiag.credit), the scored output's axes (rnndiag.temporal), the output and loss
choice (rnndiag.losses), mini-batch slicing of time-major and flattened tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rnndiag import credit, temporal
from rnndiag.errors import BatchError
from rnndiag.losses import choose, pick
from rnndiag.modelcheck import ModelInputs, Slicing
from rnndiag.records import Direction
from rnndiag.temporal import positions, sequence_view
from tests import credit_oracle

FWD, REV = Direction.FORWARD, Direction.REVERSE


def _sq(rows: list[list[float]]) -> Tensor:
    """sq[t][b] from a (T, B) list."""
    return torch.tensor(rows, dtype=torch.float64)


def test_pool_per_example_references_and_lengths() -> None:
    # example 0 ends at t=3 (sq 1, 4, 16, 64 going back), example 1 at t=1 (sq 9 at t=1, 1 at 0)
    sq = _sq([[64.0, 1.0], [16.0, 9.0], [4.0, 0.0], [1.0, 0.0]])
    p = credit.pool(sq, torch.tensor([3, 1]), FWD, None)
    assert (p.references, p.skipped, p.final) == (2, 0, 3)
    r = credit.by_distance(p)
    assert r[0] == 1.0
    assert r[1] == pytest.approx(math.sqrt((4.0 + 1.0) / (1.0 + 9.0)))
    assert r[2] == pytest.approx(math.sqrt(16.0 / 1.0)) and r[3] == pytest.approx(8.0)
    ratio, final = credit.ratio_series(p, FWD)
    assert final == 3 and ratio[3] == 1.0 and ratio[0] == pytest.approx(8.0)


def test_zero_reference_is_skipped_never_divided_by() -> None:
    # the loss ignores example 1's reference step: without skipping, r would be inf (a false
    # "exploding"); with it, example 1 simply does not count
    sq = _sq([[4.0, 5.0], [1.0, 0.0]])
    p = credit.pool(sq, torch.tensor([1, 1]), FWD, None)
    assert (p.references, p.skipped) == (1, 1)
    assert credit.by_distance(p)[:2] == (1.0, 2.0)


def test_no_reference_at_all_gives_no_ratio() -> None:
    p = credit.pool(_sq([[0.0], [0.0]]), torch.tensor([-1]), FWD, None)
    ratio, final = credit.ratio_series(p, FWD)
    assert ratio == (None, None) and final == 1 and p.references == 0


def test_nonfinite_reference_is_nan_not_vanishing() -> None:
    sq = _sq([[1.0], [math.inf]])
    ratio, _ = credit.ratio_series(credit.pool(sq, torch.tensor([1]), FWD, None), FWD)
    assert all(r is not None and math.isnan(r) for r in ratio)


def test_reverse_direction_looks_ahead_within_each_length() -> None:
    # example 1 has length 2: its step t=2 does not exist and must not count
    sq = _sq([[1.0, 4.0], [0.25, 1.0], [0.0625, 7.0]])
    alive = torch.tensor([[True, True], [True, True], [True, False]])
    p = credit.pool(sq, torch.tensor([0, 0]), REV, alive)
    r = credit.by_distance(p)
    assert r[1] == pytest.approx(math.sqrt((0.25 + 1.0) / (1.0 + 4.0)))
    assert r[2] == pytest.approx(math.sqrt(0.0625 / 1.0))


def test_reached_is_the_last_nonzero_step() -> None:
    sq = _sq([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert credit.reached(sq, FWD).tolist() == [1, 0, -1]
    assert credit.reached(sq, REV).tolist() == [0, 0, -1]


@pytest.mark.parametrize("direction", [FWD, REV])
def test_one_pool_of_side_by_side_rows_adds_the_rows(direction: Direction) -> None:
    """rnndiag.series pools every credit row at once, their columns side by side: the sums,
    counts and final step equal those of the rows pooled one by one."""
    torch.manual_seed(0)
    rows = [(torch.rand(6, 3, dtype=torch.float64), torch.tensor(refs))
            for refs in ([5, -1, 2], [0, 3, 3], [4, 4, -1])]
    rows[1][0][:, 1] = 0.0  # a reference with zero gradient there: skipped
    alive = torch.arange(6).unsqueeze(1) < torch.tensor([6, 4, 5])
    one = [credit.pool(sq, refs, direction, alive) for sq, refs in rows]
    joint = credit.pool(torch.cat([sq for sq, _ in rows], 1),
                        torch.cat([refs for _, refs in rows]), direction, alive.repeat(1, 3))
    torch.testing.assert_close(joint.num, sum(p.num for p in one))
    torch.testing.assert_close(joint.den, sum(p.den for p in one))
    assert joint.references == sum(p.references for p in one) > 0
    assert joint.skipped == sum(p.skipped for p in one) == 1
    finals = [p.final for p in one if p.final is not None]
    assert joint.final == (max(finals) if direction is FWD else min(finals))


def test_sampled_positions() -> None:
    assert positions(1) == [0]
    assert positions(5) == [0, 1, 2, 3, 4]
    found = positions(100)
    assert len(found) == 16 and found[0] == 0 and found[-1] == 99


B, T = 3, 7
STEPS = {T: True}


@pytest.mark.parametrize(
    ("shape", "steps", "time_axis", "want_major"),
    [((B, T, 5), STEPS, None, False), ((T, B, 5), {T: False}, None, True),
     ((B, T), STEPS, None, False), ((T * B, 5), {T: False}, None, True),
     ((B * T, 5), STEPS, None, False), ((T, B, 5), STEPS, 0, True)],
    ids=["batch-first", "time-major", "per-step-scalar", "flattened-time-major",
         "flattened-batch-first", "time-axis-option"],
)
def test_sequence_view(shape: tuple[int, ...], steps: dict[int, bool | None],
                       time_axis: int | None, want_major: bool) -> None:
    x = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    found = sequence_view(x, B, steps, time_axis, classes_last=False)
    assert found is not None
    length, view, major = found
    v = view(x)
    assert length == T and major is want_major and tuple(v.shape[:2]) == (B, T)
    if want_major:  # element (b, t) of the view is element (t, b) of the time-major tensor
        assert torch.equal(v[1, 4].reshape(-1), x.reshape(T, B, -1)[4, 1])


def test_class_axis_is_never_time() -> None:
    assert sequence_view(torch.zeros(B, T), B, STEPS, None, classes_last=True) is None


def test_equal_batch_and_length_needs_the_time_axis() -> None:
    with pytest.raises(BatchError, match="--time-axis"):
        sequence_view(torch.zeros(4, 4, 2), 4, {4: True}, None, classes_last=False)
    found = sequence_view(torch.zeros(4, 4, 2), 4, {4: True}, 0, classes_last=False)
    assert found is not None and found[2] is True


def test_cross_entropy_ignores_padding_labels() -> None:
    torch.manual_seed(0)
    out, y = torch.randn(2, 5, 4), torch.randint(0, 4, (2, 5))
    y[0, 3:] = -100
    loss = choose(out, y, None, None)
    want = F.cross_entropy(out.reshape(-1, 4), y.reshape(-1), ignore_index=-100)
    assert loss.name == "cross_entropy" and torch.equal(loss(out, y), want)
    y2 = y.clone()
    y2[y2 == -100] = 7
    assert choose(out, y2, None, None, ignore_index=7)(out, y2) == pytest.approx(float(want))
    with pytest.raises(BatchError, match="nothing is scored"):
        choose(out, torch.full((2, 5), -100), None, None)


@pytest.mark.parametrize(
    ("output", "fragment"),
    [((torch.zeros(2, 5, 16), torch.zeros(2, 5, 4)), "all fit"),
     ({"a": torch.zeros(2, 9)}, "none of its tensors fits")],
    ids=["hidden-and-logits", "nothing-fits"],
)
def test_ambiguous_outputs_are_refused(output: object, fragment: str) -> None:
    with pytest.raises(BatchError, match=fragment) as err:
        choose(output, torch.zeros(2, 5, dtype=torch.long), None, None)
    assert "--output-key" in str(err.value)


def test_the_one_fitting_element_is_scored_and_named() -> None:
    logits = torch.randn(2, 5, 4)
    hidden = (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    loss = choose((logits, hidden), torch.zeros(2, 5, dtype=torch.long), None, None)
    assert loss.key == "0"
    assert choose({"x": {"y": logits}}, torch.zeros(2, 5, dtype=torch.long), None, None,
                  key="x.y").key == "x.y"
    assert pick((logits, hidden), "1.0") is hidden[0]
    with pytest.raises(BatchError, match="no 'z'"):
        pick({"x": logits}, "z")


def test_time_major_and_flattened_slicing() -> None:
    x = torch.arange(T * B).reshape(T, B)  # time-major tokens
    static = torch.arange(B * 2).reshape(B, 2)
    y = torch.arange(T * B)  # flattened (T*B,) targets, time-major order
    part = ModelInputs((x, static), {}, y).rows(torch.tensor([2]), Slicing(B, time_major=True))
    assert torch.equal(part.args[0], x[:, [2]]) and torch.equal(part.args[1], static[[2]])
    assert part.targets is not None and torch.equal(part.targets, x[:, 2])
    flat_bf = torch.arange(B * T)
    got = Slicing(B, time_major=False).target_rows(torch.tensor([1]), flat_bf)
    assert torch.equal(got, flat_bf.reshape(B, T)[1])


@pytest.mark.parametrize("batch", [1, 3, 5, 16, 32, 40])
def test_assignments_follow_the_definition(batch: int) -> None:
    """rnndiag's credit passes against the oracle's plain loop, on batches where examples score
    random subsets (some none of the sampled positions, some nothing at all)."""
    gen = torch.Generator().manual_seed(batch)
    hit = torch.rand(batch, 40, generator=gen) < 0.7
    hit[0] = True
    if batch > 2:
        hit[1] = False  # scores nothing: never referenced
        hit[2] = False
        hit[2, 3] = True  # scores one unsampled position: referenced there, once
    sampled = positions(40)
    got = temporal.assignments(hit, sampled)
    assert got == credit_oracle.assignments(hit.tolist(), sampled)
    assert len(got) == min(len(sampled), math.ceil(2 * len(sampled) / batch))
    for b in range(batch):
        mine = [refs[b] for refs in got if refs[b] >= 0]
        assert len(mine) == len(set(mine))  # a position at most once per example
        assert all(bool(hit[b, s]) for s in mine)
    if batch > 2:
        assert all(refs[1] == -1 for refs in got)
        assert [refs[2] for refs in got] == [3] + [-1] * (len(got) - 1)
    counts = [sum(refs.count(s) for refs in got) for s in sampled]
    if batch >= 32:  # one pass over a full batch: every position twice or so
        assert len(got) == 1 and min(counts) >= 1 and max(counts) - min(counts) <= 1
