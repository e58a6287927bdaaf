"""Read tensors from `.safetensors` and torch `.pt/.pth/.ckpt` files, safely.

Nothing in a file is ever executed: torch files go through `torch.load(weights_only=True)`,
passed explicitly, with no fallback. Training-checkpoint containers are unwrapped and the
wrapper prefixes of DataParallel (`module.`) and torch.compile (`_orig_mod.`) are dropped.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rnndiag.errors import CheckpointError
from rnndiag.files import check_readable, is_lfs_pointer, sniff_format
from rnndiag.records import NonFiniteTensor
from rnndiag.sources import RawFile, nonfinite, read

# Keys under which training scripts nest the model's state dict (Lightning uses "state_dict").
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
__all__ = ["Checkpoint", "check_readable", "is_lfs_pointer", "load_checkpoint",
           "nonfinite_weights", "read_tensors", "sniff_format"]

MIN_TORCH = (2, 6)  # torch.load(weights_only=True) is unsafe before 2.6 (CVE-2025-32434)


@dataclass(frozen=True)
class Checkpoint:
    path: str
    format: str  # "safetensors" | "torch"
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    notes: tuple[str, ...]


def read_tensors(path: Path) -> tuple[str, dict[str, Tensor], dict[str, str]]:
    """Return (format, name -> torch tensor, safetensors metadata), wrapper prefixes removed."""
    raw = read(path)
    return raw.format, {k: _tensor(v) for k, v in raw.arrays.items()}, raw.metadata


def _tensor(x: Any) -> Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint's state dict; half-precision tensors are upcast to float32 (noted)."""
    return checkpoint_of(read(path))


def checkpoint_of(raw: RawFile) -> Checkpoint:
    """torch tensors from what `sources.read` gave; float16/bfloat16 upcast to float32."""
    tensors, upcast = {}, []
    for key, x in raw.arrays.items():
        tensor = _tensor(x)
        if raw.dtypes.get(key) in ("float16", "bfloat16"):
            upcast.append(f"{key} ({raw.dtypes[key]})")
            tensor = tensor.float()
        tensors[key] = tensor
    notes = []
    if upcast:
        more = f" and {len(upcast) - 3} more" if len(upcast) > 3 else ""
        notes.append(f"upcast to float32: {', '.join(upcast[:3])}{more}")
    return Checkpoint(str(raw.path), raw.format, tensors, raw.metadata, tuple(notes))


def torch_tensors(path: Path) -> dict[str, Tensor]:
    """The flat name -> tensor state dict inside a torch file, read with weights_only=True."""
    return _flatten(_torch_load(path), path)


def _torch_load(path: Path) -> Any:
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < MIN_TORCH:
        raise CheckpointError(
            f"{path}: refusing to read a torch pickle with torch {torch.__version__} "
            "(weights_only loading is unsafe before 2.6, CVE-2025-32434); upgrade torch or "
            "use safetensors"
        )
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: refused: a TorchScript archive is a program, and rnndiag "
                              "does not run programs; save model.state_dict() or use safetensors")
    try:
        # an open file, not the path: torch.load sends any path ending in .safetensors to the
        # safetensors loader, overriding the format sniffed from the content
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(path)
        what = (f"it needs unsafe globals {', '.join(names[:5])}"
                + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                if names else f"it holds objects other than tensors ({_one_line(exc, 120)})")
        raise CheckpointError(
            f"{path}: refused: {what}; rnndiag loads only tensors and plain containers "
            "(torch.load weights_only=True): save model.state_dict() or use safetensors"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read torch checkpoint ({_one_line(exc)})") from None


def _is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript code (`*/code/` or `*/constants.pkl`), by its listing."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    except Exception as exc:  # undecodable member names, unsupported zip versions, ...
        raise CheckpointError(f"{path}: cannot read the zip archive ({_one_line(exc)})") from None
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a pickle would import, found by a static scan that executes nothing."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an old or odd file: the generic refusal still applies
        return []


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flatten(obj: Any, path: Path) -> dict[str, Tensor]:
    """Find the state dict in what torch.load returned: a tensor mapping, possibly nested."""
    if isinstance(obj, Tensor):
        raise CheckpointError(f"{path}: holds a single tensor, not a state dict")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key in CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _has_tensor(inner):
            return _flatten(inner, path)
    flat: dict[str, Tensor] = {}
    _collect(obj, "", flat)
    if not flat:
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {keys or 'none'})")
    return flat


def _has_tensor(obj: Mapping[Any, Any]) -> bool:
    return any(isinstance(v, Tensor) or (isinstance(v, Mapping) and _has_tensor(v))
               for v in obj.values())


def _collect(obj: Mapping[Any, Any], prefix: str, out: dict[str, Tensor]) -> None:
    """Flatten nested mappings of tensors into dotted names ({"enc": {"w": t}} -> "enc.w")."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            _collect(value, name + ".", out)


def nonfinite_weights(tensors: Mapping[str, Tensor]) -> tuple[NonFiniteTensor, ...]:
    """Floating-point tensors holding NaN or Inf, with counts, by name (`sources.nonfinite`)."""
    return nonfinite({k: t.detach().cpu().numpy() for k, t in tensors.items()
                      if t.is_floating_point()})
