"""Torch-free checks on input paths (readable, Git LFS pointer, which checkpoint format) and on
tensor names (wrapper prefixes, the `--state-key` part of a file)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from rnndiag.errors import CheckpointError

LFS_MAGIC = b"version https://git-lfs.github.com/spec/v1"
V = TypeVar("V")
LFS_NOTE = "Git LFS pointer: the checkpoint itself was not fetched (run `git lfs pull`)"


def is_lfs_pointer(path: Path) -> bool:
    """True for a Git LFS pointer file (the real checkpoint was never fetched)."""
    with path.open("rb") as f:
        return f.read(len(LFS_MAGIC)) == LFS_MAGIC


def sniff_format(path: Path) -> str:
    """Tell safetensors from torch by content (a safetensors file opens with a length and '{')."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in {".pt", ".pth", ".ckpt", ".bin"}:
        return "torch"
    raise CheckpointError(f"{path}: not a safetensors or torch checkpoint (unrecognised content)")


def check_readable(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open ({exc.strerror})") from None


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
