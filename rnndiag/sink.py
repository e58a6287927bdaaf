"""Where a command's output goes (part of the command line; only the CLI uses it): the report
to stdout or `--output`, SVG/HTML exports, the one-line errors on stderr, the JSON or SARIF
document of a run that failed as a whole, and the progress line.

Torch-free, like the CLI's top level: Rich and the renderers are imported when used.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import RenderableType

    from rnndiag.records import CheckOptions, FileDiagnosis, InspectDiagnosis


class Format(StrEnum):
    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"



class Sink:
    """Where the report goes: stdout or --output, plus optional SVG/HTML exports."""

    def __init__(self, fmt: Format, output: Path | None, svg: Path | None,
                 html: Path | None) -> None:
        self.fmt, self.output, self.svg, self.html = fmt, output, svg, html
        self.done = False  # the report went out: an error after it (--plot) adds no document

    def json(self, doc: dict[str, object]) -> None:
        from rnndiag import jsonout

        self.emit(jsonout.dumps(doc))

    def renderable(self, renderable: RenderableType) -> None:
        from rich.console import Console

        if self.output is None:
            with stdout_errors():
                Console(highlight=False).print(renderable)
        if self.output is not None or self.svg or self.html:
            from rnndiag.report import recorded

            record = recorded(renderable)
            if self.svg:
                _write(self.svg, record.export_svg(title="rnndiag check", clear=False))
            if self.html:
                _write(self.html, record.export_html(clear=False))
            if self.output is not None:
                _write(self.output, record.export_text(clear=False, styles=False))

    def emit(self, text: str) -> None:
        if self.output is None:
            to_stdout(text)
        else:
            _write(self.output, text)
        self.done = True


def to_stdout(text: str) -> None:
    with stdout_errors():
        sys.stdout.write(text)


@contextlib.contextmanager
def stdout_errors() -> Iterator[None]:
    """Write to stdout inside; a full disk is an OutputError, a reader that left (| head) is
    not an error. Either way nothing more can reach stdout: it is pointed at /dev/null."""
    from rnndiag.errors import OutputError

    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        _silence_stdout()
        if not isinstance(exc, BrokenPipeError):
            raise OutputError("cannot write the report to standard output "
                              f"({exc.strerror or exc})") from None


def _silence_stdout() -> None:
    """Point stdout's descriptor at /dev/null, so that the flush at interpreter exit does not
    fail again with a traceback."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _write(path: Path, text: str) -> None:
    from rnndiag.atomic import write_atomic

    write_atomic(path, text)


def file_errors(files: Sequence[FileDiagnosis] | Sequence[InspectDiagnosis]) -> None:
    for f in files:
        if f.error:
            stderr_line(f.error if f.error.startswith(f.path) else f"{f.path}: {f.error}")


def fail(message: str, sink: Sink, options: CheckOptions | None, debug: bool,
          command: str = "check") -> int:
    """One line on stderr and exit code 2; in JSON and SARIF modes, still one document (on
    stdout when the output file itself is the problem), listing the error."""
    if debug:
        traceback.print_exc()
    if sink.fmt is not Format.TEXT and not sink.done:
        text = error_document(message, sink.fmt, options, command)
        try:
            sink.emit(text)
        except Exception:  # the output file itself is the problem: the document goes to stdout
            with contextlib.suppress(Exception):  # unless stdout is the problem
                to_stdout(text)
    stderr_line(message)
    return 2


def error_document(message: str, fmt: Format, options: CheckOptions | None = None,
                   command: str = "check") -> str:
    """The JSON (or SARIF) document of a run that failed as a whole with `message`; the
    options only when they are valid (the schema describes valid options)."""
    from rnndiag import jsonout

    if fmt is Format.SARIF:
        from rnndiag import sarif

        return jsonout.dumps(sarif.document([], errors=[message]))
    if command == "inspect":
        return jsonout.dumps(jsonout.inspect_document([], errors=[message]))
    return jsonout.dumps(jsonout.document([], _valid(options), errors=[message]))


def _valid(options: CheckOptions | None) -> CheckOptions | None:
    from rnndiag.config import check_values
    from rnndiag.errors import RnnDiagError

    try:
        if options is not None:
            check_values(options)
    except RnnDiagError:
        return None
    return options


def stderr_line(message: str) -> None:
    from rnndiag.report import safe

    sys.stderr.write(f"rnndiag: error: {safe(message)}\n")


class Progress:
    """A transient status line on stderr while replaying; off in pre-commit and pipes."""

    def __enter__(self):  # type: ignore[no-untyped-def]
        self.status = None
        if sys.stderr.isatty() and not os.environ.get("PRE_COMMIT"):
            from rich.console import Console

            self.status = Console(stderr=True).status("rnndiag: starting")
            self.status.start()
        return self.update

    def update(self, message: str) -> None:
        if self.status is not None:
            from rich.text import Text

            from rnndiag.report import safe

            # a Text, never a markup string: file and tensor names may hold '[...]'
            self.status.update(Text(f"rnndiag: {safe(message)}"))

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.stop()
