"""The `rnndiag` command line: parse options, call the core, render, map to an exit code.

torch is imported only inside commands that replay, so `rnndiag --help` stays fast. Every
error becomes one line on stderr and exit code 2 (`--debug` adds the traceback).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rnndiag._version import __version__
from rnndiag.sink import (
    Format,
    Progress,
    Sink,
    error_document,
    fail,
    file_errors,
    stderr_line,
    to_stdout,
)

if TYPE_CHECKING:

    from rnndiag.config import Config
    from rnndiag.records import CheckOptions

EXIT_HELP = """Exit codes: 0 nothing selected by --fail-on (healthy or skipped files);
1 an error-level finding selected by --fail-on (a vanishing or exploding span, NaN/Inf
gradients or weights); 2 unusable input, unsafe
checkpoint, bad options or internal error (takes precedence)."""

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: rendering it with Rich costs ~100 ms of imports
    help="Find where gradients vanish or explode through time in PyTorch RNN/LSTM/GRU "
    "checkpoints.\n\n" + EXIT_HELP,
)


class FailOn(StrEnum):
    """`--fail-on`'s choices: the values of `rnndiag.outcome.FailOn`, which imports the rule
    table (and numpy through it), too much for `--help` (a test keeps the two equal)."""

    ANY = "any"
    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NEVER = "never"


class InspectFormat(StrEnum):
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
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(
        help="Checkpoints: .safetensors, or torch .pt/.pth/.ckpt state dicts.",
        show_default=False)],
    batch: Annotated[Path | None, typer.Option(
        help="Batch file (.safetensors/.pt/.npz) with 'inputs' (B, T, input_size) floats or "
        "(B, T) token ids. Default: a synthetic N(0, 1) batch.")] = None,
    batch_size: Annotated[int, typer.Option(help="Synthetic batch: examples.")] = 16,
    seq_len: Annotated[int | None, typer.Option(
        help="Synthetic batch: time steps (default 100, or context + 1 with --context).",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Synthetic batch: random seed.")] = 0,
    nonlinearity: Annotated[Nonlinearity | None, typer.Option(
        help="Plain RNN nonlinearity (not stored in state dicts). Default: the file's "
        "'rnndiag.nonlinearity' metadata, else tanh.")] = None,
    dtype: Annotated[DType, typer.Option(
        help="Replay precision; float64 resolves deeper decay.")] = DType.FLOAT32,
    context: Annotated[int | None, typer.Option(
        help="The span the model must learn, in steps: vanishing means the gradient cannot "
        "reach N steps back, exploding that it grows past the threshold within N steps; "
        "steps further back do not count.")] = None,
    vanish_threshold: Annotated[float, typer.Option(
        help="r_t below this is vanishing.")] = 1e-3,
    explode_threshold: Annotated[float, typer.Option(
        help="r_t above this (or non-finite) is exploding.")] = 1e3,
    model: Annotated[str | None, typer.Option(
        help="Your model: package.module:callable returning an nn.Module (the current "
        "directory is importable); needs --batch.")] = None,
    model_kwargs: Annotated[str | None, typer.Option(
        help="JSON object of keyword arguments for the --model callable.")] = None,
    loss: Annotated[str | None, typer.Option(
        help="package.module:callable(output, targets) -> scalar loss (default: "
        "cross-entropy for integer targets, MSE for float targets, else the final-state "
        "objective).")] = None,
    output_key: Annotated[str | None, typer.Option(
        help="Which element of a tuple or dict output the loss scores (an index such as 1, a "
        "key such as logits, dotted for nesting). Needed when the output holds several "
        "tensors that fit the targets.")] = None,
    time_axis: Annotated[int | None, typer.Option(
        help="The output's time axis, 0 (time-major) or 1 (batch-first); needed only when "
        "batch size and sequence length are equal.")] = None,
    ignore_index: Annotated[int, typer.Option(
        help="Cross-entropy targets with this value are padding, not scored.")] = -100,
    embedding: Annotated[list[str] | None, typer.Option(
        help="MODULE=TENSOR: the embedding matrix that feeds token ids to a recurrent module "
        "(repeatable). Default: the one under the module's own parent, else the file's only "
        "candidate; never a guess between equals.")] = None,
    strict_nonfinite: Annotated[bool, typer.Option(
        help="NaN/Inf in any tensor fails the file (default: only in recurrent weights; "
        "elsewhere, e.g. a -inf mask table, it is a warning).")] = False,
    state_key: Annotated[str | None, typer.Option(
        help="The entry of a checkpoint container that holds the weights (e.g. model_state, "
        "ema; dotted for nesting). Default: found automatically.")] = None,
    train_batch_size: Annotated[int | None, typer.Option(
        help="The batch size training uses: the clip suggestion is the expected gradient norm "
        "at this size (default: the replayed batch's).")] = None,
    lr: Annotated[float | None, typer.Option(
        help="Training learning rate, for the clip's step cap (default: the checkpoint's "
        "optimizer state, if any).")] = None,
    optimizer: Annotated[str | None, typer.Option(
        help="Training optimizer: sgd, adam, adamw, rmsprop, ... (default: the checkpoint's "
        "optimizer state, if any).")] = None,
    device: Annotated[str, typer.Option(
        help="Where to replay: cpu, cuda, cuda:N or auto (cuda when available).")] = "cpu",
    max_memory: Annotated[str | None, typer.Option(
        help="Refuse a replay estimated above this (e.g. 8G; inputs included), before any "
        "input is made; default half of the RAM (or of what ulimit -v leaves).")
    ] = None,
    fail_on: Annotated[FailOn, typer.Option(
        help="Which error findings make the exit code 1: vanishing (RD001), exploding "
        "(RD002, RD003, RD007), any, never.")] = FailOn.ANY,
    output_format: Annotated[Format, typer.Option(
        "--format", help="text for people, json for pipelines, sarif for code scanning.")
    ] = Format.TEXT,
    output: Annotated[Path | None, typer.Option(
        help="Write the report (in --format) to this file instead of stdout: atomically "
        "(temporary file, then rename), or into a device, FIFO or /dev/stdout; never onto an "
        "input file.")
    ] = None,
    save_svg: Annotated[Path | None, typer.Option(
        help="Also save the text report as SVG (for pull requests).")] = None,
    save_html: Annotated[Path | None, typer.Option(
        help="Also save the text report as HTML.")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Also save a picture (.png or .svg): per-step gradient norms, spans and the "
        "credit matrix (needs matplotlib: pip install 'rnndiag[plot]').")] = None,
    config: Annotated[Path | None, typer.Option(
        help="Settings file (TOML: a [tool.rnndiag] table or top-level keys). Default: the "
        "first pyproject.toml with [tool.rnndiag] here or above. Command-line options win.")
    ] = None,
    no_config: Annotated[bool, typer.Option(
        help="Ignore any pyproject.toml [tool.rnndiag].")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Replay each checkpoint's recurrent layers step by step and report gradient flow."""
    from rnndiag.errors import RnnDiagError
    from rnndiag.records import CheckOptions, Thresholds
    from rnndiag.resources import parse_size

    sink = Sink(output_format, output, save_svg, save_html)
    try:
        limit = parse_size(max_memory) if max_memory is not None else None
        embeddings = _pairs(embedding or [], "--embedding", "MODULE=TENSOR")
        settings = _settings(config, no_config)
        if plot is not None:
            from rnndiag.plot import check_target

            check_target(plot)
    except RnnDiagError as exc:
        raise typer.Exit(fail(str(exc), sink, None, debug)) from None

    options = CheckOptions(
        batch_path=str(batch) if batch else None, batch_size=batch_size,
        seq_len=seq_len if seq_len is not None else (
            context + 1 if context is not None and context > 0 else 100),
        seed=seed, nonlinearity=nonlinearity.value if nonlinearity else None,
        dtype=dtype.value, thresholds=Thresholds(vanish_threshold, explode_threshold, context),
        train_batch_size=train_batch_size, lr=lr, optimizer=optimizer, model=model,
        model_kwargs=model_kwargs, loss=loss, device=device, max_memory=limit, debug=debug,
        state_key=state_key, output_key=output_key, time_axis=time_axis,
        ignore_index=ignore_index, strict_nonfinite=strict_nonfinite, embeddings=embeddings)
    given = _given(ctx)
    options = apply_config(options, settings, given)
    if "fail_on" not in given and settings.fail_on is not None:
        try:
            fail_on = FailOn(settings.fail_on)
        except ValueError:
            message = (f"config {settings.path}: fail-on = {settings.fail_on!r}: expected one "
                       f"of {', '.join(f.value for f in FailOn)}")
            raise typer.Exit(fail(message, sink, options, debug)) from None
    try:
        from rnndiag.config import check_values

        check_values(options)
    except RnnDiagError as exc:
        raise typer.Exit(fail(str(exc), sink, options, debug)) from None
    try:
        _refuse_inputs(sink, plot, [*paths, *_batches(options), *([settings.path] if
                                                                   settings.path else [])])
    except RnnDiagError as exc:  # and the document goes to stdout, not to the refused file
        raise typer.Exit(fail(str(exc), Sink(sink.fmt, None, None, None), options,
                               debug)) from None
    raise typer.Exit(_run_check(paths, options, fail_on, sink, debug, plot))


def _batches(options: CheckOptions) -> list[str]:
    """Every batch file the run may read: the options' and the config overrides'."""
    found = [options.batch_path] if options.batch_path else []
    return found + [v for o in options.overrides for k, v in o.values
                    if k == "batch_path" and isinstance(v, str)]


def _refuse_inputs(sink: Sink, plot: Path | None, inputs: Sequence[Path | str]) -> None:
    """OptionError when an output file is an input (before anything is read or written)."""
    from rnndiag.atomic import refuse_inputs

    refuse_inputs({"--output": sink.output, "--save-svg": sink.svg, "--save-html": sink.html,
                   "--plot": plot}, inputs)


# command-line parameters -> the CheckOptions (or Thresholds) fields they set
_FIELDS = {"batch": "batch_path", "vanish_threshold": "vanish",
           "explode_threshold": "explode", "embedding": "embeddings", "max_memory": "max_memory"}


def _given(ctx: typer.Context) -> set[str]:
    """The fields set on the command line (they win over the configuration)."""
    def typed(name: str) -> bool:  # by the enum member's name: typer vendors its click
        return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"

    return {_FIELDS.get(name, name) for name in ctx.params if typed(name)}


def _settings(path: Path | None, skip: bool) -> Config:
    from rnndiag import config

    if skip:
        return config.Config(None)
    return config.load(path if path is not None else config.find())


def apply_config(options: CheckOptions, settings: Config, given: set[str]) -> CheckOptions:
    from rnndiag import config

    return config.options_for(options, settings, given)


@app.command(epilog="Exit codes: 0 no problem found; 1 NaN/Inf in weights; 2 unusable input.")
def inspect(
    paths: Annotated[list[Path], typer.Argument(
        help="Checkpoints: .safetensors (read without torch), or torch .pt/.pth/.ckpt.",
        show_default=False)],
    nonlinearity: Annotated[Nonlinearity | None, typer.Option(
        help="Plain RNN nonlinearity, for Pascanu's reading.")] = None,
    output_format: Annotated[InspectFormat, typer.Option(
        "--format", help="text for people, json for pipelines.")] = InspectFormat.TEXT,
    output: Annotated[Path | None, typer.Option(
        help="Write the report to this file, atomically, instead of stdout.")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Static, data-free check: architecture, NaN/Inf in weights, sigma_max(W_hh), forget bias."""
    from rnndiag.errors import RnnDiagError

    sink = Sink(Format(output_format.value), output, None, None)
    try:
        _refuse_inputs(sink, None, paths)
    except RnnDiagError as exc:  # and the document goes to stdout, not to the refused file
        raise typer.Exit(fail(str(exc), Sink(sink.fmt, None, None, None), None, debug,
                               command="inspect")) from None
    try:
        from rnndiag.api import inspect_files

        result = inspect_files(paths, nonlinearity=nonlinearity.value if nonlinearity else None,
                               debug=debug)
        if sink.fmt is Format.JSON:
            sink.emit(result.to_json())
        else:
            from rnndiag.report import render_inspect

            sink.renderable(render_inspect(result.files))
    except Exception as exc:  # RnnDiagError (bad --output) or a bug: one line, exit 2
        message = str(exc) if _is_ours(exc) else f"internal error: {type(exc).__name__}: {exc}"
        raise typer.Exit(fail(message, sink, None, debug, command="inspect")) from None
    file_errors(result.files)
    raise typer.Exit(result.exit_code)


def _pairs(values: Sequence[str], option: str, form: str) -> tuple[tuple[str, str], ...]:
    """`A=B` values of a repeatable option, in order."""
    from rnndiag.errors import OptionError

    out = []
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise OptionError(f"{option} {value!r}: expected {form}")
        out.append((key, rest))
    return tuple(out)


def _is_ours(exc: Exception) -> bool:
    from rnndiag.errors import RnnDiagError

    return isinstance(exc, RnnDiagError)


class SchemaName(StrEnum):
    CHECK = "check"
    INSPECT = "inspect"


@app.command()
def schema(
    command: Annotated[SchemaName, typer.Option(
        help="Whose --format json output to describe.")] = SchemaName.CHECK,
) -> None:
    """Print the JSON Schema (draft 2020-12) of `check` (or `inspect`) --format json output."""
    from importlib.resources import files

    name = f"{'report' if command is SchemaName.CHECK else 'inspect'}.schema.json"
    sys.stdout.write(files("rnndiag").joinpath(name).read_text("utf-8"))


def _run_check(paths: list[Path], options: CheckOptions, fail_on: FailOn, sink: Sink,
               debug: bool, plot: Path | None = None) -> int:
    from rnndiag.errors import RnnDiagError

    try:
        from rnndiag.api import check_files

        with Progress() as progress:
            result = check_files(paths, options=options, fail_on=fail_on.value,
                                 progress=progress)
        if sink.fmt is Format.JSON:
            sink.emit(result.to_json())
        elif sink.fmt is Format.SARIF:
            sink.emit(result.to_sarif())
        else:
            sink.renderable(result.__rich__())
        if plot is not None and any(f.modules for f in result.files):
            result.save_plot(plot)
    except RnnDiagError as exc:
        return fail(str(exc), sink, options, debug)
    except SystemExit as exc:  # sys.exit() in user code (--model, --loss) is not ours
        return fail(f"user code called sys.exit({exc.code!r}) during the run", sink, options,
                     debug)
    except Exception as exc:  # a bug in rnndiag: still one line and exit 2
        return fail(f"internal error: {type(exc).__name__}: {exc}", sink, options, debug)
    file_errors(result.files)
    return result.exit_code


HOOK_COMMANDS = ("check", "inspect")
HOOK_HELP = """For pre-commit: `rnndiag hook check|inspect [OPTIONS... --] FILES...`.

pre-commit appends file names after the hook's `args:`, and a committed file may be named like
an option (`--model=evil:x.safetensors`). Under `hook`, no file name is ever parsed as an
option: the arguments before the first `--` are options (from your `args:`), everything after
it is a file; with no `--`, every argument is a file. End `args:` with `--` when you give
options, e.g. `args: [--batch, val.safetensors, --]`. An option position holding the name of
an existing file that starts with '-' is refused (exit 2)."""


@app.command(help=HOOK_HELP, context_settings={"allow_extra_args": True,
                                               "ignore_unknown_options": True})
def hook(ctx: typer.Context) -> None:
    """Reached only when `main` did not rewrite the arguments: a usage error."""
    stderr_line("usage: rnndiag hook check|inspect [OPTIONS... --] FILES... "
            "(see rnndiag hook --help)")
    raise typer.Exit(2)


def hook_argv(argv: Sequence[str]) -> list[str] | None:
    """`hook CMD [OPTIONS --] FILES` -> `CMD OPTIONS -- FILES`, or None when it is not a hook
    call. Raises OptionError when an option position names an existing '-' file."""
    from rnndiag.errors import OptionError

    if len(argv) < 2 or argv[0] != "hook" or argv[1] not in HOOK_COMMANDS:
        return None
    rest = list(argv[2:])
    options, files = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) \
        if "--" in rest else ([], rest)
    for token in options:
        if token.startswith("-") and os.path.lexists(token):
            raise OptionError(f"refusing {token!r}: a file of that name exists, so it may be a "
                              "file name passed by pre-commit, not an option from args:")
    return [argv[1], *options, "--", *files]


# click's base class of usage errors, found through typer's public BadParameter: typer vendors
# click in newer releases and depends on it in older ones
_CLICK_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (also usable in-process)."""
    from rnndiag.errors import OptionError

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = hook_argv(args) or args
    except OptionError as exc:
        return _usage_error(str(exc), args, 2)
    try:
        code = app(args=args, prog_name="rnndiag", standalone_mode=False)
    except _CLICK_ERROR as exc:  # a usage error: click's words, and a document when asked
        if _format_asked(args) is Format.TEXT:
            exc.show()  # type: ignore[attr-defined]
            code = exc.exit_code  # type: ignore[attr-defined]
        else:
            code = _usage_error(exc.format_message(), args,  # type: ignore[attr-defined]
                                exc.exit_code)  # type: ignore[attr-defined]
    except typer.Abort:
        stderr_line("aborted")
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return _flushed(code if isinstance(code, int) else 0)


def _usage_error(message: str, args: Sequence[str], code: int) -> int:
    fmt = _format_asked(args)
    if fmt is not Format.TEXT:
        command = "inspect" if args and args[0] == "inspect" else "check"
        with contextlib.suppress(Exception):
            to_stdout(error_document(message, fmt, None, command))
    stderr_line(message)
    return code


def _format_asked(args: Sequence[str]) -> Format:
    """The --format of a `check` or `inspect` command line, read before click parses it (for
    a usage error in JSON mode: the document is still printed); text when unclear."""
    if args and args[0] == "hook":
        args = args[1:]
    if not args or args[0] not in HOOK_COMMANDS:
        return Format.TEXT
    options = list(args[1:args.index("--")] if "--" in args else args[1:])
    value = None
    for i, token in enumerate(options):
        if token == "--format" and i + 1 < len(options):
            value = options[i + 1]
        elif token.startswith("--format="):
            value = token.partition("=")[2]
    try:
        return Format(value) if value is not None else Format.TEXT
    except ValueError:
        return Format.TEXT


def _flushed(code: int) -> int:
    """Flush stdout now, so a full disk or a closed pipe is one line here (exit 2), not a
    traceback at interpreter exit."""
    from rnndiag.errors import OutputError

    try:
        to_stdout("")
    except OutputError as exc:
        stderr_line(str(exc))
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
