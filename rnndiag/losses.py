"""The loss a diagnosis backpropagates, chosen from what the batch holds.

- integer `targets`: cross-entropy (mean) of the output against them: (B, C) vs (B,), or
  (B, T, C) vs (B, T) (a term at every step);
- float `targets`: mean squared error against them (same shape as the output; (B, T, ...)
  with a 3-D output has a term at every step);
- `--loss module:callable`: `callable(output, targets)` returning a scalar tensor;
- no targets: the final-state objective of each recurrent module (see rnndiag.replay).

A model's output may be a tuple (as nn.RNN-style modules return); its first element is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rnndiag.errors import BatchError

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Loss:
    name: str  # "cross_entropy" | "mse" | "custom:<target>" | "final_state_energy"
    fn: LossFn | None  # None: the final-state objective
    per_step: bool  # the loss has a term at every time step (B, T, ...) of a batch-first output

    def __call__(self, output: Tensor, targets: Tensor) -> Tensor:
        assert self.fn is not None
        try:
            value = self.fn(output, targets)
        except Exception as exc:  # the user's loss (or a shape it rejects), in one line
            text = " ".join(str(exc).split())[:200]
            raise BatchError(f"loss {self.name} failed: {type(exc).__name__}: {text}") from None
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise BatchError(f"loss {self.name} must return a scalar tensor, got "
                             f"{type(value).__name__}{_shape(value)}")
        return value.reshape(())

    def at_step(self, output: Tensor, targets: Tensor, t: int) -> Tensor:
        """The loss term of time step t alone (built-in per-step losses only)."""
        return self(output[:, t], targets[:, t])


def _shape(x: object) -> str:
    return f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else ""


def first_output(output: object) -> Tensor:
    while isinstance(output, tuple | list) and output:
        output = output[0]
    if not isinstance(output, Tensor):
        raise BatchError(f"the model returned {type(output).__name__}, not a tensor (or a tuple "
                         "whose first element is one)")
    return output


def choose(output: Tensor, targets: Tensor | None, custom: LossFn | None,
           custom_name: str | None) -> Loss:
    """Pick the loss for this output and targets, and check that they fit."""
    if custom is not None:
        if targets is None:
            raise BatchError(f"--loss {custom_name} needs 'targets' in the batch file")
        return Loss(f"custom:{custom_name}", custom, per_step=False)
    if targets is None:
        return Loss("final_state_energy", None, per_step=False)
    if targets.is_floating_point():
        if tuple(output.shape) != tuple(targets.shape):
            raise BatchError(f"float targets of shape {tuple(targets.shape)} do not fit the "
                             f"model output {tuple(output.shape)} (mean squared error needs "
                             "equal shapes)")
        return Loss("mse", F.mse_loss, per_step=output.ndim == 3)
    if targets.dtype in (torch.bool,) or targets.is_complex():
        raise BatchError(f"targets dtype {str(targets.dtype).removeprefix('torch.')}: expected "
                         "integer class ids or floats")
    if output.ndim == 2 and targets.ndim == 1 and output.shape[0] == targets.shape[0]:
        _check_classes(output, targets)
        return Loss("cross_entropy", _cross_entropy, per_step=False)
    if output.ndim == 3 and targets.ndim == 2 and tuple(output.shape[:2]) == tuple(targets.shape):
        _check_classes(output, targets)
        return Loss("cross_entropy", _cross_entropy, per_step=True)
    raise BatchError(f"integer targets of shape {tuple(targets.shape)} do not fit the model "
                     f"output {tuple(output.shape)}: cross-entropy needs (B, C) with (B,) or "
                     "(B, T, C) with (B, T)")


def _check_classes(output: Tensor, targets: Tensor) -> None:
    classes = output.shape[-1]
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= classes:
        raise BatchError(f"targets span {lo}..{hi}, outside the model's {classes} classes")


def _cross_entropy(output: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1).long())
