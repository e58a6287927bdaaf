"""Checkpoint keys in `check --model`: wrapper prefixes on the model's side, tied weights,
training containers and optimizer states, `--state-key`.

Every checkpoint is written by the test from a real model; the model `--model` builds starts
from other random weights, so a run whose loss equals the saved model's loss on the batch has
loaded exactly the checkpoint's values.

torch.compile wraps lazily: building a compiled model compiles nothing. The models the CLI
runs use `backend="eager"`, so that nothing could reach the inductor's C++ compiler even if
rnndiag stopped running compiled forwards eagerly; the wrapper, and so the state-dict keys,
are those of the default backend.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model
from torch import Tensor, nn
from typer.testing import CliRunner

from rnndiag import inspect_files
from rnndiag.checkpoint import load_checkpoint
from rnndiag.cli import app
from rnndiag.errors import ArchitectureError, CheckpointError
from rnndiag.files import strip_wrappers
from rnndiag.statedict import load_strict
from tests.conftest import ROOT

V, H = 13, 6  # vocabulary, hidden size (= embedding size: the decoder reuses the embedding)
B, T = 3, 5
runner = CliRunner()


def _compiled(module: nn.Module, backend: str = "inductor") -> nn.Module:
    """`torch.compile(module)`: an OptimizedModule, whose parameters are `_orig_mod.*`."""
    return cast(nn.Module, torch.compile(module, backend=backend))


class TiedLM(nn.Module):
    """An LSTM language model whose decoder weight is its embedding weight."""

    def __init__(self, compile_rnn: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(V, H)
        rnn = nn.LSTM(H, H, batch_first=True)
        self.rnn = _compiled(rnn, backend="eager") if compile_rnn else rnn
        self.decoder = nn.Linear(H, V)
        self.decoder.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embedding(tokens))
        return cast(Tensor, self.decoder(out))  # (B, T, V)


class LitLM(nn.Module):
    """A LightningModule's layout: the network under `self.model` (keys `model.*`)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TiedLM()

    def forward(self, tokens: Tensor) -> Tensor:
        return cast(Tensor, self.model(tokens))


# --model targets (importable as tests.test_keys:<name> from the repository root)
def tied_lm() -> nn.Module:
    return TiedLM()


def compiled_lm() -> nn.Module:
    return _compiled(TiedLM(), backend="eager")


def inner_compiled_lm() -> nn.Module:
    return TiedLM(compile_rnn=True)


def data_parallel_lm() -> nn.Module:
    return nn.DataParallel(TiedLM())  # on a CPU-only machine it calls the model directly


# --------------------------------------------------------------------------------------------
# helpers


def _trained(seed: int = 0) -> TiedLM:
    torch.manual_seed(seed)
    model = TiedLM()
    with torch.no_grad():  # away from the default init, so a missed load cannot look right
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _values(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict under unwrapped names."""
    return {strip_wrappers(k): v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_values(got: nn.Module, want: nn.Module) -> None:
    a, b = _values(got), _values(want)
    assert sorted(a) == sorted(b)
    for key in b:
        assert torch.equal(a[key], b[key]), key


def _batch(tmp_path: Path) -> tuple[Path, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    path = tmp_path / "batch.safetensors"
    save_file({"inputs": tokens, "targets": targets}, str(path))
    return path, tokens, targets


def _loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(tokens).reshape(-1, V), targets.reshape(-1)))


def _check(args: list[str]) -> tuple[int, dict[str, Any], str]:
    """`rnndiag check ... --format json` in-process: (exit code, the document, stderr)."""
    result = runner.invoke(app, ["check", *args, "--format", "json"])
    return result.exit_code, json.loads(result.stdout), result.stderr


def _check_model(ckpt: Path, factory: str, batch: Path, *extra: str,
                 ) -> tuple[int, dict[str, Any], str]:
    return _check([str(ckpt), "--model", f"tests.test_keys:{factory}", "--batch", str(batch),
                   *extra])


def _assert_diagnosed(code: int, doc: dict[str, Any], err: str, loss: float,
                      names: list[str]) -> None:
    """Exit 0/1, the named recurrent modules found, and the saved model's loss on the batch."""
    [found] = doc["files"]
    assert code in (0, 1), f"{found.get('error')} {err}"
    assert found["status"] == "ok"
    # the lead may name modules with or without wrapper segments (`module.rnn`, `rnn`)
    assert [strip_wrappers(m["name"]) for m in found["modules"]] == names
    assert found["modules"][0]["objective"]["value"] == pytest.approx(loss, rel=1e-5)


def _one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


# --------------------------------------------------------------------------------------------
# tied weights: safetensors' save_model keeps one name of each shared tensor


def test_save_model_drops_one_tied_name(tmp_path: Path) -> None:
    """The premise: the file lacks one of the two tied names."""
    path = tmp_path / "lm.safetensors"
    save_model(_trained(), str(path))
    names = set(load_checkpoint(path).tensors)
    assert len({"embedding.weight", "decoder.weight"} & names) == 1


def test_tied_weights_load_from_the_one_name_kept(tmp_path: Path) -> None:
    saved = _trained()
    path = tmp_path / "lm.safetensors"
    save_model(saved, str(path))
    model = TiedLM()

    load_strict(model, load_checkpoint(path).tensors, str(path))

    _assert_same_values(model, saved)
    assert model.decoder.weight is model.embedding.weight  # still tied


@pytest.mark.parametrize("kept", ["embedding.weight", "decoder.weight"])
def test_either_tied_name_is_enough(tmp_path: Path, kept: str) -> None:
    saved = _trained()
    tensors = {k: v.clone() for k, v in saved.state_dict().items()
               if k not in {"embedding.weight", "decoder.weight"} - {kept}}
    model = TiedLM()
    load_strict(model, tensors, "lm.pt")
    _assert_same_values(model, saved)


def test_a_truly_missing_key_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "lm.safetensors"
    save_model(_trained(), str(path))
    tensors = dict(load_checkpoint(path).tensors)
    del tensors["decoder.bias"]
    with pytest.raises(ArchitectureError) as info:
        load_strict(TiedLM(), tensors, str(path))
    # the tied names are fine: only the key that is really absent is reported
    assert str(info.value) == (f"{path}: the state dict does not fit the model: missing keys: "
                               "decoder.bias")


def test_tied_names_both_absent_are_both_missing() -> None:
    tensors = {k: v for k, v in _trained().state_dict().items()
               if k not in ("embedding.weight", "decoder.weight")}
    with pytest.raises(ArchitectureError, match=r"missing keys: decoder.weight, "
                                                r"embedding.weight$"):
        load_strict(TiedLM(), tensors, "lm.pt")


def test_tied_weights_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    saved = _trained()
    ckpt = tmp_path / "lm.safetensors"
    save_model(saved, str(ckpt))
    batch, tokens, targets = _batch(tmp_path)
    code, doc, err = _check_model(ckpt, "tied_lm", batch)
    _assert_diagnosed(code, doc, err, _loss(saved, tokens, targets), ["rnn"])


# --------------------------------------------------------------------------------------------
# wrapper prefixes on the model's side: torch.compile, nn.DataParallel

MODELS: dict[str, Callable[[], nn.Module]] = {
    "bare": TiedLM,
    "compile": lambda: _compiled(TiedLM()),
    "compile-inner-lstm": lambda: TiedLM(compile_rnn=True),
    "dataparallel": lambda: nn.DataParallel(TiedLM()),
    "compile-of-dataparallel": lambda: _compiled(nn.DataParallel(TiedLM())),
}
PAIRS = [("bare", "compile"), ("bare", "compile-inner-lstm"), ("bare", "dataparallel"),
         ("bare", "compile-of-dataparallel"), ("compile", "bare"), ("dataparallel", "bare"),
         ("compile-inner-lstm", "dataparallel"), ("dataparallel", "compile-inner-lstm")]


def _wrapped_like(kind: str, saved: TiedLM) -> nn.Module:
    """A model built as `kind` that holds the values of `saved`."""
    model = MODELS[kind]()
    model.load_state_dict(dict(zip(model.state_dict(), saved.state_dict().values(),
                                   strict=True)))
    return model


@pytest.mark.parametrize("fmt", ["safetensors-save_model", "torch"])
@pytest.mark.parametrize(("saved_as", "loaded_as"), PAIRS, ids=[f"{a}-into-{b}" for a, b in PAIRS])
def test_wrapped_models_take_checkpoints_of_other_wrappings(
        tmp_path: Path, saved_as: str, loaded_as: str, fmt: str) -> None:
    saved = _trained()
    source = _wrapped_like(saved_as, saved)
    path = tmp_path / "m.ckpt"
    if fmt == "torch":
        torch.save(source.state_dict(), path)  # both tied names, under the wrapped names
    else:
        save_model(source, str(path))
    model = MODELS[loaded_as]()

    load_strict(model, load_checkpoint(path).tensors, str(path))

    _assert_same_values(model, saved)


def test_the_model_keeps_its_own_key_names() -> None:
    """Loaded under `_orig_mod.`/`module.` names: the wrapper's own state dict is unchanged."""
    saved = _trained()
    model = _compiled(nn.DataParallel(TiedLM()))
    load_strict(model, saved.state_dict(), "m.pt")
    assert "_orig_mod.module.rnn.weight_hh_l0" in model.state_dict()
    assert torch.equal(model.state_dict()["_orig_mod.module.rnn.weight_hh_l0"],
                       saved.state_dict()["rnn.weight_hh_l0"])


def test_model_keys_that_collide_once_unwrapped_are_an_error() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)  # "module.weight" -> "weight"
            self.weight = nn.Parameter(torch.zeros(2, 2))

    with pytest.raises(ArchitectureError, match="'weight' and 'module.weight' are the same name"):
        load_strict(Odd(), {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, "m.pt")


@pytest.mark.parametrize("factory", ["compiled_lm", "inner_compiled_lm", "data_parallel_lm"])
def test_wrapped_models_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   factory: str) -> None:
    monkeypatch.chdir(ROOT)
    saved = _trained()
    ckpt = tmp_path / "lm.safetensors"
    save_model(saved, str(ckpt))  # saved from the bare model, tied names deduplicated
    batch, tokens, targets = _batch(tmp_path)
    code, doc, err = _check_model(ckpt, factory, batch)
    _assert_diagnosed(code, doc, err, _loss(saved, tokens, targets), ["rnn"])


@pytest.mark.parametrize("factory", ["compiled_lm", "inner_compiled_lm"])
def test_compiled_models_diagnose_as_the_bare_model(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    factory: str) -> None:
    """Traced by TorchDynamo, the step-by-step replay would lose its steps (one step of
    zeros); `usermodel.capture` runs compiled forwards eagerly."""
    monkeypatch.chdir(ROOT)
    ckpt = tmp_path / "lm.safetensors"
    save_model(_trained(), str(ckpt))
    batch, _, _ = _batch(tmp_path)
    _, bare, _ = _check_model(ckpt, "tied_lm", batch)
    _, compiled, _ = _check_model(ckpt, factory, batch)
    want = bare["files"][0]["modules"][0]["layers"]
    got = compiled["files"][0]["modules"][0]["layers"]
    assert [d["grad_norm"] for d in got] == [d["grad_norm"] for d in want]


# --------------------------------------------------------------------------------------------
# training containers and optimizer states


def _adam_state(model: nn.Module) -> dict[str, Any]:
    """A real optimizer state dict after one step (exp_avg tensors shaped like the weights),
    taken on a copy: `model` keeps its values."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, V, (B, T))
    F.cross_entropy(model(tokens).reshape(-1, V), tokens.reshape(-1)).backward()
    opt.step()
    opt.zero_grad()
    return opt.state_dict()


def test_model_state_container_with_an_optimizer_state(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    saved = _trained()
    optimizer_state = _adam_state(saved)
    ckpt = tmp_path / "train.pt"
    torch.save({"model_state": saved.state_dict(), "optimizer_state": optimizer_state,
                "epoch": 3}, ckpt)

    loaded = load_checkpoint(ckpt)
    assert sorted(loaded.tensors) == sorted(saved.state_dict())  # no optimizer tensor
    model = TiedLM()
    load_strict(model, loaded.tensors, str(ckpt))
    _assert_same_values(model, saved)

    batch, tokens, targets = _batch(tmp_path)
    code, doc, err = _check_model(ckpt, "tied_lm", batch)
    _assert_diagnosed(code, doc, err, _loss(saved, tokens, targets), ["rnn"])


def test_optimizer_state_beside_plain_weights_is_left_out_with_a_note(tmp_path: Path) -> None:
    """No container key: every tensor is read, except the optimizer's."""
    saved = _trained()
    ckpt = tmp_path / "parts.pt"
    torch.save({"lm": saved.state_dict(), "opt": _adam_state(saved), "step": 100}, ckpt)

    loaded = load_checkpoint(ckpt)

    assert sorted(loaded.tensors) == sorted(f"lm.{k}" for k in saved.state_dict())
    assert "ignored optimizer state (not model weights): opt" in loaded.notes
    code, doc, err = _check([str(ckpt)])
    assert code in (0, 1), err
    assert [m["name"] for m in doc["files"][0]["modules"]] == ["lm.rnn"]


@pytest.mark.parametrize(("layout", "fragment"), [
    ("bare", "holds an optimizer's state dict (state, param_groups), not model weights"),
    ("container", "no tensors found (only optimizer state (optimizer_state); top-level keys: "
                  "optimizer_state, epoch)"),
], ids=["optimizer.state_dict()", "in-a-container"])
def test_a_file_holding_only_an_optimizer_state_is_not_diagnosed(
        tmp_path: Path, layout: str, fragment: str) -> None:
    state = _adam_state(_trained())
    ckpt = tmp_path / "opt.pt"
    torch.save(state if layout == "bare" else {"optimizer_state": state, "epoch": 3}, ckpt)
    code, doc, err = _check([str(ckpt)])
    _one_line_error(code, err, str(ckpt), fragment)
    assert doc["files"][0]["status"] == "error"


def test_two_candidate_containers_are_noted(tmp_path: Path) -> None:
    a, b = _trained(0), _trained(1)
    ckpt = tmp_path / "two.pt"
    torch.save({"model_state_dict": a.state_dict(), "model": b.state_dict()}, ckpt)
    loaded = load_checkpoint(ckpt)
    assert torch.equal(loaded.tensors["rnn.weight_hh_l0"], a.state_dict()["rnn.weight_hh_l0"])
    assert loaded.notes == ("weights from 'model_state_dict'; 'model' also holds tensors "
                            "(choose with --state-key)",)


# --------------------------------------------------------------------------------------------
# Lightning: {"state_dict": {"model.rnn.weight_ih_l0": ...}, ...}


def _lightning(tmp_path: Path, saved: TiedLM) -> Path:
    lit = LitLM()
    lit.model.load_state_dict(saved.state_dict())
    ckpt = tmp_path / "epoch=3-step=120.ckpt"
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "state_dict": lit.state_dict(), "optimizer_states": [_adam_state(lit)],
                "lr_schedulers": [], "hyper_parameters": {"hidden": H}}, ckpt)
    return ckpt


def test_lightning_checkpoint_into_the_lightning_module(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    saved = _trained()
    ckpt = _lightning(tmp_path, saved)
    batch, tokens, targets = _batch(tmp_path)
    code, doc, err = _check_model(ckpt, "LitLM", batch)
    _assert_diagnosed(code, doc, err, _loss(saved, tokens, targets), ["model.rnn"])


def test_lightning_checkpoint_into_the_bare_network_with_state_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    saved = _trained()
    ckpt = _lightning(tmp_path, saved)
    model = TiedLM()
    load_strict(model, load_checkpoint(ckpt, state_key="state_dict.model").tensors, str(ckpt))
    _assert_same_values(model, saved)

    batch, tokens, targets = _batch(tmp_path)
    code, doc, err = _check_model(ckpt, "tied_lm", batch, "--state-key", "state_dict.model")
    _assert_diagnosed(code, doc, err, _loss(saved, tokens, targets), ["rnn"])


def test_lightning_checkpoint_into_the_bare_network_says_to_use_state_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    ckpt = _lightning(tmp_path, _trained())
    batch, _, _ = _batch(tmp_path)
    code, _, err = _check_model(ckpt, "tied_lm", batch)
    _one_line_error(code, err, "missing keys: decoder.bias", "unexpected keys: model.",
                    "the file's keys are under 'model'", "--state-key",
                    "state_dict.model inside a Lightning checkpoint")


# --------------------------------------------------------------------------------------------
# --state-key: an entry of a torch container, a prefix of a safetensors file


def _with_ema(tmp_path: Path, fmt: str) -> tuple[Path, TiedLM, TiedLM]:
    """A file holding the trained weights and, separately, their moving average."""
    raw, ema = _trained(0), _trained(1)
    if fmt == "torch":
        path = tmp_path / "ema.pt"
        torch.save({"model": raw.state_dict(), "ema": {"model": ema.state_dict(), "updates": 40},
                    "optimizer": _adam_state(_trained(2)), "epoch": 3}, path)
    else:
        path = tmp_path / "ema.safetensors"
        tensors = {f"model.{k}": v for k, v in raw.state_dict().items() if k != "decoder.weight"}
        tensors |= {f"ema.model.{k}": v for k, v in ema.state_dict().items()
                    if k != "decoder.weight"}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path, raw, ema


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_state_key_selects_the_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     fmt: str) -> None:
    monkeypatch.chdir(ROOT)
    path, raw, ema = _with_ema(tmp_path, fmt)
    for key, want in (("model", raw), ("ema.model", ema)):
        model = TiedLM()
        load_strict(model, load_checkpoint(path, state_key=key).tensors, str(path))
        _assert_same_values(model, want)

    batch, tokens, targets = _batch(tmp_path)
    code, doc, err = _check_model(path, "tied_lm", batch, "--state-key", "ema.model")
    _assert_diagnosed(code, doc, err, _loss(ema, tokens, targets), ["rnn"])


def test_state_key_in_plain_check_and_inspect(tmp_path: Path) -> None:
    path, _, ema = _with_ema(tmp_path, "safetensors")
    code, doc, err = _check([str(path), "--state-key", "ema.model"])
    assert code in (0, 1), err
    assert [m["name"] for m in doc["files"][0]["modules"]] == ["rnn"]
    # without it, both copies are found, under their full names
    _, both, _ = _check([str(path)])
    assert sorted(m["name"] for m in both["files"][0]["modules"]) == ["ema.model.rnn",
                                                                       "model.rnn"]
    # inspect --state-key ema.model reports what inspecting a file of the EMA alone does
    alone = tmp_path / "ema-alone.safetensors"
    save_file({k: v for k, v in ema.state_dict().items() if k != "decoder.weight"}, str(alone))
    [got] = inspect_files([path], state_key="ema.model").files
    [want] = inspect_files([alone]).files
    assert got.modules == want.modules and got.modules[0].spec.name == "rnn"


def test_state_key_is_taken_before_container_detection(tmp_path: Path) -> None:
    """`model` is a container key: without --state-key it wins; --state-key ema overrides."""
    path, raw, ema = _with_ema(tmp_path, "torch")
    key = "rnn.weight_hh_l0"
    assert torch.equal(load_checkpoint(path).tensors[key], raw.state_dict()[key])
    got = load_checkpoint(path, state_key="ema").tensors
    assert torch.equal(got[f"model.{key}"], ema.state_dict()[key])
    assert "updates" not in got


def test_state_key_keeps_wrapper_stripping(tmp_path: Path) -> None:
    saved = _trained()
    path = tmp_path / "ddp.pt"
    torch.save({"ema": nn.DataParallel(saved).state_dict()}, path)
    got = load_checkpoint(path, state_key="ema").tensors
    assert torch.equal(got["rnn.weight_ih_l0"], saved.state_dict()["rnn.weight_ih_l0"])


STATE_KEY_ERRORS = [
    ("torch", "nope", "--state-key 'nope': no such entry (top-level keys: model, ema)"),
    ("torch", "ema.nope", "--state-key 'ema.nope': no such entry (keys under 'ema': model)"),
    ("torch", "optimizer", "--state-key 'optimizer' is an optimizer's state dict"),
    ("torch", "model.rnn.weight_hh_l0", "names a single tensor, not a state dict"),
    ("safetensors", "nope", "--state-key 'nope': no such entry (top-level keys: ema, model)"),
    ("safetensors", "ema.model.rnn.x", "no such entry (keys under 'ema.model.rnn': bias_"),
]


@pytest.mark.parametrize(("fmt", "key", "fragment"), STATE_KEY_ERRORS,
                         ids=[f"{fmt}-{key}" for fmt, key, _ in STATE_KEY_ERRORS])
def test_state_key_errors_are_one_line(tmp_path: Path, fmt: str, key: str,
                                       fragment: str) -> None:
    path, _, _ = _with_ema(tmp_path, fmt)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, state_key=key)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)
    code, doc, err = _check([str(path), "--state-key", key])
    _one_line_error(code, err, fragment)
    assert doc["files"][0]["status"] == "error"


def test_state_key_error_in_model_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    path, _, _ = _with_ema(tmp_path, "torch")
    batch, _, _ = _batch(tmp_path)
    code, _, err = _check_model(path, "tied_lm", batch, "--state-key", "emma")
    _one_line_error(code, err, str(path), "--state-key 'emma': no such entry")


def test_state_key_lists_at_most_eight_choices(tmp_path: Path) -> None:
    path = tmp_path / "many.safetensors"
    save_file({f"part{i}.w": torch.zeros(1) for i in range(12)}, str(path))
    with pytest.raises(CheckpointError, match=r"top-level keys: (part\d+, ){7}part\d+ "
                                              r"\(\+4 more\)\)$"):
        load_checkpoint(path, state_key="x")


# --------------------------------------------------------------------------------------------
# found by test_checkpoint's fuzzing while this work was tested (it belongs beside
# test_zip_with_undecodable_member_name_is_a_checkpoint_error)


def test_zip64_locator_naming_several_disks_is_a_checkpoint_error(tmp_path: Path) -> None:
    """`zipfile.is_zipfile` itself raises BadZipFile ('span multiple disks') on such a file."""
    path = tmp_path / "m.pt"
    torch.save(_trained().state_dict(), path)
    data = bytearray(path.read_bytes())
    locator = data.rindex(b"PK\x06\x07")  # the ZIP64 end-of-central-directory locator
    data[locator + 16:locator + 20] = (2).to_bytes(4, "little")  # total number of disks
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="cannot read torch checkpoint"):
        load_checkpoint(path)
