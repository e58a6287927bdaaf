"""Cost of `rnndiag check --model` against one training step of the same model, in one process.

The model: a tagger, Embedding(1000, 64) -> 2-layer bidirectional LSTM (hidden 256,
batch_first) -> Linear(512, 50), scored by cross-entropy at every position (per-step loss).
  baseline: one training step on the batch: forward, backward, SGD optimizer step;
  rnndiag:  diagnose_files() with --model on a safetensors checkpoint of that model and a batch
            file holding `inputs` and `targets`: loading, building the model, replay, the loss's
            backward pass, the temporal credit passes (rnndiag.temporal), every series, static
            analysis, and the clip suggestion's per-example gradients (recorded in the same
            backward pass, rnndiag.pergrad).
Times are medians of --repeat interleaved runs (baseline, rnndiag, baseline, ...) after one
warm-up each. The load average is printed with the table: on a shared machine it moves the
numbers more than anything else.

Run: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_model.py [--repeat N] [--steps T ...]
         [--device cuda] [--step-replay] [--cell LSTM|GRU|RNN]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_check import median_times  # noqa: E402  (the bench folder is not a package)

GOAL = 2.0
VOCAB, WIDTH, HIDDEN, LABELS = 1000, 64, 256, 50


CELLS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


class Tagger(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM (or GRU) -> Linear: a label per token."""

    def __init__(self, hidden: int = HIDDEN, cell: str = "LSTM") -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.rnn = CELLS[cell](WIDTH, hidden, num_layers=2, bidirectional=True,
                               batch_first=True)
        self.head = nn.Linear(2 * hidden, LABELS)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, C)
        out, _ = self.rnn(self.embed(tokens))
        logits: Tensor = self.head(out)
        return logits


def make(hidden: int = HIDDEN, cell: str = "LSTM") -> Tagger:
    """The factory `--model bench_model:make` calls."""
    return Tagger(hidden, cell)


def setup(batch: int, steps: int, hidden: int, folder: Path,
          device: str = "cpu", cell: str = "LSTM") -> tuple[Any, ...]:
    from rnndiag.records import CheckOptions

    torch.manual_seed(0)
    model = Tagger(hidden, cell)
    tokens = torch.randint(0, VOCAB, (batch, steps))
    targets = torch.randint(0, LABELS, (batch, steps))
    ckpt, data = folder / f"tagger{steps}.safetensors", folder / f"tagger{steps}_batch.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    save_file({"inputs": tokens, "targets": targets}, data)
    options = CheckOptions(batch_path=str(data), model="bench_model:make",
                           model_kwargs=f'{{"hidden": {hidden}, "cell": "{cell}"}}',
                           device=device)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return model, optimizer, tokens.to(device), targets.to(device), (ckpt, options)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, tokens: Tensor,
                  targets: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    optimizer.step()
    if tokens.is_cuda:
        torch.cuda.synchronize()


def diagnosis(target: tuple[Path, Any]) -> None:
    from rnndiag.diagnose import diagnose_files

    [f] = diagnose_files([target[0]], target[1])
    assert f.error is None, f.error


def main() -> None:
    parser = argparse.ArgumentParser(description="rnndiag check --model vs one training step")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--cell", default="LSTM", choices=list(CELLS),
                        help="the tagger's recurrent module (RNN: step by step on the CPU)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--step-replay", action="store_true",
                        help="replay nn.LSTM step by step (modelcheck.GRAPHED off), to compare")
    args = parser.parse_args()
    if args.step_replay:
        from rnndiag import modelcheck

        modelcheck.GRAPHED = False
    os.chdir(Path(__file__).parent)  # `--model bench_model:make` imports from here
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads; "
          f"tagger: embedding "
          f"{VOCAB}x{WIDTH}, 2-layer bidirectional {args.cell} H={args.hidden}, head {LABELS}, "
          f"per-step cross-entropy; B={args.batch}")
    print(f"{'T':>5} {'train s':>8} {'rnndiag s':>9} {'time x':>7} {'load':>5}   of which "
          "(one more run): credit passes, per-example gradients, the rest")
    with tempfile.TemporaryDirectory() as tmp:
        for steps in args.steps:
            _row(steps, args, Path(tmp))


def _row(steps: int, args: argparse.Namespace, folder: Path) -> None:
    model, opt, tokens, targets, target = setup(args.batch, steps, args.hidden, folder,
                                                args.device, args.cell)
    base, ours = median_times([lambda: training_step(model, opt, tokens, targets),
                               lambda: diagnosis(target)], args.repeat)
    flag = "ok" if ours / base <= GOAL else "over"
    credit, examples, total = phases(target)
    rest = total - credit - examples
    print(f"{steps:>5} {base:8.3f} {ours:9.3f} {ours / base:7.2f} {os.getloadavg()[0]:5.1f}   "
          f"{credit / base:.2f}x + {examples / base:.2f}x + {rest / base:.2f}x {flag}",
          flush=True)


def phases(target: tuple[Path, Any]) -> tuple[float, float, float]:
    """Seconds spent in the credit passes, in the per-example gradients (the shares recorded
    in the main pass, rnndiag.pergrad, checked against two examples run as a batch of their
    own; or the loop) and in all, in one run."""
    from rnndiag import modelcheck

    names = ("credit_rows", "_shares", "_gram")
    spent = dict.fromkeys(names, 0.0)
    saved = {name: getattr(modelcheck, name) for name in names}

    def timed(name: str, fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return run

    for name in names:
        setattr(modelcheck, name, timed(name, saved[name]))
    try:
        start = time.perf_counter()
        diagnosis(target)
        total = time.perf_counter() - start
    finally:
        for name in names:
            setattr(modelcheck, name, saved[name])
    return spent["credit_rows"], spent["_shares"] + spent["_gram"], total


if __name__ == "__main__":
    main()
