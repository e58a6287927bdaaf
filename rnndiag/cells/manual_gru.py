"""A GRU layer's per-step adjoints on the CPU without a step-by-step autograd graph: the GRU's
counterpart of rnndiag.cells.manual (see there for why).

One layer and direction, time-major (T, B, .) by time index; a reverse direction walks the same
buffers from t = T-1 down, so "t-1" is the step before in run order. With the input term
xt = x_t W_ih^T + b_ih split into (x_r, x_u, x_n) (u is PyTorch's z, the update gate) and
hp = h_{t-1} W_hh^T + b_hh into (h_r, h_u, h_n):

    r_t, u_t = sigmoid(x_r + h_r), sigmoid(x_u + h_u)
    n_t = tanh(x_n + r_t h_n)
    h_t = (1 - u_t) n_t + u_t h_{t-1}

Backward, from the last step, g_t = dL/dh_t from outside the recurrence:

    dh_t      = g_t + dh_{t+1} u_{t+1} + dhp_{t+1} W_hh     the total dL/dh_t
    delta_n   = dh_t (1 - u_t) (1 - n_t^2)                  dL/d(x_n + r h_n)
    delta_u   = dh_t (h_{t-1} - n_t) u_t (1 - u_t)
    delta_r   = delta_n h_n r_t (1 - r_t)
    delta_t   = [delta_r, delta_u, delta_n]                 dL/d(input term), for pergrad
    dhp_t     = [delta_r, delta_u, r_t delta_n]             dL/d(hidden term)

A backward step costs one GEMM and five elementwise kernels; the factors that do not depend on
the adjoints are computed for all steps at once. Exact: float64 tests against the step replay
(tests/test_graphed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rnndiag.cells.manual import order
from rnndiag.cells.tensors import LayerWeights


@dataclass(frozen=True)
class Forward:
    """One GRU layer's forward run, time-major by time index: what its backward reads."""

    out: Tensor  # (T, B, H) h_t
    ru: Tensor  # (T, B, 2H) r_t, u_t
    n: Tensor  # (T, B, H)
    hn: Tensor  # (T, B, H) h_{t-1} W_hn^T + b_hn
    reverse: bool = False


@torch.no_grad()
def run(terms: Tensor, w: LayerWeights, alive: Tensor | None = None, h0: Tensor | None = None,
        reverse: bool = False) -> Forward:
    """The recurrence from the input terms (T, B, 3H) (x W_ih^T + b_ih, time-major) and h0
    (B, H) (zero when None); t = 0 up, or T-1 down when `reverse`. With `alive` (T, B) bool by
    time index, a step an example does not have keeps its state (as rnndiag.replay.unroll)."""
    steps, batch, three = terms.shape
    hidden = three // 3
    out = terms.new_zeros(steps, batch, hidden)
    ru, n, hn = (terms.new_empty(steps, batch, k * hidden) for k in (2, 1, 1))
    live = None if alive is None else alive.unsqueeze(2)  # (T, B, 1)
    w_hh = w.w_hh.t()
    zero = terms.new_zeros(batch, hidden)
    before = None  # the time index of the step before, in run order
    for t in order(steps, reverse):
        h_prev = (zero if h0 is None else h0) if before is None else out[before]
        if w.b_hh is not None:
            hp = torch.addmm(w.b_hh, h_prev, w_hh)
        else:
            hp = h_prev @ w_hh
        x = terms[t]
        torch.add(x[:, : 2 * hidden], hp[:, : 2 * hidden], out=ru[t]).sigmoid_()
        hn[t].copy_(hp[:, 2 * hidden:])
        torch.addcmul(x[:, 2 * hidden:], ru[t, :, :hidden], hn[t], out=n[t]).tanh_()
        h = torch.lerp(n[t], h_prev, ru[t, :, hidden:])  # (1 - u) n + u h_{t-1}
        if live is None:
            out[t] = h
        else:  # a missing step keeps the state it read
            torch.where(live[t], h, h_prev, out=out[t])
        before = t
    return Forward(out, ru, n, hn, reverse)


@torch.no_grad()
def backward(fw: Forward, g: Tensor | None, w: LayerWeights, h0: Tensor | None = None,
             alive: Tensor | None = None, g_h: Tensor | None = None,
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(dh (T, B, H) by time index, delta (T, B, 3H), dL/dh_init (B, H)) from g = dL/d(h_t)
    from outside the recurrence (None: zero) and g_h, that of the last state in run order (a
    returned h_n). At a missing step delta and dh are zero and the gradient of the state it
    kept passes to the step before unchanged."""
    steps, batch, hidden = fw.out.shape
    run_order = order(steps, fw.reverse)
    first = torch.zeros_like(fw.out[0]) if h0 is None else h0
    prev = fw.out.roll(-1 if fw.reverse else 1, dims=0)  # h_{t-1} in run order
    prev[run_order[0]] = first
    r, u = fw.ru[..., :hidden], fw.ru[..., hidden:]
    to_n = (1 - u) * (1 - fw.n * fw.n)  # delta_n = dh * to_n
    to_u = (prev - fw.n) * u * (1 - u)  # delta_u = dh * to_u
    to_r = fw.hn * r * (1 - r)  # delta_r = delta_n * to_r
    del prev
    # time-major and contiguous whatever g's layout: each step writes its rows
    dh = fw.out.new_zeros(steps, batch, hidden) if g is None else torch.empty_like(
        fw.out, memory_format=torch.contiguous_format)
    delta = fw.out.new_empty(steps, batch, 3 * hidden)
    dhp = fw.out.new_empty(batch, 3 * hidden)
    live = None if alive is None else alive.unsqueeze(2)
    carried = None
    for t in reversed(run_order):
        if g is not None and carried is not None:
            torch.add(g[t], carried, out=dh[t])
        elif g is not None:
            dh[t].copy_(g[t])
        elif carried is not None:
            dh[t] += carried
        if g_h is not None and t == run_order[-1]:
            dh[t] += g_h
        d = delta[t]
        torch.mul(dh[t], to_n[t], out=d[:, 2 * hidden:])
        torch.mul(dh[t], to_u[t], out=d[:, hidden: 2 * hidden])
        torch.mul(d[:, 2 * hidden:], to_r[t], out=d[:, :hidden])
        dhp[:, : 2 * hidden] = d[:, : 2 * hidden]
        torch.mul(d[:, 2 * hidden:], r[t], out=dhp[:, 2 * hidden:])
        back = torch.addmm(dh[t] * u[t], dhp, w.w_hh)  # dL/dh_{t-1} through step t
        if live is not None:
            back = torch.where(live[t], back, dh[t])
            d.mul_(live[t].to(d.dtype))
        carried = back
    assert carried is not None  # at least one step
    if live is not None:
        dh.mul_(live.to(dh.dtype))
    return dh, delta, carried
