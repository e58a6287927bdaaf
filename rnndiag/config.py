"""Project configuration: `[tool.rnndiag]` in pyproject.toml, or `--config FILE`. Torch-free.

    [tool.rnndiag]
    context = 40                      # any `check` option, kebab-case, as on the command line
    batch = "data/val_batch.safetensors"
    fail-on = "any"
    ignore = ["RD006", {rule = "RD001", module = "encoder", direction = "reverse"}]

    [[tool.rnndiag.overrides]]        # later entries win; first the top level, then these
    files = ["checkpoints/tagger*.safetensors"]
    batch = "data/tagger_batch.safetensors"
    model = "mypkg.models:Tagger"

The file is found like ruff's and mypy's: `--config FILE` (a TOML file: its `[tool.rnndiag]`
table, or its top level), else the first `pyproject.toml` with a `[tool.rnndiag]` table in the
current directory or above. Paths in it (`batch`, `files` patterns) are relative to the file's
directory. Command-line options override it. Unknown keys and wrong types are errors naming
them. `ignore` accepts known findings: they are still reported (marked ignored) but never
change the exit code.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rnndiag.errors import CheckpointError, OptionError
from rnndiag.files import check_readable, one_line
from rnndiag.records import CheckOptions, Ignore, Override

# key -> (CheckOptions field, accepted python types)
OPTION_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "batch": ("batch_path", (str,)), "batch-size": ("batch_size", (int,)),
    "seq-len": ("seq_len", (int,)), "seed": ("seed", (int,)),
    "nonlinearity": ("nonlinearity", (str,)), "dtype": ("dtype", (str,)),
    "train-batch-size": ("train_batch_size", (int,)), "lr": ("lr", (int, float)),
    "optimizer": ("optimizer", (str,)),
    "model": ("model", (str,)), "model-kwargs": ("model_kwargs", (dict,)),
    "loss": ("loss", (str,)), "device": ("device", (str,)),
    "max-memory": ("max_memory", (str, int)), "state-key": ("state_key", (str,)),
    "output-key": ("output_key", (str, int)), "time-axis": ("time_axis", (int,)),
    "ignore-index": ("ignore_index", (int,)), "strict-nonfinite": ("strict_nonfinite", (bool,)),
    "embedding": ("embeddings", (dict,)), "ignore": ("ignores", (list,)),
    "vanish-threshold": ("vanish", (int, float)), "explode-threshold": ("explode", (int, float)),
    "context": ("context", (int,)),
}
THRESHOLD_FIELDS = ("vanish", "explode", "context")


@dataclass(frozen=True)
class Config:
    path: Path | None
    values: tuple[tuple[str, Any], ...] = ()
    overrides: tuple[Override, ...] = ()
    fail_on: str | None = None


def find(start: Path | None = None) -> Path | None:
    """The first pyproject.toml with a [tool.rnndiag] table, from `start` upwards."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and "rnndiag" in _read(candidate).get("tool", {}):
            return candidate
    return None


MAX_CONFIG_BYTES = 10 * 2**20  # a configuration file, at most


def _read(path: Path) -> dict[str, Any]:
    """The TOML document of a regular file (a FIFO named by --config would block the run)."""
    try:
        check_readable(path)
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise OptionError(f"config {path}: larger than {MAX_CONFIG_BYTES} bytes")
        with path.open("rb") as f:
            return tomllib.load(f)
    except CheckpointError as exc:
        raise OptionError(f"config {exc}") from None
    except (OSError, tomllib.TOMLDecodeError, RecursionError) as exc:  # nested 10,000 deep
        raise OptionError(f"config {path}: cannot read ({one_line(exc)})") from None


def load(path: Path | None) -> Config:
    """Parse and check a config file (None: no configuration)."""
    if path is None:
        return Config(None)
    doc = _read(path)
    table = doc.get("tool", {}).get("rnndiag", doc if path.name != "pyproject.toml" else {})
    where = f"config {path}"
    if not isinstance(table, dict):
        raise OptionError(f"{where}: [tool.rnndiag] must be a table")
    table = dict(table)
    overrides = table.pop("overrides", [])
    fail_on = table.pop("fail-on", None)
    if fail_on is not None and not isinstance(fail_on, str):
        raise OptionError(f"{where}: fail-on must be a string, got {type(fail_on).__name__}")
    if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
        raise OptionError(f"{where}: overrides must be an array of tables "
                          "([[tool.rnndiag.overrides]])")
    base = _values(table, path.parent, where)
    found = []
    for i, entry in enumerate(overrides):
        entry = dict(entry)
        patterns = entry.pop("files", None)
        if not isinstance(patterns, list) or not patterns or \
                not all(isinstance(p, str) for p in patterns):
            raise OptionError(f"{where}: overrides[{i}] needs files = [\"pattern\", ...]")
        found.append(Override(tuple(patterns), _values(entry, path.parent,
                                                       f"{where}: overrides[{i}]"),
                              str(path.parent)))
    return Config(path, base, tuple(found), fail_on)


def _values(table: Mapping[str, Any], root: Path, where: str) -> tuple[tuple[str, Any], ...]:
    unknown = sorted(set(table) - set(OPTION_KEYS))
    if unknown:
        top = " (fail-on is top-level only)" if "fail-on" in unknown else ""
        raise OptionError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                          f"{', '.join(unknown)}{top}; known: {', '.join(sorted(OPTION_KEYS))}")
    out = []
    for key, value in table.items():
        name, types = OPTION_KEYS[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise OptionError(f"{where}: {key} = {value!r}: expected "
                              f"{' or '.join(t.__name__ for t in types)}")
        out.append((name, _convert(key, value, root, where)))
    return tuple(out)


def _convert(key: str, value: Any, root: Path, where: str) -> Any:
    if key == "batch":
        return str(root / value) if not os.path.isabs(value) else value
    if key == "model-kwargs":
        return json.dumps(value)
    if key == "output-key":
        return str(value)
    if key == "embedding":
        if not all(isinstance(v, str) for v in value.values()):
            raise OptionError(f"{where}: embedding values must be tensor names")
        return tuple(value.items())
    if key == "max-memory":
        from rnndiag.resources import parse_size  # torch-free

        return parse_size(str(value))
    if key == "ignore":
        return tuple(ignore_entry(x, f"{where}: ignore") for x in value)
    return value


def ignore_entry(x: Any, where: str) -> Ignore:
    """"RD006" or {rule = "RD001", module = "rnn", layer = 0, direction = "reverse"}."""
    from rnndiag.findings import Rule

    known = {r.value for r in Rule}
    if isinstance(x, str):
        x = {"rule": x}
    if not isinstance(x, dict) or not isinstance(x.get("rule"), str):
        raise OptionError(f"{where}: entries are rule ids or tables with a rule, got {x!r}")
    extra = sorted(set(x) - {"rule", "module", "layer", "direction"})
    if extra or x["rule"] not in known:
        what = f"unknown keys {', '.join(extra)}" if extra else f"unknown rule {x['rule']!r}"
        raise OptionError(f"{where}: {what} (rules: {', '.join(sorted(known))})")
    return Ignore(x["rule"], x.get("module"), x.get("layer"), x.get("direction"))


def options_for(base: CheckOptions, config: Config, given: set[str]) -> CheckOptions:
    """`base` with the config's top-level values applied to every field not in `given` (the
    options set on the command line), and its overrides kept for `for_path`, less `given`."""
    overrides = tuple(replace(o, values=tuple((k, v) for k, v in o.values if k not in given))
                      for o in config.overrides)
    return replace(_apply(base, [(k, v) for k, v in config.values if k not in given]),
                   overrides=base.overrides + overrides)


def for_path(options: CheckOptions, path: Path) -> CheckOptions:
    """The options of one file: every override whose patterns match it, in order."""
    values = [kv for o in options.overrides if _matches(o, path) for kv in o.values]
    return _apply(options, values)


def _matches(o: Override, path: Path) -> bool:
    try:
        rel = path.resolve().relative_to(Path(o.root).resolve()).as_posix()
    except ValueError:
        rel = path.as_posix()
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(path.as_posix(), p)
               for p in o.patterns)


def _apply(base: CheckOptions, values: list[tuple[str, Any]]) -> CheckOptions:
    changes: dict[str, Any] = {}
    th: dict[str, Any] = {}
    for name, value in values:
        if name in THRESHOLD_FIELDS:
            th[name] = value
        elif name == "ignores":
            changes[name] = changes.get(name, base.ignores) + value
        else:
            changes[name] = value
    if th:
        changes["thresholds"] = replace(base.thresholds, **th)
    if changes:
        changes["from_config"] = base.from_config + tuple(n for n, _ in values)
    return replace(base, **changes) if changes else base


INT64 = 2**63 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
DTYPE_NAMES = ("float32", "float64")


def check_values(options: CheckOptions) -> None:
    """Reject option values no file could make sense of, with one line naming the option.
    Torch-free, so the CLI can check before anything is imported or written; the device and
    the optimizer name are checked by rnndiag.diagnose.validate."""
    o, th = options, options.thresholds
    for flag, value, low in (("--batch-size", o.batch_size, 1), ("--seq-len", o.seq_len, 1),
                             ("--train-batch-size", o.train_batch_size, 1),
                             ("--context", th.context, 1),
                             ("--ignore-index", o.ignore_index, -INT64)):
        if value is not None and value < low:
            raise OptionError(f"{flag} must be at least {low}, got {value}")
        if value is not None and value > INT64:
            raise OptionError(f"{flag} {value} is too large (at most 2**63 - 1)")
    if not SEED_RANGE[0] <= o.seed <= SEED_RANGE[1]:
        raise OptionError(f"--seed {o.seed} is out of range: expected an integer from "
                          "-2**63 to 2**64 - 1")
    if o.dtype not in DTYPE_NAMES:
        raise OptionError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {o.dtype!r}")
    if o.lr is not None and not 0.0 < o.lr < float("inf"):
        raise OptionError(f"--lr must be a positive number, got {o.lr}")
    if o.time_axis not in (None, 0, 1):
        raise OptionError(f"--time-axis must be 0 (time-major) or 1 (batch-first), got "
                          f"{o.time_axis}")
    if o.max_memory is not None and o.max_memory < 1:
        raise OptionError(f"--max-memory must be more than 0 bytes, got {o.max_memory} (leave "
                          "it out for half of the RAM)")
    if not 0.0 < th.vanish < 1.0 < th.explode < float("inf"):
        raise OptionError("thresholds must satisfy 0 < --vanish-threshold < 1 < "
                          f"--explode-threshold (finite), got {th.vanish:g} and "
                          f"{th.explode:g}")
    if o.model_kwargs:
        model_kwargs(o.model_kwargs)


def model_kwargs(text: str) -> dict[str, Any]:
    """--model-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise OptionError("--model-kwargs is nested too deeply to parse") from None
    except ValueError as exc:
        raise OptionError(f"--model-kwargs is not valid JSON ({one_line(exc)})") from None
    if not isinstance(value, dict):
        raise OptionError("--model-kwargs must be a JSON object of keyword arguments")
    return value
