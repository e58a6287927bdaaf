"""Captured adjoints -> per-step norm series and ratios -> a LayerDiagnosis (float64 norms)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rnndiag import analysis, credit
from rnndiag.capture import StepAdjoints
from rnndiag.records import (
    Credit,
    LayerDiagnosis,
    RatioBasis,
    StaticLayer,
    Thresholds,
)


def series_norms(adjoint: Tensor) -> tuple[float, ...]:
    """||adjoint[t]||_2 over the whole batch for every t, accumulated in float64."""
    flat = adjoint.detach().reshape(adjoint.shape[0], -1)
    out: list[float] = []
    for chunk in credit.float64_chunks(flat):  # 32 steps at a time, not all T in float64
        out.extend(torch.linalg.vector_norm(chunk, dim=1).tolist())
    return tuple(out)


def norms(adj: StepAdjoints) -> tuple[tuple[float, ...], tuple[float, ...] | None,
                                      tuple[float, ...]]:
    """(grad_norm, cell_grad_norm, state_grad_norm) of one layer and direction."""
    grad = series_norms(adj.dh)
    cell = series_norms(adj.dc) if adj.dc is not None else None
    state = grad if cell is None else tuple(
        math.hypot(g, c) for g, c in zip(grad, cell, strict=True))
    return grad, cell, state


@dataclass(frozen=True)
class Row:
    """The references at one output position `position` of one layer and direction: sq[t, b]
    (rnndiag.credit.state_sq) of the examples referenced there (refs[b] == position; every
    other example's refs -1 and column zero)."""

    sq: Tensor
    refs: Tensor
    alive: Tensor | None
    position: int


def layer_diagnosis(adj: StepAdjoints, st: StaticLayer, th: Thresholds,
                    rows: Sequence[Row] | None = None, skipped: Sequence[int] = ()
                    ) -> LayerDiagnosis:
    """Analyse the loss's adjoints `adj`; the ratios come from the credit `rows` when given
    (basis `credit`), else from `adj` against each example's last reached step (`loss`)."""
    grad, cell, state = norms(adj)
    direction = adj.direction
    if rows is None:
        sq = credit.state_sq(adj).cpu()  # (T, B): its bookkeeping is no work for a GPU
        pooled = credit.pool(sq, credit.reached(sq, direction), direction, adj.alive)
        found_credit = None
    else:
        # every row's columns side by side: the pools' sums add over examples, so one pool
        # of all columns is the merge of the rows' pools
        masks = [row.alive for row in rows if row.alive is not None]
        alive = torch.cat(masks, 1) if masks else None  # one layer's rows share their mask
        pooled = credit.pool(torch.cat([row.sq for row in rows], 1),
                             torch.cat([row.refs for row in rows]), direction, alive)
        found_credit = Credit(tuple(row.position for row in rows),
                              tuple(credit.norms_over_batch(row.sq) for row in rows),
                              tuple(skipped), tuple(int((row.refs >= 0).sum()) for row in rows))
    r, final = credit.ratio_series(pooled, direction)
    found = analysis.spans(analysis.within(r, final, th.context), th)
    return LayerDiagnosis(
        layer=adj.layer,
        direction=direction,
        grad_norm=grad,
        cell_grad_norm=cell,
        state_grad_norm=state,
        ratio=r,
        final_step=final,
        growth_per_step=analysis.growth_per_step(r, final),
        horizon=analysis.horizon(r, final, th),
        sigma_max_hh=st.sigma_max_hh,
        pascanu=st.pascanu,
        forget_bias=st.forget_bias,
        spans=found,
        verdict=analysis.verdict(found),
        basis=RatioBasis.LOSS if rows is None else RatioBasis.CREDIT,
        references=pooled.references,
        skipped_references=pooled.skipped,
        credit=found_credit,
    )
