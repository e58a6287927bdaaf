"""Read tensors from `.safetensors`, torch `.pt/.pth/.ckpt` and numpy `.npz` files, safely.

Nothing in a file is ever executed: torch files go through `torch.load(weights_only=True)`,
passed explicitly, with no fallback (torch's warnings silenced, its message cut to the reason);
`.npz` files through `numpy.load(allow_pickle=False)` (`sources`). Training-checkpoint
containers are unwrapped (or the entry `--state-key` names is taken), optimizer states are
never read as weights, and the wrapper prefixes of DataParallel (`module.`) and torch.compile
(`_orig_mod.`) are dropped.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rnndiag.errors import CheckpointError
from rnndiag.files import (
    check_readable,
    first_segments,
    is_lfs_pointer,
    one_line,
    sniff_format,
    under_key,
)
from rnndiag.records import NonFiniteTensor, TrainingState
from rnndiag.sources import RawFile, nonfinite, read
from rnndiag.training import is_optimizer_state, training_state

# Keys under which training scripts nest the model's state dict, first found wins: Lightning,
# mmcv and timm use "state_dict"; the PyTorch tutorials "model_state_dict"; "model_state" is
# common in hand-written loops; torchvision's references, detectron2 and fairseq "model";
# DeepSpeed "module". Not "ema"/"model_ema"/"state_dict_ema": averaged weights sit beside the
# trained ones, and which to diagnose is the user's choice (--state-key).
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net")
__all__ = ["Checkpoint", "check_readable", "is_lfs_pointer", "load_checkpoint",
           "nonfinite_weights", "read_tensors", "sniff_format"]

MIN_TORCH = (2, 6)  # torch.load(weights_only=True) is unsafe before 2.6 (CVE-2025-32434)
# Bounds on what torch.load returned, checked before anything walks it: a pickle can share one
# container under many keys (8 keys per level, 12 levels: 8**12 paths from a 2 KB pickle),
# nest containers thousands deep, or hold a container inside itself
MAX_NESTING = 32  # containers inside containers; Lightning checkpoints nest about 6 deep
MAX_ENTRIES = 1_000_000  # entries reached by walking every path (shared containers repeat)
UPCAST = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
          "float8_e5m2fnuz")  # read as float32


@dataclass(frozen=True)
class Checkpoint:
    path: str
    format: str  # "safetensors" | "torch" | "npz"
    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    notes: tuple[str, ...]
    training: TrainingState | None = None  # a training checkpoint's optimizer kind and lr


def read_tensors(path: Path, limit: int | None = None,
                 ) -> tuple[str, dict[str, Tensor], dict[str, str]]:
    """Return (format, name -> torch tensor, safetensors metadata), wrapper prefixes removed;
    `limit` bounds what reading allocates (`sources.read`)."""
    raw = read(path, limit=limit)
    return raw.format, {k: _tensor(v) for k, v in raw.arrays.items()}, raw.metadata


def _tensor(x: Any) -> Tensor:
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def load_checkpoint(path: Path, *, state_key: str | None = None) -> Checkpoint:
    """Read a checkpoint's state dict (the entry `state_key` names, when given); half-precision
    tensors are upcast to float32 (noted)."""
    return checkpoint_of(read(path, state_key=state_key))


def checkpoint_of(raw: RawFile) -> Checkpoint:
    """torch tensors from what `sources.read` gave; 16- and 8-bit floats upcast to float32."""
    tensors, upcast = {}, []
    for key, x in raw.arrays.items():
        tensor = _tensor(x)
        if raw.dtypes.get(key) in UPCAST:
            upcast.append(f"{key} ({raw.dtypes[key]})")
            tensor = tensor.float()
        tensors[key] = tensor
    notes = list(raw.notes)
    beyond = [f"{key} (|x| up to {float(t.abs().max()):.3g})" for key, t in tensors.items()
              if t.dtype == torch.float64 and t.numel() and _beyond_float32(t)]
    if beyond:
        notes.append(f"float64 values beyond float32's range in {_few(beyond)}: they become "
                     "inf at --dtype float32 (the default); use --dtype float64")
    if upcast:
        more = f" and {len(upcast) - 3} more" if len(upcast) > 3 else ""
        notes.append(f"upcast to float32: {', '.join(upcast[:3])}{more}")
    return Checkpoint(str(raw.path), raw.format, tensors, raw.metadata, tuple(notes),
                      raw.training)


def _beyond_float32(t: Tensor) -> bool:
    finite = t[torch.isfinite(t)]
    return bool(finite.numel()) and float(finite.abs().max()) > torch.finfo(torch.float32).max


def torch_tensors(path: Path, *, state_key: str | None = None,
                  ) -> tuple[dict[str, Tensor], tuple[str, ...], TrainingState | None]:
    """(the flat name -> tensor state dict inside a torch file, notes, what its optimizer
    state says), read with weights_only=True: the entry `state_key` names (dotted for
    nesting), else a training container's state dict (`CONTAINER_KEYS`), else every tensor."""
    obj = _torch_load(path)
    check_structure(obj, path)
    found = training_state(obj)
    if isinstance(obj, Tensor):
        raise CheckpointError(f"{path}: holds a single tensor, not a state dict")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict (a batch "
                              "file is a dict: {'inputs': x or (x, ...), 'targets': y})")
    if is_optimizer_state(obj):
        raise CheckpointError(f"{path}: holds an optimizer's state dict (state, param_groups), "
                              "not model weights; save model.state_dict() instead")
    tensors, notes = _select(obj, state_key, path) if state_key is not None \
        else _flatten(obj, path)
    if found is not None:
        notes += (f"optimizer state: {found.optimizer or 'unrecognised optimizer'}, lr "
                  f"{'-' if found.lr is None else f'{found.lr:g}'} (used by the clip suggestion "
                  "unless --optimizer/--lr say otherwise)",)
    return tensors, notes, found


def check_structure(obj: Any, path: Path) -> None:
    """`obj` nests containers at most `MAX_NESTING` deep, reaches at most `MAX_ENTRIES`
    entries over all its paths, and holds no container inside itself; iterative, so a deep
    structure costs no recursion."""
    stack = [iter(_children(obj))]
    on_path = [id(obj)]
    entries = 0
    while stack:
        child = next(stack[-1], _END)
        if child is _END:
            stack.pop()
            on_path.pop()
            continue
        entries += 1
        if entries > MAX_ENTRIES:
            raise CheckpointError(f"{path}: its containers reach more than {MAX_ENTRIES:,} "
                                  "entries (shared or repeated nested dicts/lists); refused")
        if isinstance(child, Mapping | list | tuple):
            if id(child) in on_path:
                raise CheckpointError(f"{path}: a container in it contains itself; refused")
            if len(stack) >= MAX_NESTING:
                raise CheckpointError(f"{path}: containers nested deeper than {MAX_NESTING} "
                                      "levels; refused")
            stack.append(iter(_children(child)))
            on_path.append(id(child))


_END = object()


def _children(obj: Any) -> list[Any]:
    """A container's values, and its keys that are containers themselves (tuple keys)."""
    if isinstance(obj, Mapping):
        return [*(k for k in obj if isinstance(k, tuple)), *obj.values()]
    return list(obj) if isinstance(obj, list | tuple) else []


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
        # safetensors loader, overriding the format sniffed from the content; warnings off:
        # torch warns on stderr about what it reads (pickle protocols), and a failure is one
        # line of ours
        with path.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refusal(path, exc)) from None
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read torch checkpoint ({one_line(exc)})") from None


def _refusal(path: Path, exc: pickle.UnpicklingError) -> str:
    """Why the weights_only loader refused the file: the unsafe globals it needs, else torch's
    own reason without the paragraphs around it."""
    names = _unsafe_globals(path)
    reason = _weights_only_reason(exc)
    if names:
        what = (f"it needs unsafe globals {', '.join(names[:5])}"
                + (f" and {len(names) - 5} more" if len(names) > 5 else ""))
    elif reason.startswith("Unsupported operand"):  # FRAME (149) and the rest of protocol 4+
        what = (f"its pickle uses opcodes the weights_only loader does not read ({reason}; "
                "torch.save's default pickle_protocol=2 works)")
    else:
        what = f"it holds objects other than tensors ({reason})"
    return (f"{path}: refused: {what}; rnndiag loads only tensors and plain containers "
            "(torch.load weights_only=True): save model.state_dict() or use safetensors")


def _weights_only_reason(exc: BaseException, limit: int = 120) -> str:
    """torch's reason ('Unsupported global: GLOBAL m.C was not an allowed global by default')
    from the long weights_only message that holds it, or the whole message, on one line."""
    text = one_line(exc, limit=10_000)
    _, found, reason = text.partition("WeightsUnpickler error:")
    if found:
        reason = reason.split(" Please ")[0].split(" Check the documentation")[0].strip(" .")
    text = reason or text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript code (`*/code/` or `*/constants.pkl`), by its listing."""
    try:
        if not zipfile.is_zipfile(path):  # which can raise too (a ZIP64 record naming disks)
            return False
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):  # not a readable zip: torch.load says what is wrong
        return False
    except Exception as exc:  # undecodable member names, unsupported zip versions, ...
        raise CheckpointError(f"{path}: cannot read the zip archive ({one_line(exc)})") from None
    return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def _unsafe_globals(path: Path) -> list[str]:
    """The globals a pickle would import, found by a static scan that executes nothing."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an old or odd file: the generic refusal still applies
        return []


def _flatten(obj: Mapping[Any, Any], path: Path) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Find the state dict in what torch.load returned: a tensor mapping, possibly nested."""
    found = [key for key in CONTAINER_KEYS
             if isinstance(obj.get(key), Mapping) and _has_tensor(obj[key])]
    if found:
        flat, notes = _flatten(obj[found[0]], path)
        averaged = [k for k in obj if isinstance(k, str) and "ema" in k.lower()
                    and k not in found and isinstance(obj[k], Mapping) and _has_tensor(obj[k])]
        others = [repr(k) for k in [*found[1:], *averaged] if obj[k] is not obj[found[0]]]
        extra = (f"weights from {found[0]!r}; {', '.join(others)} also hold"
                 f"{'s' if len(others) == 1 else ''} tensors (choose with --state-key)",
                 ) if others else ()
        return flat, extra + notes
    flat, dropped = _tensors(obj)
    if not flat:
        keys = first_segments([str(k) for k in obj]) or "none"
        only = f"only optimizer state ({_few(dropped)}); " if dropped else ""
        raise CheckpointError(f"{path}: no tensors found ({only}top-level keys: {keys})")
    return flat, _dropped_note(dropped)


def _select(obj: Mapping[Any, Any], key: str, path: Path,
            ) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """The tensors under `key` (`--state-key`), by dotted name through nested mappings, with
    no container detection."""
    flat, dropped = _tensors(obj)
    if key in dropped or any(key.startswith(d + ".") for d in dropped):
        raise CheckpointError(f"{path}: --state-key {key!r} is an optimizer's state dict, not "
                              "model weights")
    picked = under_key(flat, key, path)
    inner = [d[len(key) + 1:] for d in dropped if d.startswith(key + ".")]
    return picked, _dropped_note(inner)


def _tensors(obj: Mapping[Any, Any]) -> tuple[dict[str, Tensor], list[str]]:
    """(every tensor by dotted name, the names of the optimizer states left out)."""
    flat: dict[str, Tensor] = {}
    dropped: list[str] = []
    _collect(obj, "", flat, dropped)
    return flat, dropped


def _dropped_note(dropped: list[str]) -> tuple[str, ...]:
    return (f"ignored optimizer state (not model weights): {_few(dropped)}",) if dropped else ()


def _few(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _has_tensor(obj: Mapping[Any, Any]) -> bool:
    return not is_optimizer_state(obj) and any(
        isinstance(v, Tensor) or (isinstance(v, Mapping) and _has_tensor(v))
        for v in obj.values())


def _collect(obj: Mapping[Any, Any], prefix: str, out: dict[str, Tensor],
             dropped: list[str]) -> None:
    """Flatten nested mappings of tensors into dotted names ({"enc": {"w": t}} -> "enc.w"),
    tuples and lists by index (a batch's {"inputs": (x, lengths)} -> inputs.0, inputs.1); an
    optimizer state is left out and its name added to `dropped`."""
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            out[name] = value
        elif is_optimizer_state(value):
            dropped.append(name)
        elif isinstance(value, Mapping):
            _collect(value, name + ".", out, dropped)
        elif isinstance(value, tuple | list) and value:
            _collect(dict(enumerate(value)), name + ".", out, dropped)


def nonfinite_weights(tensors: Mapping[str, Tensor]) -> tuple[NonFiniteTensor, ...]:
    """Floating-point tensors holding NaN or Inf, with counts, by name (`sources.nonfinite`)."""
    return nonfinite({k: t.detach().cpu().numpy() for k, t in tensors.items()
                      if t.is_floating_point()})
