"""`rnndiag check --model`: diagnose the user's own model under its task loss.

Per checkpoint: build the model with the user's callable, load the state dict strictly, run
`model(inputs)` on the batch file with every recurrent submodule replayed step by step
(rnndiag.usermodel), backpropagate the loss once for every dL/dh_t and dL/dc_t, and, when the
loss has a term at every step, once more per direction kind for the reach of the final step's
term alone. The clip suggestion uses all model parameters (requiring grad).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from rnndiag import clip, resources, static
from rnndiag.batch import BatchFile
from rnndiag.checkpoint import load_checkpoint, nonfinite_weights
from rnndiag.errors import BatchError
from rnndiag.losses import Loss, choose, first_output
from rnndiag.records import (
    BatchInfo,
    CheckOptions,
    ClipSuggestion,
    Direction,
    FileDiagnosis,
    FileStatus,
    ModuleDiagnosis,
    ModuleSpec,
)
from rnndiag.replay import DirectionStates, StepAdjoints, adjoints, objective
from rnndiag.series import layer_diagnosis
from rnndiag.usermodel import (
    Record,
    build_model,
    call_model,
    capture,
    final_states,
    load_callable,
    load_strict,
)

Sequences = list[tuple[str, ModuleSpec, nn.Module, tuple[DirectionStates, ...]]]


def diagnose_model_file(path: Path, options: CheckOptions, batch: BatchFile,
                        progress: Callable[[str], None]) -> FileDiagnosis:
    assert options.model is not None
    ckpt = load_checkpoint(path)
    model = build_model(options.model, options.model_kwargs)
    if options.dtype == "float64":
        model = model.double()
    load_strict(model, ckpt.tensors, str(path))
    device = resources.resolve_device(options.device)
    model = model.to(device)
    custom = load_callable(options.loss, "--loss") if options.loss else None
    inputs, targets = _batch(batch, options)
    inputs = inputs.to(device)
    targets = None if targets is None else targets.to(device)
    progress(f"{path}: replaying {options.model}")
    with capture(model) as records:
        output = first_output(call_model(model, inputs))
        loss_def = choose(output, targets, custom, options.loss)
        loss = _loss(loss_def, output, targets, records, inputs.shape[0])
        seqs = _sequences(model, records)
        if not seqs:
            raise BatchError(f"--model {options.model}: no nn.RNN/LSTM/GRU or cell ran during "
                             "model(inputs)")
        states = [s for _, _, _, group in seqs for s in group]
        found = adjoints(loss, states, retain_graph=loss_def.per_step)
        reach = _reach(loss_def, output, targets, states) if loss_def.per_step else None
    modules = _modules(seqs, found, reach, loss_def.name, float(loss.detach()), options)
    progress(f"{path}: mini-batch gradient norms")
    suggestion = _clip(model, loss_def, inputs, targets, options)
    info = BatchInfo(batch.path, inputs.shape[0], modules[0].seq_len, None)
    return FileDiagnosis(str(path), ckpt.format, FileStatus.OK, modules, info, ckpt.notes,
                         nonfinite_weights=nonfinite_weights(ckpt.tensors), clip=suggestion,
                         loss=loss_def.name)


def _batch(batch: BatchFile, options: CheckOptions) -> tuple[Tensor, Tensor | None]:
    inputs = batch.tensors.get("inputs")
    if inputs is None:
        raise BatchError(f"batch {batch.path}: --model needs an 'inputs' tensor")
    if inputs.is_floating_point():
        inputs = inputs.to(torch.float64 if options.dtype == "float64" else torch.float32)
    targets = batch.tensors.get("targets")
    if targets is not None and targets.shape[:1] != inputs.shape[:1]:
        raise BatchError(f"batch {batch.path}: targets {tuple(targets.shape)} and inputs "
                         f"{tuple(inputs.shape)} differ in batch size")
    if targets is not None and targets.is_floating_point():
        targets = targets.to(inputs.dtype if inputs.is_floating_point() else torch.float32)
    return inputs, targets


def _loss(loss_def: Loss, output: Tensor, targets: Tensor | None, records: list[Record],
          batch: int) -> Tensor:
    if loss_def.fn is None:
        return objective(final_states(records), batch)
    assert targets is not None
    return loss_def(output, targets)


def _sequences(model: nn.Module, records: list[Record]) -> Sequences:
    modules = dict(model.named_modules())
    return [(name, rec.spec, modules[rec.name if rec.name != "<root>" else ""], group)
            for rec in records for name, group in rec.states()]


def _reach(loss_def: Loss, output: Tensor, targets: Tensor | None,
           states: Sequence[DirectionStates]) -> dict[int, StepAdjoints]:
    """Adjoints of the loss term at each direction's final step alone, by id of the states."""
    assert targets is not None
    out: dict[int, StepAdjoints] = {}
    for direction, t in ((Direction.FORWARD, output.shape[1] - 1), (Direction.REVERSE, 0)):
        group = [s for s in states if s.direction is direction]
        if group:
            term = loss_def.at_step(output, targets, t)
            for s, adj in zip(group, adjoints(term, group, retain_graph=True), strict=True):
                out[id(s)] = adj
    return out


def _modules(seqs: Sequences, found: Sequence[StepAdjoints], reach: dict[int, StepAdjoints] | None,
             loss_name: str, loss_value: float, options: CheckOptions,
             ) -> tuple[ModuleDiagnosis, ...]:
    out, i = [], 0
    for name, spec, module, group in seqs:
        arrays = {k: v.detach().cpu().double().numpy() for k, v in module.named_parameters()}
        layers = []
        for s in group:
            st = static.static_layer(spec, arrays, s.layer, s.direction)
            extra = None if reach is None else reach.get(id(s))
            layers.append(layer_diagnosis(found[i], st, options.thresholds, extra))
            i += 1
        seq_len = len(group[0].h)
        out.append(ModuleDiagnosis(replace(spec, name=name),
                                   "model(inputs)", loss_value, tuple(layers),
                                   group[0].h[0].shape[0], seq_len, loss_name))
    return tuple(out)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _clip(model: nn.Module, loss_def: Loss, inputs: Tensor, targets: Tensor | None,
          options: CheckOptions) -> ClipSuggestion:
    params = [p for p in model.parameters() if p.requires_grad]
    k = clip.batches_for(options.clip_batches, inputs.shape[0])
    with _eval(model):
        norms = clip.minibatch_norms(partial(_rows_loss, model, loss_def, inputs, targets),
                                     params, inputs.shape[0], k)
    return clip.suggest(norms, options.clip_percentile, "model",
                        sum(p.numel() for p in params))


def _rows_loss(model: nn.Module, loss_def: Loss, inputs: Tensor, targets: Tensor | None,
               rows: Tensor) -> Tensor:
    x = inputs[rows]
    if loss_def.fn is None:  # the objective needs the recurrent final states: record them
        with capture(model) as records:
            model(x)
            return objective(final_states(records), x.shape[0])
    assert targets is not None
    return loss_def(first_output(model(x)), targets[rows])

