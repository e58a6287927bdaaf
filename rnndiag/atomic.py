"""Write output files: atomically where the target is a file in a folder, into it otherwise.

A new path or an existing regular file gets a temporary file beside it, fsync, then a rename:
an interrupted run leaves either the old file or the complete new one, never half a report,
and never a temporary file (also on a write error or a full disk). A symlink to a regular file
is followed, so the link stays and its target is replaced. Anything else (a character device
such as /dev/null, a FIFO, a terminal, and the `/dev/stdout`, `/dev/fd/N`, `/proc/self/fd/N`
links to what the caller holds open) is written *into*, appended to, never replaced by a
regular file. An output that is one of the run's inputs (the same file under any spelling, or
through a symlink or a hard link) is refused before anything is written: inputs are never
modified.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from rnndiag.errors import OptionError, OutputError

# the temporary name keeps at most this many bytes of the target's name: ".{name}.XXXXXXXX.tmp"
# must stay under NAME_MAX (255 bytes on every common file system)
TMP_NAME_BYTES = 100


def write_atomic(path: Path, text: str) -> None:
    write_atomic_bytes(path, text.encode("utf-8", "surrogateescape"))


def check_folder(path: Path) -> Path:
    """The folder `path` will be written in; OptionError when it cannot be."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        if path.is_dir():
            raise OptionError(f"{path}: is a directory; give a file name to write")
        if not directory.is_dir():
            raise OptionError(f"{path}: folder {directory} does not exist")
    except OSError as exc:  # a name too long, a loop of links
        raise OptionError(f"{path}: cannot write ({exc.strerror})") from None
    return directory


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` (see the module docstring); OutputError when it cannot be."""
    if _writes_into(path):
        _write_into(path, data)
        return
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path
    directory = check_folder(target)
    mode = _mode(target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{_short(target.name)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise


def _writes_into(path: Path) -> bool:
    """Whether `path` names something to write into rather than a file to replace: an existing
    non-regular file, or a link through /proc (`/dev/stdout`, `/dev/fd/1`), which names an
    open file description of this process, not a place in a folder."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a new path (or a dangling link): created by the rename
        return False
    return not stat.S_ISREG(mode) or _through_proc(path)


def _through_proc(path: Path) -> bool:
    here = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on links followed
        if not os.path.islink(here):
            return False
        if os.path.realpath(os.path.dirname(here)).startswith("/proc/"):
            return True
        here = os.path.normpath(os.path.join(os.path.dirname(here), os.readlink(here)))
    return False


def _write_into(path: Path, data: bytes) -> None:
    """Append to a device, FIFO or open descriptor (appending, not truncating: through
    /dev/stdout it may be a log the shell opened with >>)."""
    try:
        with open(path, "ab") as f:
            f.write(data)
            f.flush()
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _short(name: str) -> str:
    raw = os.fsencode(name)[:TMP_NAME_BYTES]
    return os.fsdecode(raw)


def _mode(path: Path) -> int:
    """The permissions of the file being replaced, else what a plain open() would give."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mask = os.umask(0o022)  # read the umask (only by setting it), then put it back
        os.umask(mask)
        return 0o666 & ~mask


def refuse_inputs(outputs: Mapping[str, Path | None], inputs: Iterable[Path | str]) -> None:
    """OptionError when an output (option name -> path) is one of `inputs`: the same file,
    whatever the spelling, symlink or hard link (same device and inode)."""
    ids: dict[tuple[int, int], str] = {}
    for p in inputs:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(p)
            if stat.S_ISREG(st.st_mode):  # /dev/null may be both an input and an output
                ids.setdefault((st.st_dev, st.st_ino), str(p))
    for option, out in outputs.items():
        if out is None:
            continue
        try:
            st = os.stat(out)
        except (OSError, ValueError):  # a new file cannot be an input
            continue
        found = ids.get((st.st_dev, st.st_ino))
        if found is not None:
            same = "" if found == str(out) else f" (the same file as input {found})"
            raise OptionError(f"{option} {out}: refusing to overwrite an input file{same}; "
                              "inputs are never modified, give another file name")

