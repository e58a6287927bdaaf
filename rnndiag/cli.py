"""The `rnndiag` command line: parse options, call the core, render, map to an exit code.

torch is imported only inside commands that replay, so `rnndiag --help` stays fast.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rnndiag._version import __version__

if TYPE_CHECKING:
    from rnndiag.records import FileDiagnosis, Thresholds

EXIT_HELP = """Exit codes: 0 every file healthy or skipped; 1 a layer is vanishing or
exploding; 2 unusable input or options (one line on stderr)."""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Find where gradients vanish or explode through time in PyTorch RNN/LSTM/GRU "
    "checkpoints.\n\n" + EXIT_HELP,
)


class Format(StrEnum):
    TEXT = "text"
    JSON = "json"


class Nonlinearity(StrEnum):
    TANH = "tanh"
    RELU = "relu"


class DType(StrEnum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rnndiag {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Find where gradients vanish or explode through time in recurrent checkpoints."""


@app.command(epilog=EXIT_HELP)
def check(
    paths: Annotated[list[Path], typer.Argument(
        help="Checkpoints: .safetensors, or torch .pt/.pth/.ckpt state dicts.",
        show_default=False)],
    batch: Annotated[Path | None, typer.Option(
        help="Batch file (.safetensors/.pt) with 'inputs' (B, T, input_size) floats or "
        "(B, T) token ids. Default: a synthetic N(0, 1) batch.")] = None,
    batch_size: Annotated[int, typer.Option(help="Synthetic batch: examples.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Synthetic batch: time steps.")] = 100,
    seed: Annotated[int, typer.Option(help="Synthetic batch: random seed.")] = 0,
    nonlinearity: Annotated[Nonlinearity | None, typer.Option(
        help="Plain RNN nonlinearity (not stored in state dicts). Default: the file's "
        "'rnndiag.nonlinearity' metadata, else tanh.")] = None,
    dtype: Annotated[DType, typer.Option(
        help="Replay precision; float64 resolves deeper decay.")] = DType.FLOAT32,
    vanish_threshold: Annotated[float, typer.Option(
        help="r_t below this is vanishing.")] = 1e-3,
    explode_threshold: Annotated[float, typer.Option(
        help="r_t above this (or non-finite) is exploding.")] = 1e3,
    output_format: Annotated[Format, typer.Option(
        "--format", help="text for people, json for pipelines (stdout).")] = Format.TEXT,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Replay each checkpoint's recurrent layers step by step and report gradient flow."""
    from rnndiag.records import CheckOptions, Thresholds

    options = CheckOptions(
        batch_path=str(batch) if batch else None, batch_size=batch_size, seq_len=seq_len,
        seed=seed, nonlinearity=nonlinearity.value if nonlinearity else None,
        dtype=dtype.value, thresholds=Thresholds(vanish_threshold, explode_threshold))
    raise typer.Exit(_run_check(paths, options, output_format, debug))


def _run_check(paths: list[Path], options: object, output_format: Format, debug: bool) -> int:
    from rnndiag import jsonout
    from rnndiag.errors import RnnDiagError
    from rnndiag.records import CheckOptions

    assert isinstance(options, CheckOptions)
    try:
        from rnndiag.diagnose import diagnose_files
        from rnndiag.outcome import exit_code

        files = diagnose_files(paths, options)
    except RnnDiagError as exc:
        return _fail(str(exc), output_format, options, debug)
    except Exception as exc:  # a bug in rnndiag: still one line and exit 2
        return _fail(f"internal error: {type(exc).__name__}: {exc}", output_format, options,
                     debug)
    if output_format is Format.JSON:
        sys.stdout.write(jsonout.dumps(jsonout.document(files, options)))
    else:
        _print_text(files, options.thresholds)
    for f in files:
        if f.error:
            _stderr(f.error if f.error.startswith(f.path) else f"{f.path}: {f.error}")
    return int(exit_code(files))


def _fail(message: str, output_format: Format, options: object, debug: bool) -> int:
    from rnndiag import jsonout
    from rnndiag.records import CheckOptions

    if debug:
        traceback.print_exc()
    if output_format is Format.JSON:
        opts = options if isinstance(options, CheckOptions) else None
        sys.stdout.write(jsonout.dumps(jsonout.document([], opts, errors=[message])))
    _stderr(message)
    return 2


def _stderr(message: str) -> None:
    from rnndiag.report import safe

    sys.stderr.write(f"rnndiag: error: {safe(message)}\n")


def _print_text(files: Sequence[FileDiagnosis], thresholds: Thresholds) -> None:
    from rich.console import Console

    from rnndiag.report import render

    Console(highlight=False).print(render(files, thresholds))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (also usable in-process)."""
    try:
        app(args=argv, prog_name="rnndiag", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
