"""Torch-free checks on input paths (readable, Git LFS pointer, which format) and on tensor
names (wrapper prefixes, the `--state-key` part of a file); the one-line text of an exception.

The format is told from the content, never the name: safetensors (an 8-byte length, then JSON),
a torch file (a zip with `*/data.pkl` or `*/version`, or a pickle that opens with torch's magic
number), an `.npz` (a zip of `*.npy` members). Only a file too short to tell (under 9 bytes)
falls back on its suffix, so that an empty `.pt` says what torch says. Anything else is
"unsupported format", naming what it looks like when that is recognisable (HDF5, tar, text,
a plain pickle, a single `.npy` array, ...).
"""

from __future__ import annotations

import os
import pickletools
import re
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from rnndiag.errors import CheckpointError

LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
V = TypeVar("V")
LFS_NOTE = "Git LFS pointer: the checkpoint itself was not fetched (run `git lfs pull`)"
READ_FORMATS = "safetensors, a torch file or .npz"
SUFFIX_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch",
                  ".ckpt": "torch", ".bin": "torch", ".npz": "npz"}
# torch.serialization.MAGIC_NUMBER: the first object pickled in a legacy (non-zip) torch file
TORCH_MAGIC = 0x1950A86A20F9469CFC6C
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive's end record
# Formats that are not read, by their magic bytes, to name them in the "unsupported" message
OTHER_MAGICS = {b"\x89HDF\r\n\x1a\n": "an HDF5 file", b"\x1f\x8b": "a gzip file",
                b"BZh": "a bzip2 file", b"\xfd7zXZ\x00": "an xz file",
                b"(\xb5/\xfd": "a zstd file", b"GGUF": "a GGUF file"}
SNIFF_BYTES = 512  # a tar header's "ustar" sits at bytes 257-262
# ANSI/VT escape sequences (CSI such as "\x1b[1m", OSC up to BEL or ST, two-byte escapes),
# then any other C0/C1 control character: exception text from torch carries ANSI bold
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_lfs_pointer(path: Path) -> bool:
    """True for a Git LFS pointer file (the real checkpoint was never fetched)."""
    with path.open("rb") as f:
        return f.read(len(LFS_MAGIC)) == LFS_MAGIC


def sniff_format(path: Path) -> str:
    """"safetensors", "torch" or "npz", told from the content (see the module docstring); a
    CheckpointError for anything else."""
    with path.open("rb") as f:
        head = f.read(SNIFF_BYTES)
        size = f.seek(0, 2)
    if _is_safetensors(head, size):
        return "safetensors"
    if head.startswith(ZIP_MAGICS):
        return _zip_format(path, head)
    if _is_torch_pickle(head):
        return "torch"
    if head.startswith(NPY_MAGIC):
        raise CheckpointError(f"{path}: a .npy file holds a single array, not a state dict; "
                              "save the state dict with numpy.savez(path, **arrays)")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        # torch.load cannot read it either (it wants torch's magic number first), so nothing
        # is unpickled to find out what it holds
        raise CheckpointError(f"{path}: refused: a plain pickle (pickle.dump), not a torch.save "
                              "file; rnndiag unpickles only what torch.load(weights_only=True) "
                              "reads: save with torch.save(model.state_dict(), path) or use "
                              "safetensors")
    if len(head) < 9 and path.suffix.lower() in SUFFIX_FORMATS:  # too short to tell by content
        return SUFFIX_FORMATS[path.suffix.lower()]
    raise CheckpointError(unsupported(path, _looks_like(head)))


def unsupported(path: Path, what: str = "") -> str:
    """The message for a file in no format rnndiag reads; `what` says what it looks like."""
    return f"{path}: unsupported format ({what + ', ' if what else ''}not {READ_FORMATS})"


def _is_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length, then JSON: '{' (a header, however broken), or
    '[' when the length fits the file (a header that is not an object, which the reader names)."""
    start = head[8:9]
    return start == b"{" or (start == b"[" and 8 + int.from_bytes(head[:8], "little") <= size)


def _zip_format(path: Path, head: bytes) -> str:
    """A zip archive's format by its member names: "torch" (`*/data.pkl`, `*/version`) or
    "npz" (only `*.npy` members)."""
    names = _zip_names(path, head)
    if any("/" in n and n.rsplit("/", 1)[1] in ("data.pkl", "version") for n in names):
        return "torch"
    if names and all(n.endswith(".npy") for n in names):
        return "npz"
    kind = "a zip archive of other files" if names else "an empty zip archive"
    raise CheckpointError(unsupported(path, kind))


def _zip_names(path: Path, head: bytes) -> list[str]:
    """The archive's member names; when its central directory cannot be read (a truncated or
    damaged file), the name in the first member's local header, which opens the file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except Exception:  # BadZipFile, undecodable names, unsupported zip features, ...
        pass
    if not head.startswith(ZIP_MAGICS[0]) or len(head) < 30:
        return []
    size = int.from_bytes(head[26:28], "little")
    name = head[30:30 + size].decode("utf-8", errors="replace")
    return [name] if name else []


def _is_torch_pickle(head: bytes) -> bool:
    """A legacy torch file: a pickle whose first value is torch's magic number (any protocol).
    `pickletools.genops` only parses opcodes; nothing is executed or imported."""
    try:
        for op, arg, _ in pickletools.genops(head):
            if op.name not in ("PROTO", "FRAME"):
                return op.name in ("LONG1", "LONG", "LONG4") and arg == TORCH_MAGIC
    except Exception:  # not a pickle, or cut short by the head's length
        return False
    return False


def _looks_like(head: bytes) -> str:
    """What a file rnndiag does not read looks like, or "" when nothing is recognisable."""
    if not head:
        return "an empty file"
    for magic, what in OTHER_MAGICS.items():
        if head.startswith(magic):
            return what
    if head[257:262] == b"ustar":
        return "a tar archive"
    return "a text file" if _is_text(head) else ""


def _is_text(head: bytes) -> bool:
    """UTF-8 without control characters other than tab, newline and carriage return."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a character cut by the head's end is still text
        if exc.reason != "unexpected end of data":
            return False
        text = head[:exc.start].decode("utf-8")
    return not _CONTROLS.search(text.translate({9: None, 10: None, 13: None}))


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's text for a message: escape sequences and control characters removed,
    whitespace collapsed, at most `limit` characters; its type's name when it has no text."""
    text = _CONTROLS.sub(" ", _ESCAPES.sub("", str(exc)))
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_readable(path: Path) -> None:
    """The path names a regular file (after following links) that can be opened for reading.

    A FIFO, a terminal, a socket or a device (`/dev/zero`, `/proc/self/fd/0`) would block or
    never end, so they are refused by `stat` before anything opens them; the open itself is
    non-blocking, and the opened file is checked again (it may have been swapped meanwhile)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror or one_line(exc)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(not_regular(path, st.st_mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror or one_line(exc)})") from None
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISREG(mode):
        raise CheckpointError(not_regular(path, mode))


def not_regular(path: Path, mode: int) -> str:
    """The refusal of a path that is not a regular file, naming what it is."""
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    what = next((name for test, name in kinds if test(mode)), "a special file")
    return f"{path}: is {what}, not a regular file; rnndiag reads only regular files"


def strip_wrappers(key: str) -> str:
    """Drop leading `module.` (DataParallel/DDP) and every `_orig_mod` segment (torch.compile)."""
    parts = [part for part in key.split(".") if part != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def unwrap_names(tensors: Mapping[str, V], path: Path) -> dict[str, V]:
    """`strip_wrappers` on every key; two keys that end up equal are an error."""
    out: dict[str, V] = {}
    for key, value in tensors.items():
        name = strip_wrappers(key)
        if name in out:
            raise CheckpointError(f"{path}: tensor names collide after removing wrapper "
                                  f"prefixes: {key!r} and another key both map to {name!r}")
        out[name] = value
    return out


def under_key(named: Mapping[str, V], key: str, path: Path) -> dict[str, V]:
    """The entries named `key.<rest>`, renamed `<rest>` (`--state-key`, dotted for nesting).

    No entry under `key` is a CheckpointError naming the key and the names one level below the
    deepest part of `key` that exists (the top-level ones when none does)."""
    head = key + "."
    found = {name[len(head):]: value for name, value in named.items() if name.startswith(head)}
    if found:
        return found
    if key in named:
        raise CheckpointError(f"{path}: --state-key {key!r} names a single tensor, not a state "
                              "dict")
    raise CheckpointError(f"{path}: --state-key {key!r}: no such entry "
                          f"({_choices(list(named), key)})")


def _choices(names: list[str], key: str) -> str:
    """'keys under 'a.b': x, y' for the deepest existing prefix of `key`; else the top level."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth]) + "."
        below = [n[len(prefix):] for n in names if n.startswith(prefix)]
        if below:
            return f"keys under {prefix[:-1]!r}: {first_segments(below)}"
    return f"top-level keys: {first_segments(names) or 'none'}"


def first_segments(names: list[str], n: int = 8) -> str:
    """The distinct first dotted segments of `names`, in order, at most `n` of them."""
    heads = list(dict.fromkeys(name.split(".", 1)[0] for name in names))
    more = f" (+{len(heads) - n} more)" if len(heads) > n else ""
    return ", ".join(heads[:n]) + more
