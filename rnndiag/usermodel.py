"""Diagnose the user's own nn.Module (`--model module:callable`) under its task loss.

While the model runs, every nn.RNN/LSTM/GRU submodule is replaced (on the instance, for this
call only) by the step-by-step replay of `rnndiag.replay.unroll` with the module's own
parameters, which returns what the fused module returns; every nn.RNNCell/LSTMCell/GRUCell
call is recorded by a forward hook as one time step. One backward pass of the loss,
`torch.autograd.grad`, then yields dL/dh_t (and dL/dc_t) of every recorded state without
touching any parameter's `.grad`. The model runs in eval mode (no dropout); forwards, hooks
and every module's train/eval flag are restored in `finally`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnndiag.errors import ArchitectureError, BatchError, OptionError, RnnDiagError
from rnndiag.records import Direction, ModuleKind, ModuleSpec
from rnndiag.replay import DirectionStates, Unrolled, unroll, zero_states

STACKED: dict[type[nn.Module], ModuleKind] = {nn.RNN: ModuleKind.RNN, nn.LSTM: ModuleKind.LSTM,
                                              nn.GRU: ModuleKind.GRU}
CELLS: dict[type[nn.Module], ModuleKind] = {nn.RNNCell: ModuleKind.RNN_CELL,
                                            nn.LSTMCell: ModuleKind.LSTM_CELL,
                                            nn.GRUCell: ModuleKind.GRU_CELL}


def load_callable(target: str, option: str = "--model") -> Callable[..., Any]:
    """Import `package.module:attr` with the current directory importable."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise OptionError(f"{option} {target!r}: expected package.module:callable")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's import may fail in any way
        raise OptionError(f"{option} {target}: cannot import {module_name!r} "
                          f"({type(exc).__name__}: {_line(exc)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"{option} {target}: {module_name!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise OptionError(f"{option} {target}: {type(obj).__name__} is not callable")
    return obj  # type: ignore[no-any-return]


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]


def build_model(target: str, kwargs_json: str | None) -> nn.Module:
    factory = load_callable(target)
    kwargs: Any = {}
    if kwargs_json:
        try:
            kwargs = json.loads(kwargs_json)
        except ValueError as exc:
            raise OptionError(f"--model-kwargs is not valid JSON ({_line(exc)})") from None
        if not isinstance(kwargs, dict):
            raise OptionError("--model-kwargs must be a JSON object of keyword arguments")
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise OptionError(f"--model {target}: calling it failed ({type(exc).__name__}: "
                          f"{_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise OptionError(f"--model {target}: returned {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


def load_strict(model: nn.Module, tensors: dict[str, Tensor], path: str) -> None:
    """load_state_dict(strict=True), with one line listing missing/unexpected/misshapen keys."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    misshapen = sorted(f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}"
                       for k, v in expected.items()
                       if k in tensors and tuple(tensors[k].shape) != tuple(v.shape))
    problems = [f"{label}: {_few(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("shape mismatch (file vs model)", misshapen)) if keys]
    if problems:
        raise ArchitectureError(f"{path}: the state dict does not fit the model: "
                                + "; ".join(problems))
    model.load_state_dict({k: t.to(expected[k].dtype) for k, t in tensors.items()}, strict=True)


def _few(keys: list[str], n: int = 5) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def spec_of(name: str, module: nn.Module) -> ModuleSpec:
    """The ModuleSpec of a live recurrent module, from its attributes."""
    kind = STACKED.get(type(module)) or CELLS[type(module)]
    m: Any = module
    return ModuleSpec(
        name=name, kind=kind, input_size=m.input_size, hidden_size=m.hidden_size,
        proj_size=getattr(m, "proj_size", 0), num_layers=getattr(m, "num_layers", 1),
        bidirectional=getattr(m, "bidirectional", False), bias=m.bias,
        nonlinearity=getattr(m, "nonlinearity", None) if kind.cell_type.gates == 1 else None)


def recurrent_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name or "<root>", m) for name, m in model.named_modules()
            if type(m) in STACKED or type(m) in CELLS]


@dataclass
class Record:
    """What one recurrent module did during the forward pass."""

    name: str
    spec: ModuleSpec
    calls: list[Unrolled] = field(default_factory=list)  # stacked modules: one per call
    cell_h: list[Tensor] = field(default_factory=list)  # cells: one state per call (= step)
    cell_c: list[Tensor] = field(default_factory=list)

    def states(self) -> list[tuple[str, tuple[DirectionStates, ...]]]:
        """(display name, states) per recorded sequence."""
        if self.spec.kind.is_cell:
            if not self.cell_h:
                return []
            c = self.cell_c or None
            states = DirectionStates(0, Direction.FORWARD, self.cell_h, c,
                                     torch.stack(self.cell_h, dim=1))
            return [(self.name, (states,))]
        names = [self.name] + [f"{self.name}#{i + 1}" for i in range(1, len(self.calls))]
        return [(n, u.states) for n, u in zip(names, self.calls, strict=True)]


@contextlib.contextmanager
def capture(model: nn.Module) -> Iterator[list[Record]]:
    """Replay stacked modules step by step and record cell calls while the block runs."""
    records = [Record(name, spec_of(name, m)) for name, m in recurrent_modules(model)]
    modules = dict(recurrent_modules(model))
    modes = {m: m.training for m in model.modules()}
    handles = []
    patched = []
    try:
        model.eval()
        for rec in records:
            module = modules[rec.name]
            if rec.spec.kind.is_cell:
                handles.append(module.register_forward_hook(_cell_hook(rec)))
            else:
                module.forward = _replay_forward(module, rec)
                patched.append(module)
        yield records
    finally:
        for module in patched:
            del module.forward
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training


def _cell_hook(rec: Record) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        h, c = (output if isinstance(output, tuple) else (output, None))
        if h.dim() != 2:
            raise BatchError(f"{rec.name}: rnndiag records batched cell calls (B, H) only, got "
                             f"shape {tuple(h.shape)}")
        rec.cell_h.append(h)
        if c is not None:
            rec.cell_c.append(c)
    return hook


def _replay_forward(module: nn.Module, rec: Record) -> Callable[..., Any]:
    m: Any = module
    spec = rec.spec

    def forward(inputs: Any, hx: Any = None) -> Any:
        if isinstance(inputs, PackedSequence):
            raise BatchError(f"{rec.name}: packed sequences are not supported; pass the padded "
                             "tensor (the diagnosis then includes the padding steps)")
        unbatched = inputs.dim() == 2
        x = inputs.unsqueeze(0) if unbatched else (inputs if m.batch_first
                                                   else inputs.transpose(0, 1))
        h0, c0 = zero_states(spec, x.shape[0], x)
        if hx is not None:
            h_given, c_given = hx if isinstance(hx, tuple) else (hx, None)
            h0 = h_given.unsqueeze(1) if unbatched else h_given
            if c_given is not None:
                c0 = c_given.unsqueeze(1) if unbatched else c_given
        run = unroll(spec, dict(module.named_parameters()), x, h0, c0)
        rec.calls.append(run)
        out = run.output
        assert out is not None  # unrolled with top_output=True
        h_n, c_n = run.h_n, run.c_n
        if unbatched:
            out, h_n = out.squeeze(0), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif not m.batch_first:
            out = out.transpose(0, 1)
        return out, ((h_n, c_n) if c_n is not None else h_n)

    return forward


def final_states(records: list[Record]) -> list[Tensor]:
    """h_final of every recorded sequence (top layer, each direction): for the objective."""
    out: list[Tensor] = []
    for rec in records:
        if rec.spec.kind.is_cell:
            out.extend(rec.cell_h[-1:])
        for run in rec.calls:
            out.extend(run.finals(rec.spec))
    return out


def call_model(model: nn.Module, inputs: Tensor) -> Any:
    try:
        return model(inputs)
    except RnnDiagError:
        raise
    except Exception as exc:  # the model's own complaint about the batch, one line
        raise BatchError(f"the model rejected the batch: {type(exc).__name__}: "
                         f"{_line(exc)}") from None


