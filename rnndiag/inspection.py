"""`rnndiag inspect`: the data-free part of a diagnosis, without importing torch for
safetensors files (torch files need torch to be read safely, so they import it).

Reports the discovered architecture, NaN/Inf counts in every floating-point tensor, each
direction's sigma_max(W_hh) with Pascanu's reading, and LSTM forget-gate bias statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

from rnndiag import static
from rnndiag.discover import find_modules, mark_nonfinite
from rnndiag.records import FileStatus, InspectDiagnosis, ModuleSpec, StaticModule
from rnndiag.sources import RawFile, as_numpy, guarded, nonfinite

NO_RECURRENT = "no recurrent layer (nn.RNN/LSTM/GRU or their cells) in this file"

Arrays = Mapping[str, np.ndarray]
V = TypeVar("V")


def inspect_file(path: Path, nonlinearity: str | None = None, debug: bool = False, *,
                 state_key: str | None = None) -> InspectDiagnosis:
    """The static facts of one file (of the entry `state_key` names, when given)."""
    def work(raw: RawFile) -> InspectDiagnosis:
        arrays = as_numpy(raw)
        specs = find_modules({name: a.shape for name, a in arrays.items()}, raw.metadata,
                             nonlinearity, dtypes=raw.dtypes)
        bad = mark_nonfinite(nonfinite(arrays), (s.name for s in specs), strict=False)
        if not specs:
            return InspectDiagnosis(str(path), raw.format, FileStatus.SKIPPED,
                                    nonfinite_weights=bad, notes=raw.notes + (NO_RECURRENT,))
        owned = by_module(arrays)
        modules = tuple(static_module(s, owned.get(s.name, {})) for s in specs)
        return InspectDiagnosis(str(path), raw.format, FileStatus.OK, modules, bad,
                                notes=raw.notes)

    def failed(fmt: str, status: FileStatus, error: str | None,
               notes: tuple[str, ...]) -> InspectDiagnosis:
        return InspectDiagnosis(str(path), fmt, status, notes=notes, error=error)

    return guarded(path, work, failed, debug, state_key=state_key)


def by_module(arrays: Mapping[str, V]) -> dict[str, dict[str, V]]:
    """{module name: {local name: array}} for every `module.local` key ("" for top-level keys),
    in one pass: looking each module's tensors up by prefix would be quadratic in a file of
    many small modules."""
    out: dict[str, dict[str, V]] = {}
    for key, a in arrays.items():
        head, _, local = key.rpartition(".")
        out.setdefault(head, {})[local] = a
    return out


def static_module(spec: ModuleSpec, local: Arrays) -> StaticModule:
    """The static facts of one module from its own tensors, by local name (`weight_hh_l0`)."""
    return StaticModule(spec, tuple(static.static_layer(spec, local, layer, direction)
                                    for layer in range(spec.num_layers)
                                    for direction in spec.directions))
