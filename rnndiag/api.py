"""The public Python API: `check_model`, `check_files`, `inspect_files`.

Each returns a frozen record that renders to exactly what the CLI prints for the same input:
`.to_json()` (the `--format json` document), `.to_sarif()`, `.to_text()` (the report),
`.exit_code` (0 / 1 / 2) and `.verdict`. The CLI is a thin layer over these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rnndiag.outcome import FailOn, exit_code, inspect_exit_code
from rnndiag.records import (
    BatchInfo,
    CheckOptions,
    FileDiagnosis,
    FileStatus,
    InspectDiagnosis,
    Thresholds,
    Verdict,
)

if TYPE_CHECKING:
    from torch import Tensor, nn

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Diagnosis:
    """The result of `check_model` / `check_files`: one FileDiagnosis per file (or model)."""

    files: tuple[FileDiagnosis, ...]
    options: CheckOptions = field(default_factory=CheckOptions)
    fail_on: FailOn = FailOn.ANY

    @property
    def verdict(self) -> Verdict | None:
        """The worst verdict over every replayed file; None when nothing was replayed."""
        verdicts = [f.verdict for f in self.files if f.verdict is not None]
        return Verdict.worst(verdicts) if verdicts else None

    @property
    def exit_code(self) -> int:
        """0 healthy or skipped, 1 a verdict selected by `fail_on`, 2 an unusable file."""
        return int(exit_code(self.files, self.fail_on))

    def to_dict(self) -> dict[str, Any]:
        from rnndiag import jsonout

        return jsonout.document(self.files, self.options, fail_on=self.fail_on)

    def to_json(self) -> str:
        """The `rnndiag check --format json` document (strict JSON, see `rnndiag schema`)."""
        from rnndiag import jsonout

        return jsonout.dumps(self.to_dict())

    def to_sarif(self) -> str:
        from rnndiag import jsonout, sarif

        return jsonout.dumps(sarif.document(self.files))

    def to_text(self, width: int = 100) -> str:
        """The text report, without colour."""
        from rnndiag.report import render, to_plain_text

        return to_plain_text(render(self.files, self.options.thresholds), width)

    def __rich__(self) -> Any:  # `rich.print(diagnosis)` and notebooks show the report
        from rnndiag.report import render

        return render(self.files, self.options.thresholds)

    def save_plot(self, path: str | Path) -> int:
        """The `--plot` picture (.png or .svg, needs matplotlib); returns the panels drawn.
        Refuses (OptionError) to write over one of the diagnosed files or their batch."""
        from rnndiag.atomic import refuse_inputs
        from rnndiag.plot import save_plot

        inputs = [f.path for f in self.files] + [f.batch.source for f in self.files if f.batch]
        refuse_inputs({"--plot": Path(path)}, inputs)
        return save_plot(self.files, Path(path), self.options.thresholds)


@dataclass(frozen=True)
class Inspection:
    """The result of `inspect_files`: static facts per file, no replay."""

    files: tuple[InspectDiagnosis, ...]

    @property
    def exit_code(self) -> int:
        return int(inspect_exit_code(self.files))

    def to_dict(self) -> dict[str, Any]:
        from rnndiag import jsonout

        return jsonout.inspect_document(self.files)

    def to_json(self) -> str:
        from rnndiag import jsonout

        return jsonout.dumps(self.to_dict())

    def to_text(self, width: int = 100) -> str:
        from rnndiag.report import render_inspect, to_plain_text

        return to_plain_text(render_inspect(self.files), width)


def check_model(model: nn.Module, inputs: Any, targets: Tensor | None = None, *,
                loss: Callable[[Any, Tensor], Tensor] | None = None,
                thresholds: Thresholds | None = None, dtype: str | None = None,
                device: str | None = None, train_batch_size: int | None = None,
                lr: float | None = None, optimizer: str | None = None,
                fail_on: FailOn | str = FailOn.ANY,
                name: str | None = None, progress: Progress | None = None,
                output_key: str | int | None = None, time_axis: int | None = None,
                ignore_index: int = -100) -> Diagnosis:
    """Diagnose a live model on a batch, exactly as `rnndiag check --model` does.

    `inputs` is what the model takes: a tensor (`model(x)`), a tuple of positional arguments
    (`model(*inputs)`) or a dict of keyword arguments (`model(**inputs)`). With `targets`, the
    loss is `loss(output, targets)`, or cross-entropy for integer targets and MSE for float
    ones; without, the final-state objective. `dtype` ("float32"/"float64") and `device`
    default to the model's own; when they differ, a converted copy is diagnosed. Inputs and
    targets move to `device` when it is given, else stay where they are (given, and torch
    refuses a moved length for `pack_padded_sequence`, the 1-D integer inputs stay where they
    were, and a note says so). The model is
    left exactly as it was, also when this raises: train/eval flags, hooks, forwards, dtype,
    device, parameter values and their `.grad`, tensors it keeps as attributes.
    `output_key`, `time_axis` and `ignore_index` are `--output-key`, `--time-axis` and
    `--ignore-index` (README, "Diagnose your own model").

    Raises `RnnDiagError` (one line naming the problem) when the model, inputs, targets or
    loss cannot be used.
    """
    import torch

    from rnndiag.diagnose import DTYPES, validate
    from rnndiag.modelcheck import converted, diagnose_placed, inputs_of

    label = name or f"<{type(model).__name__}>"
    floats = [p for p in model.parameters() if p.is_floating_point()]
    own = str(floats[0].dtype).removeprefix("torch.") if floats else "float32"
    chosen = dtype or (own if own in DTYPES else "float32")  # half models: a float32 copy
    options = CheckOptions(thresholds=thresholds or Thresholds(), dtype=chosen,
                           train_batch_size=train_batch_size, lr=lr, optimizer=optimizer,
                           device=device or (str(floats[0].device) if floats else "cpu"),
                           loss=getattr(loss, "__name__", "custom") if loss else None,
                           output_key=None if output_key is None else str(output_key),
                           time_axis=time_axis, ignore_index=ignore_index)
    validate(options)
    target = converted(model, DTYPES[chosen], device)
    params = list(target.parameters())
    where = params[0].device if params else torch.device(options.device)
    # inputs move to a `device` asked for; without one they stay where the caller put them
    # (a PackedSequence's lengths must stay on the CPU beside a CUDA model)
    place = where if device is not None else None
    batch = inputs_of(inputs, targets).map(
        lambda x: x.to(DTYPES[chosen]) if x.is_floating_point() else x)
    live = diagnose_placed(target, batch, place, loss, options.loss, options,
                           progress or (lambda _: None))
    info = BatchInfo("inputs", live.batch_size, live.modules[0].seq_len, None)
    found = FileDiagnosis(label, "module", FileStatus.OK, live.modules, info, live.notes,
                          clip=live.clip, loss=live.loss)
    return Diagnosis((found,), options, FailOn(fail_on))


def check_files(paths: Iterable[str | Path], *, batch: str | Path | None = None,
                options: CheckOptions | None = None, fail_on: FailOn | str = FailOn.ANY,
                progress: Progress | None = None, config: str | Path | None = None,
                **settings: Any) -> Diagnosis:
    """Diagnose checkpoint files, as `rnndiag check PATHS` does.

    Settings are the fields of `CheckOptions` (`batch_size`, `seq_len`, `seed`,
    `nonlinearity`, `dtype`, `thresholds`, `model`, `loss`, `device`, ...), given as keyword
    arguments or as one `options` record. `config` is a settings file (`rnndiag check
    --config`); the settings given here win over it. Option and batch errors raise
    `RnnDiagError`; a file that cannot be used becomes that file's error record.
    """
    from dataclasses import replace

    from rnndiag import config as project
    from rnndiag.diagnose import diagnose_files

    base = options or CheckOptions()
    if batch is not None:
        settings["batch_path"] = str(batch)
    chosen = replace(base, **settings) if settings else base
    if config is not None:
        given = set(settings) | ({"vanish", "explode", "context"} if "thresholds" in settings
                                 else set())
        chosen = project.options_for(chosen, project.load(Path(config)), given)
    files = diagnose_files([Path(p) for p in paths], chosen, progress or (lambda _: None))
    return Diagnosis(tuple(files), chosen, FailOn(fail_on))


def inspect_files(paths: Iterable[str | Path], *, nonlinearity: str | None = None,
                  debug: bool = False, state_key: str | None = None) -> Inspection:
    """The static, data-free check of `rnndiag inspect` (torch-free for safetensors);
    `state_key` selects an entry of a checkpoint container, as `check --state-key` does."""
    from rnndiag.inspection import inspect_file

    return Inspection(tuple(inspect_file(Path(p), nonlinearity, debug, state_key=state_key)
                            for p in paths))
