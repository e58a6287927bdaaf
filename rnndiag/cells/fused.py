"""Per-step adjoints from the fused kernels (cuDNN on a GPU) instead of a step-by-step replay.

The fused kernels hide h_t from autograd. The trick (issue 14): run one layer and direction
as a fused single-layer module whose input is [x_t, z_t] with z_t = 0 (B, P) and whose
weight_ih is [W_ih, W_hh]. The output is unchanged, and since z_t enters the gates of step t
exactly as h_{t-1} does,

    dL/dz_t = W_hh^T delta_t        (delta_t = dL/d(pre-activations of step t))

which is the recurrent part of dL/dh_{t-1}. With g_t = dL/d(output_t) (the layer above and
the loss, asked of autograd directly), in run order

    dh_t = g_t + dL/dz_{t+1}        (dL/dz_T = 0)

For the LSTM, dL/dc_t follows by an elementwise recurrence, the gates being recomputed from
the outputs in one GEMM (h_{t-1} is the previous output):

    c_t  = f_t * c_{t-1} + i_t * g_t
    dc_t = dm_t * o_t * (1 - tanh(c_t)^2) + dc_{t+1} * f_{t+1},  dm_t = W_hr^T dh_t (or dh_t)

For the GRU (h_t = (1 - u_t) * n_t + u_t * h_{t-1}, n_t = tanh(W_in x_t + b_in + r_t *
(W_hn h_{t-1} + b_hn))) two zero blocks: z1 with input weights [W_hr; W_hz; 0] and z2 with
[0; 0; I], so dL/dz1_t = W_hr^T delta_r + W_hz^T delta_u and dL/dz2_t = delta_n (the n gate's
pre-activation adjoint), and in run order

    dh_t = g_t + dz1_{t+1} + W_hn^T (r_{t+1} * dz2_{t+1}) + u_{t+1} * dh_{t+1}

with r and u recomputed from the outputs in one GEMM. The elementwise recurrences run as
log-depth scans (`linear_scan`); the recurrence with its GEMMs stays in the fused kernel.
Shapes in run order, batch-first: x (B, T, I), outputs
(B, T, P); a reverse direction runs on x flipped in time.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from rnndiag.cells.tensors import LayerWeights
from rnndiag.records import CellType


def augmented_run(cell: CellType, nonlinearity: str | None, x: Tensor, w: LayerWeights,
                  ) -> tuple[Tensor, Tensor]:
    """(outputs (B, T, P), z (B, T, P)): the fused run on [x, z] from zero states, z the zero
    leaf whose gradient is the recurrent part of the adjoints."""
    batch, steps, _ = x.shape
    width = w.w_hh.shape[1]
    if cell is CellType.GRU:  # two zero blocks (see the module docstring)
        z = x.new_zeros(batch, steps, 2 * width).requires_grad_()
        recurrent = torch.cat([w.w_hh[: 2 * width], torch.zeros_like(w.w_hh[2 * width:])])
        inject = torch.cat([torch.zeros_like(w.w_hh[: 2 * width]),
                            torch.eye(width, dtype=x.dtype, device=x.device)])
        params = [torch.cat([w.w_ih, recurrent, inject], dim=1), w.w_hh]
    else:
        z = x.new_zeros(batch, steps, width).requires_grad_()
        params = [torch.cat([w.w_ih, w.w_hh], dim=1), w.w_hh]
    if w.b_ih is not None and w.b_hh is not None:
        params += [w.b_ih, w.b_hh]
    if w.w_hr is not None:
        params.append(w.w_hr)
    h0 = x.new_zeros(1, batch, width)
    # (params, has_biases, layers, dropout, train, bidirectional, batch_first): train=True,
    # since cuDNN has no backward for an inference-mode run (dropout 0: the same numbers)
    args = (params, len(params) >= 4, 1, 0.0, True, False, True)
    xz = torch.cat([x, z], dim=2)
    # cuDNN wants the weights in one buffer (else it copies them, with a warning) and rounds
    # float32 GEMMs to TF32 by default: exact float32 here, as on the CPU
    with warnings.catch_warnings(), torch.backends.cudnn.flags(enabled=True,
                                                                allow_tf32=False):
        warnings.filterwarnings("ignore", message=".*contiguous chunk of memory")
        if cell is CellType.LSTM:
            c0 = x.new_zeros(1, batch, w.w_hh.shape[0] // 4)
            out: Tensor = torch._VF.lstm(xz, (h0, c0), *args)[0]
        elif cell is CellType.GRU:
            out = torch._VF.gru(xz, h0, *args)[0]
        elif nonlinearity == "relu":
            out = torch._VF.rnn_relu(xz, h0, *args)[0]
        else:
            out = torch._VF.rnn_tanh(xz, h0, *args)[0]
    return out, z


def state_adjoints(g: Tensor, dz: Tensor) -> Tensor:
    """dh (B, T, P) in run order from g = dL/d(outputs) and dz = dL/dz."""
    dh = g.clone()
    dh[:, :-1] += dz[:, 1:]
    return dh


@torch.no_grad()
def lstm_cell_adjoints(x: Tensor, out: Tensor, dh: Tensor, w: LayerWeights,
                       ) -> tuple[Tensor, Tensor]:
    """dc (B, T, H) in run order (see the module docstring), and the last c_t (B, H)."""
    a = x @ w.w_ih.t() + _previous(out) @ w.w_hh.t()
    if w.b_ih is not None and w.b_hh is not None:
        a = a + (w.b_ih + w.b_hh)
    i, f, g, o = a.chunk(4, dim=2)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    ig = i * g
    c = linear_scan(f, ig)  # c_t = f_t * c_{t-1} + i_t * g_t, c_{-1} = 0
    dm = dh if w.w_hr is None else dh @ w.w_hr
    local = dm * o * (1 - c.tanh().pow(2))  # dL/dc_t through h_t alone
    return reverse_scan(f, local), c[:, -1]  # dc_t = f_{t+1} * dc_{t+1} + local_t


@torch.no_grad()
def gru_state_adjoints(x: Tensor, out: Tensor, g: Tensor, dz: Tensor, w: LayerWeights,
                       ) -> Tensor:
    """dh (B, T, H) in run order for a GRU from g = dL/d(outputs) and dz = dL/d[z1, z2] (see
    the module docstring): dh_t = g_t + a_{t+1} + u_{t+1} * dh_{t+1}, where
    a_t = dz1_t + W_hn^T (r_t * dz2_t) and the gates r_t, u_t (PyTorch's z) are recomputed from
    the outputs in one GEMM."""
    hidden = w.w_hh.shape[1]
    gi = x @ w.w_ih[: 2 * hidden].t()
    gh = _previous(out) @ w.w_hh[: 2 * hidden].t()
    if w.b_ih is not None and w.b_hh is not None:
        gi, gh = gi + w.b_ih[: 2 * hidden], gh + w.b_hh[: 2 * hidden]
    r, u = (gi + gh).sigmoid().chunk(2, dim=2)
    a = dz[..., :hidden] + (r * dz[..., hidden:]) @ w.w_hh[2 * hidden:]
    return reverse_scan(u, state_adjoints(g, a))


def _previous(out: Tensor) -> Tensor:
    """h_{t-1} for every t, in run order: the outputs shifted by one, from the zero state."""
    return torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)


def reverse_scan(a: Tensor, b: Tensor) -> Tensor:
    """y with y_t = a_{t+1} * y_{t+1} + b_t along dim 1, from y_{T-1} = b_{T-1}: an adjoint's
    backward recurrence, as `linear_scan` over the sequence reversed in time."""
    ahead = torch.cat([torch.zeros_like(a[:, :1]), a.flip(1)[:, :-1]], dim=1)
    return linear_scan(ahead, b.flip(1)).flip(1)


def linear_scan(a: Tensor, b: Tensor) -> Tensor:
    """y (B, T, H) with y_t = a_t * y_{t-1} + b_t along dim 1, y_{-1} = 0.

    A Hillis-Steele scan over the affine maps y -> a_t * y + b_t (composition: (a2, b2) after
    (a1, b1) is (a2 * a1, a2 * b1 + b2)): ceil(log2 T) rounds of elementwise kernels over the
    whole sequence instead of T rounds of tiny ones (on a GPU each kernel launch costs more
    than a step's arithmetic). Only products and sums, no division: no cancellation, results
    equal the sequential loop to rounding (float64 tests at 1e-12)."""
    steps = a.shape[1]
    shift = 1
    while shift < steps:
        b = torch.cat([b[:, :shift], torch.addcmul(b[:, shift:], a[:, shift:], b[:, :-shift])],
                      dim=1)
        a = torch.cat([a[:, :shift], a[:, shift:] * a[:, :-shift]], dim=1)
        shift *= 2
    return b
