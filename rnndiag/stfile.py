"""A torch-free, validating reader of safetensors files (format: 8-byte little-endian header
length N, N bytes of JSON header, then the data buffer).

Everything is checked before any tensor is touched, as the `safetensors` library checks it
(so a file rnndiag accepts is one that library loads): header length bounded by the file size
and `MAX_HEADER`, UTF-8 JSON (nested no deeper than Python's recursion limit) that parses to an
object without duplicate names, integers of at most `MAX_DIGITS` digits, names and metadata that are
valid Unicode, `__metadata__` absent, null or an object of strings, known dtypes, shapes of at
most `MAX_DIMS` non-negative dimensions whose product fits in 63 bits, offsets whose size
matches the shape, and tensors that tile the data buffer exactly (no overlap, no gap, no bytes
after the last one).

Tensors are read with plain reads (`read_arrays`), never through a memory map: a file
truncated while it is read is an error naming it, where a map would fault (SIGBUS).
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rnndiag.errors import CheckpointError

MAX_HEADER = 100_000_000  # the safetensors library's own limit (bytes, not MiB)
MAX_DIGITS = 20  # a 64-bit integer has at most 20 digits; longer ones are not parsed at all
MAX_DIMS = 64  # numpy's own limit on dimensions
MAX_ELEMENTS = 2**63 - 1
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
            "C64": 8}
NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
         "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8",
         "BOOL": "?", "C64": "<c8"}
FLOATS = ("F64", "F32", "F16", "BF16")
INTEGERS = ("I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL")
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
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
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
    if len(raw) < n:
        raise CheckpointError(f"{path}: the file was truncated while it was read")
    doc = _parse(path, raw)
    metadata = _metadata(path, doc.pop("__metadata__", None))
    tensors = {name: _info(path, name, entry) for name, entry in doc.items()}
    _check_layout(path, tensors, size - 8 - n)
    return Header(path, 8 + n, tensors, metadata)


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    """The header's JSON object; every way it can be malformed is a CheckpointError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: invalid safetensors header (not UTF-8 text)") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_integer,
                         parse_constant=_constant)
    except RecursionError:  # CPython's parser recurses once per level
        raise CheckpointError(f"{path}: invalid safetensors header (JSON nested too deeply)"
                              ) from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid safetensors header ({_short(exc)})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: invalid safetensors header (not a JSON object)")
    for name in doc:
        _check_text(path, "tensor name", name)
    return doc


def _integer(text: str) -> int:
    """JSON integers of at most `MAX_DIGITS` digits: a longer one is never converted (the
    conversion is quadratic in its length)."""
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-')):,} digits, more than a 64-bit "
                         "value has")
    return int(text)


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not valid JSON")


def _check_text(path: Path, what: str, text: str) -> None:
    """Names and metadata must be valid Unicode: JSON escapes can spell lone surrogates
    ("\\ud800"), which no UTF-8 file name or terminal can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise CheckpointError(f"{path}: invalid safetensors header: {what} {shown[:80]!r} is "
                              "not valid Unicode (it holds a lone surrogate)") from None


def _metadata(path: Path, value: Any) -> dict[str, str]:
    """`__metadata__`: absent or null (no metadata), else an object mapping strings to strings."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise CheckpointError(f"{path}: invalid safetensors header (__metadata__ must map "
                              "strings to strings)")
    for key, text in value.items():
        _check_text(path, "metadata key", key)
        _check_text(path, f"metadata value of {key!r}", text)
    return value


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
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"{bad} has unknown dtype {_brief(dtype)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{bad} has an invalid shape {_brief(shape)}")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:  # zero-size tensors too: numpy
        raise CheckpointError(f"{bad} has shape {_brief(shape)}, whose dimensions multiply "
                              "past 2**63")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{bad} has invalid data_offsets {_brief(offsets)}")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise CheckpointError(f"{bad}: data_offsets {offsets} hold {end - begin} bytes but "
                              f"shape {shape} of {dtype} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_layout(path: Path, tensors: dict[str, TensorInfo], buffer: int) -> None:
    """The tensors tile the data buffer: sorted by offsets, each begins where the previous one
    ended, and the last ends with the file (the safetensors library's rule)."""
    last_end, last_name = 0, None
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.end > buffer:
            raise CheckpointError(f"{path}: truncated or invalid safetensors file: tensor "
                                  f"{t.name!r} ends at byte {t.end} of a {buffer}-byte buffer")
        if t.begin < last_end:
            raise CheckpointError(f"{path}: invalid safetensors file: tensors {last_name!r} "
                                  f"and {t.name!r} overlap")
        if t.begin > last_end:
            raise CheckpointError(f"{path}: invalid safetensors file: a gap of "
                                  f"{t.begin - last_end} bytes before tensor {t.name!r} in the "
                                  "data buffer")
        last_end, last_name = t.end, t.name
    if last_end != buffer:
        raise CheckpointError(f"{path}: invalid safetensors file: {buffer - last_end} bytes "
                              "after the last tensor belong to none")


def materialised_bytes(t: TensorInfo) -> int:
    """Bytes `read_arrays` allocates for `t` (half and 8-bit floats come back as float32)."""
    itemsize = 4 if t.dtype in WIDENED else ITEMSIZE[t.dtype]
    return math.prod(t.shape) * itemsize


def read_arrays(header: Header, names: Mapping[str, str]) -> dict[str, np.ndarray]:
    """{reported name: the tensor stored under `names[reported]`} in its stored type (bfloat16
    and float8 as float32, exactly), as writable arrays, from one read-only open of the file."""
    with header.path.open("rb") as f:
        return {name: _read_one(header, f, key) for name, key in names.items()}


def read_native(header: Header, name: str) -> np.ndarray:
    """One tensor, as `read_arrays` reads it."""
    return read_arrays(header, {name: name})[name]


def _read_one(header: Header, f: io.BufferedReader, name: str) -> np.ndarray:
    t = header.tensors[name]
    if t.dtype not in NUMPY and t.dtype not in FLOAT8:
        raise CheckpointError(f"{header.path}: tensor {name!r} has dtype "
                              f"{DTYPE_NAMES.get(t.dtype, t.dtype)}, which rnndiag cannot read")
    stored = np.dtype(NUMPY.get(t.dtype, "u1"))
    count = math.prod(t.shape)
    if count == 0:
        return np.zeros(t.shape, dtype=np.float32 if t.dtype in WIDENED else stored)
    data = np.empty(count, dtype=stored)
    f.seek(header.data_start + t.begin)
    if f.readinto(data.data.cast("B")) != t.end - t.begin:
        raise CheckpointError(f"{header.path}: the file was truncated or changed while it was "
                              f"read (tensor {name!r})")
    if t.dtype == "BF16":  # bfloat16 is the upper half of a float32
        return (data.astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
    if t.dtype in FLOAT8:
        return FLOAT8[t.dtype][data].reshape(t.shape)
    return data.astype(stored.newbyteorder("="), copy=False).reshape(t.shape)


def _float8_table(exponent_bits: int, has_inf: bool) -> np.ndarray:
    """Every value of an 8-bit float format, by byte, as float32 (exact: float32 has more
    exponent and mantissa bits). E4M3FN (OCP FP8): bias 7, no infinities, S.1111.111 is NaN;
    E5M2: IEEE-style, bias 15, all-ones exponent is Inf (mantissa 0) or NaN."""
    mantissa_bits = 7 - exponent_bits
    bias, top = 2 ** (exponent_bits - 1) - 1, 2**exponent_bits - 1
    values = []
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        e, m = (byte >> mantissa_bits) & top, byte & (2**mantissa_bits - 1)
        if e == top and (has_inf or m == 2**mantissa_bits - 1):
            value = math.inf if has_inf and m == 0 else math.nan
        elif e == 0:
            value = m / 2**mantissa_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + m / 2**mantissa_bits) * 2.0 ** (e - bias)
        values.append(sign * value)
    return np.array(values, dtype=np.float32)


FLOAT8 = {"F8_E4M3": _float8_table(4, has_inf=False), "F8_E5M2": _float8_table(5, has_inf=True)}
WIDENED = ("BF16", *FLOAT8)  # dtypes read as float32
