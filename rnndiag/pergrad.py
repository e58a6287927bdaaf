"""Per-example gradients of the task loss, recorded during the diagnosis's own backward pass.

The clip rule (rnndiag.clip) needs the Gram matrix K_ij = <g_i, g_j> of n per-example
gradients, g_i the gradient of example i's own loss (example i alone: its mean over its own
scored positions). `rnndiag.clip.per_example_gram` runs the model once per example. Here the
model mode's one backward pass of the batch loss gives them (BackPACK's approach, Dangel et
al. 2020) for the parameters of modules whose per-example gradient has a closed form. With e
the gradient of a module's output and k running over example i's rows (positions):

- nn.Linear, y = a W^T + b:   g_i(W) = sum_k e_ik^T a_ik,   g_i(b) = sum_k e_ik;
- nn.Embedding:               g_i(E)[v] = sum of e_ik over example i's positions holding token
                              v (none for padding_idx, as in PyTorch);
- nn.LayerNorm, y = x_hat w + b (x_hat recomputed from the input):
                              g_i(w) = sum_k e_ik * x_hat_ik,   g_i(b) = sum_k e_ik;
- nn.RNN / nn.LSTM / nn.GRU, replayed step by step with a tap (rnndiag.replay.Tapped): with
  d = dL/d(input term) (B, T, G*H), x the layer input and P the state each step read:
    RNN, LSTM (gates see x W_ih^T + h W_hh^T + b_ih + b_hh):
        g_i(W_ih) = d_i^T x_i,  g_i(W_hh) = d_i^T P_i,  g_i(b_ih) = g_i(b_hh) = sum_t d_it;
    GRU (n = tanh(x_n + r * (h W_hn^T + b_hn))): the hidden side is d_hid = [d_rz, r * d_n],
        r recomputed in one GEMM:  g_i(W_hh) = d_hid_i^T P_i,  g_i(b_hh) = sum_t d_hid_it.
  Sums over t are one batched GEMM each, never a (B, G*H, I) tensor per step.

These are example i's share of the batch loss's gradient. The batch loss is the mean over the
N = sum_i N_i scored positions (targets not ignored, or elements for MSE), so the share is
(N_i / N) g_i, and g_i = (N / N_i) * share (`scales`).

The route applies when every parameter that requires grad belongs to one of those modules or
to a cell called in the model's loop (rnndiag.cellgrad): an LSTM without proj_size, an
Embedding without max_norm, sparse gradients or scale_grad_by_freq; and each module's input
has the batch axis where `rnndiag.modelcheck.Slicing` finds it. The backward pass asks autograd
for the gradients of the recorded tensors (the input terms, the modules' outputs) alongside
the states', so no weight gradient is computed. The caller checks the result against the
gradient of two examples run as a batch of their own (a weight also read outside its module, a
model that mixes examples, an axis read wrongly would all show there) and runs the loop when
they differ.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnndiag import cellgrad
from rnndiag.cellgrad import CELLS, CellCall
from rnndiag.clip import inner_products
from rnndiag.records import CellType, Direction
from rnndiag.replay import Tapped

KNOWN = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RNN, nn.LSTM, nn.GRU, *CELLS)
LEAVES = (nn.Linear, nn.Embedding, nn.LayerNorm)  # recorded by forward hooks
AGREE = 1e-3  # formulas vs autograd: relative to the gradient's norm (float32 rounding)


class Outer:
    """Each of n examples' sum over steps of d_it x_it^T, (n, G, I), held as its factors d
    (n, G, T) and x (n, T, I) (views): a recurrent weight's shares, which `gram` takes block
    by block of gate rows instead of writing all n of them out and reading them back (at
    T = 100 the (n, G, I) tensors outweigh the activations, and their Gram matrix then costs
    memory traffic, not arithmetic). `[i]` is example i's own (G, I), `full()` all of them."""

    def __init__(self, d: Tensor, x: Tensor) -> None:
        self.d, self.x = d, x
        self.shape = (d.shape[0], d.shape[1], x.shape[2])

    def __getitem__(self, i: int) -> Tensor:
        return self.d[i] @ self.x[i]

    def full(self) -> Tensor:
        return self.d @ self.x

    def inner(self, rows: Tensor | None) -> Tensor:
        """The Gram matrix (float64) of the examples `rows` (None: all), BLOCK_BYTES of
        shares at a time."""
        d, x = (self.d, self.x) if rows is None else (self.d[rows], self.x[rows])
        n, gates, width = d.shape[0], d.shape[1], x.shape[2]
        step = max(1, BLOCK_BYTES // max(1, n * width * x.element_size()))
        out = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, gates, step):
            out += inner_products((d[:, start:start + step] @ x).reshape(n, -1))
        return out


BLOCK_BYTES = 8 * 2**20  # of an Outer's shares at a time (a block stays in cache)

Share = Tensor | Outer  # (n, *shape): each example's share of one parameter's gradient
Terms = list[tuple[Tensor, Share]]  # (parameter, its shares from one module call)


def dense(share: Share) -> Tensor:
    """The shares as one (n, *shape) tensor."""
    return share.full() if isinstance(share, Outer) else share


class Recorder:
    """What per-example gradients need, recorded while the model runs: each call of a Linear,
    Embedding or LayerNorm module (its input and output) and each replayed recurrent layer and
    direction (`tap`, given to rnndiag.usermodel.capture). The backward pass asks autograd for
    the gradients of `wanted()` alongside its own, so no weight gradient is computed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.why = unsupported(model)
        self.tap: list[Tapped] | None = None if self.why else []
        self.calls: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, input, output)
        self.cells: list[tuple[nn.Module, CellCall]] = []  # cells called in the model's loop

    @contextlib.contextmanager
    def hooks(self) -> Iterator[Recorder]:
        """Record Linear, Embedding and LayerNorm calls while the block runs (hooks removed
        on exit)."""
        handles = [] if self.why else [
            m.register_forward_hook(self._call) for m in self.model.modules()
            if isinstance(m, LEAVES)] + [
            m.register_forward_hook(self._cell_call, with_kwargs=True)
            for m in self.model.modules() if isinstance(m, CELLS)]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _call(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor) and output.requires_grad and args and any(
                p.requires_grad for p in module.parameters(recurse=False)):
            self.calls.append((module, args[0], output))

    def _cell_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> None:
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            return
        call = cellgrad.call_of(module, args, kwargs, output)
        if call is None:
            self.why = f"{type(module).__name__} called on an unbatched input"
        else:
            self.cells.append((module, call))

    def wanted(self) -> list[Tensor]:
        """The tensors whose gradients `shares` takes, in its order."""
        return [t.terms for t in self.tap or ()] + [out for _, _, out in self.calls] + [
            o for _, call in self.cells for o in call.outputs]

    def shares(self, params: Sequence[Tensor], grads: Sequence[Tensor | None], n: int,
               batch: int, time_major: bool) -> list[Share] | str:
        """The first n examples' shares of the batch gradient, (n, *p.shape) per parameter
        (an `Outer` for a recurrent weight with no other term), from the gradients of
        `wanted()`; or why not."""
        if self.why is not None:
            return self.why
        taps = self.tap or []
        terms: Terms = []
        for t, d in zip(taps, grads[:len(taps)], strict=True):
            if d is not None:
                ran = t.x.shape[1 if t.time_major else 0]
                if ran != batch:
                    return f"a recurrent module ran on {ran} examples, not {batch}"
                terms += _recurrent_terms(t, d, n)
        leaves = grads[len(taps):len(taps) + len(self.calls)]
        for (module, a, _), e in zip(self.calls, leaves, strict=True):
            if e is not None:
                got = _module_terms(module, a, e, n, batch, time_major)
                if isinstance(got, str):
                    return got
                terms += got
        found = _cell_terms(self.cells, grads[len(taps) + len(self.calls):], n, batch)
        if isinstance(found, str):
            return found
        terms += found
        per: dict[int, Share] = {}
        for p, each in terms:
            per[id(p)] = each if id(p) not in per else dense(per[id(p)]) + dense(each)
        return [per[id(p)] if id(p) in per else p.new_zeros(n, *p.shape) for p in params]


def _cell_terms(cells: Sequence[tuple[nn.Module, CellCall]], grads: Sequence[Tensor | None],
                n: int, batch: int) -> Terms | str:
    """Every cell's terms (rnndiag.cellgrad), its calls grouped by module."""
    given = iter(grads)
    by_module: dict[nn.Module, tuple[list[CellCall], list[list[Tensor | None]]]] = {}
    for module, call in cells:
        if call.x.shape[0] != batch:
            return f"a {type(module).__name__} ran on {call.x.shape[0]} examples, not {batch}"
        calls, got = by_module.setdefault(module, ([], []))
        calls.append(call)
        got.append([next(given) for _ in call.outputs])
    out: Terms = []
    for module, (calls, got) in by_module.items():
        out += cellgrad.terms(module, calls, got, n)
    return out


def unsupported(model: nn.Module) -> str | None:
    """Why per-example gradients cannot come from one pass of `model`, or None."""
    for name, m in model.named_modules():
        if not any(p.requires_grad for p in m.parameters(recurse=False)):
            continue
        label = name or "the model"
        if not isinstance(m, KNOWN):
            return f"{label} ({type(m).__name__}) has parameters of its own"
        if isinstance(m, nn.LSTM) and m.proj_size > 0:
            return f"{label} has proj_size"
        if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse
                                            or m.scale_grad_by_freq):
            return f"{label} renormalises, is sparse or scales by frequency"
    return None


def scales(counts: Tensor, total: int) -> Tensor:
    """N / N_i (0 where N_i = 0), float64, from the examples' counts N_i and the batch's N:
    example i's share of a mean-over-positions batch loss's gradient, times this, is the
    gradient of its own loss."""
    return torch.where(counts > 0, total / counts.clamp(min=1).double(), 0.0).double()


def gram(shares: Sequence[Share], scale: Tensor) -> Tensor:
    """K (m, m) float64 of the gradients of the m examples with scale > 0, from their shares
    block by block (no (n, P) copy): K_ij = s_i s_j <share_i, share_j>."""
    rows = (scale > 0).nonzero().flatten()
    s = scale[rows]
    k = torch.zeros(len(rows), len(rows), dtype=torch.float64)
    everyone = len(rows) == len(scale)
    for g in shares:
        if isinstance(g, Outer):
            k += g.inner(None if everyone else rows.to(g.d.device))
            continue
        block = g.reshape(g.shape[0], -1)
        k += inner_products(block if everyone else block[rows.to(g.device)])
    return k * s.unsqueeze(0) * s.unsqueeze(1)


def agrees(ours: Sequence[Tensor], exact: Sequence[Tensor | None]) -> bool:
    """Whether one example's gradients (`ours`) match the loop's (`exact`), each within AGREE
    of the whole gradient's norm."""
    whole = math.sqrt(sum(0.0 if g is None else float(g.double().pow(2).sum()) for g in exact))
    for a, g in zip(ours, exact, strict=True):
        gap = float((a if g is None else a - g).double().norm())
        if not math.isfinite(gap) or gap > AGREE * max(whole, 1e-30):
            return False
    return True


def _rows(x: Tensor, batch: int, time_major: bool) -> Tensor | None:
    """x (..., F) -> (B, K, F) with the batch axis where `Slicing` finds it; None: none fits."""
    f = x.shape[-1]
    if x.dim() >= 3 and x.shape[1] == batch and (time_major or x.shape[0] != batch):
        return x.movedim(1, 0).reshape(batch, -1, f)
    if x.dim() >= 2 and x.shape[0] == batch:
        return x.reshape(batch, -1, f)
    if x.dim() == 2 and x.shape[0] % batch == 0:  # flattened (T*B, F) or (B*T, F)
        steps = x.shape[0] // batch
        return (x.reshape(steps, batch, f).transpose(0, 1) if time_major
                else x.reshape(batch, steps, f))
    return None


def _module_terms(module: nn.Module, a: Tensor, e: Tensor, n: int, batch: int,
                  time_major: bool) -> Terms | str:
    if isinstance(module, nn.LayerNorm):  # the affine part: features over normalized_shape
        dims = len(module.normalized_shape)
        a = F.layer_norm(a.detach(), module.normalized_shape, None, None, module.eps)
        a, e = a.flatten(-dims), e.flatten(-dims)
    x = a.unsqueeze(-1) if isinstance(module, nn.Embedding) else a.detach()
    aa, ee = _rows(x, batch, time_major), _rows(e, batch, time_major)
    if aa is None or ee is None or aa.shape[1] != ee.shape[1]:
        return (f"the input {tuple(a.shape)} of a {type(module).__name__} has no batch axis "
                f"of size {batch}")
    if isinstance(module, nn.LayerNorm):  # y = x_hat * w + b
        shape = module.normalized_shape
        out: Terms = [(module.weight, (ee[:n] * aa[:n]).sum(1).view(n, *shape))]
        if module.bias is not None:
            out.append((module.bias, ee[:n].sum(1).view(n, *shape)))
        return [t for t in out if t[0] is not None and t[0].requires_grad]
    if isinstance(module, nn.Linear):
        out = [(module.weight, torch.einsum("bko,bki->boi", ee[:n], aa[:n]))]
        if module.bias is not None:
            out.append((module.bias, ee[:n].sum(1)))
        return [t for t in out if t[0].requires_grad]
    assert isinstance(module, nn.Embedding)
    ids = aa[:n].squeeze(-1)  # (n, K)
    ee = ee[:n]
    if module.padding_idx is not None:
        ee = ee * (ids != module.padding_idx).unsqueeze(-1).to(ee.dtype)
    size, width = module.num_embeddings, ee.shape[2]
    offsets = size * torch.arange(n, device=ids.device).unsqueeze(1)
    each = ee.new_zeros(n * size, width).index_add_(
        0, (ids + offsets).flatten(), ee.reshape(-1, width)).view(n, size, width)
    return [(module.weight, each)] if module.weight.requires_grad else []


def _recurrent_terms(t: Tapped, d: Tensor, n: int) -> Terms:
    """The first n examples' gradients of one layer and direction's weights, from
    d = dL/d(input term) (B, T, G*H) (see the module doc); time-major (T, B, .) tensors are
    read through batch-major views (the GEMMs take the strides as they are)."""
    w, x, terms = t.w, t.x.detach(), t.terms.detach()
    if t.time_major:
        x, terms, d = x.transpose(0, 1), terms.transpose(0, 1), d.transpose(0, 1)
    x, d = x[:n], d[:n]  # (n, T, I), (n, T, G*H)
    prev = _previous(t, n)  # (n, T, P)
    hidden = d
    if t.cell is CellType.GRU:
        size = d.shape[2] // 3
        hp = prev @ w.w_hh.detach()[:size].t()  # the reset gate's rows only
        if w.b_hh is not None:
            hp = hp + w.b_hh.detach()[:size]
        r = (terms[:n, :, :size] + hp).sigmoid()
        hidden = torch.cat([d[..., :2 * size], r * d[..., 2 * size:]], dim=2)
    out: Terms = [(w.w_ih, Outer(d.transpose(1, 2), x)),
                  (w.w_hh, Outer(hidden.transpose(1, 2), prev))]
    if w.b_ih is not None:
        out.append((w.b_ih, d.sum(1)))
    if w.b_hh is not None:
        out.append((w.b_hh, hidden.sum(1)))
    return [term for term in out if term[0].requires_grad]


def _previous(t: Tapped, n: int) -> Tensor:
    """(n, T, P): the state each step read, by time index (the step before it in run order);
    a view of a time-major stack where the tap is time-major."""
    states = [s.detach()[:n] for s in t.states]
    first = t.h_init.detach()[:n]
    read = [first, *states[:-1]] if t.direction is Direction.FORWARD else [*states[1:], first]
    if t.time_major:
        return torch.stack(read, dim=0).transpose(0, 1)
    return torch.stack(read, dim=1)
