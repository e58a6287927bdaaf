"""Fuzz the torch-file path: mutated pickles inside valid torch zip archives, and random
nested containers saved by torch.save, read by `inspect`'s whole pipeline with `debug=True`
(so a bug raises instead of becoming an `internal error` record). Whatever the bytes, the
result is a record (ok, skipped or a one-line error), never another exception.

Bounded: a few hundred examples with a deadline, a few seconds in CI.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rnndiag.inspection import inspect_file
from rnndiag.records import FileStatus


def _archive(obj: object) -> dict[str, bytes]:
    """The members torch.save writes for `obj`, by name."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


torch.manual_seed(0)
_RNN = {k: v.detach().clone() for k, v in nn.GRU(2, 3).state_dict().items()}
BASES = [
    _archive(_RNN),
    _archive({"state_dict": {f"model.{k}": v for k, v in _RNN.items()}, "epoch": 3,
              "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}]}),
    _archive({"a": [1, (2.5, "x"), {"b": torch.zeros(2, 2)}], "c": None, "d": True}),
]


def _write(path: Path, members: dict[str, bytes], pickle_bytes: bytes) -> None:
    with zipfile.ZipFile(path, "w") as out:
        for name, data in members.items():
            out.writestr(name, pickle_bytes if name.endswith("/data.pkl") else data)


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, byte) edits: 0 overwrite, 1 insert, 2 delete, 3 truncate."""
    out = bytearray(data)
    for kind, pos, byte in edits:
        i = pos % (len(out) + 1)
        if kind == 0 and i < len(out):
            out[i] = byte
        elif kind == 1:
            out.insert(i, byte)
        elif kind == 2 and i < len(out):
            del out[i]
        elif kind == 3:
            del out[i:]
    return bytes(out)


def _assert_record(path: Path) -> None:
    found = inspect_file(path, debug=True)
    assert found.status in (FileStatus.OK, FileStatus.SKIPPED, FileStatus.ERROR)
    if found.error is not None:
        assert "\n" not in found.error and "internal error" not in found.error


_EDIT = st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255))
# pickle opcodes worth inserting: containers, memo get/put, stack ops, the persistent load
_OPCODES = st.sampled_from(list(b"}]()tseuh\x85\x86\x87qjQRb0.") + [0x80, 0x94, 0x95])


@settings(max_examples=250, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.integers(0, len(BASES) - 1),
       edits=st.lists(st.one_of(_EDIT, st.tuples(st.just(1), st.integers(0, 10_000), _OPCODES)),
                      min_size=1, max_size=6))
def test_mutated_pickles_in_valid_archives(tmp_path: Path, base: int,
                                           edits: list[tuple[int, int, int]]) -> None:
    members = BASES[base]
    pkl = next(data for name, data in members.items() if name.endswith("/data.pkl"))
    path = tmp_path / "m.pt"
    _write(path, members, _mutate(pkl, edits))
    _assert_record(path)


_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.text(max_size=4),
                  st.builds(lambda n: torch.zeros(n), st.integers(0, 3)))
_TREE = st.recursive(_LEAF, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=12)


@settings(max_examples=100, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=st.dictionaries(st.text(max_size=12), _TREE, max_size=4))
def test_random_containers(tmp_path: Path, tree: dict[str, Any]) -> None:
    path = tmp_path / "m.pt"
    torch.save(tree, path)
    _assert_record(path)


def _containers(obj: Any, out: list[Any]) -> list[Any]:
    if isinstance(obj, dict | list):
        out.append(obj)
        for value in (obj.values() if isinstance(obj, dict) else obj):
            _containers(value, out)
    return out


@settings(max_examples=100, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tree=st.dictionaries(st.text(max_size=4), _TREE, min_size=1, max_size=4),
       links=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1,
                      max_size=4))
def test_shared_and_cyclic_containers(tmp_path: Path, tree: dict[str, Any],
                                      links: list[tuple[int, int]]) -> None:
    """The same containers linked into each other (pickle memo references): sharing, and
    cycles when a container is linked below itself."""
    found = _containers(tree, [])
    for i, j in links:
        a, b = found[i % len(found)], found[j % len(found)]
        if isinstance(a, dict):
            a[f"link{i}"] = b
        else:
            a.append(b)
    path = tmp_path / "m.pt"
    torch.save(tree, path)
    _assert_record(path)
