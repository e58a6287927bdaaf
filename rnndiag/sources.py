"""Reading any input file: one guard, one reader per format, one NaN/Inf scan. Torch-free
(the torch reader imports torch when a torch file is read).

`read(path)` is the single way in for checkpoints (check, --model, inspect) and batch files:
it checks the file is readable, skips Git LFS pointers (`Skipped`), sniffs the format from the
content (`files.sniff_format`), reads the tensors with that format's reader (`READERS`:
safetensors, torch, npz), keeping only the part named
by `state_key` (`--state-key`) when given, and removes wrapper prefixes (`module.`,
`_orig_mod.`). `guarded` turns whatever goes wrong with one file into that file's record, so
one bad file never hides the others.

Reading is bounded before it allocates: a file holds at most `MAX_TENSORS` tensors, and what
its tensors take once read (`footprint`: declared element counts, floats counted at 8 bytes
as inspect converts them to float64) must fit in the reading limit (`--max-memory` when given,
else `resources.default_limit`). Safetensors files are measured from their header, torch and
.npz files from their zip directory (the sizes members decompress to) before anything is
decompressed, and torch files again from the tensors' shapes before any is copied (a stride-0
view of a tiny storage can stand for gigabytes).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.lib.npyio import NpzFile

from rnndiag import resources, stfile
from rnndiag.errors import CheckpointError, RnnDiagError
from rnndiag.files import (
    LFS_NOTE,
    check_readable,
    is_lfs_pointer,
    one_line,
    sniff_format,
    under_key,
    unwrap_names,
)
from rnndiag.records import FileStatus, NonFiniteTensor, TrainingState
from rnndiag.resources import size_text as _size

T = TypeVar("T")
MAX_TENSORS = 100_000  # tensors (or .npz arrays) in one file; a 70B-parameter LLM has ~1,000


class Skipped(CheckpointError):
    """The file is skipped with a note (a Git LFS pointer), not failed; to a caller that reads
    one file directly, it is a file that holds no checkpoint."""

    def __init__(self, path: Path, format: str, note: str) -> None:  # noqa: A002
        super().__init__(f"{path}: {note}")
        self.format, self.note = format, note


@dataclass(frozen=True)
class RawFile:
    """A file's tensors as its format's reader gives them (numpy arrays for safetensors and
    .npz, torch tensors for torch files), under names without wrapper prefixes, with their
    dtypes."""

    path: Path
    format: str  # "safetensors" | "torch" | "npz"
    arrays: dict[str, Any]
    metadata: dict[str, str]
    dtypes: dict[str, str]  # name -> the stored dtype ("float16", "bfloat16", "float32", ...)
    notes: tuple[str, ...] = ()  # what reading chose or left out (a container, optimizer state)
    training: TrainingState | None = None  # a training checkpoint's optimizer kind and lr


class Reader(Protocol):
    """One format's reader: the file's tensors under their stored names (wrappers not yet
    removed), only those under `state_key.` (renamed without it) when `state_key` is given."""

    def __call__(self, path: Path, *, state_key: str | None = None,
                 limit: int) -> RawFile: ...


def guard(path: Path) -> str:
    """The file's format, after the checks every input goes through first."""
    check_readable(path)
    try:
        if is_lfs_pointer(path):
            raise Skipped(path, "lfs-pointer", LFS_NOTE)
        return sniff_format(path)
    except OSError as exc:  # a regular file that cannot be read: /proc/self/mem (EIO)
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None


def _read_safetensors(path: Path, *, state_key: str | None = None, limit: int) -> RawFile:
    header = stfile.read_header(path)
    stored = {name: name for name in header.tensors}  # name to report -> name in the file
    if state_key is not None:
        stored = under_key(stored, state_key, path)
    check_count(path, len(stored))
    infos = [header.tensors[key] for key in stored.values()]
    check_budget(path, sum(_footprint(math.prod(t.shape), stfile.ITEMSIZE[t.dtype],
                                      t.dtype not in stfile.INTEGERS) for t in infos), limit)
    arrays = stfile.read_arrays(header, stored)
    dtypes = {name: stfile.DTYPE_NAMES.get(header.tensors[key].dtype, header.tensors[key].dtype)
              for name, key in stored.items()}
    return RawFile(path, "safetensors", arrays, header.metadata, dtypes)


def _read_torch(path: Path, *, state_key: str | None = None, limit: int) -> RawFile:
    from rnndiag.checkpoint import torch_tensors  # a pickle is read safely only by torch

    check_archive(path, limit)
    tensors, notes, training = torch_tensors(path, state_key=state_key)
    check_count(path, len(tensors))
    check_budget(path, sum(_footprint(t.numel(), t.element_size(),
                                      t.is_floating_point() or t.is_complex())
                           for t in tensors.values()), limit)
    dtypes = {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()}
    return RawFile(path, "torch", tensors, {}, dtypes, notes, training)


def _footprint(count: int, itemsize: int, floating: bool) -> int:
    """Bytes a tensor of `count` elements may take once read: floats as float64 (inspect's
    working type; complex at their own size, at least 8), others at their own size."""
    return count * (max(itemsize, 8) if floating else itemsize)


def check_count(path: Path, count: int) -> None:
    if count > MAX_TENSORS:
        raise CheckpointError(f"{path}: holds {count:,} tensors, more than the {MAX_TENSORS:,} "
                              "rnndiag reads from one file")


def check_budget(path: Path, need: int, limit: int) -> None:
    """`need` bytes of tensors fit in the reading limit, or a one-line refusal."""
    if need > limit:
        raise CheckpointError(f"{path}: its tensors take about {_size(need)} once read, above "
                              f"the {_size(limit)} limit on what reading may allocate (raise "
                              "it with --max-memory)")


def check_archive(path: Path, limit: int) -> None:
    """A zip archive's members, at the sizes its directory says they decompress to, fit in the
    reading limit (a pickle at 8 times its size: the objects it builds). Declared sizes bound
    what is allocated: a member that inflates past its declared size is an error to torch and
    numpy, not a larger buffer. Not a zip (a legacy torch file): nothing to measure here."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except Exception:  # a damaged archive: its reader says what is wrong
        return
    check_count(path, len(members))
    need = sum(m.file_size * (8 if m.filename.endswith(".pkl") else 1) for m in members)
    if need > limit:
        raise CheckpointError(f"{path}: its zip members decompress to about {_size(need)}, "
                              f"above the {_size(limit)} limit on what reading may allocate "
                              "(raise it with --max-memory)")


# The dtypes an .npz array may have: those torch.from_numpy takes (not float128, strings,
# datetimes or structured records)
NPZ_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                        "uint64", "float16", "float32", "float64", "complex64", "complex128"})


def _read_npz(path: Path, *, state_key: str | None = None, limit: int) -> RawFile:
    """Every array of a numpy .npz archive under its key, read with allow_pickle=False (never
    True): an object array, which would need pickle, is refused by name and never loaded."""
    check_archive(path, limit)
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {name: name for name in npz.files}
            if state_key is not None:
                stored = under_key(stored, state_key, path)
            check_count(path, len(stored))
            arrays = {name: _npz_array(npz, key, path) for name, key in stored.items()}
    except RnnDiagError:
        raise
    except Exception as exc:  # a damaged archive or member: zip, zlib and .npy header errors
        raise CheckpointError(f"{path}: cannot read .npz ({one_line(exc)})") from None
    return RawFile(path, "npz", arrays, {}, {k: a.dtype.name for k, a in arrays.items()})


def _npz_array(npz: NpzFile, key: str, path: Path) -> np.ndarray:
    """One member, in native byte order (torch.from_numpy takes no other)."""
    try:
        array: np.ndarray = npz[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):  # numpy's refusal names the option; other errors
            raise                           # are a damaged member
        raise CheckpointError(f"{path}: refused: array {key!r} holds Python objects (an object "
                              "array needs pickle, which rnndiag never loads)") from None
    if array.dtype.name not in NPZ_DTYPES:
        raise CheckpointError(f"{path}: array {key!r} has dtype {array.dtype.name}, not a "
                              "number type")
    return array.astype(array.dtype.newbyteorder("="), copy=False)


READERS: dict[str, Reader] = {"safetensors": _read_safetensors, "torch": _read_torch,
                              "npz": _read_npz}


def read(path: Path, fmt: str | None = None, *, state_key: str | None = None,
         limit: int | None = None) -> RawFile:
    """The file's tensors (only those under `state_key`, renamed without it, when given);
    `fmt` is what `guard` already returned (it guards the file when not given); `limit` bounds
    what reading allocates (bytes; `resources.default_limit()` when None)."""
    try:
        raw = READERS[fmt or guard(path)](path, state_key=state_key,
                                          limit=limit or resources.default_limit())
    except OSError as exc:  # /proc/self/mem, a file removed or truncated meanwhile, EIO, ...
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or one_line(exc)})") from None
    return replace(raw, arrays=unwrap_names(raw.arrays, path),
                   dtypes=unwrap_names(raw.dtypes, path))


def as_numpy(raw: RawFile) -> dict[str, np.ndarray]:
    """Every tensor as a numpy array: floats in float64, others in their own type."""
    out = {}
    for name, x in raw.arrays.items():
        if not isinstance(x, np.ndarray):  # a torch tensor
            x = x.detach().float().double().numpy() if x.is_floating_point() else x.numpy()
        out[name] = x.astype(np.float64) if x.dtype.kind == "f" else x
    return out


def nonfinite(arrays: Mapping[str, Any]) -> tuple[NonFiniteTensor, ...]:
    """Every floating-point tensor holding NaN or Inf, with counts, by name (numpy arrays, or
    anything `np.asarray` views without a copy, such as CPU torch tensors)."""
    out = []
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        if a.dtype.kind != "f" or a.size == 0:
            continue
        finite = np.isfinite(a)
        if finite.all():
            continue
        nan = int(np.isnan(a).sum())
        out.append(NonFiniteTensor(name, nan, int(a.size - finite.sum()) - nan))
    return tuple(out)


def guarded(path: Path, work: Callable[[RawFile], T],
            failed: Callable[[str, FileStatus, str | None, tuple[str, ...]], T],
            debug: bool = False, *, state_key: str | None = None, limit: int | None = None,
            ) -> T:
    """`work(read(path, state_key=state_key, limit=limit))`, or `failed(format, status, error,
    notes)` for a skipped or unusable file. A bug in rnndiag is that file's error too
    (`internal error: ...`); `debug` lets it raise instead, for the traceback."""
    fmt = "unknown"
    try:
        fmt = guard(path)
        return work(read(path, fmt, state_key=state_key, limit=limit))
    except Skipped as skip:
        return failed(skip.format, FileStatus.SKIPPED, None, (skip.note,))
    except RnnDiagError as exc:
        return failed(fmt, FileStatus.ERROR, str(exc), ())
    except MemoryError:
        if debug:
            raise
        return failed(fmt, FileStatus.ERROR, f"{path}: ran out of memory (lower --max-memory "
                      "to have it refused before it is read)", ())
    except Exception as exc:
        if debug:
            raise
        return failed(fmt, FileStatus.ERROR, f"{path}: internal error: "
                      f"{type(exc).__name__}: {one_line(exc, 300)}", ())
