"""Input formats: numpy `.npz` state dicts are read (with allow_pickle=False), anything that is
not safetensors, a torch file or an .npz is "unsupported format" in one line, and refusals of
pickles reach the terminal clean (no ANSI escapes from torch's text, no torch warnings).

Every file is written to `tmp_path` by the test that reads it; nothing binary is committed.
The oracle for an .npz is the same weights saved as safetensors: identical numbers.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from rnndiag.checkpoint import load_checkpoint
from rnndiag.cli import main
from rnndiag.errors import CheckpointError
from rnndiag.files import one_line, sniff_format

SCHEMAS = {cmd: json.loads(files("rnndiag").joinpath(f"{name}.schema.json").read_text("utf-8"))
           for cmd, name in (("check", "report"), ("inspect", "inspect"))}
CHECK = ["--seq-len", "10"]


def _lstm_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in nn.LSTM(3, 4, num_layers=2).state_dict().items()}


def _numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in sd.items()}


def _run(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capfd.readouterr()
    return code, out, err


def _json(capfd: pytest.CaptureFixture[str], cmd: str, path: Path,
          *extra: str) -> tuple[int, dict[str, Any]]:
    code, out, err = _run(capfd, cmd, str(path), "--format", "json", *extra)
    doc = json.loads(out)
    jsonschema.validate(doc, SCHEMAS[cmd], cls=jsonschema.Draft202012Validator)
    assert doc["exit_code"] == code, err
    return code, doc


def _same_file_result(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two file records that differ only in path, format and notes (which name tensors in the
    file's order: safetensors sorts them)."""
    skip = {"path", "format", "notes"}
    assert {k: v for k, v in a.items() if k not in skip} == \
        {k: v for k, v in b.items() if k not in skip}


# --------------------------------------------------------------------------------------------
# .npz state dicts: the same numbers as the same weights in safetensors

NPZ_WRITERS: dict[str, tuple[str, Callable[..., None], str | None]] = {
    # id: (file name, numpy writer, dtype to store)
    "savez": ("m.npz", np.savez, None),
    "savez-compressed": ("m.npz", np.savez_compressed, None),
    "big-endian": ("m.npz", np.savez, ">f4"),
    "named-dat": ("weights.dat", np.savez, None),  # the format comes from the content
}


@pytest.mark.parametrize("writer", list(NPZ_WRITERS))
def test_npz_is_checked_with_the_numbers_of_the_same_safetensors(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], writer: str) -> None:
    sd = _lstm_state()
    reference = tmp_path / "m.safetensors"
    save_file(sd, reference)
    name, save, dtype = NPZ_WRITERS[writer]
    path = tmp_path / name
    with path.open("wb") as f:  # a file, not a path, to which np.savez would add ".npz"
        save(f, **{k: a if dtype is None else a.astype(dtype) for k, a in _numpy(sd).items()})

    code, doc = _json(capfd, "check", path, *CHECK)
    ref_code, ref = _json(capfd, "check", reference, *CHECK)
    [got], [want] = doc["files"], ref["files"]
    assert code == ref_code == 0 and got["status"] == "ok", got["error"]
    assert got["format"] == "npz" and got["notes"] == []
    assert got["modules"][0]["kind"] == "LSTM" and got["modules"][0]["num_layers"] == 2
    assert len(got["modules"][0]["layers"][0]["grad_norm"]) == 10
    _same_file_result(got, want)


def test_float16_npz_is_upcast_like_safetensors(tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    sd = {k: v.half() for k, v in _lstm_state().items()}
    reference = tmp_path / "h.safetensors"
    save_file(sd, reference)
    path = tmp_path / "h.npz"
    np.savez(path, **_numpy(sd))

    ckpt = load_checkpoint(path)
    assert {t.dtype for t in ckpt.tensors.values()} == {torch.float32}
    _, doc = _json(capfd, "check", path, *CHECK)
    _, ref = _json(capfd, "check", reference, *CHECK)
    [got], [want] = doc["files"], ref["files"]
    [note] = got["notes"]
    assert note.startswith("upcast to float32: weight_ih_l0 (float16), ") and \
        note.endswith(" and 5 more")
    assert want["notes"][0].endswith(" and 5 more")
    _same_file_result(got, want)


def test_inspect_reads_npz(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    sd = _lstm_state()
    reference = tmp_path / "m.safetensors"
    save_file(sd, reference)
    path = tmp_path / "m.npz"
    np.savez(path, **_numpy(sd))
    code, doc = _json(capfd, "inspect", path)
    _, ref = _json(capfd, "inspect", reference)
    [got], [want] = doc["files"], ref["files"]
    assert code == 0 and got["format"] == "npz" and got["status"] == "ok"
    _same_file_result(got, want)
    code, out, err = _run(capfd, "inspect", str(path))
    assert code == 0 and err == "" and "(npz)" in out


def test_inspect_of_npz_does_not_import_torch(tmp_path: Path) -> None:
    path = tmp_path / "m.npz"
    np.savez(path, **_numpy(_lstm_state()))
    code = ("import sys\nfrom rnndiag.cli import main\n"
            f"rc = main(['inspect', {str(path)!r}, '--format', 'json'])\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("NO-TORCH 0")


def test_npz_under_a_state_key_with_dotted_names(tmp_path: Path) -> None:
    """Dotted keys nest like a torch container's; --state-key picks the model's part."""
    sd = _lstm_state()
    path = tmp_path / "c.npz"
    np.savez(path, **{f"model.module.rnn.{k}": v for k, v in _numpy(sd).items()},
             step=np.array(7))
    ckpt = load_checkpoint(path, state_key="model")
    assert sorted(ckpt.tensors) == sorted(f"rnn.{k}" for k in sd)  # `module.` unwrapped
    torch.testing.assert_close(ckpt.tensors["rnn.weight_hh_l1"], sd["weight_hh_l1"],
                               rtol=0, atol=0)


def test_npz_batch_file_gives_the_numbers_of_a_safetensors_batch(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "m.safetensors"
    save_file(_lstm_state(), model)
    inputs = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(1))
    save_file({"inputs": inputs}, tmp_path / "b.safetensors")
    np.savez(tmp_path / "b.npz", inputs=inputs.numpy())
    _, doc = _json(capfd, "check", model, "--batch", str(tmp_path / "b.npz"))
    _, ref = _json(capfd, "check", model, "--batch", str(tmp_path / "b.safetensors"))
    assert doc["files"][0]["status"] == "ok"
    assert doc["files"][0]["modules"] == ref["files"][0]["modules"]


# --------------------------------------------------------------------------------------------
# .npz and .npy files that are refused: one line, exit 2, nothing unpickled


class _Touch:
    """Unpickling this creates `marker`: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("cmd", ["check", "inspect"])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_npz_with_an_object_array_is_refused_by_name_and_never_loaded(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], cmd: str, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "o.npz"
    np.savez(path, **_numpy(_lstm_state()),
             config=np.array([_Touch(marker)], dtype=object))
    code, out, err = _run(capfd, cmd, str(path), "--format", fmt)
    assert code == 2 and err.count("\n") == 1 and err.startswith("rnndiag: error:")
    assert "refused: array 'config' holds Python objects" in err and str(path) in err
    assert not marker.exists()
    if fmt == "json":
        assert "refused" in json.loads(out)["files"][0]["error"]


def test_object_array_outside_the_state_key_is_not_read(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "o.npz"
    np.savez(path, **{f"model.{k}": v for k, v in _numpy(_lstm_state()).items()},
             extra=np.array([_Touch(marker)], dtype=object))
    assert len(load_checkpoint(path, state_key="model").tensors) == 8
    with pytest.raises(CheckpointError, match="'extra' holds Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("array", [
    pytest.param(lambda: np.zeros((4, 3), np.float32), id="float-array"),
    pytest.param(lambda: np.array(_numpy(_lstm_state()), dtype=object), id="pickled-dict"),
])
def test_npy_is_a_single_array_not_a_state_dict(tmp_path: Path,
                                                capfd: pytest.CaptureFixture[str],
                                                array: Callable[[], np.ndarray]) -> None:
    path = tmp_path / "w.npy"
    np.save(path, array(), allow_pickle=True)
    code, out, err = _run(capfd, "check", str(path))
    assert code == 2 and err.count("\n") == 1
    assert "holds a single array, not a state dict" in err


@pytest.mark.parametrize(("array", "fragment"), [
    pytest.param(np.array(["a", "b"]), "dtype str", id="strings"),
    pytest.param(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]), "dtype void",
                 id="structured"),
    pytest.param(np.zeros(2, dtype="datetime64[s]"), "dtype datetime64", id="datetimes"),
])
def test_npz_with_non_numeric_arrays_is_an_error(tmp_path: Path, array: np.ndarray,
                                                 fragment: str) -> None:
    path = tmp_path / "x.npz"
    np.savez(path, w=array)
    with pytest.raises(CheckpointError, match=f"array 'w' has {fragment}"):
        load_checkpoint(path)


def test_truncated_npz_keeps_its_format_and_says_so(tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """The central directory is gone; the first member's header still names an .npy."""
    path = tmp_path / "t.npz"
    np.savez(path, **_numpy(_lstm_state()))
    path.write_bytes(path.read_bytes()[:300])
    code, out, err = _run(capfd, "check", str(path))
    assert code == 2 and err.count("\n") == 1 and "cannot read .npz" in err


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


_VALID_NPZ = _npz_bytes(a=np.arange(6, dtype=np.float32).reshape(2, 3),
                        b=np.ones(2, dtype=np.float16))


@settings(max_examples=int(os.environ.get("FUZZN", 60)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       cut=st.none() | st.integers(0, 10_000))
def test_corrupted_npz_loads_or_raises_checkpoint_error(
        tmp_path: Path, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(_VALID_NPZ)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path / "fuzz.npz"
    path.write_bytes(bytes(data))
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
    else:
        assert all(isinstance(t, torch.Tensor) for t in ckpt.tensors.values())


# --------------------------------------------------------------------------------------------
# formats rnndiag does not read: "unsupported format", naming what was recognised


def _zip_of(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


def _tar_of(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _torch_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_lstm_state(), buf)
    return buf.getvalue()


# An ONNX ModelProto as torch.onnx.export begins one: ir_version (field 1), producer_name
# "pytorch", producer_version, then the graph; protobuf has no magic number
ONNX = (b"\x08\x08\x12\x07pytorch\x1a\x052.1.0:\xd2\x01\n!\n\x05input\x12\x06output\x1a\x04"
        b"Gemm\"\x04Gemm*\x0f\n\x05alpha\x15\x00\x00\x80?\xa0\x01\x01" + bytes(range(200)))
UNSUPPORTED: dict[str, tuple[str, Callable[[], bytes], str]] = {
    # id: (file name, content, what the message names)
    "zip-of-other-files": ("model.keras", lambda: _zip_of(**{"config.json": b"{}",
                                                            "model.weights.h5": b"\0" * 64}),
                           "a zip archive of other files"),
    "zipped-checkpoint": ("model.pt", lambda: _zip_of(**{"model.pt": _torch_bytes()}),
                          "a zip archive of other files"),
    "tar": ("model.tar", lambda: _tar_of("model.pt", _torch_bytes()), "a tar archive"),
    "gzip": ("model.pt.gz", lambda: gzip.compress(_torch_bytes()), "a gzip file"),
    "hdf5": ("model.h5", lambda: b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 4, "an HDF5 file"),
    "onnx": ("model.onnx", lambda: ONNX, ""),
    "html-error-page": ("model.pt", lambda: b"<!DOCTYPE html>\n<html><body>404 Not Found"
                        b"</body></html>\n", "a text file"),
    "empty-zip": ("empty.npz", lambda: _zip_of(), "an empty zip archive"),
}


@pytest.mark.parametrize("cmd", ["check", "inspect"])
@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_other_formats_are_unsupported_in_one_line(tmp_path: Path,
                                                   capfd: pytest.CaptureFixture[str],
                                                   case: str, cmd: str) -> None:
    name, content, what = UNSUPPORTED[case]
    path = tmp_path / name
    path.write_bytes(content())
    expected = f"unsupported format ({what + ', ' if what else ''}not safetensors, a torch " \
               "file or .npz)"
    code, out, err = _run(capfd, cmd, str(path))
    assert code == 2, err
    assert err == f"rnndiag: error: {path}: {expected}\n"
    code, doc = _json(capfd, cmd, path)
    assert code == 2 and doc["files"][0]["format"] == "unknown"
    assert doc["files"][0]["error"] == f"{path}: {expected}"


# --------------------------------------------------------------------------------------------
# pickles: refused in one clean line (no ANSI escapes, no torch warnings)


class _Config:
    """Stands for anything a training script pickles besides tensors."""

    def __init__(self) -> None:
        self.lr = 0.1


def _pickle(make: Callable[[], Any], protocol: int | None = None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with path.open("wb") as f:
            pickle.dump(make(), f, protocol=protocol)
    return write


def _torch_save(make: Callable[[], Any], **kwargs: Any) -> Callable[[Path], None]:
    return lambda path: torch.save(make(), path, **kwargs)


def _with_config() -> dict[str, Any]:
    return {**_lstm_state(), "config": _Config()}


PICKLES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    # id: (file name, writer, expected fragment)
    "plain-dict-with-object": ("m.pkl", _pickle(_with_config),
                               "a plain pickle (pickle.dump), not a torch.save file"),
    "plain-instance": ("c.pkl", _pickle(_Config), "a plain pickle"),
    "plain-tensors-protocol-2": ("t.pkl", _pickle(_lstm_state, protocol=2), "a plain pickle"),
    # torch's message for these holds "\x1b[1m...\x1b[0m"
    "legacy-torch-with-object": ("l.pt", _torch_save(_with_config,
                                                     _use_new_zipfile_serialization=False),
                                 "Unsupported global: GLOBAL tests.test_formats._Config was "
                                 "not an allowed global by default"),
    "torch-with-object": ("z.pt", _torch_save(_with_config),
                          "needs unsafe globals tests.test_formats._Config"),
    # torch warns "Detected pickle protocol 4" on stderr while reading these
    "torch-protocol-4": ("p.pt", _torch_save(_lstm_state, pickle_protocol=4),
                         "Unsupported operand 149"),
    "legacy-torch-protocol-4": ("p.pt", _torch_save(_with_config, pickle_protocol=4,
                                                    _use_new_zipfile_serialization=False),
                                "Unsupported operand 149"),
}


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("case", list(PICKLES))
def test_pickle_refusal_is_one_clean_line(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                          case: str, fmt: str) -> None:
    name, write, fragment = PICKLES[case]
    path = tmp_path / name
    write(path)
    with warnings.catch_warnings(record=True) as caught:  # pytest would hide them from capfd
        warnings.simplefilter("always")
        code, out, err = _run(capfd, "check", str(path), "--format", fmt)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(f"rnndiag: error: {path}: refused: ")
    assert fragment in err
    for leak in ("\x1b", "\\x1b", "[1m", "Warning", "weights_only` argument"):
        assert leak not in out + err
    if fmt == "json":
        assert fragment in json.loads(out)["files"][0]["error"]


@pytest.mark.parametrize("protocol", [0, 2, 3, 4])
def test_legacy_torch_file_is_told_from_a_plain_pickle_by_its_magic_number(
        tmp_path: Path, protocol: int) -> None:
    """Any pickle protocol: torch's weights_only loader then reads 2 and 3, not 0 or 4."""
    path = tmp_path / "legacy.pkl"
    torch.save(_lstm_state(), path, pickle_protocol=protocol,
               _use_new_zipfile_serialization=False)
    assert sniff_format(path) == "torch"
    if protocol in (2, 3):
        assert sorted(load_checkpoint(path).tensors) == sorted(_lstm_state())
    else:
        with pytest.raises(CheckpointError, match="refused: its pickle uses opcodes"):
            load_checkpoint(path)


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("\x1b[1mdo this\x1b[0m. next", "do this. next", id="ansi-bold"),
    pytest.param("a\n\tb\r\nc", "a b c", id="whitespace"),
    pytest.param("\x1b]8;;https://x\x07link\x1b]8;;\x07 \x1b[38;5;196mred", "link red",
                 id="osc-hyperlink-and-256-colour"),
    pytest.param("bell\x07 nul\x00 del\x7f c1\x9b", "bell nul del c1", id="controls"),
    pytest.param("", "ValueError", id="empty"),
])
def test_one_line_strips_escapes_and_controls(text: str, expected: str) -> None:
    assert one_line(ValueError(text)) == expected
