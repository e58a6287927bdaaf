"""Find recurrent modules in a state dict from key names and shapes alone (no torch needed).

nn.RNN/LSTM/GRU store `weight_ih_l{k}[_reverse]`, `weight_hh_l{k}[_reverse]`, optional biases
and, for projected LSTMs, `weight_hr_l{k}`. The cells store `weight_ih`, `weight_hh`, biases.
With P = proj_size or hidden_size: W_ih (G*H, I_k), W_hh (G*H, P), W_hr (P, H), b (G*H,),
where the gate multiple G is 1 (RNN), 4 (LSTM) or 3 (GRU).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace

from rnndiag.errors import ArchitectureError
from rnndiag.records import ModuleKind, ModuleSpec

Shape = tuple[int, ...]

_STACKED = re.compile(
    r"^(?:(?P<prefix>.+)\.)?(?P<base>weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)"
    r"_l(?P<layer>\d+)(?P<rev>_reverse)?\Z",
    re.DOTALL,  # names are untrusted and may hold any character, newlines included
)
_CELL = re.compile(r"^(?:(?P<prefix>.+)\.)?(?P<base>weight_ih|weight_hh|bias_ih|bias_hh)\Z",
                   re.DOTALL)
_KINDS = {1: ModuleKind.RNN, 4: ModuleKind.LSTM, 3: ModuleKind.GRU}
_CELL_KINDS = {1: ModuleKind.RNN_CELL, 4: ModuleKind.LSTM_CELL, 3: ModuleKind.GRU_CELL}
NONLINEARITIES = ("tanh", "relu")
META_NONLINEARITY = "rnndiag.nonlinearity"  # safetensors __metadata__ key; may end in .<module>


@dataclass(frozen=True)
class _Group:
    """The tensors of one candidate module: (base, layer, reverse) -> shape."""

    prefix: str
    stacked: bool
    shapes: dict[tuple[str, int, bool], Shape]

    def key(self, base: str, layer: int, reverse: bool) -> str:
        local = base if not self.stacked else f"{base}_l{layer}{'_reverse' if reverse else ''}"
        return f"{self.prefix}.{local}" if self.prefix else local


def discover(shapes: Mapping[str, Shape]) -> list[ModuleSpec]:
    """Every recurrent module in `shapes` (name -> shape), sorted by name."""
    groups: dict[tuple[str, bool], dict[tuple[str, int, bool], Shape]] = defaultdict(dict)
    for name, shape in shapes.items():
        m = _STACKED.match(name)
        if m:
            key = (m["base"], int(m["layer"]), m["rev"] is not None)
            groups[(m["prefix"] or "", True)][key] = tuple(shape)
        elif m := _CELL.match(name):
            groups[(m["prefix"] or "", False)][(m["base"], 0, False)] = tuple(shape)
    specs = []
    for (prefix, stacked), found in groups.items():
        group = _Group(prefix, stacked, found)
        if not stacked and not {("weight_ih", 0, False), ("weight_hh", 0, False)} <= found.keys():
            continue  # a lone `weight_ih` or `bias_hh` is not a cell
        specs.append(_spec(group))
    specs = [attach_embedding(spec, shapes) for spec in specs]
    return sorted(specs, key=lambda s: s.name)


def _spec(g: _Group) -> ModuleSpec:
    """Check one group's shapes for consistency and describe it."""
    layers = sorted({layer for (_, layer, _) in g.shapes})
    if layers != list(range(len(layers))):
        raise ArchitectureError(f"{g.key('weight_ih', len(layers), False)}: layers of "
                                f"'{g.prefix or '<root>'}' are not numbered 0..{len(layers) - 1}: "
                                f"found {layers}")
    bidirectional = any(rev for (_, _, rev) in g.shapes)
    hidden, proj, gates = _sizes(g)
    bias = ("bias_ih", 0, False) in g.shapes
    directions = (False, True) if bidirectional else (False,)
    input_size = _shape(g, "weight_ih", 0, False, 2)[1]
    for layer in layers:
        width = input_size if layer == 0 else len(directions) * (proj or hidden)
        for rev in directions:
            _check_layer(g, layer, rev, gates * hidden, width, proj, hidden, bias)
    kinds = _KINDS if g.stacked else _CELL_KINDS
    kind = kinds[gates]
    return ModuleSpec(
        name=g.prefix, kind=kind, input_size=input_size, hidden_size=hidden,
        proj_size=proj, num_layers=len(layers), bidirectional=bidirectional, bias=bias,
        nonlinearity="tanh" if kind.cell_type.gates == 1 else None,
    )


def _sizes(g: _Group) -> tuple[int, int, int]:
    """(hidden_size, proj_size, gate multiple) from layer 0's forward tensors."""
    w_hh = _shape(g, "weight_hh", 0, False, 2)
    proj = 0
    hidden = w_hh[1]
    if ("weight_hr", 0, False) in g.shapes:
        w_hr = _shape(g, "weight_hr", 0, False, 2)
        proj, hidden = w_hr
        if w_hh[1] != proj:
            raise ArchitectureError(f"{g.key('weight_hh', 0, False)}: shape {w_hh} does not "
                                    f"match {g.key('weight_hr', 0, False)} {w_hr}: expected "
                                    f"(*, {proj})")
    rows = w_hh[0]
    if hidden == 0 or rows % hidden or rows // hidden not in _KINDS:
        raise ArchitectureError(f"{g.key('weight_hh', 0, False)}: shape {w_hh} is not "
                                f"(G*H, H) with G = 1 (RNN), 3 (GRU) or 4 (LSTM) for H = {hidden}")
    gates = rows // hidden
    if proj and gates != 4:
        raise ArchitectureError(f"{g.key('weight_hr', 0, False)}: a projection (proj_size) "
                                f"exists only for LSTM, but the gate multiple is {gates}")
    return hidden, proj, gates


def _shape(g: _Group, base: str, layer: int, rev: bool, ndim: int) -> Shape:
    key = (base, layer, rev)
    if key not in g.shapes:
        raise ArchitectureError(f"{g.key(base, layer, rev)}: missing (other tensors of "
                                f"'{g.prefix or '<root>'}' say it should exist)")
    shape = g.shapes[key]
    if len(shape) != ndim:
        raise ArchitectureError(f"{g.key(base, layer, rev)}: expected {ndim} dimensions, "
                                f"found shape {shape}")
    return shape


def _check_layer(g: _Group, layer: int, rev: bool, rows: int, width: int, proj: int,
                 hidden: int, bias: bool) -> None:
    """Every tensor of one layer and direction has the shape the sizes imply."""
    expected: dict[str, Shape] = {
        "weight_ih": (rows, width),
        "weight_hh": (rows, proj or hidden),
    }
    if bias:
        expected |= {"bias_ih": (rows,), "bias_hh": (rows,)}
    if proj:
        expected["weight_hr"] = (proj, hidden)
    for base, want in expected.items():
        found = _shape(g, base, layer, rev, len(want))
        if found != want:
            raise ArchitectureError(f"{g.key(base, layer, rev)}: shape {found}, expected {want}")
    extra = {b for (b, lay, r) in g.shapes if lay == layer and r == rev} - expected.keys()
    if extra:
        base = sorted(extra)[0]
        raise ArchitectureError(f"{g.key(base, layer, rev)}: unexpected here (bias tensors "
                                f"must come in pairs and exist in every layer, or in none)")


def attach_embedding(spec: ModuleSpec, shapes: Mapping[str, Shape]) -> ModuleSpec:
    """Name an embedding matrix (V, input_size) that may feed the module token ids.

    Candidates are 2-D `*.weight` tensors under a module whose name contains "emb"; the one
    sharing the longest dotted prefix with the module wins, then the first by name.
    """
    candidates = [
        name for name, shape in shapes.items()
        if name.endswith("weight") and len(shape) == 2 and shape[1] == spec.input_size
        and "emb" in name.removesuffix("weight").lower()
    ]
    if not candidates:
        return spec
    best = min(candidates, key=lambda n: (-_common_segments(n, spec.name), n))
    return replace(spec, embedding=best)


def _common_segments(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        n += 1
    return n


def resolve_nonlinearity(spec: ModuleSpec, metadata: Mapping[str, str],
                         override: str | None) -> ModuleSpec:
    """Set a plain RNN's nonlinearity: option > `rnndiag.nonlinearity.<name>` > file-wide > tanh."""
    if spec.cell_type.gates != 1:
        return spec
    value = override or metadata.get(f"{META_NONLINEARITY}.{spec.name}") \
        or metadata.get(META_NONLINEARITY) or "tanh"
    if value not in NONLINEARITIES:
        raise ArchitectureError(f"{META_NONLINEARITY}: {value!r} in the file's metadata is not "
                                f"one of {', '.join(NONLINEARITIES)}")
    return replace(spec, nonlinearity=value)
