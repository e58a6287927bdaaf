"""Model mode's recurrent layers as one autograd node each through the fused kernel, for a GPU:
the LSTM (`layer`, the node of rnndiag.cells.graphed) and the RNN and GRU (`simple_layer`).

The hand-written loops (rnndiag.cells.manual) launch a dozen small kernels per step, which on
a GPU cost far more than the step's arithmetic (pytorch#31423). This node runs one layer and
direction as one fused call (cuDNN) on the input [terms_t, z_t], z_t = 0 (B, P), with
weight_ih [I, W_hh], weight_hh W_hh and no biases (they are in terms): the gates are
terms_t + W_hh (z_t + h_{t-1}), unchanged, so one backward pass through the kernel gives

    dL/d(terms_t) = delta_t           the gate pre-activations' gradient (for pergrad)
    dL/dz_t       = W_hh^T delta_t    the recurrent part of dL/dh_{t-1} (rnndiag.cells.fused)
    dL/dh_init, dL/dc_init

and the capture's totals follow without a loop over steps: in run order
dh_t = g_t + dL/dz_{t+1}, g_t the gradient reaching the kernel's output t, and dL/dc_t by the
elementwise backward scan over the gates recomputed in one GEMM (rnndiag.cells.fused).

Variable lengths (a prefix of steps per example, as packed sequences give) run as a packed
sequence. A reverse direction runs each example's own steps reversed (its last step first), so
in "run layout" (B, T, .) step s of every example is its s-th step in run order and its
missing steps come last; by time index they are those after its length, where the node's
states are what manual.run keeps there: the last state (forward) or the initial one (reverse).
Those fills are autograd ops on the inner graph, so their gradients go where manual.backward
sends them. Exact against the hand-written node in float64 (tests/test_graphed.py).

The RNN and GRU need no zero block: their input weight is I alone, and the recurrent part
of dL/dh_{t-1} is read off delta with one GEMM (see `_FusedSimple`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnndiag.cells.fused import linear_scan, reverse_scan
from rnndiag.cells.tensors import LayerWeights
from rnndiag.records import CellType

TWICE = "rnndiag's graphed replay cannot be differentiated twice"  # a node's refusal


def lengths_of(alive: Tensor | None, steps: int) -> tuple[bool, Tensor | None]:
    """(whether this node runs `alive` (T, B), each example's number of steps): it runs no
    mask (lengths None) and a prefix of at least one step per example (a packed sequence's);
    any other mask is the hand-written node's."""
    if alive is None:
        return True, None
    lengths = alive.sum(0)
    prefix = torch.arange(steps, device=alive.device).unsqueeze(1) < lengths
    return not bool((lengths == 0).any()) and torch.equal(prefix, alive), lengths


@dataclass(frozen=True)
class _Layout:
    """Run layout <-> time index, (B, T, .) both ways (an involution)."""

    steps: int
    reverse: bool
    lengths: Tensor | None  # (B,)

    def index(self) -> Tensor | None:
        if not self.reverse or self.lengths is None:
            return None
        s = torch.arange(self.steps, device=self.lengths.device)
        own = self.lengths.unsqueeze(1) - 1 - s  # (B, T)
        return torch.where(own >= 0, own, s)  # missing steps stay in place

    def swap(self, x: Tensor, index: Tensor | None) -> Tensor:
        if not self.reverse:
            return x
        if index is None:
            return x.flip(1)
        return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.shape[2]))

    def valid(self) -> Tensor | None:
        """(B, T, 1) bool: the steps an example has, in run layout."""
        if self.lengths is None:
            return None
        s = torch.arange(self.steps, device=self.lengths.device)
        return (s < self.lengths.unsqueeze(1)).unsqueeze(2)

    def last(self, x: Tensor) -> Tensor:
        """(B, 1, .) each example's last step in run layout."""
        if self.lengths is None:
            return x[:, -1:]
        at = (self.lengths - 1).view(-1, 1, 1).expand(-1, 1, x.shape[2])
        return x.gather(1, at)


def _lstm_kernel(xz: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights,
                 lengths: Tensor | None) -> tuple[Tensor, Tensor]:
    """(outputs (B, T, P) in run layout, zero at missing steps; c of each example's last step
    (B, H)): the fused LSTM on [terms, z] (see the module docstring)."""
    four = w.w_hh.shape[0]
    eye = torch.eye(four, dtype=xz.dtype, device=xz.device)
    w_hh = w.w_hh.detach()
    params = [torch.cat([eye, w_hh], dim=1), w_hh]
    if w.w_hr is not None:
        params.append(w.w_hr.detach())
    out, (_, c_n) = _fused(CellType.LSTM, None, xz, (h0, c0), params, False, lengths)
    return out, c_n


def _fused(cell: CellType, nonlinearity: str | None, x: Tensor, state: tuple[Tensor, ...],
           params: list[Tensor], biases: bool, lengths: Tensor | None,
           ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """(outputs (B, T, P), zero at missing steps; the final states (B, .)) of one fused
    single-layer run of `cell` on x (B, T, .) from `state` (h0[, c0]) (B, .), as a packed
    sequence with `lengths`. cuDNN on a GPU: train mode (it has no backward otherwise; no
    dropout, so the same numbers), TF32 off (exact float32)."""
    fn: Any = {CellType.LSTM: torch._VF.lstm, CellType.GRU: torch._VF.gru}.get(
        cell, torch._VF.rnn_relu if nonlinearity == "relu" else torch._VF.rnn_tanh)
    states = tuple(x_.unsqueeze(0) for x_ in state)
    hx: Any = states if cell is CellType.LSTM else states[0]
    # cuDNN: weights not in one buffer (it copies them, with a warning)
    with warnings.catch_warnings(), torch.backends.cudnn.flags(enabled=True,
                                                                allow_tf32=False):
        warnings.filterwarnings("ignore", message=".*contiguous chunk of memory")
        if lengths is None:  # (params, has_biases, layers, dropout, train, bidir, batch_first)
            found = fn(x, hx, params, biases, 1, 0.0, True, False, True)
            return found[0], tuple(f[0] for f in found[1:])
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        order, back = packed.sorted_indices, packed.unsorted_indices
        assert order is not None and back is not None
        hx = tuple(h.index_select(1, order) for h in states)
        found = fn(packed.data, packed.batch_sizes, hx if cell is CellType.LSTM else hx[0],
                   params, biases, 1, 0.0, True, False)
        out, _ = pad_packed_sequence(PackedSequence(found[0], packed.batch_sizes, order, back),
                                     batch_first=True, total_length=x.shape[1])
        return out, tuple(f[0].index_select(0, back) for f in found[1:])


def _kept(kernel_out: Tensor, h0: Tensor, layout: _Layout, valid: Tensor | None) -> Tensor:
    """The states in run layout: the kernel's, where a missing step keeps the last state
    (forward) or the initial one `h0` (reverse), as manual.run keeps them; autograd ops, so
    the gradients reaching those steps go where manual.backward sends them."""
    if valid is None:
        return kernel_out
    fill = h0.unsqueeze(1) if layout.reverse else layout.last(kernel_out)
    return torch.where(valid, kernel_out, fill)


def _incoming(g_out: Tensor | None, g_h: Tensor | None, like: Tensor, reverse: bool) -> Tensor:
    """The gradient of the node's states (T, B, P) by time index, h_n's added to the last step
    in run order (h_n is that state)."""
    grad = torch.zeros_like(like) if g_out is None else g_out.clone()
    if g_h is not None:
        grad[0 if reverse else -1] += g_h
    return grad


def _pull(pairs: list[tuple[Tensor, Tensor | None]], inputs: tuple[Tensor, ...],
          ) -> list[Tensor]:
    """dL/d(inputs) through the inner graph from (output, its gradient) pairs (a None
    gradient: none reached that output), zero where none reaches an input; the graph is
    retained, for the credit passes' further backward passes."""
    given = [(x, g) for x, g in pairs if g is not None]
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        found = torch.autograd.grad([x for x, _ in given], list(inputs),
                                    [g for _, g in given], retain_graph=True,
                                    allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for d, x in zip(found, inputs, strict=True)]


@dataclass
class _Saved:
    out: Tensor  # (T, B, P) the node's states on the inner graph
    c_n: Tensor  # (B, H) on the inner graph
    leaves: tuple[Tensor, ...]  # terms, z, h0, c0
    kernel_out: Tensor  # (B, T, P) the kernel's outputs, run layout
    keep: Tensor  # (B, T, H) o_t (1 - tanh(c_t)^2), run layout
    forget: Tensor  # (B, T, H) f_t (1 at missing steps), run layout
    layout: _Layout
    index: Tensor | None


class _FusedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, terms: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights,
                lengths: Tensor | None, reverse: bool, receive: Any,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, steps, _ = terms.shape
        layout = _Layout(steps, reverse, lengths)
        index, valid = layout.index(), layout.valid()
        with torch.enable_grad():
            leaves = (terms.detach().requires_grad_(),
                      terms.new_zeros(batch, steps, w.w_hh.shape[1]).requires_grad_(),
                      h0.detach().requires_grad_(), c0.detach().requires_grad_())
            run_terms = layout.swap(leaves[0], index)
            kernel_out, c_n = _lstm_kernel(torch.cat([run_terms, leaves[1]], dim=2),
                                           leaves[2], leaves[3], w, lengths)
            states = _kept(kernel_out, leaves[2], layout, valid)
            out = layout.swap(states, index).transpose(0, 1)
        with torch.no_grad():  # the gates again, in one GEMM, for c_t and dL/dc_t
            before = torch.cat([h0.detach().unsqueeze(1), states[:, :-1].detach()], dim=1)
            a = run_terms.detach() + before @ w.w_hh.detach().t()
            i, f, g, o = a.chunk(4, dim=2)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            add = i * g
            add[:, 0] += f[:, 0] * c0.detach()
            if valid is not None:  # a missing step keeps c: c_t = 1 * c_{t-1} + 0
                f = torch.where(valid, f, 1.0)
                add = torch.where(valid, add, 0.0)
            c = linear_scan(f, add)
            keep = o * (1 - c.tanh().pow(2))
            if valid is not None and reverse:
                c = torch.where(valid, c, c0.detach().unsqueeze(1))
            c_all = layout.swap(c, index).transpose(0, 1).contiguous()
        ctx.saved = _Saved(out, c_n, leaves, kernel_out, keep, f, layout, index)
        ctx.w, ctx.receive = w, receive
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(c_all)
        last = 0 if reverse else steps - 1
        values = out.detach()
        return values.contiguous(), values[last].clone(), c_n.detach().clone(), c_all

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_h: Tensor | None, g_c: Tensor | None,
                 _: Any) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph: a second derivative through this node
            raise RuntimeError(TWICE)
        s: _Saved = ctx.saved
        w: LayerWeights = ctx.w
        grad = _incoming(g_out, g_h, s.out, s.layout.reverse)
        d_terms, dz, dh0, dc0, g_run = _pull([(s.out, grad), (s.c_n, g_c)],
                                             (*s.leaves, s.kernel_out))
        if ctx.receive is not None:
            dh = g_run.clone()
            # at missing steps g_run and dz are zero (the kernel never read them), so dh and
            # dc are too, and nothing flows back across an example's last step
            dh[:, :-1] += dz[:, 1:]
            local = (dh if w.w_hr is None else dh @ w.w_hr.detach()) * s.keep
            if g_c is not None:  # c_n is each example's last c in run order
                local += _at_last(local, g_c, s.layout)
            dc = reverse_scan(s.forget, local)
            ctx.receive(s.layout.swap(dh, s.index).transpose(0, 1),
                        s.layout.swap(dc, s.index).transpose(0, 1))
        return d_terms, dh0, dc0, None, None, None, None


def _at_last(like: Tensor, g_c: Tensor, layout: _Layout) -> Tensor:
    """Zeros like `like` (B, T, H) but g_c at each example's last step in run layout."""
    out = torch.zeros_like(like)
    if layout.lengths is None:
        out[:, -1] = g_c
    else:
        out.scatter_(1, (layout.lengths - 1).view(-1, 1, 1).expand(-1, 1, like.shape[2]),
                     g_c.unsqueeze(1))
    return out


class _FusedSimple(torch.autograd.Function):
    """An RNN or GRU layer and direction as one node: the fused kernel on the input terms
    with weight_ih = I (the terms hold x W_ih^T and the input biases), so one backward pass
    gives dL/d(terms) (pergrad's delta) and dL/dh_init. The capture's totals in run order:
    RNN, dh_t = g_t + delta_{t+1} W_hh; GRU (rnndiag.cells.fused.gru_state_adjoints, with
    dL/dz1 and dL/dz2 read off delta), dh_t = g_t + a_{t+1} + u_{t+1} dh_{t+1},
    a_t = [delta_r, delta_u] W_h(r,u) + (r_t delta_n) W_hn, as a backward scan."""

    @staticmethod
    def forward(ctx: Any, terms: Tensor, h0: Tensor, w: LayerWeights, cell: CellType,
                nonlinearity: str | None, lengths: Tensor | None, reverse: bool,
                receive: Any) -> tuple[Tensor, Tensor]:
        steps, width = terms.shape[1], w.w_hh.shape[1]
        layout = _Layout(steps, reverse, lengths)
        index, valid = layout.index(), layout.valid()
        w_hh = w.w_hh.detach()
        params = [torch.eye(terms.shape[2], dtype=terms.dtype, device=terms.device), w_hh]
        biases = cell is CellType.GRU and w.b_hh is not None  # an RNN's are in the terms
        if biases:
            assert w.b_hh is not None
            params += [torch.zeros_like(w.b_hh), w.b_hh.detach()]
        with torch.enable_grad():
            leaves = (terms.detach().requires_grad_(), h0.detach().requires_grad_())
            run_terms = layout.swap(leaves[0], index)
            kernel_out, _ = _fused(cell, nonlinearity, run_terms, (leaves[1],), params, biases,
                                   lengths)
            states = _kept(kernel_out, leaves[1], layout, valid)
            out = layout.swap(states, index).transpose(0, 1)
        gates = None
        if cell is CellType.GRU:
            with torch.no_grad():  # r and u again, in one GEMM
                before = torch.cat([h0.detach().unsqueeze(1), states[:, :-1].detach()], dim=1)
                hp = before @ w_hh[: 2 * width].t()
                if biases:
                    assert w.b_hh is not None
                    hp += w.b_hh.detach()[: 2 * width]
                r, u = (run_terms.detach()[..., : 2 * width] + hp).sigmoid().chunk(2, dim=2)
                gates = (r, u)
        ctx.saved = (out, leaves, kernel_out, layout, index, gates)
        ctx.w, ctx.receive = w, receive
        ctx.set_materialize_grads(False)
        values = out.detach()
        return values.contiguous(), values[0 if reverse else steps - 1].clone()

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_h: Tensor | None,
                 ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph: a second derivative through this node
            raise RuntimeError(TWICE)
        out, leaves, kernel_out, layout, index, gates = ctx.saved
        w: LayerWeights = ctx.w
        grad = _incoming(g_out, g_h, out, layout.reverse)
        d_terms, dh0, g_run = _pull([(out, grad)], (*leaves, kernel_out))
        if ctx.receive is not None:
            delta = layout.swap(d_terms, index)  # run layout; zero at missing steps
            w_hh = w.w_hh.detach()
            if gates is None:  # RNN
                a = delta @ w_hh
            else:
                width = w_hh.shape[1]
                r, u = gates
                a = delta[..., : 2 * width] @ w_hh[: 2 * width] + \
                    (r * delta[..., 2 * width:]) @ w_hh[2 * width:]
            dh = g_run.clone()
            dh[:, :-1] += a[:, 1:]
            if gates is not None:
                dh = reverse_scan(gates[1], dh)
            ctx.receive(layout.swap(dh, index).transpose(0, 1))
        return d_terms, dh0, None, None, None, None, None, None


def simple_layer(cell: CellType, nonlinearity: str | None, terms: Tensor, h0: Tensor,
                 w: LayerWeights, lengths: Tensor | None, reverse: bool, receive: Any = None,
                 ) -> tuple[Tensor, Tensor]:
    """An RNN or GRU layer and direction as one node: (h (T, B, P) by time index, h_n) from
    its input terms (B, T, G*H) (rnndiag.cells.input_terms) and initial state (B, P);
    `receive(dh)` gets each backward pass's dL/dh_t (T, B, P) by time index, zero at a
    missing step; `lengths` as `lengths_of` gives them."""
    out: tuple[Tensor, Tensor] = _FusedSimple.apply(  # type: ignore[no-untyped-call]
        terms, h0, w, cell, nonlinearity, lengths, reverse, receive)
    return out


def layer(terms: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights, lengths: Tensor | None,
          reverse: bool, receive: Any = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """rnndiag.cells.graphed.layer through the fused kernel; `lengths` (B,) as
    `lengths_of` gives them."""
    out: tuple[Tensor, Tensor, Tensor, Tensor] = _FusedLayer.apply(  # type: ignore[no-untyped-call]
        terms, h0, c0, w, lengths, reverse, receive)
    return out
