"""Per-example gradients of recurrent cells called in the model's own loop (rnndiag.pergrad).

A cell (nn.RNNCell, nn.LSTMCell, nn.GRUCell) called K times contributes, for example b,
g_b(W_ih) = sum_k d_kb^T x_kb, g_b(W_hh) = sum_k d'_kb^T h_kb, g_b(b_ih) = sum_k d_kb and
g_b(b_hh) = sum_k d'_kb, with x_k, h_k (and c_k) the k-th call's input and state and d_k, d'_k
the gradients of its input-side and hidden-side gate pre-activations. The cell's fused kernel
keeps those to itself, so they are recomputed (one GEMM over all calls) from the gradients of
its outputs, which the backward pass takes (PyTorch's step equations):

- RNNCell:  h' = act(a), a = x W_ih^T + b_ih + h W_hh^T + b_hh;  d = d' = dh' * act'(a).
- LSTMCell: (i, f, g, o) = (sig, sig, tanh, sig)(a), c' = f c + i g, h' = o tanh(c'); with the
            total dc = dc' + dh' o (1 - tanh(c')^2) where c' reaches h' inside a fused kernel
            (a composite cell, as on the CPU, has it on the graph: dc is then dc' itself):
            d = d' = [dc g i(1-i), dc c f(1-f), dc i (1-g^2), dh' tanh(c') o(1-o)].
- GRUCell:  r, z = sig(x_rz + h_rz), n = tanh(x_n + r h_n), h' = (1-z) n + z h, with
            x_* = x W_ih^T + b_ih and h_* = h W_hh^T + b_hh split (r, z, n):
            dn = dh'(1-z)(1-n^2), dr = dn h_n r(1-r), dz = dh'(h-n) z(1-z);
            d = [dr, dz, dn], d' = [dr, dz, r dn].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rnndiag.usermodel import reaches

CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


@dataclass(frozen=True)
class CellCall:
    """One call of a cell: input x (B, I), state h (and c) it read (None: zeros), outputs."""

    x: Tensor
    h: Tensor | None
    c: Tensor | None
    outputs: tuple[Tensor, ...]  # (h',) or (h', c')
    c_total: bool = False  # the gradient autograd gives for c' already holds the path to h'


def call_of(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object],
            output: object) -> CellCall | None:
    """The call's record, or None when it is not a batched call (x (B, I)) with tensors."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if not isinstance(x, Tensor) or x.dim() != 2:
        return None
    h, c = hx if isinstance(hx, tuple | list) else (hx, None)
    outs = tuple(output) if isinstance(output, tuple | list) else (output,)
    if not all(isinstance(t, Tensor) for t in outs) or not all(
            t is None or isinstance(t, Tensor) for t in (h, c)):
        return None
    if len(outs) == 2:  # LSTMCell: a composite cell computes h' from c' on the graph
        total = _c_total(outs[0], outs[1])
        if total is None:
            return None
        return CellCall(x, h, c, outs, total)
    return CellCall(x, h, c, outs)


def _c_total(h: Tensor, c: Tensor, depth: int = 4) -> bool | None:
    """Whether c' is on the graph below h' (a composite LSTM cell, as on the CPU: the
    gradient autograd gives for c' is then dL/dc' in full), or not (a fused kernel whose one
    node returns both: the path c' -> h' is inside it); None when neither is clear."""
    if h.grad_fn is None or c.grad_fn is None:
        return None
    if h.grad_fn is c.grad_fn:
        return False
    return True if reaches(h.grad_fn, c.grad_fn, depth) else None


def terms(module: nn.Module, calls: Sequence[CellCall],
          grads: Sequence[Sequence[Tensor | None]], n: int,
          ) -> list[tuple[Tensor, Tensor]]:
    """(parameter, (n, *shape)) for the first n examples, over every call of `module`."""
    assert isinstance(module, CELLS)
    x = torch.stack([k.x.detach() for k in calls])  # (K, B, I)
    h = torch.stack([_or_zeros(k.h, k.outputs[0]) for k in calls])  # (K, B, H)
    dh = torch.stack([_or_zeros(g[0], k.outputs[0]) for k, g in zip(calls, grads, strict=True)])
    w_ih, w_hh = module.weight_ih.detach(), module.weight_hh.detach()
    b_ih, b_hh = _bias(module, "bias_ih"), _bias(module, "bias_hh")
    xi = x @ w_ih.t() + (0 if b_ih is None else b_ih)
    hh = h @ w_hh.t() + (0 if b_hh is None else b_hh)
    if isinstance(module, nn.LSTMCell):
        c = torch.stack([_or_zeros(k.c, k.outputs[0]) for k in calls])
        dc = torch.stack([_or_zeros(g[1] if len(g) > 1 else None, k.outputs[0])
                          for k, g in zip(calls, grads, strict=True)])
        inner = torch.tensor([not k.c_total for k in calls], dtype=dh.dtype,
                             device=dh.device).view(-1, 1, 1)  # calls whose dc' lacks h's path
        d_in = d_hid = _lstm(xi + hh, c, dh, dc, inner)
    elif isinstance(module, nn.GRUCell):
        d_in, d_hid = _gru(xi, hh, h, dh)
    else:
        d_in = d_hid = _rnn(xi + hh, dh, str(module.nonlinearity))
    out = [(module.weight_ih, _sum(d_in, x, n)), (module.weight_hh, _sum(d_hid, h, n))]
    if b_ih is not None:
        out.append((module.get_parameter("bias_ih"), d_in[:, :n].sum(0)))
    if b_hh is not None:
        out.append((module.get_parameter("bias_hh"), d_hid[:, :n].sum(0)))
    return [(p, g) for p, g in out if p.requires_grad]


def _bias(module: nn.Module, name: str) -> Tensor | None:
    """The bias, detached, or None (bias=False)."""
    found = getattr(module, name, None)
    return found.detach() if isinstance(found, Tensor) else None


def _or_zeros(t: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t.detach()


def _sum(d: Tensor, x: Tensor, n: int) -> Tensor:
    """(n, G, I): sum over calls k of d[k, b]^T x[k, b] for the first n examples b."""
    return torch.einsum("kbg,kbi->bgi", d[:, :n], x[:, :n])


def _rnn(a: Tensor, dh: Tensor, nonlinearity: str) -> Tensor:
    if nonlinearity == "relu":
        return dh * (a > 0).to(dh.dtype)
    t = a.tanh()
    return dh * (1 - t * t)


def _lstm(a: Tensor, c: Tensor, dh: Tensor, dc: Tensor, inner: Tensor) -> Tensor:
    i, f, g, o = a.chunk(4, dim=-1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    tc = (f * c + i * g).tanh()
    total = dc + inner * dh * o * (1 - tc * tc)
    return torch.cat([total * g * i * (1 - i), total * c * f * (1 - f), total * i * (1 - g * g),
                      dh * tc * o * (1 - o)], dim=-1)


def _gru(xi: Tensor, hh: Tensor, h: Tensor, dh: Tensor) -> tuple[Tensor, Tensor]:
    x_r, x_z, x_n = xi.chunk(3, dim=-1)
    h_r, h_z, h_n = hh.chunk(3, dim=-1)
    r, z = (x_r + h_r).sigmoid(), (x_z + h_z).sigmoid()
    n = (x_n + r * h_n).tanh()
    dn = dh * (1 - z) * (1 - n * n)
    dr = dn * h_n * r * (1 - r)
    dz = dh * (h - n) * z * (1 - z)
    return torch.cat([dr, dz, dn], dim=-1), torch.cat([dr, dz, r * dn], dim=-1)
