"""Start-up cost of the CLI, as ratios to baselines measured in the same run (medians).

    rnndiag --help          vs  python -c "import typer, rich"   goal <= 1.5x
    rnndiag inspect SAMPLE  vs  python -c "import torch"         goal <= 0.5x
    rnndiag check SAMPLE    vs  python -c "import torch"         goal <= 1.6x

Run: .venv/bin/python bench/bench_startup.py [--repeat N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = str(ROOT / "sample_models" / "rnn_tanh_vanishing.safetensors")
RNNDIAG = [sys.executable, "-m", "rnndiag"]


def median_seconds(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    repeat = parser.parse_args().repeat
    py = [sys.executable, "-c"]
    cases = [
        ("rnndiag --help", RNNDIAG + ["--help"], "import typer, rich", py + ["import typer, rich"],
         1.5),
        ("rnndiag inspect", RNNDIAG + ["inspect", SAMPLE], "import torch", py + ["import torch"],
         0.5),
        ("rnndiag check", RNNDIAG + ["check", SAMPLE], "import torch", py + ["import torch"],
         1.6),
    ]
    print(f"{'command':<18} {'seconds':>8} {'baseline':<20} {'seconds':>8} {'ratio':>6} goal")
    for name, cmd, base_name, base, goal in cases:
        base_s = median_seconds(base, repeat)
        cmd_s = median_seconds(cmd, repeat)
        ratio = cmd_s / base_s
        status = "ok" if ratio <= goal else "MISSED"
        print(f"{name:<18} {cmd_s:8.3f} {base_name:<20} {base_s:8.3f} {ratio:6.2f} "
              f"<= {goal} {status}")


if __name__ == "__main__":
    main()
