"""A torch-free, validating reader of safetensors files (format: 8-byte little-endian header
length N, N bytes of JSON header, then the data buffer).

Everything is checked before any tensor is touched: header length bounded by the file size and
`MAX_HEADER`, JSON that parses to an object without duplicate names, known dtypes, integer
shapes, offsets inside the buffer whose size matches the shape, tensors that do not overlap.
Tensors are read from a read-only memory map (`read_native`); the file is opened read-only.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rnndiag.errors import CheckpointError

MAX_HEADER = 100_000_000  # the safetensors library's own limit (bytes, not MiB)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
            "C64": 8}
NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
         "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8",
         "BOOL": "?", "C64": "<c8"}
FLOATS = ("F64", "F32", "F16", "BF16")
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
               "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data buffer
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: Path) -> Header:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: invalid safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        # The declared length is never echoed: for a file that is not safetensors (a symlink
        # to a private file, say) it is that file's first 8 bytes.
        if 8 + n > size:
            raise CheckpointError(f"{path}: invalid safetensors file (its first 8 bytes do not "
                                  f"give a header length that fits in its {size} bytes)")
        if n > MAX_HEADER:
            raise CheckpointError(f"{path}: invalid safetensors file (header longer than the "
                                  f"{MAX_HEADER:,}-byte limit)")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: invalid safetensors header (not UTF-8 text)") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid safetensors header ({_short(exc)})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: invalid safetensors header (not a JSON object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError(f"{path}: invalid safetensors header (__metadata__ must map "
                              "strings to strings)")
    tensors = {name: _info(path, name, entry) for name, entry in doc.items()}
    _check_layout(path, tensors, size - 8 - n)
    return Header(path, 8 + n, tensors, metadata)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate tensor name {key!r}")
        out[key] = value
    return out


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:160]


def _info(path: Path, name: str, entry: Any) -> TensorInfo:
    bad = f"{path}: invalid safetensors header: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise CheckpointError(f"{bad} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{bad} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{bad} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise CheckpointError(f"{bad}: data_offsets {offsets} hold {end - begin} bytes but "
                              f"shape {shape} of {dtype} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _check_layout(path: Path, tensors: dict[str, TensorInfo], buffer: int) -> None:
    last_end, last_name = 0, None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.end > buffer:
            raise CheckpointError(f"{path}: truncated or invalid safetensors file: tensor "
                                  f"{t.name!r} ends at byte {t.end} of a {buffer}-byte buffer")
        if t.begin < last_end:
            raise CheckpointError(f"{path}: invalid safetensors file: tensors {last_name!r} "
                                  f"and {t.name!r} overlap")
        if t.end > t.begin:
            last_end, last_name = t.end, t.name


def read_native(header: Header, name: str) -> np.ndarray:
    """The tensor in its stored type (bfloat16 as float32, exactly), as a writable array."""
    t = header.tensors[name]
    if t.dtype not in NUMPY:
        raise CheckpointError(f"{header.path}: tensor {name!r} has dtype "
                              f"{DTYPE_NAMES.get(t.dtype, t.dtype)}, which rnndiag cannot read")
    count = math.prod(t.shape)
    if count == 0:
        return np.zeros(t.shape, dtype=np.float32 if t.dtype == "BF16" else NUMPY[t.dtype])
    mm = np.memmap(header.path, dtype=np.dtype(NUMPY[t.dtype]), mode="r",
                   offset=header.data_start + t.begin, shape=(count,))
    if t.dtype == "BF16":  # bfloat16 is the upper half of a float32
        return (mm.astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
    return np.array(mm, dtype=mm.dtype.newbyteorder("=")).reshape(t.shape)
