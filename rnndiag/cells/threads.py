"""Two independent pieces of work at once, for a bidirectional layer's two directions."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

R1 = TypeVar("R1")
R2 = TypeVar("R2")


def side_by_side(first: Callable[[], R1], second: Callable[[], R2]) -> tuple[R1, R2]:
    """(first(), second()), run at once: `second` in a worker thread, each with half of
    torch's intra-op threads (restored after), both without autograd recording. Two
    directions' loops of small kernels keep two cores busy this way, where one loop leaves the
    second core idle between its kernels (the per-step elementwise work is below torch's
    parallel grain, and a GEMM of B rows shares poorly): 1.6x for two LSTM directions' forward
    loops on 2 cores. Sequential where torch has one thread (the user's setting is kept) or
    no thread can start."""
    before = torch.get_num_threads()
    if before < 2:
        return _in_turn(first, second)
    found: dict[str, Any] = {}

    def work() -> None:
        try:
            torch.set_num_threads(before // 2)  # this thread's own (OpenMP, MKL) setting
            with torch.no_grad():
                found["value"] = second()
        except BaseException as exc:  # handed to the caller's thread as it was
            found["error"] = exc

    thread = threading.Thread(target=work, name="rnndiag-pair", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread can start
        return _in_turn(first, second)
    torch.set_num_threads(before - before // 2)
    try:
        with torch.no_grad():
            value = first()
    finally:
        thread.join()
        torch.set_num_threads(before)
    if "error" in found:
        raise found["error"]
    return value, found["value"]


def _in_turn(first: Callable[[], R1], second: Callable[[], R2]) -> tuple[R1, R2]:
    with torch.no_grad():
        return first(), second()
