"""Where the replay runs (--device) and how much memory it may take (--max-memory).

The memory estimate is for one module's replay in checkpoint mode: every layer and direction
keeps its states, the autograd graph of its steps and the captured adjoint buffers until the
backward pass ends. Measured on CPU (bench/bench_check.py, float32), the growth of the
process's resident set per layer and direction is about U * T * B * max(H, P) values, U being
the cell unit's `memory_units`; the estimate adds 25% for the allocator and rounds up.
`--max-memory` is checked against that plus the (B, T, input_size) inputs (`peak`), from the
declared sizes, before the inputs are made: a synthetic batch, an embedding lookup or the
input projection of a very wide input is never allocated first.
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
    """Half of the memory this process may still take: of the machine's physical memory, and
    of what is left under its address-space limit (ulimit -v), when one is set."""
    try:
        half = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        half = 8 * 2**30
    left = _address_space_left()
    return half if left is None else max(1, min(half, left // 2))


def _address_space_left() -> int | None:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:  # first field: the address space now, in pages
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError, IndexError):
        return None
    return max(0, soft - used)


def estimate(spec: ModuleSpec, batch: int, seq_len: int, itemsize: int) -> int:
    """Estimated peak bytes of the replay of `spec` on a (batch, seq_len) input."""
    width = max(spec.hidden_size, spec.proj_size)
    per_direction = unit(spec.cell_type).memory_units * seq_len * batch * width * itemsize
    return math.ceil(MARGIN * per_direction * spec.num_layers * len(spec.directions))


def peak(spec: ModuleSpec, batch: int, seq_len: int, itemsize: int) -> int:
    """`estimate`, plus the (B, T, input_size) inputs themselves (made in float32 by the
    synthetic batch or an embedding lookup, plus their copy in the replay dtype when that is
    not float32): they dominate when input_size is much larger than the hidden size."""
    inputs = batch * seq_len * spec.input_size * (4 if itemsize == 4 else 4 + itemsize)
    return estimate(spec, batch, seq_len, itemsize) + math.ceil(MARGIN * inputs)


def check_fits(spec: ModuleSpec, batch: int, seq_len: int, itemsize: int, limit: int) -> None:
    """OptionError when the replay's estimate is above `limit`, saying what would fit. Called
    before the inputs are made, from the sizes alone."""
    need = peak(spec, batch, seq_len, itemsize)
    if need <= limit:
        return
    name = spec.name or "<root>"
    head = (f"replaying module '{name}' (B={batch}, T={seq_len}) needs about {size_text(need)}, "
            f"above --max-memory {size_text(limit)}")
    smallest = peak(spec, 1, 1, itemsize)
    if smallest > limit:
        raise OptionError(f"{head}; even B=1, T=1 needs {size_text(smallest)}: raise "
                          "--max-memory")
    steps = limit // peak(spec, batch, 1, itemsize)
    examples = limit // peak(spec, 1, seq_len, itemsize)
    fits = [f"at B={batch} up to T={steps} fits"] if steps else []
    fits += [f"at T={seq_len} up to B={examples} fits"] if examples else []
    raise OptionError(f"{head}; {' or '.join(fits) or 'a smaller B and T fit'} (use "
                      "--batch-size/--seq-len, a smaller batch file, or raise --max-memory)")


def size_text(n: int) -> str:
    """Bytes for people: 512 bytes, 3.0 KiB, 1.50 GiB."""
    if n < 1024:
        return f"{n} bytes"
    for unit_name, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.2f} {unit_name}"
    return f"{n / 1024:.1f} KiB"


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
