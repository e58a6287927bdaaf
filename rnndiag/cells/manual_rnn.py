"""A plain RNN layer's per-step adjoints on the CPU without a step-by-step autograd graph: the
counterpart of rnndiag.cells.manual for nn.RNN (tanh or relu).

One layer and direction, time-major (T, B, H) by time index; a reverse direction walks the same
buffers from t = T-1 down. With the input term xt = x_t W_ih^T + b_ih + b_hh:

    h_t = phi(a_t),  a_t = xt + h_{t-1} W_hh^T

and backward, from the last step, with g_t = dL/dh_t from outside the recurrence:

    dh_t    = g_t + delta_{t+1} W_hh      the total dL/dh_t
    delta_t = dh_t phi'(a_t)              phi' = 1 - h_t^2 (tanh), [a_t > 0] = [h_t > 0] (relu)

one GEMM and one elementwise kernel per step. Exact: float64 tests against the step replay
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
    out: Tensor  # (T, B, H) h_t by time index
    slope: Tensor  # (T, B, H) phi'(a_t) (at a step an example has)
    reverse: bool = False


@torch.no_grad()
def run(terms: Tensor, w: LayerWeights, nonlinearity: str | None, alive: Tensor | None = None,
        h0: Tensor | None = None, reverse: bool = False) -> Forward:
    """The recurrence from the input terms (T, B, H) and h0 (B, H) (zero when None); with
    `alive` (T, B) a step an example does not have keeps its state (as rnndiag.replay.unroll)."""
    steps, batch, hidden = terms.shape
    out = terms.new_zeros(steps, batch, hidden)
    live = None if alive is None else alive.unsqueeze(2)
    w_hh = w.w_hh.t()
    relu = nonlinearity == "relu"
    before = None
    for t in order(steps, reverse):
        h_prev = h0 if before is None else out[before]
        a = terms[t] if h_prev is None else torch.addmm(terms[t], h_prev, w_hh)
        h = a.relu() if relu else a.tanh()
        if live is None:
            out[t] = h
        else:  # a missing step keeps the state it read (zero before the first)
            torch.where(live[t], h, out[t] if h_prev is None else h_prev, out=out[t])
        before = t
    slope = (out > 0).to(out.dtype) if relu else 1 - out * out
    return Forward(out, slope, reverse)


@torch.no_grad()
def backward(fw: Forward, g: Tensor | None, w: LayerWeights, alive: Tensor | None = None,
             g_h: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dh (T, B, H) by time index, delta (T, B, H), dL/dh_init (B, H)) from g = dL/d(h_t)
    from outside the recurrence (None: zero) and g_h, that of the last state in run order. At
    a missing step delta and dh are zero and the gradient of the state it kept passes to the
    step before unchanged."""
    steps = fw.out.shape[0]
    run_order = order(steps, fw.reverse)
    dh = torch.zeros_like(fw.out) if g is None else g.clone()
    if g_h is not None:
        dh[run_order[-1]] += g_h
    delta = torch.empty_like(fw.out)
    live = None if alive is None else alive.unsqueeze(2)
    carried = None
    for t in reversed(run_order):
        if carried is not None:
            dh[t] += carried
        torch.mul(dh[t], fw.slope[t], out=delta[t])
        back = delta[t] @ w.w_hh  # dL/dh_{t-1} through step t
        if live is not None:
            back = torch.where(live[t], back, dh[t])
            delta[t].mul_(live[t].to(delta.dtype))
        carried = back
    assert carried is not None  # at least one step
    if live is not None:
        dh.mul_(live.to(dh.dtype))
    return dh, delta, carried
