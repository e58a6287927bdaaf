"""A rule tried for the clip suggestion and dropped: a short trial run on the check batch.

For each SGD row of bench/validate_clip.py (seeds 0-2, the GRU 0-1): start from the shipped
rule's suggestion c (the `rnndiag c` column of bench/clip_validation.md, median over seeds),
train `--steps` steps on the first training batch, repeated, clipped at c; keep c when the loss
never rises above `--worst` times its start and ends below it, else try c / 10 (at most six
times). Then train as bench/validate_clip.py does with the kept c and judge the row by its
criterion against the best fixed threshold of bench/clip_validation.md.

Run: .venv/bin/python bench/clip_trial.py [--worst 10] [--steps 20]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import validate_clip as V  # noqa: E402  (the bench folder is not a package)

# the shipped rule's suggestion and the best fixed threshold's final loss (None: every fixed
# threshold diverged), per (model, lr), from bench/clip_validation.md
RULE = {("tanh", 0.01): 0.51, ("tanh", 0.1): 0.18, ("tanh", 1.0): 0.018,
        ("lstm", 0.01): 0.043, ("lstm", 0.1): 0.025, ("lstm", 1.0): 0.0025,
        ("relu", 0.01): 3.2, ("relu", 0.1): 0.32, ("relu", 1.0): 0.032,
        ("gru", 0.01): 0.34, ("gru", 0.1): 0.34, ("gru", 1.0): 0.064,
        ("irnn", 0.01): 3.0, ("irnn", 0.1): 0.3, ("irnn", 1.0): 0.03}
BEST: dict[tuple[str, float], float | None] = {
    ("tanh", 0.01): 0.18, ("tanh", 0.1): 0.18, ("tanh", 1.0): 0.18,
    ("lstm", 0.01): 0.0009, ("lstm", 0.1): 0.0009, ("lstm", 1.0): 0.0014,
    ("relu", 0.01): 3.5e4, ("relu", 0.1): None, ("relu", 1.0): None,
    ("gru", 0.01): 0.17, ("gru", 0.1): 0.17, ("gru", 1.0): 0.17,
    ("irnn", 0.01): 0.3, ("irnn", 0.1): 0.58, ("irnn", 1.0): 0.36}


def trial(job: V.Job, max_norm: float, steps: int) -> tuple[float, float, float]:
    """(start loss, highest loss, last loss) of `steps` clipped SGD steps on the job's first
    training batch, repeated."""
    x, y = V.adding_batch(job.grid.batch, job.grid.seq_len, V.stream(job))
    model = V.build(job.model, job.seed, job.grid.irnn_scale)
    opt = torch.optim.SGD(model.parameters(), lr=job.lr)
    seen: list[float] = []
    for step in range(steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        seen.append(loss.item())
        if not math.isfinite(seen[-1]):
            return seen[0], math.inf, math.inf
        if step < steps:
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
    return seen[0], max(seen), seen[-1]


def kept(job: V.Job, start: float, worst: float, steps: int) -> float:
    c = start
    for _ in range(6):
        first, highest, last = trial(job, c, steps)
        if highest < worst * first and last < first:
            return c
        c /= 10
    return c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worst", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    passed = 0
    for (name, lr), start in RULE.items():
        finals, diverged, chosen = [], 0, []
        for seed in (0, 1) if name == "gru" else (0, 1, 2):
            job = V.Job("sgd", lr, name, seed, V.FULL)
            c = kept(job, start, args.worst, args.steps)
            chosen.append(c)
            run = V.train(job, c)
            diverged += run.diverged
            if not run.diverged:
                finals.append(run.final)
        median = statistics.median(finals) if finals else math.inf
        best = BEST[(name, lr)]
        ok = diverged == 0 and (best is None or median <= V.FACTOR * best)
        passed += ok
        ratio = "" if best is None else f" ({median / best:.2f}x best)"
        print(f"{name:5} lr {lr:<5} c {'/'.join(f'{c:.2g}' for c in chosen):<22} diverged "
              f"{diverged}, final {median:.3g}{ratio}: {'pass' if ok else 'FAIL'}", flush=True)
    print(f"{passed} of {len(RULE)} SGD rows pass")


if __name__ == "__main__":
    main()
