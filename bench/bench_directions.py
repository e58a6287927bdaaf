"""Two LSTM directions' forward loops, three ways, in one process: one after the other (each
with all of torch's threads), side by side in two threads (rnndiag.cells.threads.side_by_side,
each with half), and batched into one `baddbmm` and one set of elementwise kernels per step.
The loops are rnndiag.cells.manual.run's (the hand-written LSTM recurrence), on random input
terms; times are medians of --repeat interleaved runs.

Run: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_directions.py [--repeat N]
         [--steps T] [--batch B] [--hidden H]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent.parent))
from rnndiag.cells import manual  # noqa: E402  (run from a checkout)
from rnndiag.cells.tensors import LayerWeights  # noqa: E402
from rnndiag.cells.threads import side_by_side  # noqa: E402


def _batched(gates: Tensor, w_hh: Tensor) -> None:
    """Both directions (D, T, B, 4H), the reverse one stored in run order, one step at a
    time for both: one baddbmm and the same elementwise kernels on (D, B, .)."""
    _, steps, batch, four = gates.shape
    hidden = four // 4
    out = gates.new_zeros(2, steps, batch, hidden)
    c = gates.new_zeros(2, steps, batch, hidden)
    tc = gates.new_empty(2, steps, batch, hidden)
    for t in range(steps):
        a = gates[:, t]
        if t:
            a.baddbmm_(out[:, t - 1], w_hh)
        a[..., : 2 * hidden].sigmoid_()
        a[..., 2 * hidden: 3 * hidden].tanh_()
        a[..., 3 * hidden:].sigmoid_()
        i, f, g, o = a.chunk(4, dim=2)
        if t:
            torch.addcmul(i * g, f, c[:, t - 1], out=c[:, t])
        else:
            torch.mul(i, g, out=c[:, t])
        torch.tanh(c[:, t], out=tc[:, t])
        torch.mul(o, tc[:, t], out=out[:, t])


def main() -> None:
    parser = argparse.ArgumentParser(description="two LSTM directions: in turn, side by side")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    t, b, h = args.steps, args.batch, args.hidden
    ws = [LayerWeights(torch.randn(4 * h, 64), torch.randn(4 * h, h) * 0.05, None, None, None)
          for _ in range(2)]
    terms = torch.randn(2, t, b, 4 * h)

    def in_turn() -> None:
        for k, w in enumerate(ws):
            manual.run(terms[k].clone(), w, reverse=k == 1)

    def together() -> None:
        side_by_side(lambda: manual.run(terms[0].clone(), ws[0]),
                     lambda: manual.run(terms[1].clone(), ws[1], reverse=True))

    w_hh = torch.stack([w.w_hh.t() for w in ws])

    def batched() -> None:
        _batched(terms.clone(), w_hh)

    ways: dict[str, Callable[[], None]] = {"in turn": in_turn, "side by side": together,
                                           "one baddbmm": batched}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for fn in ways.values():
        fn()  # warm-up
    for _ in range(args.repeat):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["in turn"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; two LSTM directions, "
          f"T={t} B={b} H={h}; load {os.getloadavg()[0]:.1f}")
    for name, got in times.items():
        m = statistics.median(got)
        print(f"{name:>13}: {m:.3f} s  ({m / base:.2f}x in turn)")


if __name__ == "__main__":
    main()
