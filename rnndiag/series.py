"""Captured adjoints -> per-step norm series -> a LayerDiagnosis (norms in float64)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rnndiag import analysis
from rnndiag.records import LayerDiagnosis, StaticLayer, Thresholds
from rnndiag.replay import StepAdjoints, final_step


def series_norms(adjoint: Tensor) -> tuple[float, ...]:
    """||adjoint[t]||_2 over the whole batch for every t, accumulated in float64."""
    flat = adjoint.detach().reshape(adjoint.shape[0], -1)
    out: list[float] = []
    for chunk in flat.split(32):  # a float64 copy of 32 steps at a time, not of all T
        out.extend(torch.linalg.vector_norm(chunk, dim=1, dtype=torch.float64).tolist())
    return tuple(out)


def norms(adj: StepAdjoints) -> tuple[tuple[float, ...], tuple[float, ...] | None,
                                      tuple[float, ...]]:
    """(grad_norm, cell_grad_norm, state_grad_norm) of one layer and direction."""
    grad = series_norms(adj.dh)
    cell = series_norms(adj.dc) if adj.dc is not None else None
    state = grad if cell is None else tuple(
        math.hypot(g, c) for g, c in zip(grad, cell, strict=True))
    return grad, cell, state


def layer_diagnosis(adj: StepAdjoints, st: StaticLayer, th: Thresholds,
                    reach: StepAdjoints | None = None) -> LayerDiagnosis:
    """Analyse `adj`, or `reach` (the last step's loss term alone) when one is given."""
    grad, cell, state = norms(adj)
    reach_grad, reach_cell, reach_state = norms(reach) if reach is not None else (None,) * 3
    used = reach_state if reach_state is not None else state
    final = final_step(adj.direction, adj.dh.shape[0])
    r = analysis.ratios(used, final)
    found = analysis.spans(r, th)
    return LayerDiagnosis(
        layer=adj.layer,
        direction=adj.direction,
        grad_norm=grad,
        cell_grad_norm=cell,
        state_grad_norm=state,
        ratio=r,
        final_step=final,
        growth_per_step=analysis.growth_per_step(used, final),
        horizon=analysis.horizon(r, final, th),
        sigma_max_hh=st.sigma_max_hh,
        pascanu=st.pascanu,
        forget_bias=st.forget_bias,
        spans=found,
        verdict=analysis.verdict(found),
        reach_grad_norm=reach_grad,
        reach_cell_grad_norm=reach_cell,
        reach_state_grad_norm=reach_state,
    )
