"""Model mode: diagnose a user's own nn.Module under its task loss.

`diagnose_live` serves both `rnndiag.check_model` (a live model and tensors) and
`check --model` (a model built by the user's callable, its state dict loaded from a checkpoint,
inputs from a batch file). The model is called as in training, `model(*args, **kwargs)`, with
every recurrent submodule replayed step by step (rnndiag.usermodel); one backward pass of the
loss through the shared capture hooks yields every dL/dh_t and dL/dc_t. When the scored output
has a time axis, the credit passes (rnndiag.temporal) measure how far each position's own loss
term reaches back; ratios and verdicts come from them (rnndiag.credit). The clip suggestion
uses all model parameters that require grad; their per-example gradients are recorded in the
same backward pass where the model's modules allow (rnndiag.pergrad), else taken by the loop
(rnndiag.clip.per_example_gram).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from rnndiag import clip, pergrad, static
from rnndiag.capture import StepAdjoints
from rnndiag.cells import graphed_fused
from rnndiag.errors import BatchError
from rnndiag.losses import Loss, LossFn, choose, pick
from rnndiag.records import (
    CheckOptions,
    ClipSuggestion,
    ModuleDiagnosis,
    TrainingState,
)
from rnndiag.replay import objective, with_deep_stack
from rnndiag.series import layer_diagnosis
from rnndiag.temporal import CreditRows, credit_rows, scored_sequences
from rnndiag.usermodel import (
    Recording,
    Sequence_,
    call_model,
    capture,
    eager,
    final_states,
    restored_modes,
)

_POSITIONAL = re.compile(r"^inputs\.(\d+)\Z")
_KEYWORD = re.compile(r"^inputs\.([A-Za-z_]\w*)\Z")


@dataclass(frozen=True)
class ModelInputs:
    """What the model is called with, `model(*args, **kwargs)`, and the targets of its loss."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    targets: Tensor | None = None

    def map(self, fn: Callable[[Tensor], Tensor]) -> ModelInputs:
        """Apply `fn` to every tensor (inputs and targets)."""
        def f(x: Any) -> Any:
            return fn(x) if isinstance(x, Tensor) else x
        return ModelInputs(tuple(f(x) for x in self.args), {k: f(v) for k, v in
                                                            self.kwargs.items()},
                           None if self.targets is None else fn(self.targets))

    def rows(self, index: Tensor, slicing: Slicing) -> ModelInputs:
        """The examples `index` of every tensor that has the batch axis (see `Slicing`)."""
        part = ModelInputs(self.args, self.kwargs).map(partial(slicing.rows, index))
        return replace(part, targets=None if self.targets is None
                       else slicing.target_rows(index, self.targets))


@dataclass(frozen=True)
class Slicing:
    """How to cut a mini-batch out of an input or target tensor: along the axis of size B,
    the second one for time-major sequences (T, B, ...); a tensor without one is passed
    unchanged (a shared table, a scalar)."""

    batch: int
    time_major: bool

    def rows(self, index: Tensor, x: Tensor) -> Tensor:
        index = index.to(x.device)
        if x.dim() >= 2 and x.shape[1] == self.batch and (self.time_major or
                                                           x.shape[0] != self.batch):
            return x[:, index]
        if x.dim() >= 1 and x.shape[0] == self.batch:
            return x[index]
        return x

    def target_rows(self, index: Tensor, y: Tensor) -> Tensor:
        """As `rows`; targets may also be flattened, (T*B, ...) time-major or (B*T, ...)."""
        n = y.shape[0] if y.dim() else 0
        if n == self.batch or n % self.batch or (y.dim() >= 2 and y.shape[1] == self.batch):
            return self.rows(index, y)
        index = index.to(y.device)
        steps = n // self.batch
        if self.time_major:
            grid: Tensor = y.reshape(steps, self.batch, *y.shape[1:])[:, index]
        else:
            grid = y.reshape(self.batch, steps, *y.shape[1:])[index]
        return grid.flatten(0, 1)


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
    notes: tuple[str, ...] = ()


GRAPHED = True  # each recurrent layer and direction replays as one autograd node where one
#                exists (rnndiag.cells.graphed: an LSTM's and a GRU's; on a GPU an RNN's
#                too); False: the step replay (the tests' reference)


CPU_LENGTHS = "'lengths' argument should be a 1D CPU int64 tensor"  # torch's own words
KEPT_ON_CPU = ("the model's 1-D integer inputs stayed on the CPU: it hands them to "
               "pack_padded_sequence, which takes its lengths there")


def diagnose_placed(model: nn.Module, inputs: ModelInputs, device: torch.device | None,
                    custom: LossFn | None, custom_name: str | None, options: CheckOptions,
                    progress: Callable[[str], None] = lambda _: None,
                    state: TrainingState | None = None) -> LiveDiagnosis:
    """`diagnose_live` with every input and target moved to `device` (None: left where they
    are).

    A training loop moves its batch to the GPU but keeps the lengths it passes to
    `pack_padded_sequence` on the CPU, where torch requires them. A batch file cannot say which
    tensor is which, so when torch refuses a moved 1-D integer input in exactly those words,
    the diagnosis runs again with the 1-D integer inputs where they were (targets still move:
    a loss needs its labels beside the output), and a note says so. The refusal comes from the
    model's first forward, before anything is measured.
    """
    def run(placed: ModelInputs) -> LiveDiagnosis:
        return diagnose_live(model, placed, custom, custom_name, options, progress, state)

    if device is None:
        return run(inputs)
    try:
        return run(inputs.map(lambda x: x.to(device)))
    except BatchError as exc:
        kept = _lengths_kept(inputs, device)
        if CPU_LENGTHS not in str(exc) or kept is None:
            raise
    live = run(kept)
    return replace(live, notes=(*live.notes, KEPT_ON_CPU))


def _lengths_kept(inputs: ModelInputs, device: torch.device) -> ModelInputs | None:
    """`inputs` moved to `device` but for its 1-D integer tensors; None when it has none."""
    def lengths(x: Any) -> bool:
        return isinstance(x, Tensor) and x.dim() == 1 and not (
            x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)

    found = [x for x in (*inputs.args, *inputs.kwargs.values()) if lengths(x)]
    if not found:
        return None
    moved = ModelInputs(inputs.args, inputs.kwargs).map(
        lambda x: x if lengths(x) else x.to(device))
    return replace(moved, targets=None if inputs.targets is None
                   else inputs.targets.to(device))


def diagnose_live(model: nn.Module, inputs: ModelInputs, custom: LossFn | None,
                  custom_name: str | None, options: CheckOptions,
                  progress: Callable[[str], None] = lambda _: None,
                  state: TrainingState | None = None) -> LiveDiagnosis:
    """Run the model once with every recurrent state captured; analyse; suggest a clip
    (with a deep C stack: rnndiag.replay.with_deep_stack).

    The recurrent layers run as graphed nodes (`GRAPHED`). A custom loss that differentiates
    through them (a gradient penalty: a second derivative) is refused by the node before
    anything is measured; the diagnosis then runs again, step by step."""
    run = partial(_diagnose_live, model, inputs, custom, custom_name, options, progress, state)
    try:
        return with_deep_stack(partial(run, GRAPHED))
    except BatchError as exc:
        if not (GRAPHED and graphed_fused.TWICE in str(exc)):
            raise
    return with_deep_stack(partial(run, False))


def _diagnose_live(model: nn.Module, inputs: ModelInputs, custom: LossFn | None,
                   custom_name: str | None, options: CheckOptions,
                   progress: Callable[[str], None], state: TrainingState | None,
                   graphed: bool) -> LiveDiagnosis:
    progress("replaying the model")
    recorder = pergrad.Recorder(model)
    with capture(model, tap=recorder.tap, graphed=graphed) as rec, recorder.hooks():
        output = call_model(model, inputs.args, inputs.kwargs)
        seqs = rec.sequences()
        if not seqs:
            raise BatchError("no nn.RNN/LSTM/GRU or cell ran during the model's forward")
        batch = seqs[0].states[0].h[0].shape[0]
        _check_targets(inputs.targets, batch)
        loss_def = choose(output, inputs.targets, custom, custom_name, options.output_key,
                          options.ignore_index)
        loss = _loss(loss_def, output, inputs.targets, rec, batch)
        measured = _measure(rec, seqs, loss, loss_def, output, batch, options,
                            _wanted(loss_def, recorder))
    loss_value = float(loss.detach())
    modules = _modules(seqs, measured, loss_def.name, loss_value, options)
    progress("per-example gradient norms")
    steps = clip.exploding_steps(modules)
    exploding = steps is not None
    slicing = Slicing(batch, measured.time_major)
    params = [p for p in model.parameters() if p.requires_grad]
    n = clip.examples_for(batch, sum(p.numel() for p in params))
    shares = _shares(recorder, measured, loss_def, inputs, slicing, options.ignore_index,
                     params, n)
    suggestion = _clip(model, loss_def, inputs, slicing, options, exploding, state, params, n,
                       shares, steps, loss_value)
    return LiveDiagnosis(modules, suggestion, _loss_name(loss_def), batch, measured.notes)


def _check_targets(targets: Tensor | None, batch: int) -> None:
    """Targets must have the batch axis: first (B, ...), second (T, B, ...) or a flattened
    leading (T*B, ...) one."""
    if targets is None or targets.dim() == 0:
        return
    if targets.shape[0] % batch == 0 or (targets.dim() > 1 and targets.shape[1] == batch):
        return
    raise BatchError(f"targets {tuple(targets.shape)} and the recurrent states differ in batch "
                     f"size ({batch}): no axis of the targets has that size")


def _loss_name(loss_def: Loss) -> str:
    return loss_def.name if loss_def.key is None else f"{loss_def.name} on output[{loss_def.key}]"


def _loss(loss_def: Loss, output: Any, targets: Tensor | None, rec: Recording,
          batch: int) -> Tensor:
    if loss_def.fn is None:
        return objective(final_states(rec), batch)
    assert targets is not None
    return loss_def(output, targets)


@dataclass(frozen=True)
class Measured:
    """The loss's adjoints of every state (flat, in sequence order) and the credit rows of
    the states whose steps are the scored output's positions."""

    found: tuple[StepAdjoints, ...]
    credit: CreditRows | None
    time_major: bool
    notes: tuple[str, ...]
    recorded: tuple[Tensor | None, ...] | None = None  # gradients of the recorder's
    #   `wanted()` tensors (rnndiag.pergrad); None when not recorded


def _measure(rec: Recording, seqs: Sequence[Sequence_], loss: Tensor, loss_def: Loss,
             output: Any, batch: int, options: CheckOptions,
             wanted: tuple[Tensor, ...] | None) -> Measured:
    states = [s for seq in seqs for s in seq.states]
    chains = [s.chain for s in states if s.chain is not None]
    roots = [r for seq in seqs for r in seq.roots if r.requires_grad]
    if not loss.requires_grad or not roots:
        raise BatchError("the loss does not depend on any recurrent state (do the recurrent "
                         "parameters or the inputs require grad?)")
    extra = [t for t in wanted or () if t.requires_grad]
    found, got = rec.capture.backward_with(loss, roots, chains, loss_def.fn is not None, extra)
    given = iter(got)
    recorded = None if wanted is None else tuple(
        next(given) if t.requires_grad else None for t in wanted)
    conventions = _conventions(seqs)
    scored = None if loss_def.fn is None else scored_sequences(
        loss, pick(output, loss_def.key), batch, {**_cells(seqs), **conventions},
        options.time_axis, loss_def.classes_last)
    if scored is None:
        major = options.time_axis == 0 if options.time_axis is not None else (
            bool(conventions) and not any(conventions.values()))
        return Measured(found, None, major, (), recorded)
    rows = credit_rows(scored, states, rec.capture, roots, batch)
    return Measured(found, rows, scored.time_major, _credit_notes(rows, scored.steps),
                    recorded)


def _wanted(loss_def: Loss, recorder: pergrad.Recorder) -> tuple[Tensor, ...] | None:
    """The tensors whose gradients the backward pass also takes for per-example gradients
    (rnndiag.pergrad): when the loss is a built-in mean over positions and the model's modules
    allow it; else None."""
    if recorder.why is not None or loss_def.name not in BUILTIN_MEANS:
        return None
    return tuple(recorder.wanted())


BUILTIN_MEANS = ("cross_entropy", "mse")  # losses that average over scored positions


def _shares(recorder: pergrad.Recorder, measured: Measured, loss_def: Loss,
            inputs: ModelInputs, slicing: Slicing, ignore_index: int,
            params: Sequence[Tensor], n: int) -> tuple[list[pergrad.Share], Tensor] | str:
    """(each of the first n examples' share of the batch gradient, the factors N / N_i that
    turn shares into the examples' own gradients), or why the loop must run instead."""
    if measured.recorded is None:
        return recorder.why or f"loss {loss_def.name} is not a mean over positions"
    assert inputs.targets is not None  # a built-in loss has targets
    counts = torch.tensor([_scored(slicing.target_rows(torch.tensor([i]), inputs.targets),
                                   loss_def, ignore_index) for i in range(n)])
    total = _scored(inputs.targets, loss_def, ignore_index)
    found = recorder.shares(params, measured.recorded, n, slicing.batch, slicing.time_major)
    if isinstance(found, str):
        return found
    return found, pergrad.scales(counts, total)


def _scored(y: Tensor, loss_def: Loss, ignore_index: int) -> int:
    """The positions a built-in loss averages over in `y` (targets not ignored; elements)."""
    return int((y != ignore_index).sum()) if loss_def.classes_last else y.numel()


def _conventions(seqs: Sequence[Sequence_]) -> dict[int, bool | None]:
    """Each stacked module's sequence length -> its batch_first."""
    return {s.chain.steps: bool(getattr(seq.module, "batch_first", False))
            for seq in seqs if not seq.spec.kind.is_cell for s in seq.states[:1]
            if s.chain is not None}


def _cells(seqs: Sequence[Sequence_]) -> dict[int, bool | None]:
    return {s.chain.steps: None for seq in seqs if seq.spec.kind.is_cell for s in seq.states
            if s.chain is not None}


def _credit_notes(rows: CreditRows, steps: int) -> tuple[str, ...]:
    notes = []
    if rows.skipped:
        notes.append(f"credit: sampled positions {', '.join(map(str, rows.skipped))} of "
                     f"{steps} are scored by no example (ignored targets or padding): skipped")
    if rows.unscored:
        notes.append(f"credit: {rows.unscored} example(s) score no position: left out")
    return tuple(notes)


def _modules(seqs: Sequence[Sequence_], measured: Measured, loss_name: str, loss_value: float,
             options: CheckOptions) -> tuple[ModuleDiagnosis, ...]:
    out, i = [], 0
    credit = measured.credit
    for seq in seqs:
        arrays = {k: v.detach().cpu().double().numpy() for k, v in
                  seq.module.named_parameters()}
        layers = []
        for s in seq.states:
            st = static.static_layer(seq.spec, arrays, s.layer, s.direction)
            rows = None if credit is None else credit.rows.get(i)
            layers.append(layer_diagnosis(measured.found[i], st, options.thresholds, rows,
                                          () if credit is None else credit.skipped))
            i += 1
        first = seq.states[0].h
        out.append(ModuleDiagnosis(replace(seq.spec, name=seq.name), "model(inputs)",
                                   loss_value, tuple(layers), first[0].shape[0], len(first),
                                   loss_name))
    return tuple(out)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    with restored_modes(model):
        model.eval()
        yield


def _clip(model: nn.Module, loss_def: Loss, inputs: ModelInputs, slicing: Slicing,
          options: CheckOptions, exploding: bool, state: TrainingState | None,
          params: Sequence[Tensor], n: int, shares: tuple[list[pergrad.Share], Tensor] | str,
          steps: int | None = None, loss: float | None = None) -> ClipSuggestion:
    """The clip rule (rnndiag.clip) on per-example gradients of the task loss: the first n
    examples' (`clip.examples_for`), of `params` (every parameter that requires grad); `loss`:
    the task loss on the batch."""
    count = sum(p.numel() for p in params)
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
    gram, unavailable, curvature = None, None, None
    if loss_def.fn is not None:
        some = partial(_examples_loss, model, loss_def, inputs, slicing, options.ignore_index)
        one = partial(_example_loss, some)
        try:
            with _eval(model), eager():
                with _cudnn_backward(model):
                    gram = _gram(one, some, params, n, shares)
                # cuDNN has no double backward for its RNN kernels
                with torch.backends.cudnn.flags(enabled=False):
                    curvature = clip.measured_curvature(
                        partial(_rows_loss, model, loss_def, inputs, slicing,
                                torch.arange(n)), params, options, state, slicing.batch)
        except BatchError as exc:  # a model bound to its batch (a stateful self.hidden)
            unavailable = f"the model does not run on one example alone ({exc})"
    return clip.recommend(gram, options, state, slicing.batch, norm, "model", count, exploding,
                          unavailable, curvature, steps,
                          loss if loss_def.floor_zero else None)


@contextlib.contextmanager
def _cudnn_backward(model: nn.Module) -> Iterator[None]:
    """cuDNN for the per-example passes where it gives the eval-mode numbers: its RNN backward
    refuses eval mode, so the recurrent modules run in train mode, which changes nothing for
    a plain nn.RNN/LSTM/GRU without dropout (train mode's only effect on one). With dropout,
    or a subclass that may read `training` itself, cuDNN is off instead (the per-step
    kernels, some 10x slower on a GPU)."""
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    if not all(type(m) in (nn.RNN, nn.LSTM, nn.GRU) and m.dropout == 0 for m in rnns):
        with torch.backends.cudnn.flags(enabled=False):
            yield
        return
    with restored_modes(model):
        for m in rnns:
            m.training = True
        yield


def _gram(one: Callable[[int], Tensor | None],
          some: Callable[[list[int]], Tensor | None], params: Sequence[Tensor], n: int,
          shares: tuple[list[pergrad.Share], Tensor] | str) -> Tensor:
    """K of n per-example gradients: from the recorded shares (rnndiag.pergrad) when they
    match the gradient of the first and the last scoring example run as a batch of their own
    (`_matches`: a model that mixes examples, or reads a batch axis elsewhere, would not), else
    by the loop (`one`: example i's loss alone)."""
    if not isinstance(shares, str):
        grads, scale = shares
        kept = scale.nonzero().flatten().tolist()
        with clip.one_thread(any(p.device.type == "cpu" for p in params)):
            agree = bool(kept) and _matches(some, params, grads, scale,
                                             sorted({kept[0], kept[-1]}))
        if agree:
            return pergrad.gram(grads, scale)
    return clip.per_example_gram(one, params, n)


def _matches(some: Callable[[list[int]], Tensor | None], params: Sequence[Tensor],
             grads: Sequence[pergrad.Share], scale: Tensor, rows: list[int]) -> bool:
    """Whether the shares give the gradient of the loss on `rows` alone, one forward and
    backward pass of those examples as a batch. Example i's own gradient is its share times
    scale_i = N / N_i (N_i its scored positions, N the batch's); a mean over the rows'
    positions weighs each by N_i, so the batch's gradient is sum_i share_i / sum_i (1 /
    scale_i). One pass for two examples costs about what one example alone does (on the CPU
    a step of B = 1 or 2 is the same few kernels), half of checking each alone; a mismatch
    that two examples' sum could hide would have to cancel exactly between them."""
    loss = some(rows)
    if loss is None or not loss.requires_grad:
        return False
    with torch.enable_grad():
        exact = torch.autograd.grad(loss, list(params), allow_unused=True)
    weight = 1.0 / sum(1.0 / float(scale[i]) for i in rows)
    return pergrad.agrees([sum((g[i] for i in rows[1:]), g[rows[0]]) * weight for g in grads],
                          exact)


def _examples_loss(model: nn.Module, loss_def: Loss, inputs: ModelInputs, slicing: Slicing,
                   ignore_index: int, rows: list[int]) -> Tensor | None:
    """The loss of these examples run as a batch of their own; None when they score nothing
    (every target ignored)."""
    part = inputs.rows(torch.tensor(rows), slicing)
    assert part.targets is not None
    if loss_def.classes_last and bool((part.targets == ignore_index).all()):
        return None
    return loss_def(call_model(model, part.args, part.kwargs), part.targets)


def _example_loss(some: Callable[[list[int]], Tensor | None], i: int) -> Tensor | None:
    """Example i's loss on its own (`_examples_loss` of [i])."""
    return some([i])


def _rows_loss(model: nn.Module, loss_def: Loss, inputs: ModelInputs, slicing: Slicing,
               rows: Tensor) -> Tensor:
    part = inputs.rows(rows, slicing)
    if loss_def.fn is None:  # the objective needs the recurrent final states: record them
        with capture(model) as rec:
            call_model(model, part.args, part.kwargs)
            return objective(final_states(rec), len(rows))
    assert part.targets is not None
    return loss_def(call_model(model, part.args, part.kwargs), part.targets)


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
