"""The inputs a module is replayed on: a batch file, or a deterministic synthetic batch.

A batch file (`.safetensors` or `.pt`) holds `inputs`: (B, T, input_size) floats, or (B, T)
integer token ids for a module fed by an embedding. A tensor named `inputs.<module name>`
overrides `inputs` for that module. `targets` may be present; it is used by task losses only.

The synthetic batch, per module: x ~ N(0, 1) of shape (B, T, input_size) drawn from a
`torch.Generator` seeded with `seed` (token ids uniform in [0, V) when an embedding feeds the
module), so every run and every module order gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rnndiag.checkpoint import read_tensors
from rnndiag.errors import BatchError, CheckpointError
from rnndiag.records import ModuleSpec


@dataclass(frozen=True)
class BatchFile:
    path: str
    tensors: dict[str, Tensor]


def load_batch(path: Path, limit: int | None = None) -> BatchFile:
    """Read a batch file (what reading allocates bounded by `limit`, `sources.read`); it must
    hold an `inputs` tensor (or `inputs.<module>` tensors) of finite numbers."""
    try:
        _, tensors, _ = read_tensors(path, limit)
    except CheckpointError as exc:
        raise BatchError(f"batch {exc}") from None
    if not any(k == "inputs" or k.startswith("inputs.") for k in tensors):
        found = ", ".join(sorted(tensors)[:8]) or "none"
        raise BatchError(f"batch {path}: no 'inputs' tensor (found: {found})")
    check_finite_inputs(tensors, str(path))
    return BatchFile(str(path), tensors)


def check_finite_inputs(tensors: Mapping[str, Tensor], where: str) -> None:
    """Every floating-point `inputs`/`inputs.*` tensor is finite: a NaN or Inf in the data would
    be reported as the model's exploding gradient, so it is refused here, named and counted."""
    for name in sorted(tensors):
        x = tensors[name]
        if not (name == "inputs" or name.startswith("inputs.")) or not (
                x.is_floating_point() or x.is_complex()):
            continue
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            nan = int(torch.isnan(x).sum())
            raise BatchError(f"batch {where}: {name!r} holds {nan} NaN and {bad - nan} infinite "
                             f"values (of {x.numel()}); rnndiag diagnoses the model, not the "
                             "data: clean or drop them")


def synthetic_inputs(spec: ModuleSpec, batch_size: int, seq_len: int, seed: int,
                     vocab: int | None) -> Tensor:
    """x ~ N(0, 1), (B, T, input_size) float32; or token ids (B, T) when `vocab` is given."""
    gen = torch.Generator().manual_seed(seed)
    if vocab is not None and vocab < 1:
        raise BatchError(f"module '{spec.name or '<root>'}': its embedding {spec.embedding} has "
                         "no rows, so there are no token ids to feed it")
    if vocab is not None:
        return torch.randint(0, vocab, (batch_size, seq_len), generator=gen)
    return torch.randn(batch_size, seq_len, spec.input_size, generator=gen)


def file_inputs(spec: ModuleSpec, batch: BatchFile) -> tuple[str, Tensor]:
    """(tensor name, inputs) for `spec` from a batch file: `inputs.<name>`, else `inputs`."""
    for name in (f"inputs.{spec.name}", "inputs"):
        if name in batch.tensors:
            return name, batch.tensors[name]
    raise BatchError(f"batch {batch.path}: no 'inputs' tensor for module "
                     f"'{spec.name or '<root>'}' (add 'inputs' or 'inputs.{spec.name}')")


def embed_or_check(spec: ModuleSpec, inputs: Tensor, where: str,
                   tensors: Mapping[str, Tensor]) -> tuple[Tensor, str | None]:
    """Validate `inputs` for `spec`; look token ids up in its embedding. Returns (B, T, I)."""
    if inputs.is_floating_point() and inputs.ndim == 3:
        if inputs.shape[2] != spec.input_size:
            raise BatchError(f"{where}: shape {tuple(inputs.shape)} but module "
                             f"'{spec.name or '<root>'}' takes input_size {spec.input_size}: "
                             f"expected (B, T, {spec.input_size})")
        _check_nonempty(inputs, where)
        return inputs, None
    if not inputs.is_floating_point() and not inputs.is_complex() and inputs.ndim == 2 \
            and inputs.dtype != torch.bool:
        return _embed(spec, inputs, where, tensors)
    raise BatchError(f"{where}: shape {tuple(inputs.shape)} dtype "
                     f"{str(inputs.dtype).removeprefix('torch.')}: expected float "
                     f"(B, T, {spec.input_size}) or integer token ids (B, T)")


def _embed(spec: ModuleSpec, ids: Tensor, where: str,
           tensors: Mapping[str, Tensor]) -> tuple[Tensor, str]:
    if spec.embedding is None:
        label = spec.name or "<root>"
        if len(spec.candidates) > 1:
            why = (f"rnndiag does not guess between {', '.join(spec.candidates)}: choose with "
                   f"--embedding {label}=TENSOR")
        elif spec.candidates:
            why = (f"{spec.candidates[0]} may feed a convolution rather than module '{label}': "
                   f"choose with --embedding {label}={spec.candidates[0]}")
        else:
            why = f"no embedding of width {spec.input_size} feeds module '{label}'"
        raise BatchError(f"{where}: integer token ids, but {why}")
    _check_nonempty(ids, where)
    table = tensors[spec.embedding]
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= table.shape[0]:
        raise BatchError(f"{where}: token ids span {lo}..{hi}, outside the "
                         f"{table.shape[0]}-row embedding {spec.embedding}")
    return table[ids.long()], spec.embedding


def _check_nonempty(inputs: Tensor, where: str) -> None:
    if inputs.shape[0] == 0 or inputs.shape[1] == 0:
        raise BatchError(f"{where}: shape {tuple(inputs.shape)} has no "
                         f"{'examples' if inputs.shape[0] == 0 else 'time steps'}")


def file_lengths(batch: BatchFile, batch_size: int, seq_len: int) -> Tensor | None:
    """The batch file's `lengths` (B,), checked against the inputs' B and T; None if absent."""
    lengths = batch.tensors.get("lengths")
    if lengths is None:
        return None
    where = f"batch {batch.path}: 'lengths'"
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool \
            or tuple(lengths.shape) != (batch_size,):
        raise BatchError(f"{where}: shape {tuple(lengths.shape)} dtype "
                         f"{str(lengths.dtype).removeprefix('torch.')}: expected {batch_size} "
                         "integer lengths, one per example")
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > seq_len:
        raise BatchError(f"{where}: lengths span {lo}..{hi}, outside 1..{seq_len} (the "
                         "inputs' time steps)")
    return lengths.long()
