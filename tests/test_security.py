"""Hostile and broken input: one clear line and the right exit code, in text and JSON modes;
nothing executed, nothing modified. The corpus is generated here, not committed."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from rnndiag.cli import main
from rnndiag.discover import discover
from rnndiag.errors import ArchitectureError, CheckpointError
from rnndiag.stfile import read_header

SCHEMA = json.loads(files("rnndiag").joinpath("report.schema.json").read_text("utf-8"))


def _raw_safetensors(header: Any, data: bytes = b"", length: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _rnn_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {f"rnn.{k}": v.contiguous() for k, v in nn.RNN(2, 3).state_dict().items()}


def _write(name: str, content: bytes | Callable[[Path], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content(path)
        return path
    return make


def _save(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, path)


def _torch_save(obj: object) -> Callable[[Path], None]:
    return lambda path: torch.save(obj, path)


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CORPUS: dict[str, tuple[Callable[[Path], Path], int, str]] = {
    "header-longer-than-file": (_write("a.safetensors", _raw_safetensors({"w": F32}, b"\0" * 8,
                                                                          length=10_000)),
                                2, "header length that fits"),
    "header-over-cap": (_write("a.safetensors", struct.pack("<Q", 2**40) + b"{}"), 2,
                        "header length that fits"),
    "truncated-data": (_write("a.safetensors", _raw_safetensors({"w": F32}, b"\0" * 4)), 2,
                       "truncated"),
    "overlapping": (_write("a.safetensors", _raw_safetensors(
        {"w": F32, "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)),
        2, "overlap"),
    "duplicate-names": (_write("a.safetensors", _raw_safetensors(
        b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
        b'"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8)),
        2, "duplicate tensor name"),
    "not-json": (_write("a.safetensors", _raw_safetensors(b"{not json", b"")), 2,
                 "invalid safetensors header"),
    "json-list": (_write("a.safetensors", _raw_safetensors(b"[1, 2]", b"")), 2,
                  "not a JSON object"),
    "unknown-dtype": (_write("a.safetensors", _raw_safetensors(
        {"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)), 2,
        "unknown dtype"),
    "bad-shape": (_write("a.safetensors", _raw_safetensors(
        {"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)), 2,
        "invalid shape"),
    "size-mismatch": (_write("a.safetensors", _raw_safetensors(
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)), 2,
        "needs 12"),
    "tiny-file": (_write("a.safetensors", b"\x01\x02"), 2, "shorter than 8 bytes"),
    "empty-file": (_write("a.safetensors", b""), 2, "shorter than 8 bytes"),
    "metadata-not-strings": (_write("a.safetensors", _raw_safetensors(
        {"__metadata__": {"a": 1}, "w": F32}, b"\0" * 8)), 2, "__metadata__"),
    "unsafe-global": (_write("a.pt", _torch_save({"w": torch.zeros(2), "x": HealthCheck})), 2,
                      "needs unsafe globals"),
    "torchscript": (_write("a.pt", lambda p: torch.jit.save(torch.jit.script(nn.Linear(2, 2)),
                                                            p)), 2, "TorchScript"),
    "single-tensor": (_write("a.pt", _torch_save(torch.zeros(3))), 2, "single tensor"),
    "list": (_write("a.pt", _torch_save([1, 2])), 2, "not a state dict"),
    "gate-mismatch": (_write("a.safetensors", _save({
        "rnn.weight_ih_l0": torch.zeros(12, 2), "rnn.weight_hh_l0": torch.zeros(9, 3)})), 2,
        "rnn.weight_ih_l0: shape (12, 2)"),
    "missing-layer-tensor": (_write("a.safetensors", _save({
        **{f"rnn.{k}": v.contiguous() for k, v in nn.GRU(2, 3, 2).state_dict().items()
           if k != "weight_hh_l1"}})), 2, "weight_hh_l1"),
    "integer-weights": (_write("a.safetensors", _save({
        k: v.to(torch.int32) for k, v in _rnn_tensors().items()})), 2, "int32"),
    "directory": (lambda folder: folder, 2, "is a directory"),
    "missing": (lambda folder: folder / "nope.safetensors", 2, "no such file"),
}


@pytest.mark.parametrize("case", list(CORPUS))
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_corpus(case: str, fmt: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make, code, fragment = CORPUS[case]
    path = make(tmp_path)
    got = main(["check", str(path), "--format", fmt])
    out, err = capsys.readouterr()
    assert got == code, err
    assert err.count("\n") == 1 and err.startswith("rnndiag: error:") and fragment in err
    assert "Traceback" not in out + err
    if fmt == "json":
        doc = json.loads(out)
        jsonschema.validate(doc, SCHEMA, cls=jsonschema.Draft202012Validator)
        assert doc["exit_code"] == code
        assert any(fragment in e["message"] for e in doc["errors"])


def test_half_precision_is_upcast_with_a_note(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "h.safetensors"
    save_file({k: v.half() for k, v in _rnn_tensors().items()}, path)
    assert main(["check", str(path), "--format", "json", "--fail-on", "never"]) == 0
    notes = json.loads(capsys.readouterr().out)["files"][0]["notes"]
    assert any("upcast to float32" in n and "float16" in n for n in notes)


def test_lfs_pointer_is_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "big.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    assert main(["check", str(path), "--format", "json"]) == 0
    f = json.loads(capsys.readouterr().out)["files"][0]
    assert f["status"] == "skipped" and "git lfs pull" in f["notes"][0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_rnn_tensors(), path)
    path.chmod(0)
    assert main(["check", str(path)]) == 2
    assert "cannot open" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("batch", "fragment"),
    [({"inputs": torch.zeros(2, 5, 7)}, "takes input_size 2"),
     ({"inputs": torch.zeros(2, 0, 2)}, "no time steps"),
     ({"inputs": torch.zeros(0, 5, 2)}, "no examples"),
     ({"inputs": torch.zeros(2, 5, 2, dtype=torch.bool)}, "dtype bool"),
     ({"other": torch.zeros(2, 5, 2)}, "no 'inputs' tensor"),
     ({"inputs": torch.zeros(2, 5, dtype=torch.int64)}, "no embedding")],
    ids=["input-size", "zero-steps", "zero-examples", "bool", "no-inputs", "ids-no-embedding"],
)
def test_bad_batches(batch: dict[str, torch.Tensor], fragment: str, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    model, data = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    save_file(_rnn_tensors(), model)
    save_file(batch, data)
    for fmt in ("text", "json"):
        assert main(["check", str(model), "--batch", str(data), "--format", fmt]) == 2
        out, err = capsys.readouterr()
        assert fragment in err and err.count("\n") == 1
        if fmt == "json":
            assert json.loads(out)["exit_code"] == 2


def test_inputs_are_byte_identical_and_outputs_atomic(tmp_path: Path) -> None:
    model, data, report = tmp_path / "m.safetensors", tmp_path / "b.safetensors", tmp_path / "r"
    save_file(_rnn_tensors(), model)
    save_file({"inputs": torch.randn(2, 6, 2)}, data)
    pt = tmp_path / "m.pt"
    torch.save({"state_dict": _rnn_tensors()}, pt)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (model, data, pt)}
    mtimes = {p: p.stat().st_mtime_ns for p in digest}
    for fmt in ("json", "text"):
        main(["check", str(model), str(pt), "--batch", str(data), "--format", fmt,
              "--output", str(report)])
        main(["inspect", str(model), str(pt), "--format", fmt, "--output", str(report)])
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in digest} == digest
    assert {p: p.stat().st_mtime_ns for p in digest} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "m.pt",
                                                          "m.safetensors", "r"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_header_reader_never_crashes_on_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(data)
    try:
        read_header(path)
    except CheckpointError:
        pass


_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "F99", 3, None]),
    "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), st.text(max_size=3)),
    "data_offsets": st.one_of(st.lists(st.integers(-3, 80), min_size=0, max_size=3),
                              st.none()),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=8), _ENTRY, max_size=4),
       st.integers(0, 100), st.one_of(st.none(), st.integers(0, 300)))
def test_header_reader_never_crashes_on_headers(tmp_path: Path, header: dict[str, Any],
                                                data_len: int, length: int | None) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(_raw_safetensors(header, b"\0" * data_len, length))
    try:
        h = read_header(path)
    except CheckpointError:
        return
    for t in h.tensors.values():  # whatever is accepted is consistent
        assert 0 <= t.begin <= t.end <= data_len


_KEY = st.builds(
    lambda prefix, base, layer, rev: f"{prefix}{base}{layer}{rev}",
    st.sampled_from(["", "rnn.", "a.b.", "x\n.", "[red]."]),
    st.sampled_from(["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"]),
    st.sampled_from(["", "_l0", "_l1", "_l2"]),
    st.sampled_from(["", "_reverse"]),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEY, st.lists(st.integers(0, 12), max_size=3).map(tuple), max_size=8))
def test_discovery_never_crashes(shapes: dict[str, tuple[int, ...]]) -> None:
    try:
        specs = discover(shapes)
    except ArchitectureError:
        return
    for spec in specs:
        key = spec.key(spec.local_name("weight_ih", 0, spec.directions[0]))
        assert shapes[key] == (spec.cell_type.gates * spec.hidden_size, spec.input_size)
