"""Which way a checkpoint module is replayed, and the routes besides the step replay.

`replay` is the entry point: by default (`default_route`) a GPU takes the fused-kernel route
(`replay_fused`, rnndiag.cells.fused), or with per-example lengths the graphed route (each
layer and direction one fused-kernel node on a packed sequence, rnndiag.cells.graphed_fused),
an LSTM on the CPU the hand-written route (`replay_manual`, rnndiag.cells.manual), everything
else the step replay (rnndiag.replay.replay_steps). Every route returns the same
`ReplayResult`, with the same adjoints (tests/test_speed_paths.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor

from rnndiag.capture import StepAdjoints
from rnndiag.cells import LayerWeights, fused, manual
from rnndiag.cells.threads import side_by_side
from rnndiag.records import CellType, Direction, ModuleSpec
from rnndiag.replay import (
    ReplayResult,
    alive_mask,
    final_step,
    objective,
    replay_steps,
    with_deep_stack,
)

R = TypeVar("R")

FUSED_CELLS = (CellType.RNN, CellType.LSTM, CellType.GRU)
# the default on a GPU: every cell's route was checked on one (bench/gpu_check.sh on an H200)
FUSED_BY_DEFAULT = (CellType.RNN, CellType.LSTM, CellType.GRU)


def fused_applies(spec: ModuleSpec, inputs: Tensor, lengths: Tensor | None) -> bool:
    """Whether `replay` takes the fused route by default: on a GPU (where a per-step Python
    loop costs 10-30x a cuDNN step), for the cells in FUSED_BY_DEFAULT, without per-example
    lengths. Not on the CPU, where the zero block costs full GEMM work (2.25x a fused LSTM
    step, measured)."""
    return (inputs.device.type == "cuda" and lengths is None
            and spec.cell_type in FUSED_BY_DEFAULT)


ROUTES = ("steps", "fused", "manual", "graphed")


def default_route(spec: ModuleSpec, inputs: Tensor, lengths: Tensor | None) -> str:
    """`fused` where `fused_applies` (a GPU), `graphed` on a GPU with lengths, `manual` for an
    LSTM on the CPU (its step replay is bound by per-kernel costs: `replay_manual` measured
    0.6x of it), else `steps`."""
    if fused_applies(spec, inputs, lengths):
        return "fused"
    if inputs.device.type == "cuda" and spec.cell_type in FUSED_BY_DEFAULT:
        return "graphed"
    if inputs.device.type == "cpu" and spec.cell_type is CellType.LSTM:
        return "manual"
    return "steps"


def replay(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor,
           lengths: Tensor | None = None, route: str | None = None) -> ReplayResult:
    """Run `spec` on `inputs` (B, T, I) with `params` (local names) and backpropagate the objective.

    With `lengths` (B,), example b runs on its first lengths[b] steps only (see `unroll`).
    Weights are used as given (no gradient is taken for them); the zero initial state of each
    layer and direction is the leaf that puts every state on the autograd graph, and the one
    backward pass runs to those leaves, firing the capture hooks on the way.

    `route` (default: `default_route`): `steps`, the step replay just described; `fused`, the
    fused-kernel route (`replay_fused`); `manual`, the LSTM's hand-written backward
    (`replay_manual`); `graphed`, each layer and direction as one autograd node, the fused
    kernel on a packed sequence on a GPU (rnndiag.cells.graphed: elsewhere an LSTM's or GRU's
    runs the hand-written loops, an RNN steps). All give the same adjoints
    (tests/test_speed_paths.py). Runs with a deep C stack (`with_deep_stack`), gradient
    enabled.
    """
    chosen = route or default_route(spec, inputs, lengths)
    if chosen not in ROUTES:
        raise ValueError(f"unknown replay route {chosen!r}")
    if chosen == "fused":
        if lengths is not None:
            raise ValueError("the fused route takes equal lengths only")
        return replay_fused(spec, params, inputs)
    if chosen == "manual":
        return replay_manual(spec, params, inputs, lengths)
    return with_deep_stack(partial(replay_steps, spec, params, inputs, lengths,
                                   chosen == "graphed"))


def replay_fused(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor,
                 ) -> ReplayResult:
    """`replay` through the fused kernels, layer by layer (rnndiag.cells.fused): the same
    adjoints, the recurrence never unrolled in Python. RNN, LSTM and GRU, equal lengths only."""
    if spec.cell_type not in FUSED_CELLS:
        raise ValueError(f"no fused route for {spec.cell_type}")
    runs: list[tuple[int, Direction, Tensor, Tensor, Tensor, LayerWeights]] = []
    layer_input = inputs
    for layer in range(spec.num_layers):
        seqs = []
        for direction in spec.directions:
            w = LayerWeights.of(spec, params, layer, direction)
            x = layer_input if direction is Direction.FORWARD else layer_input.flip(1)
            out, z = fused.augmented_run(spec.cell_type, spec.nonlinearity, x, w)
            runs.append((layer, direction, x, out, z, w))
            seqs.append(out if direction is Direction.FORWARD else out.flip(1))
        layer_input = torch.cat(seqs, dim=2) if len(seqs) > 1 else seqs[0]
    top = runs[-len(spec.directions):]
    loss = objective([out[:, -1] for _, _, _, out, _, _ in top], inputs.shape[0])
    grads = torch.autograd.grad(loss, [r[3] for r in runs] + [r[4] for r in runs],
                                allow_unused=True)
    found, c_n = [], []
    for k, (layer, direction, x, out, z, w) in enumerate(runs):
        g = torch.zeros_like(out) if grads[k] is None else grads[k]
        dz = torch.zeros_like(z) if grads[len(runs) + k] is None else grads[len(runs) + k]
        if spec.cell_type is CellType.GRU:
            dh = fused.gru_state_adjoints(x.detach(), out.detach(), g, dz, w)
        else:
            dh = fused.state_adjoints(g, dz)
        dc = None
        if spec.cell_type is CellType.LSTM:
            dc, c_last = fused.lstm_cell_adjoints(x.detach(), out.detach(), dh, w)
            c_n.append(c_last)
        found.append(StepAdjoints(layer, direction, _by_time(dh, direction),
                                  None if dc is None else _by_time(dc, direction)))
    h_n = torch.stack([out[:, -1].detach() for _, _, _, out, _, _ in runs])
    return ReplayResult(layer_input.detach(), h_n, torch.stack(c_n) if c_n else None,
                        float(loss.item()), tuple(found))


def replay_manual(spec: ModuleSpec, params: Mapping[str, Tensor], inputs: Tensor,
                  lengths: Tensor | None = None) -> ReplayResult:
    """`replay` of an LSTM without a step-by-step autograd graph (rnndiag.cells.manual): each
    layer's forward and, top layer first, its adjoints by hand-written loops; the same
    adjoints, `lengths` run as `unroll` runs them. The CPU route."""
    if spec.cell_type is not CellType.LSTM:
        raise ValueError(f"no manual route for {spec.cell_type}")
    runs: list[tuple[int, Direction, manual.Forward, LayerWeights]] = []
    layer_input = inputs.detach().transpose(0, 1).contiguous()  # time-major (T, B, I)
    alive = None if lengths is None else alive_mask(lengths.to(inputs.device), inputs.shape[1])
    steps = inputs.shape[1]
    for layer in range(spec.num_layers):
        ws = [LayerWeights.of(spec, params, layer, d) for d in spec.directions]
        done = _directions([partial(manual.forward, layer_input, w, alive,
                                    d is Direction.REVERSE)
                            for w, d in zip(ws, spec.directions, strict=True)])
        runs.extend((layer, d, run, w)
                    for d, run, w in zip(spec.directions, done, ws, strict=True))
        seqs = [run.out for run in done]
        layer_input = torch.cat(seqs, dim=2) if len(seqs) > 1 else seqs[0]
    batch = inputs.shape[0]
    top = runs[-len(spec.directions):]
    loss = objective([run.out[final_step(d, steps)] for _, d, run, _ in top], batch)
    h_n = torch.stack([run.out[final_step(d, steps)] for _, d, run, _ in runs])
    c_n = torch.stack([run.c[final_step(d, steps)] for _, d, run, _ in runs])
    found: dict[tuple[int, Direction], StepAdjoints] = {}
    below: Tensor | None = None  # dL/d(layer input), time order, summed over directions
    for layer in range(spec.num_layers - 1, -1, -1):
        received, below = below, None
        mine = [r for r in runs if r[0] == layer]
        work = []
        for k, (_, direction, run, w) in enumerate(mine):
            width = run.out.shape[2]
            if received is None:  # the top layer: the objective's gradient, h_final / B
                g = torch.zeros_like(run.out)
                last = final_step(direction, steps)
                g[last] = run.out[last] / batch
            else:
                g = received[..., k * width:(k + 1) * width]
            work.append(partial(manual.adjoints, run, g, w, alive, inputs=layer > 0))
        for (_, direction, _, _), (dh, dc, dx) in zip(mine, _directions(work), strict=True):
            found[(layer, direction)] = StepAdjoints(layer, direction, dh, dc, alive)
            if dx is not None:  # the bottom layer's input gradient is never read
                below = dx if below is None else below + dx
    order = [(layer, direction) for layer, direction, *_ in runs]
    return ReplayResult(layer_input.transpose(0, 1), h_n, c_n, float(loss.item()),
                        tuple(found[k] for k in order))


def _directions(work: Sequence[Callable[[], R]]) -> list[R]:
    """Each direction's work, in order: a bidirectional layer's two side by side
    (rnndiag.cells.threads)."""
    if len(work) == 2:
        return list(side_by_side(work[0], work[1]))
    return [w() for w in work]


def _by_time(v: Tensor, direction: Direction) -> Tensor:
    """(B, T, W) in run order -> (T, B, W) by time index t."""
    return (v if direction is Direction.FORWARD else v.flip(1)).transpose(0, 1).contiguous()
