"""What a training checkpoint says about its optimizer: kind and learning rate. Torch-free.

An optimizer state dict (`optimizer.state_dict()`) is a mapping with `state` and a list of
`param_groups`, found at any depth of what `torch.load` returned: `{"optimizer_state": ...}`,
`{"optimizer": ...}`, Lightning's `{"optimizer_states": [...]}`. Its kind is read from the
hyper-parameter names PyTorch's optimizers store in every group (torch 2.x): SGD has
`dampening`/`nesterov`; Adam and AdamW `betas` and `amsgrad` (AdamW: `decoupled_weight_decay`
true); NAdam `momentum_decay`; RMSprop `alpha` and `centered`; Adagrad `lr_decay`; Adadelta
`rho`; other `betas` optimizers count as Adam-family. The learning rate is the first group's
`lr` (a scheduler's current value, as saved).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rnndiag.records import TrainingState

MAX_DEPTH = 6


def is_optimizer_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and "state" in obj \
        and isinstance(obj.get("param_groups"), list | tuple)


def training_state(obj: object) -> TrainingState | None:
    """The first optimizer state found in `obj` (None when there is none)."""
    found = _find(obj, 0)
    if found is None:
        return None
    groups = found["param_groups"]
    group = groups[0] if groups and isinstance(groups[0], Mapping) else {}
    return TrainingState(kind(group, found.get("state")), _number(group.get("lr")))


def _find(obj: object, depth: int) -> Mapping[str, Any] | None:
    if depth > MAX_DEPTH:
        return None
    if is_optimizer_state(obj):
        assert isinstance(obj, Mapping)
        return obj
    values = obj.values() if isinstance(obj, Mapping) else (
        obj if isinstance(obj, list | tuple) else ())
    for value in values:
        if isinstance(value, Mapping | list | tuple):
            found = _find(value, depth + 1)
            if found is not None:
                return found
    return None


def kind(group: Mapping[str, Any], state: object) -> str | None:
    """rnndiag.clip's name of the optimizer that saved `group` (None: not recognised)."""
    keys = set(group)
    if "momentum_decay" in keys:
        return "nadam"
    if "betas" in keys:
        if "amsgrad" in keys:
            return "adamw" if group.get("decoupled_weight_decay") else "adam"
        return "adam"
    if {"alpha", "centered"} <= keys:
        return "rmsprop"
    if "lr_decay" in keys:
        return "adagrad"
    if "rho" in keys:
        return "adadelta"
    if {"dampening", "nesterov"} & keys:
        return "sgd"
    if isinstance(state, Mapping) and any(isinstance(s, Mapping) and "exp_avg_sq" in s
                                          for s in state.values()):
        return "adam"
    return None


def _number(x: object) -> float | None:
    try:
        value = float(x)  # type: ignore[arg-type]  # a float, or a 0-d tensor
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None
