"""The `check` pipeline: file -> modules -> replay -> per-step series -> records.

Everything here returns frozen records; nothing prints. A file that cannot be used becomes a
`FileDiagnosis` with status `error` so that one bad file never hides the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from rnndiag import clip, pergrad, resources, static
from rnndiag.batch import BatchFile, embed_or_check, file_inputs, load_batch, synthetic_inputs
from rnndiag.checkpoint import (
    Checkpoint,
    is_lfs_pointer,
    load_checkpoint,
    nonfinite_weights,
    sniff_format,
)
from rnndiag.discover import attach_embedding, discover, resolve_nonlinearity
from rnndiag.errors import ArchitectureError, OptionError, RnnDiagError
from rnndiag.files import LFS_NOTE
from rnndiag.modelcheck import diagnose_model_file
from rnndiag.records import (
    BatchInfo,
    CheckOptions,
    ClipSuggestion,
    FileDiagnosis,
    FileStatus,
    ModuleDiagnosis,
    ModuleSpec,
)
from rnndiag.replay import replay
from rnndiag.series import layer_diagnosis

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def validate(options: CheckOptions) -> None:
    """Reject option values no file could make sense of (exit 2 before any work)."""
    if options.batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.seq_len < 1:
        raise OptionError(f"--seq-len must be at least 1, got {options.seq_len}")
    resources.resolve_device(options.device)
    if options.dtype not in DTYPES:
        raise OptionError(f"--dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    if not 0.0 <= options.clip_percentile <= 100.0:
        raise OptionError(f"--clip-percentile must be within 0..100, got {options.clip_percentile}")
    th = options.thresholds
    if not 0.0 < th.vanish < 1.0 < th.explode < float("inf"):
        raise OptionError("thresholds must satisfy 0 < --vanish-threshold < 1 < "
                          f"--explode-threshold, got {th.vanish:g} and {th.explode:g}")


Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


def diagnose_files(paths: Iterable[Path], options: CheckOptions,
                   progress: Progress = _quiet) -> list[FileDiagnosis]:
    """Diagnose every file with one batch. Option and batch errors raise: they affect all files."""
    validate(options)
    batch = load_batch(Path(options.batch_path)) if options.batch_path else None
    if options.model is not None:
        if batch is None:
            raise OptionError("--model needs --batch: a file with the 'inputs' your model "
                              "takes (and 'targets' for a task loss)")
        return [_guard(path, lambda p: diagnose_model_file(p, options, batch, progress))
                for path in paths]
    if options.loss is not None:
        raise OptionError("--loss needs --model (a loss applies to your model's output)")
    return [diagnose_file(path, options, batch, progress) for path in paths]


def _guard(path: Path, run: Callable[[Path], FileDiagnosis]) -> FileDiagnosis:
    """A file's RnnDiagError becomes its error record; the other files go on."""
    try:
        return _lfs_skip(path) or run(path)
    except RnnDiagError as exc:
        return FileDiagnosis(str(path), "unknown", FileStatus.ERROR, error=str(exc))


def _lfs_skip(path: Path) -> FileDiagnosis | None:
    """A Git LFS pointer is skipped with a note, not failed."""
    if path.is_file() and is_lfs_pointer(path):
        return FileDiagnosis(str(path), "lfs-pointer", FileStatus.SKIPPED, notes=(LFS_NOTE,))
    return None


def diagnose_file(path: Path, options: CheckOptions, batch: BatchFile | None,
                  progress: Progress = _quiet) -> FileDiagnosis:
    fmt = "unknown"
    try:
        if skipped := _lfs_skip(path):
            return skipped
        if path.is_file():
            fmt = sniff_format(path)
        ckpt = load_checkpoint(path)
        fmt = ckpt.format
        specs = find_modules(ckpt, options.nonlinearity)
        if not specs:
            return FileDiagnosis(str(path), fmt, FileStatus.SKIPPED, notes=ckpt.notes + (
                "no recurrent layer (nn.RNN/LSTM/GRU or their cells) in this file",))
        bad = nonfinite_weights(ckpt.tensors)
        modules, squares, count = [], [], 0
        for spec in specs:
            progress(f"{path}: replaying {spec.name or '<root>'} ({spec.kind.value})")
            diagnosis, sq, n = _diagnose_module(spec, ckpt, options, batch)
            modules.append(diagnosis)
            squares.append(sq)
            count += n
        suggestion = _clip(squares, options, count)
    except RnnDiagError as exc:
        return FileDiagnosis(str(path), fmt, FileStatus.ERROR, error=str(exc))
    first = modules[0]
    info = BatchInfo(
        source=batch.path if batch else "synthetic",
        batch_size=first.batch_size,
        seq_len=first.seq_len,
        seed=None if batch else options.seed,
    )
    return FileDiagnosis(str(path), fmt, FileStatus.OK, tuple(modules), info, ckpt.notes,
                         nonfinite_weights=bad, clip=suggestion)


def _clip(squares: list[list[float]], options: CheckOptions, count: int) -> ClipSuggestion:
    """Mini-batch norms over all recurrent modules' parameters (their objectives summed).

    Each module's squared norms are for its own objective on mini-batch k; the objectives are
    independent, so the total is the root of their sum.
    """
    total = [math.sqrt(sum(parts)) for parts in zip(*squares, strict=True)]
    return clip.suggest(total, options.clip_percentile, "recurrent", count)


def find_modules(ckpt: Checkpoint, nonlinearity: str | None) -> list[ModuleSpec]:
    shapes = {name: tuple(t.shape) for name, t in ckpt.tensors.items()}
    return [
        resolve_nonlinearity(attach_embedding(spec, shapes), ckpt.metadata, nonlinearity)
        for spec in discover(shapes)
    ]


def module_params(spec: ModuleSpec, tensors: Mapping[str, Tensor], dtype: torch.dtype,
                  ) -> dict[str, Tensor]:
    """The module's tensors under their local names (`weight_hh_l0`), cast to `dtype`."""
    prefix = f"{spec.name}." if spec.name else ""
    out = {}
    for key, tensor in tensors.items():
        local = key[len(prefix):] if key.startswith(prefix) else None
        if local is None or "." in local:
            continue
        if not tensor.is_floating_point():
            raise ArchitectureError(f"{key}: dtype {str(tensor.dtype).removeprefix('torch.')} "
                               "is not a floating-point weight")
        out[local] = tensor.detach().to(dtype)
    return out


def module_inputs(spec: ModuleSpec, ckpt: Checkpoint, options: CheckOptions,
                  batch: BatchFile | None) -> tuple[str, Tensor]:
    """(description, float inputs (B, T, input_size)) for one module."""
    if batch is not None:
        name, raw = file_inputs(spec, batch)
        where = f"batch {batch.path}: '{name}'"
        tensors: Mapping[str, Tensor] = ckpt.tensors
    else:
        vocab = ckpt.tensors[spec.embedding].shape[0] if spec.embedding else None
        raw = synthetic_inputs(spec, options.batch_size, options.seq_len, options.seed, vocab)
        name = "synthetic token ids" if vocab else "synthetic N(0, 1)"
        where, tensors = name, ckpt.tensors
    inputs, embedding = embed_or_check(spec, raw, where, tensors)
    desc = f"{name} via embedding {embedding}" if embedding else name
    return desc, inputs


def _diagnose_module(spec: ModuleSpec, ckpt: Checkpoint, options: CheckOptions,
                     batch: BatchFile | None,
                     ) -> tuple[ModuleDiagnosis, list[float], int]:
    dtype = DTYPES[options.dtype]
    desc, inputs = module_inputs(spec, ckpt, options, batch)
    resources.check_fits(spec, inputs.shape[0], inputs.shape[1], dtype.itemsize,
                         options.max_memory or resources.default_limit())
    device = resources.resolve_device(options.device)
    params = {k: v.to(device) for k, v in module_params(spec, ckpt.tensors, dtype).items()}
    inputs = inputs.detach().to(device=device, dtype=dtype)
    batch_size, seq_len, _ = inputs.shape
    with torch.enable_grad():
        result = replay(spec, params, inputs)
        k = clip.batches_for(options.clip_batches, batch_size)
        groups = torch.tensor_split(torch.arange(batch_size), k)
        squares = pergrad.replay_sq_norms(spec, inputs, result, groups)
    scaled = pergrad.scale_to_minibatch_loss(squares, groups, batch_size)
    arrays = {k: v.detach().cpu().double().numpy() for k, v in params.items()}
    layers = tuple(
        layer_diagnosis(adj, static.static_layer(spec, arrays, adj.layer, adj.direction),
                        options.thresholds)
        for adj in result.adjoints)
    diagnosis = ModuleDiagnosis(spec, desc, result.loss, layers, batch_size, seq_len)
    return diagnosis, [x * x for x in scaled], sum(p.numel() for p in params.values())
