"""The hand-written LSTM layer (rnndiag.cells.manual) as one autograd node, for model mode.

In model mode the user's own modules run around each replayed nn.LSTM, so the layer must sit
on autograd's graph: the loss's backward pass, the credit passes and the per-example gradients
(rnndiag.pergrad) all go through it. The step replay puts some 25 nodes per step there; this
puts one per layer and direction:

    forward:  (terms, h_init, c_init) -> (h_t for every t, c_t for every t), run order (T, B, .)
    backward: the hand-written loop from dL/dh_t and dL/dc_t received from outside the
              recurrence; writes the total dL/dh_t and dL/dc_t into the capture's open buffers
              (rnndiag.replay.Chain.receive) and returns dL/d(terms) = delta_t (the gate
              pre-activations' gradient, from which pergrad takes each example's weight
              gradients) and dL/dh_init, dL/dc_init.

`terms` = x W_ih^T + b_ih + b_hh stays an ordinary autograd tensor, so dL/dx and dL/dW_ih
follow by autograd. W_hh and W_hr are constants here: no gradient is ever taken for them
through this node (model mode never asks for one; the curvature pass, which differentiates
twice, replays step by step). The node may run backward several times over a retained graph
(the credit passes): each run starts from its own copy of the factors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rnndiag.cells import manual
from rnndiag.cells.tensors import LayerWeights


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, terms: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights,
                alive: Tensor | None, receive: Any) -> tuple[Tensor, Tensor]:
        run = manual.run(terms.detach().clone(), w, alive, h0.detach(), c0.detach())
        ctx.factors = manual.factors(run, alive, c0.detach())
        ctx.w, ctx.alive, ctx.receive = w, alive, receive
        ctx.set_materialize_grads(False)
        return run.out, run.c

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_c: Tensor | None,
                 ) -> tuple[Tensor | None, ...]:
        kept: manual.Factors = ctx.factors
        fa = manual.Factors(kept.a.clone(), kept.keep, kept.forget)
        steps, batch = fa.a.shape[:2]
        width = ctx.w.w_hh.shape[1]
        g = g_out if g_out is not None else fa.a.new_zeros(steps, batch, width)
        dh, dc, (dh0, dc0) = manual.backward(fa, g, ctx.w, ctx.alive, g_c)
        if ctx.receive is not None:
            ctx.receive(dh, dc)
        return fa.a, dh0, dc0, None, None, None


def layer(terms: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights, alive: Tensor | None,
          receive: Any = None) -> tuple[Tensor, Tensor]:
    """(h (T, B, P), c (T, B, H)) of one layer and direction, run order, from its input terms
    (T, B, 4H) and initial states; `receive(dh, dc)` gets each backward pass's totals (run
    order, zero at a missing step); `alive` (T, B) run order, as rnndiag.cells.manual.run."""
    out: tuple[Tensor, Tensor] = _Layer.apply(  # type: ignore[no-untyped-call]
        terms, h0, c0, w, alive, receive)
    return out
