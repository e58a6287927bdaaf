"""Load a checkpoint's tensors into the user's model strictly (`check --model`).

Names are matched after `files.strip_wrappers` on both sides: the file's names come without
wrapper prefixes (`sources.read`), and so are the model's compared, so a model returned as
`torch.compile(model)` or `nn.DataParallel(model)`, or holding `torch.compile(nn.LSTM(...))`,
takes a checkpoint saved from the bare model, and the other way round. The tensors are then
loaded under the model's own key names.

A model key the file lacks is fine when its tensor is the very same tensor as another key's
the file has (tied weights: `decoder.weight = embedding.weight`; `safetensors.save_model`
keeps one name of each shared tensor): it gets that key's values. Every other missing,
unexpected or misshapen key is listed in one error line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from rnndiag.errors import ArchitectureError
from rnndiag.files import strip_wrappers

WRAPPERS = "module., _orig_mod."


def load_strict(model: nn.Module, tensors: Mapping[str, Tensor], path: str) -> None:
    """load_state_dict(strict=True) by unwrapped names, with one line listing missing,
    unexpected and misshapen keys (named without wrapper prefixes)."""
    own = model.state_dict(keep_vars=True)  # the parameters themselves: tied ones are one
    names = _unwrapped(own, path)  # model key -> its name without wrappers
    source = {key: name for key, name in names.items() if name in tensors}
    _share_tied(own, source)
    missing = sorted(name for key, name in names.items() if key not in source)
    unexpected = sorted(tensors.keys() - set(names.values()))
    misshapen = sorted(f"{name} {tuple(tensors[name].shape)} vs {tuple(own[key].shape)}"
                       for key, name in source.items()
                       if tuple(tensors[name].shape) != tuple(own[key].shape))
    problems = [f"{label}: {_few(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatch (file vs model)", misshapen)) if keys]
    if problems:
        raise ArchitectureError(f"{path}: the state dict does not fit the model: "
                                + "; ".join(problems) + _prefix_hint(unexpected, missing))
    not_real = sorted(f"{name} ({str(tensors[name].dtype).removeprefix('torch.')})"
                      for key, name in source.items()
                      if own[key].is_floating_point() and not tensors[name].is_floating_point())
    if not_real:  # complex would lose its imaginary part, integers their meaning, silently
        raise ArchitectureError(f"{path}: not floating-point weights for the model's "
                                f"floating-point parameters: {_few(not_real)}")
    state = {key: tensors[name].to(own[key].dtype) for key, name in source.items()}
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as exc:  # a model's own _load_from_state_dict
        text = " ".join(str(exc).split())[:200]
        raise ArchitectureError(f"{path}: loading the state dict into the model failed "
                                f"({type(exc).__name__}: {text})") from None


def _unwrapped(own: Mapping[str, Any], path: str) -> dict[str, str]:
    """Model key -> `strip_wrappers(key)`; two different tensors under one name is an error."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key, value in own.items():
        name = strip_wrappers(key)
        other = seen.setdefault(name, key)
        if other != key and _identity(own[other]) != _identity(value):
            raise ArchitectureError(
                f"{path}: the model's keys {other!r} and {key!r} are the same name once the "
                f"wrapper prefixes ({WRAPPERS}) are removed, so the file's keys cannot be "
                "matched to them")
        out[key] = name
    return out


def _share_tied(own: Mapping[str, Any], source: dict[str, str]) -> None:
    """Give each model key without a source in the file the source of a key that holds the
    very same tensor (in place)."""
    groups: dict[object, list[str]] = {}
    for key, value in own.items():
        groups.setdefault(_identity(value), []).append(key)
    for keys in groups.values():
        present = [source[key] for key in keys if key in source]
        if present:
            for key in keys:
                source.setdefault(key, present[0])


def _identity(value: Any) -> object:
    """What makes two state-dict entries one tensor: the same object, or the same view of the
    same storage (same start, shape and strides). Empty and storage-less tensors (meta,
    uninitialized) are only themselves."""
    try:
        if isinstance(value, Tensor) and value.numel() > 0:
            ptr = value.untyped_storage().data_ptr()
            if ptr:
                return (value.device, ptr, value.storage_offset(), tuple(value.shape),
                        value.stride(), value.dtype)
    except (RuntimeError, NotImplementedError, ValueError):  # no storage (a lazy parameter)
        pass
    return id(value)


def _prefix_hint(unexpected: list[str], missing: list[str]) -> str:
    """When every unexpected key is `P.<a model key that is missing>` for one P (a training
    wrapper's attribute, e.g. Lightning's `self.model`), say how to select that part."""
    heads = {key.split(".", 1)[0] for key in unexpected}
    if len(heads) != 1 or not all("." in key for key in unexpected):
        return ""
    head = heads.pop()
    if not set(missing) & {key[len(head) + 1:] for key in unexpected}:
        return ""
    return (f" (the file's keys are under {head!r}: select that part with --state-key, e.g. "
            f"--state-key {head}, or state_dict.{head} inside a Lightning checkpoint)")


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
