"""`rnndiag inspect`: the data-free part of a diagnosis, without importing torch for
safetensors files (torch files need torch to be read safely, so they import it).

Reports the discovered architecture, NaN/Inf counts in every floating-point tensor, each
direction's sigma_max(W_hh) with Pascanu's reading, and LSTM forget-gate bias statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rnndiag import static, stfile
from rnndiag.discover import attach_embedding, discover, resolve_nonlinearity
from rnndiag.errors import RnnDiagError
from rnndiag.files import LFS_NOTE, check_readable, is_lfs_pointer, sniff_format, unwrap_names
from rnndiag.records import (
    FileStatus,
    InspectDiagnosis,
    ModuleSpec,
    NonFiniteTensor,
    StaticModule,
)

Arrays = Mapping[str, np.ndarray]


def inspect_file(path: Path, nonlinearity: str | None = None) -> InspectDiagnosis:
    fmt = "unknown"
    try:
        if path.is_file() and not is_lfs_pointer(path):
            fmt = sniff_format(path)  # named in the report even when reading fails
    except RnnDiagError:
        pass
    try:
        fmt, arrays, metadata, notes = _read(path)
    except _LfsPointer:
        return InspectDiagnosis(str(path), "lfs-pointer", FileStatus.SKIPPED, notes=(LFS_NOTE,))
    except RnnDiagError as exc:
        return InspectDiagnosis(str(path), fmt, FileStatus.ERROR, error=str(exc))
    try:
        shapes = {name: tuple(a.shape) for name, a in arrays.items()}
        specs = [resolve_nonlinearity(attach_embedding(s, shapes), metadata, nonlinearity)
                 for s in discover(shapes)]
        bad = nonfinite(arrays)
        if not specs:
            return InspectDiagnosis(str(path), fmt, FileStatus.SKIPPED, nonfinite_weights=bad,
                                    notes=notes + ("no recurrent layer (nn.RNN/LSTM/GRU or "
                                                   "their cells) in this file",))
        modules = tuple(static_module(s, arrays) for s in specs)
    except RnnDiagError as exc:
        return InspectDiagnosis(str(path), fmt, FileStatus.ERROR, error=str(exc))
    return InspectDiagnosis(str(path), fmt, FileStatus.OK, modules, bad, notes)


def _read(path: Path) -> tuple[str, dict[str, np.ndarray], dict[str, str], tuple[str, ...]]:
    """(format, name -> float64/native array with wrapper prefixes removed, metadata, notes)."""
    check_readable(path)
    if is_lfs_pointer(path):
        raise _LfsPointer()
    fmt = sniff_format(path)
    if fmt == "safetensors":
        header = stfile.read_header(path)
        raw = {name: stfile.read_array(header, name) for name in header.tensors}
        metadata = header.metadata
    else:  # a torch pickle can only be read safely by torch itself
        from rnndiag.checkpoint import read_tensors

        _, tensors, metadata = read_tensors(path)
        raw = {name: t.detach().float().double().numpy() if t.is_floating_point()
               else t.numpy() for name, t in tensors.items()}
    return fmt, unwrap_names(raw, path), metadata, ()


class _LfsPointer(Exception):
    pass


def nonfinite(arrays: Arrays) -> tuple[NonFiniteTensor, ...]:
    """Every floating-point tensor with NaN or Inf values, by name."""
    out = []
    for name in sorted(arrays):
        a = arrays[name]
        if a.dtype.kind != "f":
            continue
        nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
        if nan or inf:
            out.append(NonFiniteTensor(name, nan, inf))
    return tuple(out)


def static_module(spec: ModuleSpec, arrays: Arrays) -> StaticModule:
    prefix = f"{spec.name}." if spec.name else ""
    local = {k[len(prefix):]: a for k, a in arrays.items() if k.startswith(prefix)}
    return StaticModule(spec, tuple(static.static_layer(spec, local, layer, direction)
                                    for layer in range(spec.num_layers)
                                    for direction in spec.directions))
