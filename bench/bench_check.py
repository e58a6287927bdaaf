"""Cost of a full `rnndiag check` against one fused PyTorch training step, in one process.

For each cell type (RNN, LSTM, GRU), unidirectional and bidirectional, 2 layers, input 64, at
B=32 and (H, T) = (256, 400) (and (512, 1000) with --big):
  baseline: forward + backward (parameter gradients) of the fused nn.RNN/LSTM/GRU on the batch
            (cuDNN with --device cuda), with the same final-state objective rnndiag uses;
  rnndiag:  diagnose_files() on a safetensors checkpoint and batch file: loading, discovery,
            step-by-step replay, every per-step series, spans, static analysis, clip suggestion.
Times are medians of --repeat interleaved runs after one warm-up (CUDA: synchronised); peak
memory, on CPU, is the growth of the process's resident set (peak reset through
/proc/self/clear_refs, then VmHWM - VmRSS) while running the workload once, each in a fresh
subprocess; on CUDA, torch.cuda.max_memory_allocated over one run. Then the scaling in T
(100, 400, 1600) for the LSTM. Each row ends with the 1-minute load average: on a shared
machine it moves the ratios more than anything else.

Run: OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_check.py [--repeat N] [--quick]
         [--big | --only-big] [--cells LSTM ...] [--device cuda] [--lengths]
         [--route steps|fused|manual|graphed]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

GOAL = 1.2  # time; memory: 1.5
MEMORY_GOAL = 1.5
CLASSES = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}


def setup(kind: str, batch: int, steps: int, folder: Path, hidden: int = 256,
          bidirectional: bool = False, device: str = "cpu", lengths: bool = False,
          ) -> tuple[Any, Any, Any]:
    """(module, its input: x, or (x, lengths) with `lengths`, the diagnosis's target)."""
    from rnndiag.records import CheckOptions

    torch.manual_seed(0)
    module = CLASSES[kind](64, hidden, num_layers=2, batch_first=True,
                           bidirectional=bidirectional)
    x = torch.randn(batch, steps, 64)
    name = f"{kind}{hidden}_{steps}_{int(bidirectional)}_{int(lengths)}"
    ckpt, data = folder / f"{name}.safetensors", folder / f"{name}_batch.safetensors"
    save_file({f"rnn.{k}": v.contiguous() for k, v in module.state_dict().items()}, ckpt)
    tensors = {"inputs": x}
    if lengths:  # each example its own length, from T/2 to T (a packed batch)
        tensors["lengths"] = torch.randint(steps // 2, steps + 1, (batch,))
        tensors["lengths"][0] = steps
    save_file(tensors, data)
    given = x.to(device) if not lengths else (x.to(device), tensors["lengths"])
    return (module.to(device), given,
            (ckpt, CheckOptions(batch_path=str(data), device=device)))


def fused_step(module: nn.Module, given: Any) -> None:
    """Forward and backward of the fused module on x, or on (x, lengths) as a packed
    sequence, with the final-state objective."""
    from torch.nn.utils.rnn import pack_padded_sequence

    module.zero_grad(set_to_none=True)
    x = given[0] if isinstance(given, tuple) else given
    _, state = module(x if not isinstance(given, tuple) else pack_padded_sequence(
        x, given[1], batch_first=True, enforce_sorted=False))
    h_n = state[0] if isinstance(state, tuple) else state
    finals = h_n[-2:] if getattr(module, "bidirectional", False) else h_n[-1:]
    (finals.pow(2).sum() / (2 * x.shape[0])).backward()
    _sync(x.device.type)


def diagnosis(target: tuple[Path, Any]) -> None:
    from rnndiag.diagnose import diagnose_files

    [f] = diagnose_files([target[0]], target[1])
    assert f.error is None, f.error
    _sync(target[1].device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def peak_growth_mb(kind: str, steps: int, which: str, hidden: int = 256,
                   bidirectional: bool = False) -> float:
    """Run one workload in a fresh process; return its peak RSS growth in MiB."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import bench_check as b; b.child(sys.argv[1], int(sys.argv[2]), sys.argv[3], "
            "int(sys.argv[4]), sys.argv[5] == '1')")
    out = subprocess.run([sys.executable, "-c", code, kind, str(steps), which, str(hidden),
                          str(int(bidirectional))],
                         capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)["mb"])


def cuda_peak_mb(fn: Any) -> float:
    """Peak CUDA memory allocated while running `fn` once, above what was allocated before."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    return float(torch.cuda.max_memory_allocated() - before) / 2**20


def child(kind: str, steps: int, which: str, hidden: int = 256,
          bidirectional: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        module, x, target = setup(kind, 32, steps, Path(tmp), hidden, bidirectional)
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
    parser.add_argument("--big", action="store_true", help="also H=512, T=1000")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (baseline: cuDNN)")
    parser.add_argument("--cells", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--only-big", action="store_true", help="H=512, T=1000 rows only")
    parser.add_argument("--lengths", action="store_true",
                        help="a batch of variable lengths (T/2 to T; the baseline packed); "
                             "time only")
    parser.add_argument("--route", choices=["steps", "fused", "manual", "graphed"],
                        help="force one replay route (rnndiag.routes), to compare")
    args = parser.parse_args()
    if args.route:
        from rnndiag import routes

        routes.default_route = lambda *_: args.route
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}; B=32 I=64 L=2; goals: time <= {GOAL}x, "
          f"memory <= {MEMORY_GOAL}x")
    print(f"{'cell':<5} {'dirs':>4} {'H':>4} {'T':>5} {'fused s':>8} {'rnndiag s':>9} "
          f"{'time x':>7} {'fused MiB':>9} {'rnndiag MiB':>11} {'mem x':>6} {'load':>5}")
    sizes = ([] if args.only_big else [(256, 400)]) + (
        [(512, 1000)] if args.big or args.only_big else [])
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, steps in sizes:
            for bidirectional in (False, True):
                for kind in args.cells:
                    _row(kind, steps, args, Path(tmp), not (args.quick or args.lengths),
                         hidden, bidirectional)
        if not (args.quick or args.lengths):
            print("scaling in T (LSTM, H=256, unidirectional):")
            for steps in (100, 400, 1600):
                _row("LSTM", steps, args, Path(tmp), False, 256, False)


def _row(kind: str, steps: int, args: argparse.Namespace, folder: Path, memory: bool,
         hidden: int, bidirectional: bool) -> None:
    module, x, target = setup(kind, 32, steps, folder, hidden, bidirectional, args.device,
                              args.lengths)
    base, ours = median_times([lambda: fused_step(module, x), lambda: diagnosis(target)],
                              args.repeat)
    mem, over = f"{'':>9} {'':>11} {'':>6}", ours / base > GOAL
    if memory:
        if args.device.startswith("cuda"):
            fm, dm = cuda_peak_mb(lambda: fused_step(module, x)), cuda_peak_mb(
                lambda: diagnosis(target))
        else:
            fm = peak_growth_mb(kind, steps, "fused", hidden, bidirectional)
            dm = peak_growth_mb(kind, steps, "rnndiag", hidden, bidirectional)
        mem, over = f"{fm:9.0f} {dm:11.0f} {dm / fm:6.2f}", over or dm / fm > MEMORY_GOAL
    dirs = 2 if bidirectional else 1
    print(f"{kind:<5} {dirs:>4} {hidden:>4} {steps:>5} {base:8.3f} {ours:9.3f} "
          f"{ours / base:7.2f} {mem} {os.getloadavg()[0]:5.1f} {'over' if over else 'ok'}",
          flush=True)


if __name__ == "__main__":
    main()
