"""An LSTM layer's per-step adjoints on the CPU without a step-by-step autograd graph.

The step replay (rnndiag.replay.unroll) records some 25 autograd nodes per step, and on the
CPU their per-kernel costs, not the arithmetic, set its pace. Here, for one layer and direction
(time-major (T, B, .), by time index; a reverse direction walks the same buffers from t = T-1
down, so "t-1" below is the step before in run order, t+1 for a reverse direction):

Forward, without a graph: the input terms x_t W_ih^T + b_ih + b_hh of every step in one GEMM,
then per step a_t = (that) + h_{t-1} W_hh^T, split (i, f, g, o) and squashed in place,
c_t = f_t c_{t-1} + i_t g_t and h_t = o_t tanh(c_t) (times W_hr^T with a projection), from
given or zero initial states; the gates, c_t and tanh(c_t) are kept for the backward pass
(the fused kernel returns only h_t, and recomputing the gates from it cost as much as the run).

Backward, from the last step, with g_t = dL/d(h_t) from outside the recurrence (the layer
above, the objective):

    dh_t    = g_t + delta_{t+1} W_hh              the total dL/dh_t  (delta_T = 0)
    dm_t    = dh_t W_hr (proj_size > 0), else dh_t
    dc_t    = dm_t o_t (1 - tanh(c_t)^2) + dc_{t+1} f_{t+1}          the total dL/dc_t
    delta_t = [dc_t g_t i_t (1 - i_t), dc_t c_{t-1} f_t (1 - f_t), dc_t i_t (1 - g_t^2),
               dm_t tanh(c_t) o_t (1 - o_t)]       dL/da_t, gate order (i, f, g, o)

and the layer below gets dL/dx_t = delta_t W_ih, one GEMM. A backward step costs one GEMM and
four elementwise kernels. Every factor that does not depend on the adjoints is computed for all
steps at once, in the gates' own buffer, which then holds delta. Exact: float64 tests against
the step replay (tests/test_speed_paths.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rnndiag.cells.tensors import LayerWeights


@dataclass(frozen=True)
class Forward:
    """One layer's forward run, time-major by time index: what its backward reads."""

    out: Tensor  # (T, B, P) h_t
    gates: Tensor  # (T, B, 4H) (i, f, g, o) after their squashing functions
    c: Tensor  # (T, B, H)
    tc: Tensor  # (T, B, H) tanh(c_t)
    reverse: bool = False  # the run went from t = T-1 down to 0


def order(steps: int, reverse: bool) -> range:
    """The time indices in run order."""
    return range(steps - 1, -1, -1) if reverse else range(steps)


@torch.no_grad()
def forward(x: Tensor, w: LayerWeights, alive: Tensor | None = None,
            reverse: bool = False) -> Forward:
    """The layer on x (T, B, I) from zero states, step by step without a graph, keeping the
    gates: the input terms x W_ih^T + b of every step in one GEMM, then `run`."""
    steps, batch, _ = x.shape
    flat = x.reshape(-1, x.shape[2])
    if w.b_ih is not None and w.b_hh is not None:  # the biases added by the GEMM itself
        gates = torch.addmm(w.b_ih + w.b_hh, flat, w.w_ih.t())
    else:
        gates = flat @ w.w_ih.t()
    return run(gates.view(steps, batch, -1), w, alive, reverse=reverse)


@torch.no_grad()
def run(gates: Tensor, w: LayerWeights, alive: Tensor | None = None,
        h0: Tensor | None = None, c0: Tensor | None = None, reverse: bool = False) -> Forward:
    """The recurrence from the input terms `gates` (T, B, 4H), a buffer it squashes in place
    into the gates: per step one GEMM and six elementwise kernels (time-major: each step's
    rows are contiguous), from (h0, c0) (B, P), (B, H), zero when None; t = 0 up, or T-1
    down when `reverse`.

    With `alive` (T, B) bool by time index, a step an example does not have keeps its state
    (h_t = h_{t-1}, c_t = c_{t-1}), as rnndiag.replay.unroll runs it; `c` holds the states and
    `tc` the tanh of each step's own new c."""
    steps, batch, _ = gates.shape
    hidden, width = w.w_hh.shape[0] // 4, w.w_hh.shape[1]
    live = None if alive is None else alive.unsqueeze(2)  # (T, B, 1)
    # every step writes its rows; a missing first step keeps zeros from these buffers
    out = (gates.new_zeros if live is not None and h0 is None else gates.new_empty)(
        steps, batch, width)
    c = (gates.new_zeros if live is not None and c0 is None else gates.new_empty)(
        steps, batch, hidden)
    tc = gates.new_empty(steps, batch, hidden)
    own = None if live is None else gates.new_empty(batch, hidden)
    h_new = None if live is None else gates.new_empty(batch, width)
    w_hh = w.w_hh.t()
    before = None  # the time index of the step before, in run order
    for t in order(steps, reverse):
        a = gates[t]
        h_prev = h0 if before is None else out[before]
        c_prev = c0 if before is None else c[before]
        if h_prev is not None:
            a.addmm_(h_prev, w_hh)
        a[:, : 2 * hidden].sigmoid_()
        a[:, 2 * hidden : 3 * hidden].tanh_()
        a[:, 3 * hidden :].sigmoid_()
        i, f, g, o = a.chunk(4, dim=1)
        cell = c[t] if own is None else own
        if c_prev is not None:
            torch.addcmul(i * g, f, c_prev, out=cell)
        else:
            torch.mul(i, g, out=cell)
        torch.tanh(cell, out=tc[t])
        h = out[t] if h_new is None else h_new
        if w.w_hr is None:
            torch.mul(o, tc[t], out=h)
        else:
            torch.mm(o * tc[t], w.w_hr.t(), out=h)
        if live is not None:  # a missing step keeps the state it read (zero before the first)
            torch.where(live[t], cell, c[t] if c_prev is None else c_prev, out=c[t])
            torch.where(live[t], h, out[t] if h_prev is None else h_prev, out=out[t])
        before = t
    return Forward(out, gates, c, tc, reverse)


@dataclass(frozen=True)
class Factors:
    """What the backward loop reads besides the adjoints, by time index (T, B, .)."""

    a: Tensor  # (T, B, 4H) the factors of delta in the gate slots (zero at a missing step)
    keep: Tensor  # o_t (1 - tanh(c_t)^2)
    forget: Tensor  # f_t
    reverse: bool = False


@torch.no_grad()
def factors(run: Forward, alive: Tensor | None = None, c0: Tensor | None = None) -> Factors:
    """The factors of delta from a forward run, in its gate buffer (consumed)."""
    steps = run.out.shape[0]
    a, c, tc = run.gates, run.c, run.tc
    i, f, gate, o = a.chunk(4, dim=2)
    # x (1 - y) as x - x y, one addcmul: these passes over (T, B, H) are memory-bound
    keep = torch.addcmul(o, o * tc, tc, value=-1)  # o (1 - tanh(c)^2): dc_t = dm_t keep_t + ..
    forget = f.clone()  # f_t, for dL/dc_{t-1}: f's own slot becomes a factor of delta
    # the factors of delta, in the gates' buffer (i, g and o read before they are replaced)
    o.mul_(torch.addcmul(tc, tc, o, value=-1))  # o -> tanh(c) o (1 - o)
    factor_g = torch.addcmul(i, i * gate, gate, value=-1)
    i.mul_(torch.addcmul(gate, gate, i, value=-1))  # i -> g i (1 - i)
    gate.copy_(factor_g)  # g -> i (1 - g^2)
    del factor_g
    # f -> c_{t-1} f (1 - f), c_{t-1} the step before in run order (c0, or zero, first);
    # f_t is kept in `forget`
    first, later = (slice(steps - 1, steps), slice(0, steps - 1)) if run.reverse else (
        slice(0, 1), slice(1, steps))
    before = c[1:] if run.reverse else c[:-1]
    f[later].mul_(torch.addcmul(before, before, f[later], value=-1))
    if c0 is None:
        f[first].zero_()
    else:
        f[first].mul_(torch.addcmul(c0, c0, f[first][0], value=-1).unsqueeze(0))
    if alive is not None:  # no gate gradient at a missing step
        a.mul_(alive.unsqueeze(2).to(a.dtype))
    return Factors(a, keep, forget, run.reverse)


@torch.no_grad()
def adjoints(run: Forward, g: Tensor, w: LayerWeights, alive: Tensor | None = None,
             inputs: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dh (T, B, P), dc (T, B, H), dL/dx (T, B, I) when `inputs`), time-major by time index,
    from the layer's forward run (whose gate buffer this consumes) and g = dL/d(outputs) from
    outside the recurrence. With `alive` (as `forward` ran), a missing step passes its state's
    gradient to the step before unchanged, gets no gate gradient, and its dh and dc are
    zero (as rnndiag.capture.Chain.close leaves them)."""
    fa = factors(run, alive)
    dh, dc, _ = backward(fa, g, w, alive)
    if not inputs:
        return dh, dc, None
    dx = (fa.a.reshape(-1, fa.a.shape[2]) @ w.w_ih).view(*fa.a.shape[:2], -1)
    return dh, dc, dx


@torch.no_grad()
def backward(fa: Factors, g: Tensor | None, w: LayerWeights, alive: Tensor | None = None,
             g_h: Tensor | None = None, g_c: Tensor | None = None, into: Tensor | None = None,
             ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """(dh, dc, (dL/dh_init, dL/dc_init)) by time index; delta (zero at a missing step) is
    written into `into` (T, B, 4H), by default fa.a itself. g (T, B, P): the gradient of the
    states h_t from outside the recurrence (None: zero); g_h (B, P) and g_c (B, H): those of
    the last states h and c in run order besides (a returned h_n, c_n; None: zero); h_init,
    c_init: the states before the first step."""
    delta = fa.a if into is None else into
    keep = fa.keep
    run = order(delta.shape[0], fa.reverse)
    # time-major and contiguous whatever g's layout (a slice of a batch-first gradient, say):
    # the loop writes every row, g_t + delta_{t+1} W_hh in one GEMM
    dh = fa.a.new_empty(*fa.a.shape[:2], w.w_hh.shape[1])
    last = dh[run[-1]]
    if g is None:
        last.zero_()
    else:
        last.copy_(g[run[-1]])
    if g_h is not None:
        last += g_h
    dc = torch.empty_like(keep)
    dm = dh if w.w_hr is None else torch.empty_like(keep)
    live = None if alive is None else alive.unsqueeze(2)  # (T, B, 1)
    carried = keep.new_zeros(keep.shape[1:]) if g_c is None else g_c.clone()
    carried = _backward_loop(fa, delta, g, dh, dm, dc, w, live, carried)
    first = run[0]
    dh_init = delta[first] @ w.w_hh  # through a = ... + h_init W_hh^T
    dc_init = dc[first] * fa.forget[first]
    if live is not None:  # a missing first step kept the initial state: its gradient
        dh_init = torch.where(live[first], dh_init, dh[first])
        dc_init = torch.where(live[first], dc_init, carried)
        dh.mul_(live.to(dh.dtype))
        dc.mul_(live.to(dc.dtype))
    return dh, dc, (dh_init, dc_init)


def _backward_loop(fa: Factors, delta: Tensor, g: Tensor | None, dh: Tensor, dm: Tensor,
                   dc: Tensor, w: LayerWeights, live: Tensor | None, carried: Tensor) -> Tensor:
    """The loop of `backward`, last step in run order first: delta[t] from fa.a[t], dh[t] =
    g[t] (zero when None) + what the step after passes back (dh of the last step in run order
    given). With `live` (T, B, 1), a missing step passes the gradient of the state it kept to
    the step before unchanged (its delta is zero: `factors` zeroed those factors). `carried`:
    dL/dc of the last state from outside. Returns dL/dc of the state the first step read,
    from the steps after it (the initial state's, where the first step is missing)."""
    steps, batch, four = delta.shape
    hidden = four // 4
    src3 = fa.a.view(steps, batch, 4, hidden)[:, :, :3]  # (T, B, 3, H): i, f, g factors
    dst3 = delta.view(steps, batch, 4, hidden)[:, :, :3]
    src_o, dst_o = fa.a[:, :, 3 * hidden:], delta[:, :, 3 * hidden:]
    after = None  # the time index of the step after, in run order
    run = order(steps, fa.reverse)
    for t in reversed(run):
        if after is not None:
            if live is None:
                if g is None:
                    torch.mm(delta[after], w.w_hh, out=dh[t])
                else:
                    torch.addmm(g[t], delta[after], w.w_hh, out=dh[t])
            else:
                back = torch.where(live[after], delta[after] @ w.w_hh, dh[after])
                if g is None:
                    dh[t].copy_(back)
                else:
                    torch.add(g[t], back, out=dh[t])
        if w.w_hr is not None:
            torch.mm(dh[t], w.w_hr, out=dm[t])
        dct = torch.addcmul(carried, dm[t], fa.keep[t], out=dc[t])
        torch.mul(src3[t], dct.unsqueeze(1), out=dst3[t])
        torch.mul(src_o[t], dm[t], out=dst_o[t])
        if t != run[0]:
            into = dct * fa.forget[t]  # dL/dc_{t-1} through c_t = f_t c_{t-1} + ...
            carried = into if live is None else torch.where(live[t], into, carried)
        after = t
    return carried
