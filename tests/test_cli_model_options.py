"""`check --model` end to end with the options real training code needs: --output-key,
--time-axis, --ignore-index, and a time-major model (batch size from the recurrent states)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rnndiag.cli import main

MODELS = textwrap.dedent('''
    import torch
    from torch import nn


    class DictTagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 6, batch_first=True)
            self.head = nn.Linear(6, 4)

        def forward(self, x):
            out, _ = self.rnn(x)
            return {"hidden": out, "logits": self.head(out)}


    class TimeMajorLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 5)
            self.rnn = nn.LSTM(5, 5)
            self.decoder = nn.Linear(5, 10)

        def forward(self, tokens):  # (T, B) -> (T, B, V)
            out, _ = self.rnn(self.embed(tokens))
            return self.decoder(out)


    def square_loss(output, targets):
        return (output["logits"] ** 2).mean()
''')


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "optmodels.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _save(model_name: str, where: Path) -> Path:
    import importlib

    module = importlib.import_module("optmodels")
    torch.manual_seed(0)
    model = getattr(module, model_name)()
    path = where / f"{model_name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _check(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dict_output_needs_a_choice(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _save("DictTagger", models)
    batch = models / "b.safetensors"
    targets = torch.randint(0, 4, (4, 9))
    targets[:, 6:] = -100
    save_file({"inputs": torch.randn(4, 9, 3), "targets": targets}, batch)
    base = [str(ckpt), "--model", "optmodels:DictTagger", "--batch", str(batch)]
    code, _, err = _check(base, capsys)
    assert code == 2 and "--output-key" in err and err.count("\n") == 1
    code, out, err = _check([*base, "--output-key", "logits", "--format", "json"], capsys)
    assert code in (0, 1), err
    doc = json.loads(out)
    [f] = doc["files"]
    assert f["loss"] == "cross_entropy on output[logits]"
    [layer] = f["modules"][0]["layers"]
    assert layer["basis"] == "credit" and layer["final_step"] == 5  # last scored position
    assert all(r is None for r in layer["ratio"][6:])  # steps after every scored position
    assert doc["options"]["output_key"] == "logits" and doc["options"]["ignore_index"] == -100
    code, out, err = _check([*base, "--loss", "optmodels:square_loss"], capsys)
    assert code in (0, 1), err
    # the same batch without padding labels, scored with --ignore-index 3 instead
    save_file({"inputs": torch.randn(4, 9, 3), "targets": torch.full((4, 9), 3)}, batch)
    code, _, err = _check([*base, "--output-key", "logits", "--ignore-index", "3"], capsys)
    assert code == 2 and "nothing is scored" in err


def test_time_major_model_reports_its_batch(models: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _save("TimeMajorLM", models)
    batch = models / "b.safetensors"
    save_file({"inputs": torch.randint(0, 10, (12, 3)),
               "targets": torch.randint(0, 10, (12, 3))}, batch)
    code, out, err = _check([str(ckpt), "--model", "optmodels:TimeMajorLM", "--batch",
                             str(batch), "--format", "json"], capsys)
    assert code in (0, 1), err
    [f] = json.loads(out)["files"]
    assert f["batch"]["batch_size"] == 3 and f["batch"]["seq_len"] == 12
    assert f["clip"]["examples"] == 3  # per-example gradients: cut along B, not along time
    assert f["modules"][0]["layers"][0]["basis"] == "credit"


def test_equal_batch_and_length(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _save("TimeMajorLM", models)
    batch = models / "b.safetensors"
    save_file({"inputs": torch.randint(0, 10, (4, 4)),
               "targets": torch.randint(0, 10, (4, 4))}, batch)
    base = [str(ckpt), "--model", "optmodels:TimeMajorLM", "--batch", str(batch)]
    code, _, err = _check(base, capsys)
    assert code == 2 and "--time-axis" in err
    code, out, err = _check([*base, "--time-axis", "0", "--format", "json"], capsys)
    assert code in (0, 1), err
    assert json.loads(out)["files"][0]["modules"][0]["layers"][0]["basis"] == "credit"


def test_pt_batch_with_a_tuple_of_inputs(models: Path, capsys: pytest.CaptureFixture[str],
                                         ) -> None:
    """torch.save({"inputs": (x, lengths), "targets": y}): the tuple is positional arguments."""
    (models / "twoin.py").write_text(textwrap.dedent('''
        from torch import nn
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


        class Packed(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.GRU(3, 4, batch_first=True)

            def forward(self, x, lengths):
                packed = pack_padded_sequence(x, lengths, batch_first=True,
                                              enforce_sorted=False)
                out, _ = self.rnn(packed)
                return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]
    '''))
    import importlib

    model = importlib.import_module("twoin").Packed()
    ckpt, batch = models / "p.safetensors", models / "b.pt"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    lengths = torch.tensor([6, 2, 4])
    torch.save({"inputs": (torch.randn(3, 6, 3), lengths), "targets": torch.randn(3, 6, 4)},
               batch)
    code, out, err = _check([str(ckpt), "--model", "twoin:Packed", "--batch", str(batch),
                             "--format", "json"], capsys)
    assert code in (0, 1), err
    [layer] = json.loads(out)["files"][0]["modules"][0]["layers"]
    # MSE scores the zero padding too, but a padded position is no example's: each example's
    # last reference is its own last step, never a step it does not have
    assert layer["basis"] == "credit" and layer["final_step"] == 5
    assert layer["grad_norm"][5] > 0 and layer["skipped_references"] == 0
