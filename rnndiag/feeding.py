"""How each module of a checkpoint is fed, and the words that say so.

In order of preference: the batch file (`inputs.<module>` or `inputs`, token ids through the
module's embedding: see rnndiag.batch and discover.attach_embedding); the outputs of another
module of the file when exactly one module's output width is this one's input width (stacked
single-layer modules: `rnn_1 -> rnn_2`); else a synthetic N(0, 1) batch of the batch file's
B and T. A module that is not fed from the batch is said to be (ModuleDiagnosis.inputs and a
note). When no module at all fits the batch, the batch is wrong for this file: that error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from rnndiag.batch import BatchFile, embed_or_check, file_inputs, synthetic_inputs
from rnndiag.checkpoint import Checkpoint
from rnndiag.errors import BatchError
from rnndiag.records import CheckOptions, ModuleSpec

WIRING = {"option": "--embedding", "same-parent": "same parent",
          "only-candidate": "a guess: the file's only embedding of that width"}


@dataclass(frozen=True)
class Fed:
    desc: str  # how the module was fed, for the report
    inputs: Tensor  # (B, T, input_size) floats
    note: str | None = None  # a file note when the module was not fed from the batch


def from_file(spec: ModuleSpec, ckpt: Checkpoint, options: CheckOptions,
              batch: BatchFile | None) -> Fed:
    """The module's inputs from the batch file, or the synthetic batch without one (raises
    BatchError when the batch does not fit this module)."""
    if batch is not None:
        name, raw = file_inputs(spec, batch)
        where = f"batch {batch.path}: '{name}'"
    else:
        vocab = ckpt.tensors[spec.embedding].shape[0] if spec.embedding else None
        raw = synthetic_inputs(spec, options.batch_size, options.seq_len, options.seed, vocab)
        name = "synthetic token ids" if vocab else "synthetic N(0, 1)"
        where = name
        if spec.candidates:
            name += (f" (no embedding chosen among {', '.join(spec.candidates)}: "
                     f"--embedding {spec.name or '<root>'}=TENSOR)")
    inputs, embedding = embed_or_check(spec, raw, where, ckpt.tensors)
    if embedding is None:
        return Fed(name, inputs)
    return Fed(f"{name} via embedding {embedding} ({WIRING.get(spec.wiring or '', '')})",
               inputs)


def fallback(spec: ModuleSpec, specs: list[ModuleSpec], outputs: Mapping[str, Tensor],
             problem: BatchError, shape: tuple[int, int], seed: int, final: bool,
             ) -> Fed | None:
    """For a module the batch does not fit: chain it after the one module whose output width
    is its input width, once that module has run (None: wait for it); when there is no such
    module or several, and `final`, a synthetic N(0, 1) batch of `shape` (B, T)."""
    width = spec.input_size
    upstream = [s for s in specs if s.name != spec.name
                and len(s.directions) * s.output_size == width]
    label = spec.name or "<root>"
    if len(upstream) == 1:
        source = upstream[0].name
        if source in outputs:
            return Fed(f"outputs of module '{source or '<root>'}' (chained: the batch does not "
                       "fit this module)", outputs[source],
                       f"{label}: fed the outputs of '{source or '<root>'}' (its output width "
                       f"{width} is this module's input; the batch does not fit: {problem})")
        if not final:
            return None
    if not final:
        return None
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(*shape, width, generator=gen)
    why = "several modules" if upstream else "no module"
    return Fed("synthetic N(0, 1) (the batch does not fit this module)", inputs,
               f"{label}: fed synthetic N(0, 1) inputs, not the batch ({problem}; {why} of "
               f"output width {width} to chain after): its verdict holds for noise inputs")
