"""Where the replay runs (--device) and how much memory it may take (--max-memory).

The memory estimate is for one module's replay in checkpoint mode: every layer and direction
keeps its states, the autograd graph of its steps and the captured adjoint buffers until the
backward pass ends. Measured on CPU (bench/bench_check.py, float32), the growth of the
process's resident set per layer and direction is about U * T * B * max(H, P) values, U being
the cell unit's `memory_units`; the estimate adds 25% for the allocator and rounds up.
"""

from __future__ import annotations

import math
import os
import re

from rnndiag.cells import unit
from rnndiag.errors import OptionError
from rnndiag.records import ModuleSpec

MARGIN = 1.25
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'512M', '8G', '1.5GiB', '1000000' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise OptionError(f"--max-memory {text!r}: expected a size such as 512M, 8G or 1.5GiB")
    return int(float(m[1]) * _SCALE[m[2].lower()])


def default_limit() -> int:
    """Half of the machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def estimate(spec: ModuleSpec, batch: int, seq_len: int, itemsize: int) -> int:
    """Estimated peak bytes of replaying `spec` on a (batch, seq_len) input."""
    width = max(spec.hidden_size, spec.proj_size)
    per_direction = unit(spec.cell_type).memory_units * seq_len * batch * width * itemsize
    return math.ceil(MARGIN * per_direction * spec.num_layers * len(spec.directions))


def check_fits(spec: ModuleSpec, batch: int, seq_len: int, itemsize: int, limit: int) -> None:
    need = estimate(spec, batch, seq_len, itemsize)
    if need <= limit:
        return
    per_step = estimate(spec, batch, 1, itemsize)
    per_example = estimate(spec, 1, seq_len, itemsize)
    name = spec.name or "<root>"
    raise OptionError(
        f"replaying module '{name}' (B={batch}, T={seq_len}) needs about {_gib(need)}, above "
        f"--max-memory {_gib(limit)}; at B={batch} up to T={limit // per_step} fits, or at "
        f"T={seq_len} up to B={limit // per_example} (use --batch-size/--seq-len, a smaller "
        "batch file, or raise --max-memory)")


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def resolve_device(name: str) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' -> a device torch can use, or a one-line error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise OptionError(f"--device {name}: CUDA is not available (torch "
                              f"{torch.__version__}, {build}); use --device cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise OptionError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                              "device(s) visible")
        return name
    raise OptionError(f"--device {name!r}: expected cpu, cuda, cuda:N or auto")
