"""The hand-written LSTM layer (rnndiag.cells.manual) as one autograd node, for model mode
(on a GPU, `layer` runs the fused kernel instead: rnndiag.cells.graphed_fused); the GRU's
likewise (`gru_layer`, rnndiag.cells.manual_gru).

In model mode the user's own modules run around each replayed nn.LSTM, so the layer must sit
on autograd's graph: the loss's backward pass, the credit passes and the per-example gradients
(rnndiag.pergrad) all go through it. The step replay puts some 25 nodes per step there; this
puts one per layer and direction:

    forward:  (terms, h_init, c_init) -> (h_t for every t (T, B, P), h_n, c_n)
    backward: the hand-written loop from dL/dh_t and dL/dc_t received from outside the
              recurrence; writes the total dL/dh_t and dL/dc_t into the capture's open buffers
              (rnndiag.capture.Chain.receive) and returns dL/d(terms) = delta_t (the gate
              pre-activations' gradient, from which pergrad takes each example's weight
              gradients) and dL/dh_init, dL/dc_init.

`terms` = x W_ih^T + b_ih + b_hh stays an ordinary autograd tensor, so dL/dx and dL/dW_ih
follow by autograd. W_hh and W_hr are constants here: no gradient is ever taken for them
through this node (model mode never asks for one; the curvature pass, which differentiates
twice, replays step by step; so does model mode under a custom loss, which may take a
gradient penalty: this node refuses a second derivative rather than give a wrong one). The
node may run backward several times over a retained graph (the credit passes): each run
writes delta into a fresh buffer, the factors stay.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rnndiag.cells import graphed_fused, manual, manual_gru
from rnndiag.cells.tensors import LayerWeights
from rnndiag.cells.threads import side_by_side
from rnndiag.records import CellType

FUSED = "cuda"  # the fused-kernel node (rnndiag.cells.graphed_fused): "cuda" on a GPU only
#                 (on the CPU the hand-written loops are faster), "always" (tests), "never"


def fused_for(x: Tensor) -> bool:
    """Whether a layer on `x` runs through the fused kernel (`FUSED`)."""
    return FUSED == "always" or (FUSED == "cuda" and x.is_cuda)


def _fused_lengths(terms: Tensor, alive: Tensor | None) -> tuple[bool, Tensor | None]:
    """(whether the fused-kernel node runs this layer, its lengths): where `fused_for` says so
    and `alive` is a mask it runs (rnndiag.cells.graphed_fused.lengths_of)."""
    if not fused_for(terms):
        return False, None
    return graphed_fused.lengths_of(alive, terms.shape[0])


def _lstm_run(terms: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights, alive: Tensor | None,
              reverse: bool) -> tuple[manual.Factors, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """One LSTM direction's forward: what its backward reads, and the node's outputs."""
    gates = terms.clone(memory_format=torch.contiguous_format)  # run squashes it in place
    run = manual.run(gates, w, alive, h0.detach(), c0.detach(), reverse)
    last = manual.order(run.out.shape[0], reverse)[-1]
    return (manual.factors(run, alive, c0.detach()),
            (run.out, run.out[last].clone(), run.c[last].clone(), run.c))


def _lstm_back(fa: manual.Factors, w: LayerWeights, alive: Tensor | None,
               g_out: Tensor | None, g_h: Tensor | None, g_c: Tensor | None,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(delta, dL/dh_init, dL/dc_init, dh, dc) of one LSTM direction's backward pass."""
    delta = torch.empty_like(fa.a)
    dh, dc, (dh0, dc0) = manual.backward(fa, g_out, w, alive, g_h, g_c, delta)
    return delta, dh0, dc0, dh, dc


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, terms: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights,
                alive: Tensor | None, reverse: bool, receive: Any,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx.factors, out = _lstm_run(terms, h0, c0, w, alive, reverse)
        ctx.w, ctx.alive, ctx.receive = w, alive, receive
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out[3])
        return out

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_h: Tensor | None, g_c: Tensor | None,
                 _: Any) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph: a second derivative through this node
            raise RuntimeError(graphed_fused.TWICE)
        delta, dh0, dc0, dh, dc = _lstm_back(ctx.factors, ctx.w, ctx.alive, g_out, g_h, g_c)
        if ctx.receive is not None:
            ctx.receive(dh, dc)
        return delta, dh0, dc0, None, None, None, None


class _LayerPair(torch.autograd.Function):
    """Both directions of a bidirectional LSTM layer as one node: `_Layer`'s work for each,
    the two run side by side (`side_by_side`) in the forward and in every backward pass.
    Inputs (terms, h0, c0) forward then reverse; outputs `_Layer`'s four, forward then
    reverse."""

    @staticmethod
    def forward(ctx: Any, terms_f: Tensor, h0_f: Tensor, c0_f: Tensor, terms_r: Tensor,
                h0_r: Tensor, c0_r: Tensor, w_f: LayerWeights, w_r: LayerWeights,
                alive: Tensor | None, receive_f: Any, receive_r: Any) -> tuple[Tensor, ...]:
        (fa_f, out_f), (fa_r, out_r) = side_by_side(
            lambda: _lstm_run(terms_f, h0_f, c0_f, w_f, alive, False),
            lambda: _lstm_run(terms_r, h0_r, c0_r, w_r, alive, True))
        ctx.factors, ctx.w, ctx.alive = (fa_f, fa_r), (w_f, w_r), alive
        ctx.receive = (receive_f, receive_r)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(out_f[3], out_r[3])
        return (*out_f, *out_r)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph: a second derivative through this node
            raise RuntimeError(graphed_fused.TWICE)
        (fa_f, fa_r), (w_f, w_r), alive = ctx.factors, ctx.w, ctx.alive
        found_f, found_r = side_by_side(
            lambda: _lstm_back(fa_f, w_f, alive, *grads[0:3]),
            lambda: _lstm_back(fa_r, w_r, alive, *grads[4:7]))
        for receive, (*_, dh, dc) in zip(ctx.receive, (found_f, found_r), strict=True):
            if receive is not None:
                receive(dh, dc)
        return (*found_f[:3], *found_r[:3], None, None, None, None, None)


def layer(terms: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights, alive: Tensor | None,
          reverse: bool, receive: Any = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h (T, B, P) by time index, h_n, c_n: the last states in run order, and the cell states
    (T, B, H) as values, off the graph) of one layer and direction, from its input terms
    (T, B, 4H), time-major, and initial states; `receive(dh, dc)` gets each backward pass's
    totals (T, B, .) by time index, zero at a missing step; `alive` (T, B) by time index, as
    rnndiag.cells.manual.run."""
    fits, lengths = _fused_lengths(terms, alive)
    if fits:  # the fused node reads its terms batch-first (a view)
        return graphed_fused.layer(terms.transpose(0, 1), h0, c0, w, lengths, reverse,
                                   receive)
    out: tuple[Tensor, Tensor, Tensor, Tensor] = _Layer.apply(  # type: ignore[no-untyped-call]
        terms, h0, c0, w, alive, reverse, receive)
    return out


def pairs(terms: Tensor) -> bool:
    """Whether a bidirectional layer on these terms runs as one pair node (`layer_pair`,
    `gru_pair`): where the hand-written loops run it (the fused kernel runs its directions
    in its own threads)."""
    return not fused_for(terms)


def layer_pair(terms: tuple[Tensor, Tensor], h0: tuple[Tensor, Tensor],
               c0: tuple[Tensor, Tensor], w: tuple[LayerWeights, LayerWeights],
               alive: Tensor | None, receive: tuple[Any, Any],
               ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """`layer`'s four outputs for the forward and the reverse direction of one bidirectional
    layer, run as one node (`_LayerPair`; where `pairs`)."""
    out = _LayerPair.apply(terms[0], h0[0], c0[0], terms[1], h0[1], c0[1], w[0], w[1], alive,
                           *receive)  # type: ignore[no-untyped-call]
    return tuple(out[:4]), tuple(out[4:])


def gru_pair(terms: tuple[Tensor, Tensor], h0: tuple[Tensor, Tensor],
             w: tuple[LayerWeights, LayerWeights], alive: Tensor | None,
             receive: tuple[Any, Any]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """`gru_layer`'s two outputs for both directions of one bidirectional layer, as one node
    (`_GruPair`; where `pairs`)."""
    out = _GruPair.apply(terms[0], h0[0], terms[1], h0[1], w[0], w[1], alive,
                         *receive)  # type: ignore[no-untyped-call]
    return tuple(out[:2]), tuple(out[2:])


def _gru_run(terms: Tensor, h0: Tensor, w: LayerWeights, alive: Tensor | None,
             reverse: bool) -> tuple[manual_gru.Forward, tuple[Tensor, Tensor]]:
    """One GRU direction's forward: what its backward reads, and the node's outputs."""
    run = manual_gru.run(terms.contiguous(), w, alive, h0.detach(), reverse)  # read only
    return run, (run.out, run.out[0 if reverse else terms.shape[0] - 1].clone())


class _GruLayer(torch.autograd.Function):
    """A GRU layer and direction as one node running rnndiag.cells.manual_gru's loops (the
    CPU's; `_Layer` for the GRU): dL/d(terms) = delta, dL/dh_init, and dL/dh_t to the
    receiver."""

    @staticmethod
    def forward(ctx: Any, terms: Tensor, h0: Tensor, w: LayerWeights, alive: Tensor | None,
                reverse: bool, receive: Any) -> tuple[Tensor, Tensor]:
        ctx.run, out = _gru_run(terms, h0, w, alive, reverse)
        ctx.w, ctx.alive, ctx.receive = w, alive, receive
        ctx.h0 = h0.detach()
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_h: Tensor | None,
                 ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph: a second derivative through this node
            raise RuntimeError(graphed_fused.TWICE)
        dh, delta, dh0 = manual_gru.backward(ctx.run, g_out, ctx.w, ctx.h0, ctx.alive, g_h)
        if ctx.receive is not None:
            ctx.receive(dh)
        return delta, dh0, None, None, None, None


class _GruPair(torch.autograd.Function):
    """Both directions of a bidirectional GRU layer as one node (`_LayerPair` for the GRU):
    inputs (terms, h0) forward then reverse, outputs (h, h_n) forward then reverse."""

    @staticmethod
    def forward(ctx: Any, terms_f: Tensor, h0_f: Tensor, terms_r: Tensor, h0_r: Tensor,
                w_f: LayerWeights, w_r: LayerWeights, alive: Tensor | None, receive_f: Any,
                receive_r: Any) -> tuple[Tensor, ...]:
        (run_f, out_f), (run_r, out_r) = side_by_side(
            lambda: _gru_run(terms_f, h0_f, w_f, alive, False),
            lambda: _gru_run(terms_r, h0_r, w_r, alive, True))
        ctx.run, ctx.w, ctx.alive = (run_f, run_r), (w_f, w_r), alive
        ctx.h0, ctx.receive = (h0_f.detach(), h0_r.detach()), (receive_f, receive_r)
        ctx.set_materialize_grads(False)
        return (*out_f, *out_r)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph: a second derivative through this node
            raise RuntimeError(graphed_fused.TWICE)
        (run_f, run_r), (w_f, w_r), (h0_f, h0_r), alive = ctx.run, ctx.w, ctx.h0, ctx.alive
        (dh_f, delta_f, dh0_f), (dh_r, delta_r, dh0_r) = side_by_side(
            lambda: manual_gru.backward(run_f, grads[0], w_f, h0_f, alive, grads[1]),
            lambda: manual_gru.backward(run_r, grads[2], w_r, h0_r, alive, grads[3]))
        for receive, dh in zip(ctx.receive, (dh_f, dh_r), strict=True):
            if receive is not None:
                receive(dh)
        return delta_f, dh0_f, delta_r, dh0_r, None, None, None, None, None


def gru_layer(terms: Tensor, h0: Tensor, w: LayerWeights, alive: Tensor | None,
              reverse: bool, receive: Any = None) -> tuple[Tensor, Tensor]:
    """(h (T, B, H) by time index, h_n) of one GRU layer and direction from its input terms
    (T, B, 3H), time-major, and initial state (B, H), as `layer` (the fused kernel on a
    GPU)."""
    fits, lengths = _fused_lengths(terms, alive)
    if fits:
        return graphed_fused.simple_layer(CellType.GRU, None, terms.transpose(0, 1), h0, w,
                                          lengths, reverse, receive)
    out: tuple[Tensor, Tensor] = _GruLayer.apply(  # type: ignore[no-untyped-call]
        terms, h0, w, alive, reverse, receive)
    return out
