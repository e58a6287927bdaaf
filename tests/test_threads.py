"""rnndiag.cells.threads.side_by_side: a bidirectional layer's two directions at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from rnndiag.cells.threads import side_by_side


@pytest.fixture
def threads() -> Iterator[int]:
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def _seen() -> tuple[str, int, bool]:
    return threading.current_thread().name, torch.get_num_threads(), torch.is_grad_enabled()


def test_both_run_at_once_each_with_half_the_threads(threads: int) -> None:
    torch.set_num_threads(4)
    first_started = threading.Event()

    def first() -> tuple[str, int, bool]:
        first_started.set()
        return _seen()

    def second() -> tuple[str, int, bool]:
        # the caller's own piece runs while this one waits: they are not one after the other
        assert first_started.wait(timeout=30)
        return _seen()

    a, b = side_by_side(first, second)
    assert a == (threading.current_thread().name, 2, False)
    assert b == ("rnndiag-pair", 2, False)
    assert torch.get_num_threads() == 4  # restored
    assert torch.is_grad_enabled()


def test_an_odd_thread_count_is_shared_out(threads: int) -> None:
    torch.set_num_threads(3)
    a, b = side_by_side(_seen, _seen)
    assert (a[1], b[1]) == (2, 1)
    assert torch.get_num_threads() == 3


def test_one_thread_runs_them_in_turn_on_the_callers_thread(threads: int) -> None:
    """A user who limited torch to one thread keeps one core."""
    torch.set_num_threads(1)
    here = threading.current_thread().name
    order: list[str] = []
    a, b = side_by_side(lambda: order.append("a") or _seen(),
                        lambda: order.append("b") or _seen())
    assert order == ["a", "b"]
    assert a[0] == b[0] == here
    assert not a[2] and not b[2]  # no autograd recording either way
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("failing", ["first", "second"])
def test_an_error_in_either_reaches_the_caller_and_threads_are_restored(
        failing: str, threads: int) -> None:
    torch.set_num_threads(2)

    def boom() -> int:
        raise ValueError(f"{failing} failed")

    pieces = (boom, lambda: 1) if failing == "first" else (lambda: 1, boom)
    with pytest.raises(ValueError, match=f"{failing} failed"):
        side_by_side(*pieces)
    assert torch.get_num_threads() == 2
