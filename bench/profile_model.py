"""Where `check --model` spends its time: cProfile over one diagnosis of the benchmark tagger
(bench_model.py), after a warm-up run, sorted by cumulative time. On a GPU, asynchronous
kernels are charged to the next call that waits for them (a `.item()`, a copy to the CPU).
The diagnosis runs on the main thread here (not in its deep-stack thread, which cProfile does
not see): fine at the benchmark's lengths.

Run: .venv/bin/python bench/profile_model.py [--device cuda] [--steps T] [--top N]
         [--cell LSTM|GRU|RNN]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import diagnosis, setup  # noqa: E402  (the bench folder is not a package)


def main() -> None:
    parser = argparse.ArgumentParser(description="profile rnndiag check --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--cell", default="LSTM", choices=["LSTM", "GRU", "RNN"])
    args = parser.parse_args()
    os.chdir(Path(__file__).parent)  # `--model bench_model:make` imports from here
    from rnndiag import modelcheck

    modelcheck.with_deep_stack = lambda fn: fn()  # cProfile sees the calling thread only
    with tempfile.TemporaryDirectory() as tmp:
        *_, target = setup(args.batch, args.steps, 256, Path(tmp), args.device, args.cell)
        diagnosis(target)  # warm-up: imports, cuDNN plans, allocator
        profile = cProfile.Profile()
        profile.enable()
        diagnosis(target)
        if args.device != "cpu":
            torch.cuda.synchronize()
        profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
