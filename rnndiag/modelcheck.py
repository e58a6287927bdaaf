"""Model mode: diagnose a user's own nn.Module under its task loss.

`diagnose_live` serves both `rnndiag.check_model` (a live model and tensors) and
`check --model` (a model built by the user's callable, its state dict loaded from a checkpoint,
inputs from a batch file). The model is called as in training, `model(*args, **kwargs)`, with
every recurrent submodule replayed step by step (rnndiag.usermodel); one backward pass of the
loss through the shared capture hooks yields every dL/dh_t and dL/dc_t, and, when the loss has
a term at every step, one more per direction kind gives the reach of the final step's term
alone. The clip suggestion uses all model parameters that require grad.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from rnndiag import clip, static
from rnndiag.errors import BatchError
from rnndiag.losses import Loss, LossFn, choose, first_output
from rnndiag.records import (
    CheckOptions,
    ClipSuggestion,
    Direction,
    ModuleDiagnosis,
)
from rnndiag.replay import StepAdjoints, objective
from rnndiag.series import layer_diagnosis
from rnndiag.usermodel import Recording, Sequence_, call_model, capture, final_states

_POSITIONAL = re.compile(r"^inputs\.(\d+)\Z")
_KEYWORD = re.compile(r"^inputs\.([A-Za-z_]\w*)\Z")


@dataclass(frozen=True)
class ModelInputs:
    """What the model is called with, `model(*args, **kwargs)`, and the targets of its loss.

    `batch_size` B is the leading size of the first input tensor; slicing a mini-batch
    (`rows`) slices every tensor whose leading size is B and passes the others unchanged.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    targets: Tensor | None = None

    @property
    def batch_size(self) -> int:
        first = next((x for x in (*self.args, *self.kwargs.values()) if isinstance(x, Tensor)
                      and x.dim() > 0), None)
        if first is None:
            raise BatchError("the model's inputs hold no tensor with a batch dimension")
        return int(first.shape[0])

    def map(self, fn: Callable[[Tensor], Tensor]) -> ModelInputs:
        """Apply `fn` to every tensor (inputs and targets)."""
        def f(x: Any) -> Any:
            return fn(x) if isinstance(x, Tensor) else x
        return ModelInputs(tuple(f(x) for x in self.args), {k: f(v) for k, v in
                                                            self.kwargs.items()},
                           None if self.targets is None else fn(self.targets))

    def rows(self, index: Tensor) -> ModelInputs:
        b = self.batch_size
        return self.map(lambda x: x[index] if x.dim() > 0 and x.shape[0] == b else x)


def inputs_of(inputs: Any, targets: Tensor | None = None) -> ModelInputs:
    """A tensor -> model(x); a tuple/list -> model(*x); a dict -> model(**x)."""
    if isinstance(inputs, ModelInputs):
        return inputs
    if isinstance(inputs, Mapping):
        return ModelInputs((), dict(inputs), targets)
    if isinstance(inputs, tuple | list):
        return ModelInputs(tuple(inputs), {}, targets)
    return ModelInputs((inputs,), {}, targets)


def file_model_inputs(tensors: Mapping[str, Tensor], where: str, dtype: torch.dtype,
                      ) -> ModelInputs:
    """The batch-file convention: `inputs` -> model(inputs); `inputs.0`, `inputs.1`, ... ->
    positional arguments; `inputs.<name>` -> keyword arguments; `targets` for the loss.
    Float tensors are cast to the replay's dtype."""
    positional = sorted((int(m[1]), k) for k in tensors if (m := _POSITIONAL.match(k)))
    keywords = {m[1]: tensors[k] for k in tensors if (m := _KEYWORD.match(k))}
    if "inputs" in tensors and positional:
        raise BatchError(f"batch {where}: holds both 'inputs' and 'inputs.0'...: use one form")
    args = [tensors["inputs"]] if "inputs" in tensors else []
    if positional:
        numbers = [n for n, _ in positional]
        if numbers != list(range(len(numbers))):
            raise BatchError(f"batch {where}: positional inputs must be numbered inputs.0 .. "
                             f"inputs.{len(numbers) - 1}, found {numbers}")
        args = [tensors[k] for _, k in positional]
    if not args and not keywords:
        raise BatchError(f"batch {where}: model mode needs 'inputs' (or inputs.0, inputs.1, "
                         "... / inputs.<argument name>)")
    found = ModelInputs(tuple(args), keywords, tensors.get("targets"))
    return found.map(lambda x: x.to(dtype) if x.is_floating_point() else x)


@dataclass(frozen=True)
class LiveDiagnosis:
    """What model mode measured, before it is wrapped into a FileDiagnosis."""

    modules: tuple[ModuleDiagnosis, ...]
    clip: ClipSuggestion
    loss: str
    batch_size: int


def diagnose_live(model: nn.Module, inputs: ModelInputs, custom: LossFn | None,
                  custom_name: str | None, options: CheckOptions,
                  progress: Callable[[str], None] = lambda _: None) -> LiveDiagnosis:
    """Run the model once with every recurrent state captured; analyse; suggest a clip."""
    batch = inputs.batch_size
    if inputs.targets is not None and inputs.targets.dim() > 0 \
            and inputs.targets.shape[0] != batch:
        raise BatchError(f"targets {tuple(inputs.targets.shape)} and inputs differ in batch "
                         f"size ({batch})")
    progress("replaying the model")
    with capture(model) as rec:
        output = first_output(call_model(model, inputs.args, inputs.kwargs))
        loss_def = choose(output, inputs.targets, custom, custom_name)
        loss = _loss(loss_def, output, inputs.targets, rec, batch)
        seqs = rec.sequences()
        if not seqs:
            raise BatchError("no nn.RNN/LSTM/GRU or cell ran during the model's forward")
        found, reach = _adjoints(rec, seqs, loss, loss_def, output, inputs.targets)
    modules = _modules(seqs, found, reach, loss_def.name, float(loss.detach()), options)
    progress("mini-batch gradient norms")
    suggestion = _clip(model, loss_def, inputs, options)
    return LiveDiagnosis(modules, suggestion, loss_def.name, batch)


def _loss(loss_def: Loss, output: Tensor, targets: Tensor | None, rec: Recording,
          batch: int) -> Tensor:
    if loss_def.fn is None:
        return objective(final_states(rec), batch)
    assert targets is not None
    return loss_def(output, targets)


def _adjoints(rec: Recording, seqs: Sequence[Sequence_], loss: Tensor, loss_def: Loss,
              output: Tensor, targets: Tensor | None,
              ) -> tuple[tuple[StepAdjoints, ...], dict[int, StepAdjoints] | None]:
    """All adjoints of the loss; with a per-step loss also those of each direction's final
    step's term alone (by index into the flat list of states)."""
    states = [s for seq in seqs for s in seq.states]
    chains = [s.chain for s in states if s.chain is not None]
    roots = [r for seq in seqs for r in seq.roots if r.requires_grad]
    if not loss.requires_grad or not roots:
        raise BatchError("the loss does not depend on any recurrent state (do the recurrent "
                         "parameters or the inputs require grad?)")
    found = rec.capture.backward(loss, roots, chains, retain_graph=loss_def.per_step)
    if not loss_def.per_step:
        return found, None
    assert targets is not None
    reach: dict[int, StepAdjoints] = {}
    for direction, t in ((Direction.FORWARD, output.shape[1] - 1), (Direction.REVERSE, 0)):
        picked = [i for i, s in enumerate(states) if s.direction is direction]
        if picked:
            term = loss_def.at_step(output, targets, t)
            got = rec.capture.backward(term, roots, [chains[i] for i in picked],
                                       retain_graph=True)
            reach.update(zip(picked, got, strict=True))
    return found, reach


def _modules(seqs: Sequence[Sequence_], found: Sequence[StepAdjoints],
             reach: dict[int, StepAdjoints] | None, loss_name: str, loss_value: float,
             options: CheckOptions) -> tuple[ModuleDiagnosis, ...]:
    out, i = [], 0
    for seq in seqs:
        arrays = {k: v.detach().cpu().double().numpy() for k, v in
                  seq.module.named_parameters()}
        layers = []
        for s in seq.states:
            st = static.static_layer(seq.spec, arrays, s.layer, s.direction)
            extra = None if reach is None else reach.get(i)
            layers.append(layer_diagnosis(found[i], st, options.thresholds, extra))
            i += 1
        first = seq.states[0].h
        out.append(ModuleDiagnosis(replace(seq.spec, name=seq.name), "model(inputs)",
                                   loss_value, tuple(layers), first[0].shape[0], len(first),
                                   loss_name))
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


def _clip(model: nn.Module, loss_def: Loss, inputs: ModelInputs,
          options: CheckOptions) -> ClipSuggestion:
    params = [p for p in model.parameters() if p.requires_grad]
    batch = inputs.batch_size
    k = clip.batches_for(options.clip_batches, batch)
    with _eval(model):
        norms = clip.minibatch_norms(partial(_rows_loss, model, loss_def, inputs), params,
                                     batch, k)
    return clip.suggest(norms, options.clip_percentile, "model",
                        sum(p.numel() for p in params))


def _rows_loss(model: nn.Module, loss_def: Loss, inputs: ModelInputs, rows: Tensor) -> Tensor:
    part = inputs.rows(rows)
    if loss_def.fn is None:  # the objective needs the recurrent final states: record them
        with capture(model) as rec:
            call_model(model, part.args, part.kwargs)
            return objective(final_states(rec), len(rows))
    assert part.targets is not None
    return loss_def(first_output(call_model(model, part.args, part.kwargs)), part.targets)


def converted(model: nn.Module, dtype: torch.dtype | None, device: str | None) -> nn.Module:
    """The model itself when it already has this dtype and device, else a converted copy (the
    caller's instance is never changed)."""
    params = list(model.parameters()) + list(model.buffers())
    floats = [p for p in params if p.is_floating_point()]
    same_dtype = dtype is None or all(p.dtype == dtype for p in floats)
    same_device = device is None or all(p.device == torch.device(device) for p in params)
    if same_dtype and same_device:
        return model
    other = copy.deepcopy(model)
    if dtype is not None:
        other = other.to(dtype)
    if device is not None:
        other = other.to(device)
    return other
