"""Optimizer kind and learning rate read from real training checkpoints (rnndiag.training)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from rnndiag.training import training_state

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.002),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.003),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.004),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.006),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=0.7),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.008),
}


def _stepped(name: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.LSTM(3, 4)
    opt = OPTIMIZERS[name](list(model.parameters()))
    out, _ = model(torch.randn(5, 2, 3))
    out.sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_kind_and_lr_from_a_torch_training_checkpoint(name: str, tmp_path: Path) -> None:
    model, opt = _stepped(name)
    path = tmp_path / "ckpt.pt"
    torch.save({"step": 10, "model_state": model.state_dict(),
                "optimizer_state": opt.state_dict()}, path)
    found = training_state(torch.load(path, weights_only=True))
    assert found is not None
    assert found.optimizer == name
    assert found.lr == pytest.approx(opt.param_groups[0]["lr"])


def test_lightning_layout_and_scheduler_lr(tmp_path: Path) -> None:
    model, opt = _stepped("sgd")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.step()  # the saved group holds the current lr: 0.025
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 1, "global_step": 7, "state_dict": model.state_dict(),
                "optimizer_states": [opt.state_dict()],
                "lr_schedulers": [sched.state_dict()]}, path)
    found = training_state(torch.load(path, weights_only=True))
    assert found is not None and found.optimizer == "sgd"
    assert found.lr == pytest.approx(0.025)


def test_no_optimizer_state() -> None:
    assert training_state({"rnn.weight_hh_l0": torch.zeros(4, 4)}) is None
    assert training_state({"state": {}, "param_groups": [{"weird": 1}]}) is not None


def test_the_clip_uses_the_checkpoints_optimizer(tmp_path: Path) -> None:
    """check on a training checkpoint: the step cap from its SGD learning rate, and the
    sources say so; --lr on the command line wins."""
    import json

    from rnndiag.cli import main

    model, opt = _stepped("sgd")
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state": {f"rnn.{k}": v for k, v in model.state_dict().items()},
                "optimizer_state": opt.state_dict(), "epoch": 3}, path)
    out = tmp_path / "r.json"
    assert main(["check", str(path), "--seq-len", "10", "--format", "json",
                 "--output", str(out)]) in (0, 1)
    clip = json.loads(out.read_text())["files"][0]["clip"]
    sources = {i["name"]: (i["value"], i["source"]) for i in clip["inputs"]}
    assert sources["optimizer"] == ("sgd", "checkpoint") and sources["lr"] == (0.05, "checkpoint")
    norm = sources["param_norm"][0]
    assert clip["decided_by"] == "step_cap"
    steps = sources["steps"][0] if "steps" in sources else 1  # an exploding verdict: / T
    assert clip["suggested_max_norm"] == pytest.approx(0.005 * norm / 0.05 / steps)
    assert main(["check", str(path), "--seq-len", "10", "--format", "json", "--lr", "0.5",
                 "--output", str(out)]) in (0, 1)
    clip = json.loads(out.read_text())["files"][0]["clip"]
    assert {i["name"]: i["source"] for i in clip["inputs"]}["lr"] == "option"


def test_an_ema_copy_is_named_and_selectable(tmp_path: Path) -> None:
    """The trained weights are used by default; the EMA copy beside them is said to exist and
    is chosen with --state-key."""
    from rnndiag.checkpoint import load_checkpoint

    model, _ = _stepped("sgd")
    ema = {k: v * 0.5 for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "ema_state_dict": ema}, path)
    ckpt = load_checkpoint(path)
    assert torch.equal(ckpt.tensors["weight_hh_l0"], model.weight_hh_l0.detach())
    assert any("'ema_state_dict'" in n and "--state-key" in n for n in ckpt.notes)
    chosen = load_checkpoint(path, state_key="ema_state_dict")
    assert torch.equal(chosen.tensors["weight_hh_l0"], ema["weight_hh_l0"])
