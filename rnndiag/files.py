"""Torch-free checks on input paths: readable, Git LFS pointer, which checkpoint format."""

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
