"""Write output files atomically: a temporary file beside the target, fsync, then rename.

An interrupted run leaves either the old file or the complete new one, never half a report.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from rnndiag.errors import OptionError


def write_atomic(path: Path, text: str) -> None:
    write_atomic_bytes(path, text.encode("utf-8"))


def check_folder(path: Path) -> Path:
    """The folder `path` will be written in; OptionError when it cannot be."""
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OptionError(f"{path}: is a directory; give a file name to write")
    if not directory.is_dir():
        raise OptionError(f"{path}: folder {directory} does not exist")
    return directory


def write_atomic_bytes(path: Path, data: bytes) -> None:
    directory = check_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise OptionError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode(path: Path) -> int:
    """The permissions of the file being replaced, else what a plain open() would give."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mask = os.umask(0o022)  # read the umask (only by setting it), then put it back
        os.umask(mask)
        return 0o666 & ~mask
