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
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from rnndiag.capture import Capture, Chain
from rnndiag.cells import unit
from rnndiag.errors import BatchError, OptionError, RnnDiagError
from rnndiag.files import strip_wrappers
from rnndiag.records import Direction, ModuleKind, ModuleSpec
from rnndiag.replay import (
    DirectionStates,
    Tapped,
    Unrolled,
    alive_mask,
    unroll,
    zero_states,
)

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
    except (Exception, SystemExit) as exc:  # the user's import may fail in any way
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
    except (Exception, SystemExit) as exc:  # sys.exit() in user code is not rnndiag's exit
        raise OptionError(f"--model {target}: calling it failed ({type(exc).__name__}: "
                          f"{_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise OptionError(f"--model {target}: returned {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


def spec_of(name: str, module: nn.Module) -> ModuleSpec:
    """The ModuleSpec of a live recurrent module, from its attributes."""
    kind = STACKED.get(type(module)) or CELLS[type(module)]
    m: Any = module
    return ModuleSpec(
        name=name, kind=kind, input_size=m.input_size, hidden_size=m.hidden_size,
        proj_size=getattr(m, "proj_size", 0), num_layers=getattr(m, "num_layers", 1),
        bidirectional=getattr(m, "bidirectional", False), bias=m.bias,
        nonlinearity=getattr(m, "nonlinearity", None) if unit(kind.cell_type).nonlinearities
        else None)


def recurrent_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(strip_wrappers(name) or "<root>", m) for name, m in model.named_modules()
            if type(m) in STACKED or type(m) in CELLS]


@dataclass(frozen=True)
class Sequence_:
    """One recorded sequence of one recurrent module: its states and the roots that a backward
    pass must reach for every state's hook to fire."""

    name: str  # display name: the module's, `name#2` for its second sequence, ...
    spec: ModuleSpec
    module: nn.Module
    states: tuple[DirectionStates, ...]
    roots: tuple[Tensor, ...]


@dataclass
class _CellChain:
    """A cell's run of calls where each call continued from the state the last one made."""

    chain: Chain
    h: list[Tensor] = field(default_factory=list)
    c: list[Tensor] = field(default_factory=list)


@dataclass
class Record:
    """What one recurrent module did during the forward pass."""

    name: str
    spec: ModuleSpec
    module: nn.Module
    calls: list[tuple[Unrolled, tuple[Tensor, ...]]] = field(default_factory=list)
    chains: list[_CellChain] = field(default_factory=list)  # cells only

    def sequences(self) -> list[Sequence_]:
        """Every recorded sequence, in call order."""
        found: list[tuple[tuple[DirectionStates, ...], tuple[Tensor, ...]]] = [
            (run.states, roots) for run, roots in self.calls]
        for cc in self.chains:
            c = cc.c or None
            states = DirectionStates(0, Direction.FORWARD, cc.h, c, torch.stack(cc.h, dim=1),
                                     chain=cc.chain)
            roots = tuple(x for x in (cc.h[0], *(cc.c[:1])) if x.requires_grad)
            found.append(((states,), roots))
        names = [self.name] + [f"{self.name}#{i + 1}" for i in range(1, len(found))]
        return [Sequence_(n, self.spec, self.module, states, roots)
                for n, (states, roots) in zip(names, found, strict=True)]


@dataclass
class Recording:
    """Every recurrent module's record and the one Capture whose hooks watch their states."""

    capture: Capture
    records: list[Record]

    def sequences(self) -> list[Sequence_]:
        return [seq for rec in self.records for seq in rec.sequences()]


@contextlib.contextmanager
def capture(model: nn.Module, tap: list[Tapped] | None = None,
            graphed: bool = False) -> Iterator[Recording]:
    """Replay stacked modules step by step and record cell calls while the block runs.

    Forwards, hooks and every module's train/eval flag are restored on exit; `call_model`
    puts back the tensors a model keeps as attributes (a stateful model's `self.hidden`).
    With a `tap`, every replayed layer and direction is appended to it (rnndiag.pergrad).
    `graphed`: an nn.LSTM replays as one autograd node per layer and direction
    (rnndiag.replay.run_graphed: no W_hh gradient, no double backward).
    """
    recording = Recording(Capture(), [Record(name, spec_of(name, m), m)
                                      for name, m in recurrent_modules(model)])
    handles = []
    patched = []
    stance = contextlib.ExitStack()
    with restored_modes(model):
        try:
            stance.enter_context(eager())
            model.eval()
            for rec in recording.records:
                if rec.spec.kind.is_cell:
                    handles.append(rec.module.register_forward_hook(
                        _cell_hook(rec, recording.capture), with_kwargs=True))
                else:
                    rec.module.forward = _replay_forward(rec, recording.capture, tap, graphed)
                    patched.append(rec.module)
            yield recording
        finally:
            stance.close()
            for module in patched:
                del module.forward
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def restored_modes(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag put back as it was when the block exits."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def eager() -> contextlib.AbstractContextManager[Any]:
    """Run torch.compile'd forwards as plain Python while the block runs: the replay and its
    hooks are Python that a compiled graph would trace away (and compiling costs minutes)."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled: no import of dynamo
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")  # type: ignore[no-any-return]


def _tensor_attributes(model: nn.Module) -> dict[tuple[nn.Module, str], Any]:
    """Plain attributes holding tensors (not parameters or buffers), or None (a stateful
    model's `self.hidden = None` before its first call)."""
    return {(m, k): v for m in model.modules() for k, v in vars(m).items()
            if not k.startswith("_") and (v is None or isinstance(v, Tensor) or (
                isinstance(v, tuple | list) and any(isinstance(x, Tensor) for x in v)))}


def _cell_hook(rec: Record, cap: Capture) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        h, c = (output if isinstance(output, tuple) else (output, None))
        if h.dim() != 2:
            raise BatchError(f"{rec.name}: rnndiag records batched cell calls (B, H) only, got "
                             f"shape {tuple(h.shape)}")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        h_in = hx[0] if isinstance(hx, tuple | list) else hx
        if not rec.chains or not _continues(h_in, rec.chains[-1].h[-1]):
            rec.chains.append(_CellChain(cap.chain(0, Direction.FORWARD)))
        cc = rec.chains[-1]
        t = len(cc.h)
        cc.h.append(h)
        cc.chain.watch("dh", t, h)
        if c is not None:
            cc.c.append(c)
            cc.chain.watch("dc", t, c)
    return hook


def _continues(h_in: Tensor | None, last: Tensor, depth: int = 6) -> bool:
    """Whether a cell call continues from the state the last call made: that very tensor, or
    one computed from it within a few operations (dropout, a mask, a residual). A state the
    cell did not produce (zeros, an encoder's output) starts a new sequence."""
    if h_in is None:
        return False
    if h_in is last:
        return True
    if last.grad_fn is None:
        return False
    return h_in.grad_fn is last.grad_fn or reaches(h_in.grad_fn, last.grad_fn, depth)


def reaches(start: Any, target: Any, depth: int) -> bool:
    """Whether autograd node `target` lies 1 to `depth` edges below node `start` (following
    next_functions, at most 64 nodes per level)."""
    frontier = [start]
    for _ in range(depth):
        frontier = [f for node in frontier if node is not None
                    for f, _ in node.next_functions][:64]
        if any(node is target for node in frontier):
            return True
    return False


def _replay_forward(rec: Record, cap: Capture, tap: list[Tapped] | None = None,
                    graphed: bool = False) -> Callable[..., Any]:
    m: Any = rec.module
    spec = rec.spec

    def forward(input: Any, hx: Any = None) -> Any:  # nn.RNN.forward's own names
        packed = input if isinstance(input, PackedSequence) else None
        alive = None
        if packed is not None:  # each example runs on its own length, as the fused kernel
            x, lengths = pad_packed_sequence(packed, batch_first=True)
            alive = alive_mask(lengths.to(x.device), x.shape[1])
            unbatched = False
        else:
            unbatched = input.dim() == 2
            x = input.unsqueeze(0) if unbatched else (input if m.batch_first
                                                      else input.transpose(0, 1))
        # zero leaves: the roots every state's hook lies on the way to; a given state is
        # added to them, so its value is unchanged and its own gradient still flows
        h0, c0 = zero_states(spec, x.shape[0], x)
        roots = (h0,) if c0 is None else (h0, c0)
        if hx is not None:
            h_given, c_given = hx if isinstance(hx, tuple) else (hx, None)
            h0 = h0 + (h_given.unsqueeze(1) if unbatched else h_given)
            if c_given is not None and c0 is not None:
                c0 = c0 + (c_given.unsqueeze(1) if unbatched else c_given)
        time_major = packed is None and not unbatched and not m.batch_first
        run = unroll(spec, dict(m.named_parameters()), x, h0, c0, capture=cap, alive=alive,
                     tap=tap, graphed=graphed, output_time_major=time_major)
        rec.calls.append((run, roots))
        out: Any = run.output
        assert out is not None  # unrolled with top_output=True
        h_n, c_n = run.h_n, run.c_n
        if packed is not None:
            out = _repack(out, packed)
        elif unbatched:
            out, h_n = out.squeeze(0), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        elif not m.batch_first:
            out = out.transpose(0, 1)
        return out, ((h_n, c_n) if c_n is not None else h_n)

    return forward


def _repack(out: Tensor, like: PackedSequence) -> PackedSequence:
    """(B, T, W) outputs in the batch's own order -> a PackedSequence laid out as `like`."""
    order = like.sorted_indices
    ordered = out if order is None else out.index_select(0, order.to(out.device))
    steps = like.batch_sizes.tolist()  # examples alive at each step, longest first
    data = torch.cat([ordered[:n, t] for t, n in enumerate(steps)])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def final_states(recording: Recording) -> list[Tensor]:
    """h_final of every recorded sequence (top layer, each direction): for the objective."""
    out: list[Tensor] = []
    for rec in recording.records:
        out.extend(cc.h[-1] for cc in rec.chains)
        for run, _ in rec.calls:
            out.extend(run.finals(rec.spec))
    return out


def call_model(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """`model(*args, **kwargs)`; the model's own complaint about the batch in one line.

    Every call starts from the model's state as it was: tensors a stateful model keeps as
    attributes (`self.hidden`) are put back afterwards, so one call never feeds the next.
    """
    kept = _tensor_attributes(model)
    try:
        return model(*args, **kwargs)
    except RnnDiagError:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit() in user code is not rnndiag's exit
        raise BatchError(f"the model rejected the batch: {type(exc).__name__}: "
                         f"{_line(exc)}") from None
    finally:
        for (m, key), value in kept.items():
            setattr(m, key, value)
