"""Long sequences run to a report (issue 15, item 7): no segmentation fault.

The reported crashes (exit 139, no message) were an LSTM batch of T = 20,000, a GRU at
`--seq-len 15000` and a stride-0 RNN batch of T = 100,000, blamed on a deep recursive free of
the autograd graph. The step replay's graph is T steps deep; each case runs here in a fresh
process with its C stack cut to 1 MiB (an eighth of Linux's default), so that a recursion
over the graph's depth would crash it, and must end with exit 0 or 1 and one JSON document.
(On this project's machine none of the three crashed with the default or the small stack
before or after the speed work; the tests guard against a regression.)
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

STACK = 2**20  # bytes


def _small_stack() -> None:
    resource.setrlimit(resource.RLIMIT_STACK, (STACK, STACK))


def _check(tmp_path: Path, module: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    """`check` in a fresh process with a small stack; a stride-0 tensor goes to a .pt batch
    (safetensors stores contiguous tensors only)."""
    ckpt = tmp_path / "m.safetensors"
    save_file({f"rnn.{k}": v.contiguous() for k, v in module.state_dict().items()}, ckpt)
    if all(t.is_contiguous() for t in batch.values()):
        data = tmp_path / "b.safetensors"
        save_file(batch, data)
    else:
        data = tmp_path / "b.pt"
        torch.save(batch, data)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-m", "rnndiag", "check", str(ckpt), "--batch",
                           str(data), "--format", "json"], capture_output=True, text=True,
                          preexec_fn=_small_stack, env=env, timeout=600, check=False)
    assert done.returncode in (0, 1), (done.returncode, done.stderr[-2000:])
    report = json.loads(done.stdout)
    [found] = report["files"]
    assert found["status"] == "ok", found


@pytest.mark.slow
def test_lstm_of_twenty_thousand_steps_with_lengths(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _check(tmp_path, nn.LSTM(4, 8, batch_first=True),
           {"inputs": torch.randn(2, 20_000, 4), "lengths": torch.tensor([20_000, 15_000])})


@pytest.mark.slow
def test_bidirectional_gru_of_fifteen_thousand_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _check(tmp_path, nn.GRU(4, 6, bidirectional=True, batch_first=True),
           {"inputs": torch.randn(2, 15_000, 4)})


@pytest.mark.slow
def test_rnn_of_a_hundred_thousand_steps_from_a_stride_zero_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _check(tmp_path, nn.RNN(4, 8, batch_first=True),
           {"inputs": torch.zeros(1, 1, 4).expand(2, 100_000, 4)})


MODEL_SCRIPT = """
import torch
from torch import nn
from rnndiag import check_model

class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 6, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])

torch.manual_seed(0)
found = check_model(Tagger(), torch.randn(2, 15_000, 4), torch.randint(0, 3, (2, 15_000)))
print(found.files[0].status.value)
"""


@pytest.mark.slow
def test_model_mode_bidirectional_gru_of_fifteen_thousand_steps() -> None:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-c", MODEL_SCRIPT], capture_output=True, text=True,
                          preexec_fn=_small_stack, env=env, timeout=600, check=False)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["ok"]
