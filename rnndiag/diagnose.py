"""The `check` pipeline: file -> modules -> replay -> per-step series -> records.

Everything here returns frozen records; nothing prints. A file that cannot be used becomes a
`FileDiagnosis` with status `error` so that one bad file never hides the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from rnndiag import clip, config, feeding, resources, static
from rnndiag.batch import BatchFile, file_inputs, file_lengths, load_batch
from rnndiag.checkpoint import Checkpoint, checkpoint_of, nonfinite_weights
from rnndiag.discover import find_modules, mark_nonfinite
from rnndiag.errors import ArchitectureError, BatchError, OptionError, RnnDiagError
from rnndiag.feeding import Fed
from rnndiag.inspection import NO_RECURRENT, by_module
from rnndiag.modelcheck import diagnose_placed, file_model_inputs
from rnndiag.records import (
    BatchInfo,
    CheckOptions,
    ClipSuggestion,
    FileDiagnosis,
    FileStatus,
    ModuleDiagnosis,
    ModuleSpec,
    TrainingState,
    Verdict,
)
from rnndiag.routes import replay
from rnndiag.series import layer_diagnosis
from rnndiag.sources import RawFile, guarded
from rnndiag.statedict import load_strict
from rnndiag.usermodel import build_model, load_callable

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def validate(options: CheckOptions) -> None:
    """Reject option values no file could make sense of (exit 2 before any work)."""
    config.check_values(options)
    resources.resolve_device(options.device)
    if options.optimizer is not None and options.optimizer not in clip.OPTIMIZERS:
        raise OptionError(f"--optimizer must be one of {', '.join(clip.OPTIMIZERS)}, got "
                          f"{options.optimizer!r}")


Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


def diagnose_files(paths: Iterable[Path], options: CheckOptions,
                   progress: Progress = _quiet) -> list[FileDiagnosis]:
    """Diagnose every file, each with its options (`options`, and the config's overrides that
    match it). Errors of `options` itself (its values, its batch) raise: they affect every
    file. An override's error is the error of the files it matches only."""
    validate(options)
    batches: dict[str, BatchFile | BatchError] = {}
    out = []
    for path in paths:
        own = config.for_path(options, path)
        try:
            found = _one_file(path, own, batches, progress)
        except RnnDiagError as exc:
            if own is options:
                raise
            found = FileDiagnosis(str(path), "unknown", FileStatus.ERROR,
                                  error=f"{path}: {exc}")
        out.append(replace(found, ignores=own.ignores) if own.ignores else found)
    return out


def _one_file(path: Path, own: CheckOptions, batches: dict[str, BatchFile | BatchError],
              progress: Progress) -> FileDiagnosis:
    validate(own)
    batch = None
    if own.batch_path:
        if own.batch_path not in batches:  # read once; a batch that fails, fails once
            try:
                batches[own.batch_path] = load_batch(Path(own.batch_path), own.max_memory)
            except BatchError as exc:
                batches[own.batch_path] = exc
        got = batches[own.batch_path]
        if isinstance(got, BatchError):
            raise got
        batch = got
    return diagnose_file(path, _work(own, batch, progress), own.debug, state_key=own.state_key,
                         limit=own.max_memory)


def _work(options: CheckOptions, batch: BatchFile | None,
          progress: Progress) -> Callable[[RawFile], FileDiagnosis]:
    """What to do with one file's contents under `options`."""
    if options.model is not None:
        if batch is None:
            raise OptionError("--model needs --batch: a file with the 'inputs' your model "
                              "takes (and 'targets' for a task loss)")
        return partial(_model_file, options=options, batch=batch, progress=progress)
    if options.loss is not None:
        raise OptionError("--loss needs --model (a loss applies to your model's output)")
    return partial(_checkpoint_file, options=options, batch=batch, progress=progress)


def diagnose_file(path: Path, work: Callable[[RawFile], FileDiagnosis],
                  debug: bool = False, *, state_key: str | None = None,
                  limit: int | None = None) -> FileDiagnosis:
    """`work` on the file's contents (the entry `state_key` names, when given); a skipped or
    unusable file becomes its own record."""
    def failed(fmt: str, status: FileStatus, error: str | None,
               notes: tuple[str, ...]) -> FileDiagnosis:
        return FileDiagnosis(str(path), fmt, status, notes=notes, error=error)

    return guarded(path, work, failed, debug, state_key=state_key, limit=limit)


def _checkpoint_file(raw: RawFile, options: CheckOptions, batch: BatchFile | None,
                     progress: Progress) -> FileDiagnosis:
    path = raw.path
    ckpt = checkpoint_of(raw)
    specs = checkpoint_modules(ckpt, options.nonlinearity, options.embeddings)
    if not specs:
        return FileDiagnosis(str(path), ckpt.format, FileStatus.SKIPPED,
                             notes=ckpt.notes + (NO_RECURRENT,))
    bad = mark_nonfinite(nonfinite_weights(ckpt.tensors), (s.name for s in specs),
                         options.strict_nonfinite)
    modules, square, count, notes = _replay_all(specs, ckpt, options, batch,
                                                lambda m: progress(f"{path}: {m}"))
    first = modules[0]
    exploding = any(m.verdict is Verdict.EXPLODING for m in modules) or any(
        t.fatal for t in bad)
    suggestion = _clip(square, options, count, first.batch_size, exploding, ckpt.training,
                       clip.exploding_steps(modules))
    info = BatchInfo(source=batch.path if batch else "synthetic", batch_size=first.batch_size,
                     seq_len=first.seq_len, seed=None if batch else options.seed)
    return FileDiagnosis(str(path), ckpt.format, FileStatus.OK, tuple(modules), info,
                         ckpt.notes + notes, nonfinite_weights=bad, clip=suggestion)


def _replay_all(specs: list[ModuleSpec], ckpt: Checkpoint, options: CheckOptions,
                batch: BatchFile | None, progress: Progress,
                ) -> tuple[list[ModuleDiagnosis], float, int, tuple[str, ...]]:
    """Replay every module, each fed as rnndiag.feeding says (in file order; a module chained
    after another waits for it). Returns modules, ||parameters||^2, parameter count, notes."""
    fed: dict[str, Fed] = {}
    problems: dict[str, BatchError] = {}
    for spec in specs:
        _check_memory(spec, options, _planned(spec, options, batch))
        try:
            fed[spec.name] = feeding.from_file(spec, ckpt, options, batch)
        except BatchError as exc:
            if batch is None:
                raise
            problems[spec.name] = exc
    if not fed:  # the batch fits no module of this file: it is the wrong batch
        raise next(iter(problems.values()))
    first = next(iter(fed.values())).inputs
    own = by_module(ckpt.tensors)  # once: by prefix per module is quadratic in many modules
    done: dict[str, tuple[ModuleDiagnosis, float, int]] = {}
    outputs: dict[str, Tensor] = {}
    pending = list(specs)
    while pending:
        stalled = all(s.name in problems for s in pending)
        for spec in list(pending):
            if spec.name not in fed:
                _check_memory(spec, options, (first.shape[0], first.shape[1]))
                got = feeding.fallback(spec, specs, outputs, problems[spec.name],
                                       (first.shape[0], first.shape[1]), options.seed, stalled)
                if got is None:
                    continue
                fed[spec.name] = got
            progress(f"replaying {spec.name or '<root>'} ({spec.kind.value})")
            with _out_of_memory(spec):
                done[spec.name], outputs[spec.name] = _diagnose_module(
                    spec, own.get(spec.name, {}), options, batch, fed[spec.name])
            pending.remove(spec)
    results = [done[s.name] for s in specs]
    notes = tuple(note for s in specs if (note := fed[s.name].note) is not None)
    return ([m for m, _, _ in results], sum(sq for _, sq, _ in results),
            sum(n for _, _, n in results), notes)


@contextmanager
def _out_of_memory(spec: ModuleSpec) -> Iterator[None]:
    """An allocation the estimate let through that failed (another process took the memory,
    a raised --max-memory) is this file's error, not a crash."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not isinstance(exc, MemoryError) and "allocate" not in str(exc):
            raise
        raise OptionError(f"out of memory replaying module '{spec.name or '<root>'}' (below "
                          "the --max-memory estimate): use a smaller --batch-size/--seq-len "
                          "or batch file") from None


def _planned(spec: ModuleSpec, options: CheckOptions, batch: BatchFile | None,
             ) -> tuple[int, int] | None:
    """(B, T) the module will be replayed on, from the options or the batch file's declared
    shape, before any input is made; None when the batch does not fit (its own error)."""
    if batch is None:
        return options.batch_size, options.seq_len
    try:
        _, inputs = file_inputs(spec, batch)
    except BatchError:
        return None
    return (inputs.shape[0], inputs.shape[1]) if inputs.ndim >= 2 else None


def _check_memory(spec: ModuleSpec, options: CheckOptions,
                  shape: tuple[int, int] | None) -> None:
    """--max-memory, checked from the sizes before the inputs are made or embedded."""
    if shape is not None:
        resources.check_fits(spec, shape[0], shape[1], DTYPES[options.dtype].itemsize,
                             options.max_memory or resources.default_limit())


def checkpoint_modules(ckpt: Checkpoint, nonlinearity: str | None,
                       embeddings: tuple[tuple[str, str], ...] = ()) -> list[ModuleSpec]:
    """The recurrent modules of a loaded checkpoint (the discovery chain of every mode)."""
    return find_modules({k: tuple(t.shape) for k, t in ckpt.tensors.items()}, ckpt.metadata,
                        nonlinearity, dict(embeddings),
                        {k: str(t.dtype).removeprefix("torch.") for k, t in ckpt.tensors.items()})


def _model_file(raw: RawFile, options: CheckOptions, batch: BatchFile,
                progress: Progress) -> FileDiagnosis:
    """--model: build the user's model, load this checkpoint into it strictly, diagnose it."""
    assert options.model is not None
    ckpt = checkpoint_of(raw)
    dtype, device = DTYPES[options.dtype], resources.resolve_device(options.device)
    # a model we built: converted in place, before loading, so float64 weights stay exact
    model = build_model(options.model, options.model_kwargs).to(dtype)
    load_strict(model, ckpt.tensors, str(raw.path))
    model = model.to(device)
    inputs = file_model_inputs(batch.tensors, batch.path, dtype)
    custom = _no_exit(load_callable(options.loss, "--loss"), options.loss) \
        if options.loss else None
    live = diagnose_placed(model, inputs, torch.device(device), custom, options.loss, options,
                           lambda m: progress(f"{raw.path}: {m}"), ckpt.training)
    info = BatchInfo(batch.path, live.batch_size, live.modules[0].seq_len, None)
    return FileDiagnosis(str(raw.path), ckpt.format, FileStatus.OK, live.modules, info,
                         ckpt.notes + live.notes,
                         nonfinite_weights=mark_nonfinite(
                             nonfinite_weights(ckpt.tensors),
                             (m.spec.name for m in live.modules), options.strict_nonfinite),
                         clip=live.clip, loss=live.loss)


def _no_exit(loss: Callable[..., Tensor], name: str) -> Callable[..., Tensor]:
    """The user's loss, with its sys.exit() an error of this file, never rnndiag's exit
    (exit code 0 and no report)."""
    def call(*args: object) -> Tensor:
        try:
            return loss(*args)
        except SystemExit as exc:
            raise OptionError(f"--loss {name}: calling it raised SystemExit({exc.code!r})"
                              ) from None

    return call


def _clip(square: float, options: CheckOptions, count: int, batch: int, exploding: bool,
          state: TrainingState | None, steps: int | None) -> ClipSuggestion:
    """Without a task loss there is no measured norm: only the step cap, over the recurrent
    modules' parameters, when the learning rate is known (rnndiag.clip)."""
    return clip.recommend(None, options, state, batch, math.sqrt(square), "recurrent", count,
                          exploding, steps=steps)


def module_params(spec: ModuleSpec, own: Mapping[str, Tensor], dtype: torch.dtype,
                  ) -> dict[str, Tensor]:
    """The module's own tensors (`by_module(tensors)[spec.name]`, by local name such as
    `weight_hh_l0`), cast to `dtype`."""
    prefix = f"{spec.name}." if spec.name else ""
    out = {}
    for local, tensor in own.items():
        key = prefix + local
        if not tensor.is_floating_point():
            raise ArchitectureError(f"{key}: dtype {str(tensor.dtype).removeprefix('torch.')} "
                               "is not a floating-point weight")
        out[local] = tensor.detach().to(dtype)
    return out


def _diagnose_module(spec: ModuleSpec, own: Mapping[str, Tensor], options: CheckOptions,
                     batch: BatchFile | None, fed: Fed,
                     ) -> tuple[tuple[ModuleDiagnosis, float, int], Tensor]:
    """Replay one module on its inputs; (diagnosis, ||its parameters||^2, parameter count),
    and its top-layer outputs (B, T, D*P) for a module chained after it."""
    dtype = DTYPES[options.dtype]
    desc, inputs = fed.desc, fed.inputs
    _check_memory(spec, options, (inputs.shape[0], inputs.shape[1]))
    device = resources.resolve_device(options.device)
    params = {k: v.to(device) for k, v in module_params(spec, own, dtype).items()}
    inputs = inputs.detach().to(device=device, dtype=dtype)
    batch_size, seq_len, _ = inputs.shape
    lengths = None if batch is None else file_lengths(batch, batch_size, seq_len)
    if lengths is not None:
        desc += ", with lengths"
    with torch.enable_grad():
        result = replay(spec, params, inputs, lengths)
    arrays = {k: v.detach().cpu().double().numpy() for k, v in params.items()}
    layers = tuple(
        layer_diagnosis(adj, static.static_layer(spec, arrays, adj.layer, adj.direction),
                        options.thresholds)
        for adj in result.adjoints)
    diagnosis = ModuleDiagnosis(spec, desc, result.loss, layers, batch_size, seq_len)
    count = sum(p.numel() for p in params.values())
    square = sum(float(p.double().pow(2).sum()) for p in params.values())
    return (diagnosis, square, count), result.output
