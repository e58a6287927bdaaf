"""rnndiag.checkpoint: reading safetensors and torch files safely, unwrapping training containers
and wrapper prefixes, refusing pickles that would run code, and failing with one clear line.

Every file is written to `tmp_path` by the test that reads it; nothing binary is committed.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_bytes
from safetensors.torch import save_file
from torch import nn

from rnndiag.checkpoint import (
    Checkpoint,
    is_lfs_pointer,
    load_checkpoint,
    read_tensors,
    sniff_format,
)
from rnndiag.errors import CheckpointError, RnnDiagError

# --------------------------------------------------------------------------------------------
# helpers


def _state_dict() -> dict[str, torch.Tensor]:
    """A small, realistic state dict: an LSTM under `encoder.rnn.` and a Linear head."""
    torch.manual_seed(0)
    sd = {f"encoder.rnn.{k}": v for k, v in nn.LSTM(3, 5, num_layers=2).state_dict().items()}
    sd |= {f"head.{k}": v for k, v in nn.Linear(5, 2).state_dict().items()}
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def _save(obj: Any, path: Path, fmt: str) -> Path:
    """Write `obj` as safetensors ("safetensors"), torch zip ("torch") or legacy torch."""
    if fmt == "safetensors":
        save_file(obj, str(path))
    elif fmt == "torch":
        torch.save(obj, path)
    elif fmt == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:  # pragma: no cover
        raise AssertionError(fmt)
    return path


def _suffix(fmt: str) -> str:
    return ".safetensors" if fmt == "safetensors" else ".pt"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert got[key].shape == tensor.shape, key
        assert torch.equal(got[key], tensor), key


def _error(path: Path) -> str:
    """The CheckpointError message for `path`, checked to be one line that names the path."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert isinstance(info.value, RnnDiagError)
    return message


# --------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    sd = _state_dict()
    metadata = {"rnndiag.nonlinearity": "relu", "rnndiag.nonlinearity.encoder.rnn": "tanh",
                "format": "pt", "note": "spaces and = signs, unicode: σ"}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path), metadata=metadata)

    ckpt = load_checkpoint(path)

    assert isinstance(ckpt, Checkpoint)
    assert ckpt.path == str(path)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == metadata
    assert ckpt.notes == ()
    _assert_same_tensors(ckpt.tensors, sd)


def test_safetensors_without_metadata_gives_an_empty_mapping(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file(_state_dict(), str(path))
    assert load_checkpoint(path).metadata == {}


def test_torch_files_have_no_metadata(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(_state_dict(), path)
    ckpt = load_checkpoint(path)
    assert (ckpt.format, ckpt.metadata, ckpt.notes) == ("torch", {}, ())


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_half_precision_is_upcast_to_float32_with_a_note(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(1)
    sd = {
        "rnn.weight_ih_l0": torch.randn(4, 3).half(),
        "rnn.weight_hh_l0": torch.randn(4, 4).bfloat16(),
        "rnn.bias_ih_l0": torch.randn(4),
        "head.weight": torch.randn(2, 4, dtype=torch.float64),
        "steps": torch.arange(3),
    }
    path = _save(sd, tmp_path / f"half{_suffix(fmt)}", fmt)

    ckpt = load_checkpoint(path)

    for key in ("rnn.weight_ih_l0", "rnn.weight_hh_l0"):
        assert ckpt.tensors[key].dtype == torch.float32, key
        assert torch.equal(ckpt.tensors[key], sd[key].float()), key  # exact: upcasting is lossless
    assert ckpt.tensors["rnn.bias_ih_l0"].dtype == torch.float32
    assert ckpt.tensors["head.weight"].dtype == torch.float64  # only half precision is touched
    assert ckpt.tensors["steps"].dtype == torch.int64
    [note] = ckpt.notes
    assert note.startswith("upcast to float32")
    assert "rnn.weight_ih_l0 (float16)" in note
    assert "rnn.weight_hh_l0 (bfloat16)" in note
    for untouched in ("rnn.bias_ih_l0", "head.weight", "steps"):
        assert untouched not in note


def test_upcast_note_names_three_tensors_and_counts_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "half.safetensors"
    save_file({f"w{i}": torch.zeros(2, dtype=torch.float16) for i in range(5)}, str(path))
    [note] = load_checkpoint(path).notes
    assert note == "upcast to float32: w0 (float16), w1 (float16), w2 (float16) and 2 more"


def test_upcast_note_uses_the_unwrapped_names(tmp_path: Path) -> None:
    path = tmp_path / "half.pt"
    torch.save({"module.rnn.weight_hh_l0": torch.zeros(2, 2, dtype=torch.float16)}, path)
    [note] = load_checkpoint(path).notes
    assert note == "upcast to float32: rnn.weight_hh_l0 (float16)"


# --------------------------------------------------------------------------------------------
# torch files: containers, nesting


def _lightning(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "epoch": 7,
        "global_step": 1234,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 8, "completed": 7}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": None}},
        "optimizer_states": [{
            "state": {0: {"step": 1234.0, "exp_avg": [0.0, 1.0]}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1, 2]}],
        }],
        "lr_schedulers": [],
        "hyper_parameters": {"hidden": 5, "lr": 1e-3, "name": "enc", "layers": [1, 2],
                             "dropout": 0.0, "bidirectional": False, "extra": None},
    }


def _lightning_with_optimizer_tensors(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Real Lightning checkpoints hold optimizer *tensors*; they must not leak into the result."""
    out = _lightning(sd)
    out["optimizer_states"][0]["state"] = {0: {"step": torch.tensor(3.0),
                                               "exp_avg": torch.zeros(20, 3)}}
    return out


CONTAINERS: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
    "bare-state-dict": lambda sd: sd,
    "lightning-state_dict": _lightning,
    "lightning-with-optimizer-tensors": _lightning_with_optimizer_tensors,
    "model_state_dict": lambda sd: {"epoch": 3, "model_state_dict": sd, "loss": 0.25,
                                    "optimizer_state_dict": {"state": {}, "param_groups": []}},
    "model": lambda sd: {"model": sd, "args": {"hidden": 5, "tag": "x"}, "iteration": 10},
    "module": lambda sd: {"module": sd, "version": 2},
    "net": lambda sd: {"net": sd, "config": ["a", 1, 2.5, None, True]},
    "empty-state_dict-then-model": lambda sd: {"state_dict": {}, "model": sd},
}


@pytest.mark.parametrize("fmt", ["torch", "torch-legacy"])
@pytest.mark.parametrize("layout", list(CONTAINERS))
def test_torch_containers_are_unwrapped(tmp_path: Path, layout: str, fmt: str) -> None:
    sd = _state_dict()
    path = _save(CONTAINERS[layout](sd), tmp_path / "ckpt.pt", fmt)

    ckpt = load_checkpoint(path)

    assert ckpt.format == "torch"
    _assert_same_tensors(ckpt.tensors, sd)


def test_nested_dicts_are_flattened_to_dotted_names(tmp_path: Path) -> None:
    w_ih, w_hh, head = torch.randn(4, 3), torch.randn(4, 4), torch.randn(2, 4)
    obj = {
        "encoder": {"rnn": {"weight_ih_l0": w_ih, "weight_hh_l0": w_hh}, "hidden": 4},
        "head": {"weight": head, "activation": "relu"},
        "step": 5,
        "notes": ["not", "tensors"],
    }
    path = tmp_path / "nested.pt"
    torch.save(obj, path)

    got = load_checkpoint(path).tensors

    _assert_same_tensors(got, {"encoder.rnn.weight_ih_l0": w_ih,
                               "encoder.rnn.weight_hh_l0": w_hh,
                               "head.weight": head})


def test_nested_dicts_inside_a_container_are_flattened(tmp_path: Path) -> None:
    t = torch.randn(2, 2)
    path = tmp_path / "nested.ckpt"
    torch.save({"epoch": 1, "state_dict": {"enc": {"cell": {"weight_hh": t}}}}, path)
    _assert_same_tensors(load_checkpoint(path).tensors, {"enc.cell.weight_hh": t})


def test_integer_keys_of_nested_dicts_become_name_segments(tmp_path: Path) -> None:
    t = torch.randn(3)
    path = tmp_path / "seq.pt"
    torch.save({"layers": {0: {"bias": t}}}, path)
    _assert_same_tensors(load_checkpoint(path).tensors, {"layers.0.bias": t})


# --------------------------------------------------------------------------------------------
# wrapper prefixes: DataParallel `module.` and torch.compile `_orig_mod.`

RENAMES = {
    # key in the file -> key rnndiag reports
    "dataparallel": ("module.encoder.rnn.weight_ih_l0", "encoder.rnn.weight_ih_l0"),
    "dataparallel-twice": ("module.module.rnn.weight_hh_l0", "rnn.weight_hh_l0"),
    "compile-leading": ("_orig_mod.rnn.weight_ih_l0", "rnn.weight_ih_l0"),
    "compile-inner": ("encoder._orig_mod.rnn.weight_ih_l0", "encoder.rnn.weight_ih_l0"),
    "compile-twice": ("_orig_mod.enc._orig_mod.rnn.bias_hh_l0", "enc.rnn.bias_hh_l0"),
    "dataparallel-then-compile": ("module._orig_mod.rnn.weight_ih_l0", "rnn.weight_ih_l0"),
    "compile-then-dataparallel": ("_orig_mod.module.rnn.weight_ih_l0", "rnn.weight_ih_l0"),
    "substring-my_orig_mod": ("my_orig_mod.x", "my_orig_mod.x"),
    "substring-inner": ("enc.my_orig_mod.rnn.weight_ih_l0", "enc.my_orig_mod.rnn.weight_ih_l0"),
    "substring-_orig_mod_x": ("_orig_mod_x.weight", "_orig_mod_x.weight"),
    "substring-x_orig_mod": ("enc.x_orig_mod.weight", "enc.x_orig_mod.weight"),
    "module-not-leading": ("encoder.module.rnn.weight_ih_l0", "encoder.module.rnn.weight_ih_l0"),
    "modules-plural": ("modules.rnn.weight_ih_l0", "modules.rnn.weight_ih_l0"),
    "module_list": ("module_list.0.weight", "module_list.0.weight"),
    "plain": ("rnn.weight_ih_l0", "rnn.weight_ih_l0"),
}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("case", list(RENAMES))
def test_wrapper_prefixes_are_stripped(tmp_path: Path, case: str, fmt: str) -> None:
    stored, reported = RENAMES[case]
    t, other = torch.randn(4, 3), torch.randn(2)
    path = _save({stored: t, "zz.other": other}, tmp_path / f"w{_suffix(fmt)}", fmt)

    got = load_checkpoint(path).tensors

    _assert_same_tensors(got, {reported: t, "zz.other": other})


def test_read_tensors_unwraps_names_and_keeps_dtypes(tmp_path: Path) -> None:
    """`read_tensors` (batch files) removes wrapper prefixes but keeps the stored dtype; only
    `load_checkpoint` upcasts half precision."""
    t = torch.randn(2, dtype=torch.float16)
    path = tmp_path / "w.pt"
    torch.save({"module.enc._orig_mod.w": t}, path)
    fmt, tensors, metadata = read_tensors(path)
    assert (fmt, metadata) == ("torch", {})
    _assert_same_tensors(tensors, {"enc.w": t})


COLLISIONS = {
    "module-vs-bare": ("module.rnn.weight_ih_l0", "rnn.weight_ih_l0"),
    "orig_mod-vs-bare": ("_orig_mod.rnn.weight_ih_l0", "rnn.weight_ih_l0"),
    "inner-orig_mod-vs-bare": ("enc._orig_mod.rnn.w", "enc.rnn.w"),
    "module-vs-orig_mod": ("module.rnn.w", "_orig_mod.rnn.w"),
}


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("case", list(COLLISIONS))
def test_names_colliding_after_stripping_are_an_error(tmp_path: Path, case: str,
                                                      fmt: str) -> None:
    a, b = COLLISIONS[case]
    path = _save({a: torch.zeros(2), b: torch.ones(2)}, tmp_path / f"c{_suffix(fmt)}", fmt)
    message = _error(path)
    assert "collide" in message


# --------------------------------------------------------------------------------------------
# safety: nothing in a file is executed


def _touch(path: str) -> None:
    """A harmless stand-in for an attacker's callable: it leaves a marker file."""
    Path(path).write_text("executed")


class _CallsTouch:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_touch, (str(self.marker),))


class _CallsPathTouch:
    """The same attack through a standard-library global, which an allow-list might miss."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


PAYLOADS: dict[str, Callable[[Path], object]] = {
    "test-function": _CallsTouch,
    "pathlib.Path.touch": _CallsPathTouch,
}
PLACEMENTS: dict[str, Callable[[object], Any]] = {
    "top-level": lambda evil: {"rnn.weight_ih_l0": torch.zeros(4, 3), "x": evil},
    "inside-state_dict": lambda evil: {"state_dict": {"rnn.weight_ih_l0": torch.zeros(4, 3),
                                                      "rnn.evil": evil}},
    "lightning-hyper_parameters": lambda evil: {"state_dict": {"w": torch.zeros(2)},
                                                "hyper_parameters": {"cfg": [1, evil]}},
    "whole-object": lambda evil: evil,
}


@pytest.mark.parametrize("fmt", ["torch", "torch-legacy"])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_pickle_with_side_effect_is_refused_and_nothing_runs(
        tmp_path: Path, payload: str, placement: str, fmt: str) -> None:
    # Control: the payload is armed. An ordinary unpickle of the same construction runs it.
    armed = tmp_path / "armed-marker"
    control = _save(PLACEMENTS[placement](PAYLOADS[payload](armed)), tmp_path / "control.pt",
                    fmt)
    torch.load(control, weights_only=False)
    assert armed.exists()

    marker = tmp_path / "marker"
    path = _save(PLACEMENTS[placement](PAYLOADS[payload](marker)), tmp_path / "evil.pt", fmt)
    digest = _sha256(path)

    message = _error(path)

    assert "refused" in message
    assert not marker.exists()
    assert _sha256(path) == digest


def test_refusal_names_the_unsafe_global(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _CallsTouch(tmp_path / "marker")}, path)
    message = _error(path)
    assert "unsafe globals" in message and "_touch" in message
    assert not (tmp_path / "marker").exists()


class _Spy:
    """Stands in for torch.load and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.real = torch.load

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self.real(*args, **kwargs)


@pytest.fixture
def load_spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    spy = _Spy()
    monkeypatch.setattr(torch, "load", spy)
    return spy


def test_torch_load_gets_weights_only_true_explicitly(tmp_path: Path, load_spy: _Spy) -> None:
    path = tmp_path / "m.pt"
    torch.save(_state_dict(), path)
    load_checkpoint(path)
    [(_, kwargs)] = load_spy.calls
    assert "weights_only" in kwargs, "weights_only must be passed, not left to torch's default"
    assert kwargs["weights_only"] is True
    assert kwargs.get("map_location") == "cpu"


def test_refused_pickle_is_not_retried_without_weights_only(tmp_path: Path,
                                                            load_spy: _Spy) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"x": _CallsTouch(marker)}, path)
    _error(path)
    assert len(load_spy.calls) == 1
    assert all(kwargs.get("weights_only") is True for _, kwargs in load_spy.calls)
    assert not marker.exists()


def test_safetensors_never_goes_through_torch_load(tmp_path: Path, load_spy: _Spy) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_state_dict(), str(path))
    load_checkpoint(path)
    assert load_spy.calls == []


def test_torch_before_2_6_refuses_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          load_spy: _Spy) -> None:
    path = tmp_path / "m.pt"
    torch.save(_state_dict(), path)
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    message = _error(path)
    assert "CVE-2025-32434" in message
    assert load_spy.calls == []


def test_torchscript_archive_is_refused(tmp_path: Path, load_spy: _Spy) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    message = _error(path)
    assert "TorchScript" in message
    assert load_spy.calls == []


# --------------------------------------------------------------------------------------------
# unusable files: one line, naming the path

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
               b"size 12345\n")


def _safetensors_bytes() -> bytes:
    return save_bytes({"rnn.weight_ih_l0": torch.randn(4, 3),
                       "rnn.weight_hh_l0": torch.randn(4, 4)})


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_of_text() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    return buf.getvalue()


def _truncated_header() -> bytes:
    data = _safetensors_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[: 8 + n // 2]


RANDOM = random.Random(20240601).randbytes(4096)
BROKEN: dict[str, tuple[str, Callable[[], bytes] | None, str]] = {
    # id: (file name, content or None for "do not create", expected fragment)
    "missing": ("absent.safetensors", None, "no such file"),
    "empty-pt": ("empty.pt", lambda: b"", "cannot read torch checkpoint"),
    "empty-safetensors": ("empty.safetensors", lambda: b"", "shorter than 8 bytes"),
    "empty-unknown-suffix": ("empty.dat", lambda: b"", "unsupported format (an empty file"),
    "random-bytes-pt": ("random.pt", lambda: RANDOM, ""),
    "random-bytes-safetensors": ("random.safetensors", lambda: RANDOM, ""),
    "random-bytes-unknown-suffix": ("random.dat", lambda: RANDOM, ""),
    "random-bytes-pickle-magic": ("random.bin", lambda: b"\x80\x02" + RANDOM, ""),
    "random-bytes-zip-magic": ("random.pt", lambda: b"PK\x03\x04" + RANDOM, ""),
    "text-file-pt": ("notes.pt", lambda: b"hello, this is not a checkpoint\n" * 4, ""),
    "zip-of-text": ("archive.pt", _zip_of_text, "unsupported format (a zip archive"),
    "truncated-safetensors-data": ("t.safetensors", lambda: _safetensors_bytes()[:-10],
                                   "truncated"),
    "truncated-safetensors-header": ("t.safetensors", _truncated_header,
                                     "header length that fits"),
    "truncated-safetensors-length": ("t.safetensors", lambda: _safetensors_bytes()[:5],
                                     "shorter than 8 bytes"),
    "truncated-torch-zip": ("t.pt", lambda: _torch_bytes(_state_dict())[:300], ""),
    "torch-single-tensor": ("t.pt", lambda: _torch_bytes(torch.zeros(3, 3)), "single tensor"),
    "torch-list-of-tensors": ("l.pt", lambda: _torch_bytes([torch.zeros(3)]), "holds a list"),
    "torch-tuple": ("l.pt", lambda: _torch_bytes((torch.zeros(3),)), "holds a tuple"),
    "torch-int": ("i.pt", lambda: _torch_bytes(3), "holds a int"),
    "torch-dict-without-tensors": ("d.pt", lambda: _torch_bytes({"epoch": 3, "lr": 0.1}),
                                   "no tensors found (top-level keys: epoch, lr)"),
    "torch-empty-dict": ("d.pt", lambda: _torch_bytes({}), "no tensors found"),
    "git-lfs-pointer-pt": ("model.pt", lambda: LFS_POINTER, ""),
    "git-lfs-pointer-safetensors": ("model.safetensors", lambda: LFS_POINTER, ""),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_unusable_files_raise_checkpoint_error_naming_the_path(tmp_path: Path,
                                                               case: str) -> None:
    name, content, fragment = BROKEN[case]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content())
        digest = _sha256(path)
    message = _error(path)
    assert fragment in message
    if content is not None:
        assert _sha256(path) == digest


def test_directory_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    assert "is a directory" in _error(folder)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_error_message_names_a_path_with_spaces_and_unicode(tmp_path: Path, fmt: str) -> None:
    folder = tmp_path / "my runs" / "σ-model"
    folder.mkdir(parents=True)
    path = folder / f"broken file{_suffix(fmt)}"
    path.write_bytes(b"\x00" * 3)
    _error(path)


# --------------------------------------------------------------------------------------------
# Git LFS pointers and format sniffing


def test_git_lfs_pointer_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(LFS_POINTER)
    assert is_lfs_pointer(path) is True


@pytest.mark.parametrize("case", ["safetensors", "torch", "empty", "mention-not-at-start",
                                  "magic-prefix-only"])
def test_other_files_are_not_lfs_pointers(tmp_path: Path, case: str) -> None:
    path = tmp_path / "f.bin"
    content = {
        "safetensors": _safetensors_bytes,
        "torch": lambda: _torch_bytes(_state_dict()),
        "empty": lambda: b"",
        "mention-not-at-start": lambda: b"# " + LFS_POINTER,
        "magic-prefix-only": lambda: LFS_POINTER[:20],
    }[case]()
    path.write_bytes(content)
    assert is_lfs_pointer(path) is False


@pytest.mark.parametrize(("fmt", "suffix", "expected"), [
    pytest.param("safetensors", ".safetensors", "safetensors", id="safetensors"),
    pytest.param("safetensors", ".pt", "safetensors", id="safetensors-named-pt"),
    pytest.param("safetensors", "", "safetensors", id="safetensors-no-suffix"),
    pytest.param("torch", ".pt", "torch", id="torch-zip"),
    pytest.param("torch", ".safetensors", "torch", id="torch-named-safetensors"),
    pytest.param("torch-legacy", ".ckpt", "torch", id="torch-legacy"),
    pytest.param("torch-legacy", "", "torch", id="torch-legacy-no-suffix"),
])
def test_format_is_sniffed_from_content_not_name(tmp_path: Path, fmt: str, suffix: str,
                                                 expected: str) -> None:
    sd = _state_dict()
    path = _save(sd, tmp_path / f"model{suffix}", fmt)
    assert sniff_format(path) == expected
    ckpt = load_checkpoint(path)
    assert ckpt.format == expected
    _assert_same_tensors(ckpt.tensors, sd)


# --------------------------------------------------------------------------------------------
# inputs are never modified


@pytest.mark.parametrize("fmt", ["safetensors", "torch", "torch-legacy"])
def test_input_file_is_byte_identical_after_loading_and_mutating(tmp_path: Path,
                                                                 fmt: str) -> None:
    sd = _state_dict()
    sd["half"] = torch.randn(3).half()
    path = _save(sd, tmp_path / f"m{_suffix(fmt)}", fmt)
    digest, mtime = _sha256(path), path.stat().st_mtime_ns

    ckpt = load_checkpoint(path)
    for tensor in ckpt.tensors.values():  # writing to what was read must not reach the file
        tensor.add_(1)
    del ckpt

    assert _sha256(path) == digest
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no side files either


# --------------------------------------------------------------------------------------------
# fuzzing: any bytes either load or raise CheckpointError

_FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZN", 60)), deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@_FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".safetensors", ".pt", ".dat"]))
def test_arbitrary_bytes_load_or_raise_checkpoint_error(tmp_path: Path, data: bytes,
                                                        suffix: str) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)


_VALID_ST = save_bytes({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
                        "b": torch.ones(2, dtype=torch.float16)}, metadata={"k": "v"})
_VALID_PT = _torch_bytes({"a": torch.arange(6.0).reshape(2, 3), "n": {"b": torch.ones(2)}})


@_FUZZ
@given(which=st.sampled_from(["safetensors", "torch"]),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       cut=st.none() | st.integers(0, 10_000))
def test_corrupted_checkpoints_load_or_raise_checkpoint_error(
        tmp_path: Path, which: str, edits: list[tuple[int, int]], cut: int | None) -> None:
    data = bytearray(_VALID_ST if which == "safetensors" else _VALID_PT)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    path = tmp_path / ("fuzz.safetensors" if which == "safetensors" else "fuzz.pt")
    path.write_bytes(bytes(data))
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
    else:
        assert all(isinstance(t, torch.Tensor) for t in ckpt.tensors.values())


def _zip_with_undecodable_name() -> bytes:
    """A zip whose member name has the UTF-8 flag set but is not UTF-8."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("archive/\u00e9", b"x")  # a non-ASCII name sets the UTF-8 flag
    return buf.getvalue().replace("\u00e9".encode(), b"\xff\xff")


def test_zip_with_undecodable_member_name_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(_zip_with_undecodable_name())
    _error(path)

