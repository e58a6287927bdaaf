"""The loss a diagnosis backpropagates, and which part of the model's output it scores.

- integer `targets`: cross-entropy (mean over the scored targets) of the output against them:
  (B, C) vs (B,), or (..., C) vs (...) for any leading axes ((B, T, C) vs (B, T), time-major
  (T, B, C) vs (T, B), flattened (T*B, C) vs (T*B,)); targets equal to `ignore_index` (-100,
  PyTorch's default) are padding and not scored;
- float `targets`: mean squared error against them (same shape as the output);
- `--loss module:callable`: `callable(output, targets)` returning a scalar tensor, given the
  whole output (a tensor, tuple or dict) unless `--output-key` picks a part of it;
- no targets: the final-state objective of each recurrent module (see rnndiag.replay).

Which output: a tensor is scored as it is. A tuple, list or dict output is scored through
`--output-key` (an index or key, dotted for nesting); without it, the one element that fits the
targets; when none or several do, a clear error, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rnndiag.errors import BatchError
from rnndiag.files import one_line

LossFn = Callable[[Any, Tensor], Tensor]


@dataclass(frozen=True)
class Loss:
    name: str  # "cross_entropy" | "mse" | "custom:<target>" | "final_state_energy"
    fn: LossFn | None  # None: the final-state objective
    key: str | None = None  # the part of the output scored (`pick`); None: all of it
    classes_last: bool = False  # the scored output's last axis holds classes (cross-entropy)

    @property
    def floor_zero(self) -> bool:
        """The loss is bounded below by 0 (mean squared error, cross-entropy); a custom loss's
        floor is unknown."""
        return self.name in ("cross_entropy", "mse")

    def __call__(self, output: Any, targets: Tensor) -> Tensor:
        """The loss of the model's whole output (the `key` part of it is picked here)."""
        assert self.fn is not None
        scored = pick(output, self.key)
        try:
            value = self.fn(scored, targets)
        except Exception as exc:  # the user's loss (or a shape it rejects), in one line
            raise BatchError(f"loss {self.name} failed: {type(exc).__name__}: "
                             f"{one_line(exc)}") from None
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise BatchError(f"loss {self.name} must return a scalar tensor, got "
                             f"{type(value).__name__}{_shape(value)}")
        return value.reshape(())


def _shape(x: object) -> str:
    return f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else ""


def pick(output: Any, key: str | None) -> Any:
    """`output[key]`: integers index tuples and lists, names index dicts (or attributes);
    dotted for nesting (`0.logits`)."""
    if key is None:
        return output
    node = output
    for part in key.split("."):
        node = _child(node, part, key)
    return node


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, Mapping):
        if part in node:
            return node[part]
    elif isinstance(node, tuple | list) and part.lstrip("-").isdigit():
        if -len(node) <= int(part) < len(node):
            return node[int(part)]
    elif hasattr(node, part) and not part.startswith("_"):
        return getattr(node, part)
    raise BatchError(f"--output-key {key}: the model's output has no {part!r} "
                     f"({describe(node)})")


def describe(output: Any) -> str:
    """The output's structure in a few words: `tuple of (8, 30, 16), (8, 30, 3)`."""
    if isinstance(output, Tensor):
        return f"tensor {tuple(output.shape)}"
    if isinstance(output, Mapping):
        inner = ", ".join(f"{k}: {_brief(v)}" for k, v in list(output.items())[:6])
        return f"dict of {inner}"
    if isinstance(output, tuple | list):
        inner = ", ".join(_brief(v) for v in output[:6])
        return f"{type(output).__name__} of {inner}"
    return type(output).__name__


def _brief(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def choose(output: Any, targets: Tensor | None, custom: LossFn | None,
           custom_name: str | None, key: str | None = None, ignore_index: int = -100,
           ) -> Loss:
    """Pick the loss and the part of `output` it scores, and check that they fit."""
    if custom is not None:
        if targets is None:
            raise BatchError(f"--loss {custom_name} needs 'targets' in the batch file")
        if key is not None:
            pick(output, key)  # a missing key is reported here, once
        return Loss(f"custom:{custom_name}", custom, key)
    if targets is None:
        return Loss("final_state_energy", None)
    if targets.dtype == torch.bool or targets.is_complex():
        raise BatchError(f"targets dtype {str(targets.dtype).removeprefix('torch.')}: expected "
                         "integer class ids or floats")
    if key is not None:
        return _builtin(pick(output, key), targets, key, ignore_index)
    if isinstance(output, Tensor):
        return _builtin(output, targets, None, ignore_index)
    fits = [k for k, v in _elements(output) if _misfit(v, targets, ignore_index, k) is None]
    if len(fits) == 1:
        return _builtin(pick(output, fits[0]), targets, fits[0], ignore_index)
    which = "none of its tensors fits" if not fits else \
        f"elements {', '.join(fits)} all fit"
    raise BatchError(f"the model returned a {describe(output)}, and {which} the targets "
                     f"{tuple(targets.shape)}: say which one the loss scores with "
                     "--output-key (or give a --loss that takes the whole output)")


def _elements(output: Any) -> list[tuple[str, Tensor]]:
    if isinstance(output, Mapping):
        items = [(str(k), v) for k, v in output.items()]
    elif isinstance(output, tuple | list):
        items = [(str(i), v) for i, v in enumerate(output)]
    else:
        raise BatchError(f"the model returned {describe(output)}, not a tensor, tuple or dict")
    return [(k, v) for k, v in items if isinstance(v, Tensor)]


def _builtin(output: Any, targets: Tensor, key: str | None, ignore_index: int) -> Loss:
    """Cross-entropy or MSE for `output` (a tensor), or why it does not fit (BatchError)."""
    what = "the model output" if key is None else f"output[{key}]"
    problem = _misfit(output, targets, ignore_index, what)
    if problem is not None:
        raise BatchError(problem)
    if targets.is_floating_point():
        return Loss("mse", F.mse_loss, key)
    return Loss("cross_entropy", _cross_entropy(ignore_index), key, classes_last=True)


def _misfit(output: Any, targets: Tensor, ignore_index: int, what: str) -> str | None:
    if not isinstance(output, Tensor):
        return f"{what} is {describe(output)}, not a tensor: pick one with --output-key"
    if targets.is_floating_point():
        if tuple(output.shape) != tuple(targets.shape):
            return (f"float targets of shape {tuple(targets.shape)} do not fit {what} "
                    f"{tuple(output.shape)} (mean squared error needs equal shapes)")
        return None
    if output.dim() != targets.dim() + 1 or tuple(output.shape[:-1]) != tuple(targets.shape) \
            or not output.is_floating_point():
        return (f"integer targets of shape {tuple(targets.shape)} do not fit {what} "
                f"{tuple(output.shape)}: cross-entropy needs (..., C) scores with (...) class "
                "ids")
    scored = targets[targets != ignore_index]
    if scored.numel() == 0:
        return f"every target is the ignore index {ignore_index}: nothing is scored"
    lo, hi, classes = int(scored.min()), int(scored.max()), output.shape[-1]
    if lo < 0 or hi >= classes:
        return (f"targets span {lo}..{hi} (besides the ignore index {ignore_index}), outside "
                f"{what}'s {classes} classes")
    return None


def _cross_entropy(ignore_index: int) -> LossFn:
    def loss(output: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1).long(),
                               ignore_index=ignore_index)
    return loss
