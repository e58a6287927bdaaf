"""The tensors a cell's step reads and returns, written without importing torch.

Shapes: x_t (B, I); h (B, P) with P = proj_size or hidden_size; c (B, H). Weights as PyTorch
stores them: W_ih (G*H, I), W_hh (G*H, P), b_ih and b_hh (G*H,), W_hr (P, H) for projected
LSTMs, G being the unit's gate multiple. The layer input `x` of `project_inputs` is
batch-first, (B, T, I).

Everything here (and in the units) calls Tensor methods, which run the same ATen ops as the
`torch.*` functions (`a.addmm(b, c)` is `torch.addmm(a, b, c)`): the cells package then needs
no torch import, so `rnndiag inspect` can use the registry without loading torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from rnndiag.records import Direction, ModuleSpec

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class LayerWeights:
    """The weights of one layer and direction."""

    w_ih: Tensor
    w_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None
    w_hr: Tensor | None  # LSTM projection, (P, H)

    @staticmethod
    def of(
        spec: ModuleSpec, params: Mapping[str, Tensor], layer: int, direction: Direction
    ) -> LayerWeights:
        """Pick one layer's tensors out of `params` (keyed by local names, `weight_ih_l0`)."""

        def get(base: str) -> Tensor | None:
            return params.get(spec.local_name(base, layer, direction))

        w_ih, w_hh = get("weight_ih"), get("weight_hh")
        if w_ih is None or w_hh is None:
            raise KeyError(spec.local_name("weight_ih", layer, direction))
        return LayerWeights(w_ih, w_hh, get("bias_ih"), get("bias_hh"), get("weight_hr"))


class StepOut(NamedTuple):
    """One step's new state."""

    h: Tensor  # (B, P) the new state
    c: Tensor | None  # (B, H) LSTM cell state


def project_inputs(x: Tensor, w: LayerWeights, hidden_bias: bool) -> Tensor:
    """Every step's input term at once, (B, T, I) -> (B, T, G*H): x W_ih^T + b_ih, plus b_hh
    when `hidden_bias` (for cells whose gates only ever see the sum b_ih + b_hh)."""
    biases = [b for b in (w.b_ih, w.b_hh if hidden_bias else None) if b is not None]
    flat = x.reshape(-1, x.shape[-1])
    if not biases:
        return (flat @ w.w_ih.t()).view(*x.shape[:-1], -1)
    bias = biases[0] if len(biases) == 1 else biases[0] + biases[1]
    return bias.addmm(flat, w.w_ih.t()).view(*x.shape[:-1], -1)

