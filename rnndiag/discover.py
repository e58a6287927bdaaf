"""Find recurrent modules in a state dict from key names and shapes alone (no torch needed).

nn.RNN/LSTM/GRU store `weight_ih_l{k}[_reverse]`, `weight_hh_l{k}[_reverse]`, optional biases
and, for projected LSTMs, `weight_hr_l{k}`. The cells store `weight_ih`, `weight_hh`, biases.
With P = proj_size or hidden_size: W_ih (G*H, I_k), W_hh (G*H, P), W_hr (P, H), b (G*H,),
where the gate multiple G names the cell kind: 1 (RNN), 4 (LSTM) or 3 (GRU). The base names,
shapes, gate multiples and which kinds may be projected come from the cell units
(rnndiag.cells), so a new kind is found once it is registered.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache

from rnndiag import cells
from rnndiag.cells import CellUnit
from rnndiag.errors import ArchitectureError
from rnndiag.records import ModuleSpec, NonFiniteTensor

Shape = tuple[int, ...]
# Recurrent modules in one file: `check` replays each (a few ms apiece for tiny cells), so
# 10,000 cells would take minutes; refused by inspect and check alike
MAX_MODULES = 1_000
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
    stacked_name, cell_name = _patterns(cells.all_bases(True), cells.all_bases(False))
    for name, shape in shapes.items():
        m = stacked_name.match(name)
        if m:
            key = (m["base"], int(m["layer"]), m["rev"] is not None)
            groups[(m["prefix"] or "", True)][key] = tuple(shape)
        elif m := cell_name.match(name):
            groups[(m["prefix"] or "", False)][(m["base"], 0, False)] = tuple(shape)
    specs = []
    for (prefix, stacked), found in groups.items():
        group = _Group(prefix, stacked, found)
        if not stacked and not {("weight_ih", 0, False), ("weight_hh", 0, False)} <= found.keys():
            continue  # a lone `weight_ih` or `bias_hh` is not a cell
        specs.append(_spec(group))
    index = _Embeddings.of(shapes)
    specs = [attach_embedding(spec, shapes, index) for spec in specs]
    return sorted(specs, key=lambda s: s.name)


@cache
def _patterns(stacked: tuple[str, ...], cell: tuple[str, ...]) -> tuple[re.Pattern[str],
                                                                       re.Pattern[str]]:
    """Key patterns of nn.RNN-style modules (`weight_hh_l1_reverse`) and of cells (`weight_hh`)
    for the given parameter base names."""
    # names are untrusted and may hold any character, newlines included: DOTALL
    return (re.compile(rf"^(?:(?P<prefix>.+)\.)?(?P<base>{_either(stacked)})"
                       r"_l(?P<layer>\d+)(?P<rev>_reverse)?\Z", re.DOTALL),
            re.compile(rf"^(?:(?P<prefix>.+)\.)?(?P<base>{_either(cell)})\Z", re.DOTALL))


def _either(bases: tuple[str, ...]) -> str:
    return "|".join(re.escape(b) for b in bases)


def _spec(g: _Group) -> ModuleSpec:
    """Check one group's shapes for consistency and describe it."""
    layers = sorted({layer for (_, layer, _) in g.shapes})
    if layers != list(range(len(layers))):
        raise ArchitectureError(f"{g.key('weight_ih', len(layers), False)}: layers of "
                                f"'{g.prefix or '<root>'}' are not numbered 0..{len(layers) - 1}: "
                                f"found {layers}")
    bidirectional = any(rev for (_, _, rev) in g.shapes)
    hidden, proj, unit = _sizes(g)
    bias = ("bias_ih", 0, False) in g.shapes
    directions = (False, True) if bidirectional else (False,)
    input_size = _shape(g, "weight_ih", 0, False, 2)[1]
    for layer in layers:
        width = input_size if layer == 0 else len(directions) * (proj or hidden)
        for rev in directions:
            _check_layer(g, layer, rev, unit.param_shapes(width, hidden, proj, bias))
    return ModuleSpec(
        name=g.prefix, kind=unit.kind(g.stacked), input_size=input_size, hidden_size=hidden,
        proj_size=proj, num_layers=len(layers), bidirectional=bidirectional, bias=bias,
        nonlinearity=unit.default_nonlinearity,
    )


def _sizes(g: _Group) -> tuple[int, int, CellUnit]:
    """(hidden_size, proj_size, cell unit) from layer 0's forward tensors."""
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
    unit = cells.by_gates(rows // hidden) if hidden and not rows % hidden else None
    if unit is None:
        choices = _listing([f"{u.gates} ({u.name})" for u in cells.units()])
        raise ArchitectureError(f"{g.key('weight_hh', 0, False)}: shape {w_hh} is not "
                                f"(G*H, H) with G = {choices} for H = {hidden}")
    if proj and not unit.projection:
        projected = _listing([u.name for u in cells.units() if u.projection])
        raise ArchitectureError(f"{g.key('weight_hr', 0, False)}: a projection (proj_size) "
                                f"exists only for {projected}, but the gate multiple is "
                                f"{unit.gates}")
    return hidden, proj, unit


def _listing(words: list[str]) -> str:
    """Join words as 'a, b or c'."""
    return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)


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


def _check_layer(g: _Group, layer: int, rev: bool, expected: Mapping[str, Shape]) -> None:
    """Every tensor of one layer and direction has the `expected` shape (by base name)."""
    for base, want in expected.items():
        found = _shape(g, base, layer, rev, len(want))
        if found != want:
            raise ArchitectureError(f"{g.key(base, layer, rev)}: shape {found}, expected {want}")
    extra = {b for (b, lay, r) in g.shapes if lay == layer and r == rev} - expected.keys()
    if extra:
        base = sorted(extra)[0]
        raise ArchitectureError(f"{g.key(base, layer, rev)}: unexpected here (bias tensors "
                                f"must come in pairs and exist in every layer, or in none)")


@dataclass(frozen=True)
class _Embeddings:
    """The file's embedding candidates by width, and the input widths of its convolutions,
    found in one pass over the names (so discovery stays linear in the number of tensors)."""

    by_width: dict[int, list[str]]
    conv_widths: frozenset[int]

    @classmethod
    def of(cls, shapes: Mapping[str, Shape]) -> _Embeddings:
        by_width: dict[int, list[str]] = defaultdict(list)
        conv: set[int] = set()
        for name, shape in shapes.items():
            if not name.endswith("weight"):
                continue
            if len(shape) == 2 and "emb" in name.removesuffix("weight").lower():
                by_width[shape[1]].append(name)
            elif len(shape) >= 3:
                conv.add(shape[1])
        return cls({w: sorted(names) for w, names in by_width.items()}, frozenset(conv))


def attach_embedding(spec: ModuleSpec, shapes: Mapping[str, Shape],
                     index: _Embeddings | None = None) -> ModuleSpec:
    """Name the embedding matrix (V, input_size) that feeds the module token ids, only when
    the wiring is certain or an announced guess.

    Candidates are 2-D `*.weight` tensors of width input_size under a module whose name holds
    "emb". Certain: exactly one candidate under the module's own parent (`enc.embed` for
    `enc.rnn`). A guess, said so: the file holds exactly one candidate, and no convolution
    reads its width (an embedding feeding a CNN front end is not the RNN's input). Anything
    else is refused and the candidates are listed: `--embedding MODULE=TENSOR` chooses.
    `index` is `_Embeddings.of(shapes)`, computed once for many modules.
    """
    index = index or _Embeddings.of(shapes)
    candidates = index.by_width.get(spec.input_size, [])
    if not candidates:
        return spec
    parent = spec.name.rpartition(".")[0]
    siblings = [n for n in candidates if _parent_module(n) == parent]
    if spec.input_size not in index.conv_widths:
        if len(siblings) == 1:
            return replace(spec, embedding=siblings[0], wiring="same-parent")
        if len(candidates) == 1:
            return replace(spec, embedding=candidates[0], wiring="only-candidate")
    return replace(spec, candidates=tuple(candidates))


def _parent_module(key: str) -> str:
    """`enc.embed.weight` -> `enc` (the module holding the embedding module)."""
    return key.removesuffix(".weight").rpartition(".")[0]


def choose_embedding(spec: ModuleSpec, choices: Mapping[str, str],
                     shapes: Mapping[str, Shape]) -> ModuleSpec:
    """Apply `--embedding MODULE=TENSOR` (checked against the file) to one module."""
    key = choices.get(spec.name or "<root>")
    if key is None:
        return spec
    shape = shapes.get(key)
    if shape is None or len(shape) != 2 or shape[1] != spec.input_size:
        found = "not in the file" if shape is None else f"shape {tuple(shape)}"
        raise ArchitectureError(f"--embedding {spec.name or '<root>'}={key}: {found}; module "
                                f"'{spec.name or '<root>'}' needs a (V, {spec.input_size}) "
                                "matrix")
    return replace(spec, embedding=key, wiring="option", candidates=())


def _common_segments(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        n += 1
    return n


def resolve_nonlinearity(spec: ModuleSpec, metadata: Mapping[str, str],
                         override: str | None) -> ModuleSpec:
    """Set a plain RNN's nonlinearity: option > `rnndiag.nonlinearity.<name>` > file-wide > tanh
    (the unit's default); cells with a fixed activation are left as they are."""
    choices = cells.unit(spec.cell_type).nonlinearities
    if not choices:
        return spec
    value = override or metadata.get(f"{META_NONLINEARITY}.{spec.name}") \
        or metadata.get(META_NONLINEARITY) or choices[0]
    if value not in choices:
        raise ArchitectureError(f"{META_NONLINEARITY}: {value!r} in the file's metadata is not "
                                f"one of {', '.join(choices)}")
    return replace(spec, nonlinearity=value)


def find_modules(shapes: Mapping[str, Shape], metadata: Mapping[str, str],
                 nonlinearity: str | None, embeddings: Mapping[str, str] | None = None,
                 dtypes: Mapping[str, str] | None = None) -> list[ModuleSpec]:
    """The discovery chain of every mode: modules from key names and shapes (each with the
    embedding that feeds it, `--embedding` first), their weights' dtypes checked when `dtypes`
    (name -> "float32", "complex64", ...) is given, and a plain RNN's nonlinearity (option >
    metadata > tanh)."""
    specs = discover(shapes)
    if len(specs) > MAX_MODULES:
        raise ArchitectureError(f"holds {len(specs):,} recurrent modules, more than the "
                                f"{MAX_MODULES:,} rnndiag diagnoses in one file (each is "
                                "replayed on its own)")
    if dtypes is not None:
        check_weight_dtypes(specs, dtypes)
    if embeddings:
        known = {s.name or "<root>" for s in specs}
        unknown = sorted(set(embeddings) - known)
        if unknown:
            raise ArchitectureError(f"--embedding {unknown[0]}=...: no recurrent module of that "
                                    f"name (found: {', '.join(sorted(known))})")
        specs = [choose_embedding(s, embeddings, shapes) for s in specs]
    return [resolve_nonlinearity(spec, metadata, nonlinearity) for spec in specs]


REAL_FLOATS = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn",
                         "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"})


def check_weight_dtypes(specs: Sequence[ModuleSpec], dtypes: Mapping[str, str]) -> None:
    """Every parameter of a recurrent module (`name.local`) is a real floating-point tensor:
    integer, boolean and complex weights are refused by name, by inspect and check alike."""
    owners = {spec.name for spec in specs}
    for key in sorted(dtypes):
        head, dot, _ = key.rpartition(".")
        if (head if dot else "") in owners and dtypes[key] not in REAL_FLOATS:
            raise ArchitectureError(f"{key}: dtype {dtypes[key]} is not a floating-point weight")


def mark_nonfinite(bad: Sequence[NonFiniteTensor], modules: Iterable[str], strict: bool,
                   ) -> tuple[NonFiniteTensor, ...]:
    """Say which NaN/Inf tensors are a recurrent module's own parameters (`name.local`, or a
    top-level key for the root module ""): those decide the verdict; others only with
    `strict` (an embedding or mask table may hold -inf on purpose)."""
    owners = {"" if m == "<root>" else m.split("#", 1)[0] for m in modules}

    def recurrent(key: str) -> bool:
        head, _, local = key.rpartition(".")
        return head in owners and bool(local)

    return tuple(replace(t, recurrent=recurrent(t.name), fatal=strict or recurrent(t.name))
                 for t in bad)
