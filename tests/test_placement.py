"""Where a batch's tensors go under `--device cuda` / `check_model(device=...)`: everything to
the device, but a model that hands its lengths to pack_padded_sequence (which takes them only
on the CPU, as a training loop keeps them) gets them where they were, with a note."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

import rnndiag
from rnndiag import modelcheck
from rnndiag.cli import main
from rnndiag.errors import BatchError
from rnndiag.modelcheck import CPU_LENGTHS, KEPT_ON_CPU, ModelInputs, diagnose_placed
from rnndiag.records import CheckOptions
from tests.test_pergrad import Packed, _labels, _tokens

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")
REFUSAL = (f"the model rejected the batch: RuntimeError: {CPU_LENGTHS}, but got 1D meta "
           "Long tensor")


def _inputs() -> ModelInputs:
    return ModelInputs((torch.randn(3, 4, 2), torch.tensor([4, 2, 3])),
                       {"ids": torch.tensor([1, 0, 2]), "mask": torch.ones(3, 4, dtype=torch.bool)},
                       torch.tensor([0, 1, 1]))


def _fake(seen: list[ModelInputs], refuse: str | None) -> Any:
    """A diagnose_live that records its inputs and refuses a batch whose 1-D integer inputs
    were moved, as pack_padded_sequence does."""
    def live(model: Any, inputs: ModelInputs, *rest: Any) -> modelcheck.LiveDiagnosis:
        seen.append(inputs)
        if refuse is not None and inputs.args[1].device == META:
            raise BatchError(refuse)
        return modelcheck.LiveDiagnosis((), None, "cross_entropy", 3,  # type: ignore[arg-type]
                                        ("measured",))
    return live


def test_a_refused_length_stays_where_it_was_and_the_report_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ModelInputs] = []
    monkeypatch.setattr(modelcheck, "diagnose_live", _fake(seen, REFUSAL))
    live = diagnose_placed(None, _inputs(), META, None, None,  # type: ignore[arg-type]
                           CheckOptions())
    assert live.notes == ("measured", KEPT_ON_CPU)
    first, second = seen
    assert all(x.device == META for x in (*first.args, *first.kwargs.values(), first.targets))
    # the retry: every 1-D integer input where it was, the rest (targets too) moved
    assert second.args[0].device == META and second.args[1].device.type == "cpu"
    assert second.kwargs["ids"].device.type == "cpu"
    assert second.kwargs["mask"].device == META  # a bool mask is not a length
    assert second.targets is not None and second.targets.device == META


@pytest.mark.parametrize("message", ["the model rejected the batch: RuntimeError: "
                                     "Expected all tensors to be on the same device",
                                     REFUSAL])
def test_other_refusals_and_batches_without_integer_inputs_are_not_retried(
        message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ModelInputs] = []
    monkeypatch.setattr(modelcheck, "diagnose_live", _fake(seen, message))
    inputs = _inputs()
    if message == REFUSAL:  # the refusal names lengths, but nothing here could be one
        inputs = ModelInputs((inputs.args[0], inputs.args[1].float()), {}, inputs.targets)
        monkeypatch.setattr(modelcheck, "diagnose_live", _fake(seen, message))
    with pytest.raises(BatchError, match="rejected the batch"):
        diagnose_placed(None, inputs, META, None, None, CheckOptions())  # type: ignore[arg-type]
    assert len(seen) == 1


def test_without_a_device_nothing_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ModelInputs] = []
    monkeypatch.setattr(modelcheck, "diagnose_live", _fake(seen, None))
    inputs = _inputs()
    diagnose_placed(None, inputs, None, None, None, CheckOptions())  # type: ignore[arg-type]
    assert seen == [inputs]


def _packed_batch() -> tuple[Packed, Tensor, Tensor, Tensor]:
    torch.manual_seed(3)
    lengths = torch.tensor([7, 3, 5, 7, 2])
    y = _labels(padded=False)
    y[torch.arange(y.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
    return Packed(), _tokens(), lengths, y


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_packed_model_runs_on_cuda_from_the_api_and_the_cli(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokens, lengths, y = _packed_batch()
    on_cpu = rnndiag.check_model(model, (tokens, lengths), y, dtype="float64")
    on_gpu = rnndiag.check_model(model, (tokens, lengths), y, dtype="float64", device="cuda")
    assert KEPT_ON_CPU in on_gpu.files[0].notes and KEPT_ON_CPU not in on_cpu.files[0].notes
    assert on_gpu.verdict == on_cpu.verdict
    ours, theirs = on_gpu.files[0].modules[0].layers[0], on_cpu.files[0].modules[0].layers[0]
    assert ours.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-9)

    ckpt, batch = tmp_path / "packed.safetensors", tmp_path / "batch.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    save_file({"inputs.0": tokens, "inputs.1": lengths, "targets": y}, batch)
    monkeypatch.chdir(ROOT)
    code = main(["check", str(ckpt), "--batch", str(batch), "--model", "tests.test_pergrad:Packed",
                 "--device", "cuda", "--dtype", "float64", "--format", "json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == on_cpu.exit_code, doc
    assert KEPT_ON_CPU in doc["files"][0]["notes"]
