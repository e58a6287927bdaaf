"""Cost of a full `rnndiag check` against one fused PyTorch training step, in one process.

For each cell type (RNN, LSTM, GRU) at B=32, T=400, input 64, hidden 256, 2 layers:
  baseline: forward + backward (parameter gradients) of the fused nn.RNN/LSTM/GRU on the batch,
            with the same final-state objective rnndiag uses;
  rnndiag:  diagnose_files() on a safetensors checkpoint and batch file: loading, discovery,
            step-by-step replay, every per-step series, spans, static analysis, clip suggestion.
Times are medians of --repeat interleaved runs after one warm-up; peak memory is the growth of
the process's resident set (peak reset through /proc/self/clear_refs, then VmHWM - VmRSS)
while running the workload once, each in a fresh subprocess. Then the scaling in T (100, 400,
1600) for the LSTM.

Run: .venv/bin/python bench/bench_check.py [--repeat N] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

GOAL = 1.5
CLASSES = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}


def setup(kind: str, batch: int, steps: int, folder: Path) -> tuple[Any, Any, Any]:
    from rnndiag.records import CheckOptions

    torch.manual_seed(0)
    module = CLASSES[kind](64, 256, num_layers=2, batch_first=True)
    x = torch.randn(batch, steps, 64)
    ckpt, data = folder / f"{kind}.safetensors", folder / f"{kind}_batch.safetensors"
    save_file({f"rnn.{k}": v.contiguous() for k, v in module.state_dict().items()}, ckpt)
    save_file({"inputs": x}, data)
    return module, x, (ckpt, CheckOptions(batch_path=str(data)))


def fused_step(module: nn.Module, x: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    _, state = module(x)
    h_n = state[0] if isinstance(state, tuple) else state
    (h_n[-1].pow(2).sum() / (2 * x.shape[0])).backward()


def diagnosis(target: tuple[Path, Any]) -> None:
    from rnndiag.diagnose import diagnose_files

    [f] = diagnose_files([target[0]], target[1])
    assert f.error is None, f.error


def median_times(fns: list[Any], repeat: int) -> list[float]:
    """Medians of interleaved runs (a, b, a, b, ...) after one warm-up each, so that drift in
    the machine's speed hits both sides alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def peak_growth_mb(kind: str, steps: int, which: str) -> float:
    """Run one workload in a fresh process; return its peak RSS growth in MiB."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import bench_check as b; b.child(sys.argv[1], int(sys.argv[2]), sys.argv[3])")
    out = subprocess.run([sys.executable, "-c", code, kind, str(steps), which],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["mb"])


def child(kind: str, steps: int, which: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        module, x, target = setup(kind, 32, steps, Path(tmp))
        import rnndiag.diagnose  # noqa: F401  (imports are not the workload)

        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (Linux >= 4.0)
        before = _status_kb("VmRSS")
        fused_step(module, x) if which == "fused" else diagnosis(target)
        after = _status_kb("VmHWM")
    print(json.dumps({"mb": (after - before) / 1024}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description="rnndiag check vs a fused training step")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="skip memory and T scaling")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=32 I=64 H=256 L=2")
    print(f"{'cell':<5} {'T':>5} {'fused s':>8} {'rnndiag s':>9} {'time x':>7} "
          f"{'fused MiB':>9} {'rnndiag MiB':>11} {'mem x':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in CLASSES:
            _row(kind, 400, args, Path(tmp), memory=not args.quick)
        if not args.quick:
            print("scaling in T (LSTM):")
            for steps in (100, 400, 1600):
                _row("LSTM", steps, args, Path(tmp), memory=False)


def _row(kind: str, steps: int, args: argparse.Namespace, folder: Path, memory: bool) -> None:
    module, x, target = setup(kind, 32, steps, folder)
    base, ours = median_times([lambda: fused_step(module, x), lambda: diagnosis(target)],
                              args.repeat)
    mem = ""
    if memory:
        fm, dm = peak_growth_mb(kind, steps, "fused"), peak_growth_mb(kind, steps, "rnndiag")
        mem = f"{fm:9.0f} {dm:11.0f} {dm / fm:6.2f}"
    flag = "ok" if ours / base <= GOAL else "over"
    print(f"{kind:<5} {steps:>5} {base:8.3f} {ours:9.3f} {ours / base:7.2f} {mem} {flag}",
          flush=True)


if __name__ == "__main__":
    main()
