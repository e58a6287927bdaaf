"""Realistic user models (tests/realistic_models.py) against an independent autograd oracle.

Each oracle rebuilds the model's computation in float64 with nn.*Cell copies of the weights
(a hand-written step for projected LSTMs, checked against the fused module's output) or the
model's own loop, keeps every state h_t (and c_t), and takes every gradient with plain
`torch.autograd.grad`. Definitions (tests/credit_oracle.py): g = dL/d(scored output); a layer
aligned with the scored output's time axis gets basis `credit`, its rows being one pass of
<g restricted to each example's last scored position (first, reverse), output> and one pass per
sampled position s (references: the examples whose g is non-zero at s); any other layer gets
basis `loss`, one row of the loss's own gradient referenced at each example's last (reverse:
first) step it reaches. Pooled ratios come from credit_oracle.ratio, and the verdict from the
oracle's ratio: exploding if any r > 1e3 or NaN, else vanishing if any r < 1e-3, else healthy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnndiag import RnnDiagError, check_model
from rnndiag.cli import main
from rnndiag.findings import Rule, findings
from rnndiag.records import FileDiagnosis, LayerDiagnosis
from tests import clip_oracle, credit_oracle
from tests.conftest import ROOT
from tests.realistic_models import (
    DictTagger,
    Forecaster,
    PackedTagger,
    PaddedTagger,
    ResidualLSTMStack,
    Seq2Seq,
    Siamese,
    SpeechCTC,
    TiedLM,
    ctc_loss,
    damp_recurrence,
    tagging_with_activation_penalty,
)

REL, TINY = 1e-10, 1e-300  # relative tolerance; absolute only where the value is zero
VANISH, EXPLODE = 1e-3, 1e3
BORDER = 2.0  # an exhaustive ratio this close to a threshold leaves the verdict to sampling


class CellStateMismatch(AssertionError):
    """dL/dc_t differs from the oracle's (raised on its own so that an xfail names it)."""



@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: fastest for these tiny tensors, and immune to the spin-waits of
    two threads on a busy two-core machine (100x slower backward passes were seen)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# The oracle: states as pieces, gradients by plain autograd, rows, ratios, verdicts.

Piece = tuple[Tensor, list[int]]  # a state (n, W) on the graph, and the examples its rows hold


@dataclass
class Chain:
    """One layer and direction of the oracle's computation: its states by time index t (each
    step a list of pieces: one (B, W) tensor for a batched run, one (1, W) per example alive
    at t for per-example runs)."""

    forward: bool
    h: list[list[Piece]]
    c: list[list[Piece]] | None = None
    alive: list[list[bool]] | None = None  # [t][b]; None: every step exists

    @property
    def steps(self) -> int:
        return len(self.h)

    def at(self, t: int) -> Tensor:
        """The batched state h_t (a batched chain only)."""
        [(h, _)] = self.h[t]
        return h


Grads = tuple[list[Tensor], list[Tensor] | None]  # dh[t] (B, W), dc[t] (B, H)


def _slot(ch: Chain, slot: str) -> list[list[Piece]]:
    pieces = ch.h if slot == "h" else ch.c
    assert pieces is not None
    return pieces


def grads(scalar: Tensor, chains: Mapping[str, Chain], batch: int) -> dict[str, Grads]:
    """d scalar / d(every state of every chain), assembled to (B, W) per step; zero where a
    state does not exist (past an example's length) or is not on a path to `scalar`."""
    slots = [(key, slot) for key, ch in chains.items()
             for slot in (("h", "c") if ch.c is not None else ("h",))]
    leaves = [x for key, slot in slots for step in _slot(chains[key], slot) for x, _ in step]
    found = iter(torch.autograd.grad(scalar, leaves, retain_graph=True, allow_unused=True))
    out: dict[str, dict[str, list[Tensor]]] = {key: {} for key in chains}
    for key, slot in slots:
        pieces = _slot(chains[key], slot)
        like = next(x for step in pieces for x, _ in step)
        series = []
        for step in pieces:
            g = like.new_zeros(batch, like.shape[1])
            for _, rows in step:
                d = next(found)
                if d is not None:
                    g[rows] = d
            series.append(g)
        out[key][slot] = series
    return {key: (v["h"], v.get("c")) for key, v in out.items()}


@dataclass(frozen=True)
class Scored:
    """The scored output's tensors, each with a map from a (B, T) mask to its own layout, and
    which (example, position) pairs the loss scores (g non-zero there)."""

    outputs: list[Tensor]
    layouts: list[Callable[[Tensor], Tensor]]
    hit: Tensor  # (B, T) bool

    @property
    def steps(self) -> int:
        return int(self.hit.shape[1])


def batch_first(m: Tensor) -> Tensor:  # (B, T, C)
    return m.unsqueeze(-1)


def per_step(m: Tensor) -> Tensor:  # (B, T)
    return m


def time_major(m: Tensor) -> Tensor:  # (T, B, C)
    return m.t().unsqueeze(-1)


def flat_time_major(m: Tensor) -> Tensor:  # (T*B, C)
    return m.t().reshape(-1, 1)


@dataclass
class Want:
    grad_norm: list[float]
    cell_grad_norm: list[float] | None
    ratio: list[float | None]
    final_step: int
    references: int
    skipped_references: int
    basis: str
    positions: list[int] | None = None
    credit_norms: list[list[float]] = field(default_factory=list)
    skipped_positions: list[int] = field(default_factory=list)
    full_ratio: list[float | None] | None = None  # the exhaustive credit measure's

    @property
    def full_verdict(self) -> str | None:
        """The exhaustive measure's verdict; None when it is borderline (its extreme ratio
        within BORDER of a threshold: there the examples sampled decide) or not measured."""
        if self.full_ratio is None:
            return None
        found = [r for r in self.full_ratio if r is not None and not math.isnan(r)]
        if found and (VANISH / BORDER <= min(found) <= VANISH * BORDER
                      or EXPLODE / BORDER <= max(found) <= EXPLODE * BORDER):
            return None
        return replace(self, full_ratio=None, ratio=self.full_ratio).verdict

    @property
    def verdict(self) -> str:
        found = [r for r in self.ratio if r is not None]
        if any(math.isnan(r) or r > EXPLODE for r in found):
            return "exploding"
        return "vanishing" if any(r < VANISH for r in found) else "healthy"


def _sq(dh: list[Tensor], dc: list[Tensor] | None, t: int, b: int) -> float:
    total = float(dh[t][b].pow(2).sum())
    return total + (float(dc[t][b].pow(2).sum()) if dc is not None else 0.0)


def _reached(dh: list[Tensor], dc: list[Tensor] | None, ch: Chain, batch: int) -> list[int]:
    """Each example's last (reverse: first) existing step with a non-zero gradient; -1 none."""
    order = range(ch.steps - 1, -1, -1) if ch.forward else range(ch.steps)
    refs = []
    for b in range(batch):
        hits = [t for t in order if (ch.alive is None or ch.alive[t][b]) and _sq(dh, dc, t, b)]
        refs.append(hits[0] if hits else -1)
    return refs


@dataclass
class CreditRows:
    rows: dict[str, list[credit_oracle.Row]]
    norms: dict[str, list[list[float]]]  # per aligned chain, per referenced position, by t
    positions: list[int]  # the referenced positions
    skipped: list[int]  # sampled positions no example scores


def _edge_refs(hit: Tensor, forward: bool) -> list[int]:
    """Each example's last (forward) or first (reverse) scored position; -1: none."""
    refs = []
    for row in hit.tolist():
        mine = [s for s, scored in enumerate(row) if scored]
        refs.append(-1 if not mine else (mine[-1] if forward else mine[0]))
    return refs


def _term(loss: Tensor, scored: Scored) -> Callable[[Tensor], Tensor]:
    g = torch.autograd.grad(loss, scored.outputs, retain_graph=True)

    def term(mask: Tensor) -> Tensor:  # <g restricted to mask (B, T), output>
        m = mask.to(torch.float64)
        return sum(((x * gx * lay(m)).sum() for x, gx, lay in
                    zip(scored.outputs, g, scored.layouts, strict=True)), loss.new_zeros(()))
    return term


def _credit_rows(loss: Tensor, chains: Mapping[str, Chain], batch: int, scored: Scored,
                 ) -> CreditRows:
    """One row per credit pass (credit_oracle.assignments), for `chains` (all aligned with
    the scored output)."""
    term = _term(loss, scored)
    sampled = credit_oracle.positions(scored.steps)
    hit = scored.hit.tolist()
    out = CreditRows({k: [] for k in chains}, {k: [] for k in chains}, [],
                     [s for s in sampled if not any(row[s] for row in hit)])
    for refs in credit_oracle.assignments(hit, sampled):
        if all(s < 0 for s in refs):
            continue
        mask = torch.zeros(batch, scored.steps)
        for b, s in enumerate(refs):
            if s >= 0:
                mask[b, s] = 1.0
        found = grads(term(mask), chains, batch)
        for k in chains:
            out.rows[k].append((refs, *found[k]))
    out.positions = sorted({s for refs, *_ in next(iter(out.rows.values())) for s in refs
                            if s >= 0})
    for k in chains:
        out.norms[k] = [credit_oracle.position_norms(out.rows[k], s) for s in out.positions]
    return out


def _full_credit_rows(loss: Tensor, chains: Mapping[str, Chain], batch: int, scored: Scored,
                      ) -> dict[str, list[credit_oracle.Row]]:
    """The exhaustive measure the passes sample: every example at its last (reverse: first)
    scored position, and every example scoring s at each sampled position s, one pass each."""
    term = _term(loss, scored)
    rows: dict[str, list[credit_oracle.Row]] = {k: [] for k in chains}
    for forward in (True, False):
        keys = [k for k, ch in chains.items() if ch.forward is forward]
        if keys:
            refs = _edge_refs(scored.hit, forward)
            mask = torch.zeros(batch, scored.steps)
            for b, s in enumerate(refs):
                if s >= 0:
                    mask[b, s] = 1.0
            found = grads(term(mask), {k: chains[k] for k in keys}, batch)
            for k in keys:
                rows[k].append((refs, *found[k]))
    for s in credit_oracle.positions(scored.steps):
        column = scored.hit[:, s]
        if not bool(column.any()):
            continue
        mask = torch.zeros(batch, scored.steps)
        mask[:, s] = column.to(mask.dtype)
        refs = [s if x else -1 for x in column.tolist()]
        found = grads(term(mask), chains, batch)
        for k in chains:
            rows[k].append((refs, *found[k]))
    return rows


def oracle(loss: Tensor, chains: Mapping[str, Chain], batch: int,
           scored: Scored | None = None) -> dict[str, Want]:
    """Every chain's expected numbers under `loss`: basis credit for chains as long as the
    scored output's time axis, basis loss for the others. A credit chain also gets the verdict
    of the exhaustive measure (`_full_credit_rows`), which the sampled one must agree with."""
    total = grads(loss, chains, batch)
    aligned = {k: ch for k, ch in chains.items()
               if scored is not None and ch.steps == scored.steps}
    credit, full = None, None
    if scored is not None and aligned:
        credit = _credit_rows(loss, aligned, batch, scored)
        full = _full_credit_rows(loss, aligned, batch, scored)
    wants = {}
    for k, ch in chains.items():
        dh, dc = total[k]
        if credit is not None and k in aligned:
            rows = credit.rows[k]
        else:
            rows = [(_reached(dh, dc, ch, batch), dh, dc)]
        r, final, used, left = credit_oracle.ratio(rows, ch.forward, ch.steps, ch.alive)
        want = Want(credit_oracle.norms(dh), None if dc is None else credit_oracle.norms(dc),
                    r, final, used, left, "loss")
        if credit is not None and full is not None and k in aligned:
            want.basis, want.positions = "credit", credit.positions
            want.credit_norms, want.skipped_positions = credit.norms[k], credit.skipped
            want.full_ratio = credit_oracle.ratio(full[k], ch.forward, ch.steps, ch.alive)[0]
        wants[k] = want
    return wants


def worst(wants: Mapping[str, Want]) -> str:
    order = ["healthy", "vanishing", "exploding"]
    return max((w.verdict for w in wants.values()), key=order.index)


# ---------------------------------------------------------------------------------------------
# Unrolling nn.RNN/LSTM/GRU through cells.

Step = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]


def _step(rnn: Any, suffix: str, inputs: int) -> Step:
    """One step of layer/direction `suffix` (`_l0`, `_l1_reverse`) with the module's weights:
    an nn.*Cell holding them, or PyTorch's documented equations for a projected LSTM."""
    w = {n: getattr(rnn, f"{n}{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih",
                                                   "bias_hh")}
    if isinstance(rnn, nn.LSTM) and rnn.proj_size:
        w_hr = getattr(rnn, f"weight_hr{suffix}")

        def projected(x: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
            assert c is not None
            gates = x @ w["weight_ih"].t() + w["bias_ih"] + h @ w["weight_hh"].t() + w["bias_hh"]
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return (torch.sigmoid(o) * torch.tanh(c)) @ w_hr.t(), c
        return projected
    cell: nn.Module
    if isinstance(rnn, nn.LSTM):
        cell = nn.LSTMCell(inputs, rnn.hidden_size, dtype=torch.float64)
    elif isinstance(rnn, nn.GRU):
        cell = nn.GRUCell(inputs, rnn.hidden_size, dtype=torch.float64)
    else:
        cell = nn.RNNCell(inputs, rnn.hidden_size, nonlinearity=rnn.nonlinearity,
                          dtype=torch.float64)
    for name, p in w.items():
        setattr(cell, name, p)
    if isinstance(rnn, nn.LSTM):
        def lstm(x: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
            h, c = cell(x, (h, c))
            return h, c
        return lstm
    return lambda x, h, c: (cell(x, h), None)


def unroll(rnn: nn.Module, x: Tensor, name: str, h0: Tensor | None = None,
           c0: Tensor | None = None, rows: list[int] | None = None,
           ) -> tuple[Tensor, dict[str, Chain]]:
    """`rnn` (nn.RNN/LSTM/GRU) on batch-first x (B, T, I) from h0 (L*D, B, P) [c0], one
    cell step at a time: (top outputs (B, T, D*P), chains `name/layer/direction`). The
    outputs are checked against the fused module's."""
    m: Any = rnn
    batch, steps = x.shape[:2]
    rows = list(range(batch)) if rows is None else rows
    lstm = isinstance(rnn, nn.LSTM)
    directions = ("forward", "reverse")[: 1 + m.bidirectional]
    width = m.proj_size if lstm and m.proj_size else m.hidden_size
    chains, layer_in = {}, x
    for layer in range(m.num_layers):
        outs = []
        for k, d in enumerate(directions):
            index = layer * len(directions) + k
            step = _step(m, f"_l{layer}" + ("_reverse" if d == "reverse" else ""),
                         layer_in.shape[2])
            h = x.new_zeros(batch, width) if h0 is None else h0[index]
            c = None if not lstm else x.new_zeros(batch, m.hidden_size) if c0 is None \
                else c0[index]
            hs: list[Tensor] = [h] * steps
            cs: list[Tensor] = [h] * steps
            for t in (range(steps) if d == "forward" else range(steps - 1, -1, -1)):
                h, c = step(layer_in[:, t], h, c)
                hs[t] = h
                if c is not None:
                    cs[t] = c
            chains[f"{name}/{layer}/{d}"] = Chain(
                d == "forward", [[(s, rows)] for s in hs], [[(s, rows)] for s in cs] if lstm
                else None)
            outs.append(torch.stack(hs, dim=1))
        layer_in = torch.cat(outs, dim=2)
    hx: Any = None if h0 is None else ((h0, c0) if lstm else h0)
    fused = m(x if m.batch_first else x.transpose(0, 1), hx)[0]
    torch.testing.assert_close(layer_in, fused if m.batch_first else fused.transpose(0, 1),
                               rtol=1e-12, atol=1e-12)
    return layer_in, chains


def cell_chain(hs: list[Tensor], cs: list[Tensor] | None) -> Chain:
    rows = list(range(hs[0].shape[0]))
    return Chain(True, [[(h, rows)] for h in hs], None if cs is None else
                 [[(c, rows)] for c in cs])


def per_example(found: Sequence[dict[str, Chain]], lengths: Sequence[int]) -> dict[str, Chain]:
    """Chains of examples run one by one (each at its own length), as one batch of pieces."""
    steps, out = max(lengths), {}
    alive = [[t < n for n in lengths] for t in range(steps)]
    for key, first in found[0].items():
        h: list[list[Piece]] = [[] for _ in range(steps)]
        c: list[list[Piece]] | None = None if first.c is None else [[] for _ in range(steps)]
        for chains in found:
            for t, pieces in enumerate(chains[key].h):
                h[t].extend(pieces)
            if c is not None:
                for t, pieces in enumerate(chains[key].c or []):
                    c[t].extend(pieces)
        out[key] = Chain(first.forward, h, c, alive)
    return out


# ---------------------------------------------------------------------------------------------
# Comparing rnndiag's records (or its JSON) with the oracle.


def fields(d: LayerDiagnosis) -> dict[str, Any]:
    """A layer's record in the JSON document's field names."""
    return {"layer": d.layer, "direction": d.direction.value, "grad_norm": list(d.grad_norm),
            "cell_grad_norm": None if d.cell_grad_norm is None else list(d.cell_grad_norm),
            "ratio": list(d.ratio), "final_step": d.final_step, "references": d.references,
            "skipped_references": d.skipped_references, "basis": d.basis.value,
            "verdict": d.verdict.value,
            "credit": None if d.credit is None else {
                "positions": list(d.credit.positions),
                "norms": [list(row) for row in d.credit.norms],
                "skipped_positions": list(d.credit.skipped)}}


def close(got: Sequence[float | None], want: Sequence[float | None], what: str) -> None:
    assert len(got) == len(want), what
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        if w is None or (g is None and math.isnan(w)):  # JSON writes NaN as null
            assert g is None, f"{what}[{t}]: {g} vs {w}"
        else:
            assert g is not None and g == pytest.approx(w, rel=REL, abs=TINY, nan_ok=True), \
                f"{what}[{t}]: {g} vs {w}"


def close_cells(got: Sequence[float | None], want: Sequence[float | None], what: str) -> None:
    try:
        close(got, want, what)
    except AssertionError as exc:
        raise CellStateMismatch(str(exc)) from None


def check_layer(got: Mapping[str, Any], want: Want, what: str) -> None:
    close(got["grad_norm"], want.grad_norm, f"{what} grad_norm")
    if want.cell_grad_norm is None:
        assert got["cell_grad_norm"] is None, what
    else:
        close_cells(got["cell_grad_norm"], want.cell_grad_norm, f"{what} cell_grad_norm")
    close(got["ratio"], want.ratio, f"{what} ratio")
    assert got["basis"] == want.basis, what
    assert got["final_step"] == want.final_step, what
    assert (got["references"], got["skipped_references"]) == (
        want.references, want.skipped_references), what
    if want.positions is None:
        assert got["credit"] is None, what
    else:
        credit = got["credit"]
        assert credit["positions"] == want.positions, what
        assert credit["skipped_positions"] == want.skipped_positions, what
        assert len(credit["norms"]) == len(want.credit_norms), what
        for s, row, norms in zip(credit["positions"], credit["norms"], want.credit_norms,
                                 strict=True):
            close(row, norms, f"{what} credit s={s}")
    assert got["verdict"] == want.verdict, f"{what}: verdict {got['verdict']}, ratio {got['ratio']}"
    if want.full_verdict is not None:  # the sampled references agree with all of them
        assert want.verdict == want.full_verdict, f"{what}: the passes' verdict {want.verdict}, " \
            f"the exhaustive measure's {want.full_verdict}"


def check_modules(modules: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                  wants: Mapping[str, Want]) -> None:
    """Every (module name, layers) against the oracle; no layer missing, none extra."""
    seen = set()
    for name, layers in modules:
        for layer in layers:
            key = f"{name}/{layer['layer']}/{layer['direction']}"
            assert key in wants, f"unexpected layer {key}; oracle has {sorted(wants)}"
            check_layer(layer, wants[key], key)
            seen.add(key)
    assert seen == set(wants)


def check_file(got: FileDiagnosis, wants: Mapping[str, Want]) -> None:
    check_modules([(m.spec.name, [fields(x) for x in m.layers]) for m in got.modules], wants)
    assert got.verdict is not None and got.verdict.value == worst(wants)


def check_document(doc: Mapping[str, Any], wants: Mapping[str, Want]) -> None:
    [found] = doc["files"]
    check_modules([(m["name"], m["layers"]) for m in found["modules"]], wants)
    assert found["verdict"] == worst(wants) and doc["verdict"] == worst(wants)


def diagnose(model: nn.Module, inputs: Any, targets: Tensor | None, **options: Any,
             ) -> FileDiagnosis:
    options.setdefault("train_batch_size", 2)
    return check_model(model, inputs, targets, dtype="float64", **options).files[0]


def masked_labels(lengths: Sequence[int], steps: int, classes: int) -> Tensor:
    """(B, T) labels in 0..classes-1, -100 past each example's length."""
    labels = torch.randint(0, classes, (len(lengths), steps))
    labels[torch.arange(steps).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)] = -100
    return labels


# ---------------------------------------------------------------------------------------------
# 1. Packed bidirectional LSTM tagger.


def packed_oracle(model: PackedTagger, tokens: Tensor, lengths: Sequence[int], labels: Tensor,
                  ) -> tuple[Tensor, dict[str, Want]]:
    """The loss and the oracle's numbers: every example through cell copies on its own
    length, padded into the batch."""
    steps, classes = tokens.shape[1], model.head.out_features
    embedded, outs, found = model.embed(tokens), [], []
    for b, n in enumerate(lengths):
        out, chains = unroll(model.rnn, embedded[b:b + 1, :n], "rnn", rows=[b])
        outs.append(F.pad(out, (0, 0, 0, steps - n)))
        found.append(chains)
    logits = model.head(torch.cat(outs))
    loss = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1))
    return loss, oracle(loss, per_example(found, lengths), len(lengths),
                        Scored([logits], [batch_first], labels != -100))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_bidirectional_tagger(cell: str) -> None:
    torch.manual_seed(0)
    model = PackedTagger(cell=cell).double()
    lengths, steps, classes = [7, 11, 3, 9, 11], 11, 5
    batch = len(lengths)
    tokens = torch.randint(1, 30, (batch, steps))
    tokens[torch.arange(steps).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)] = 0
    labels = masked_labels(lengths, steps, classes)
    got = diagnose(model, (tokens, torch.tensor(lengths)), labels)
    assert [m.spec.name for m in got.modules] == ["rnn"] and got.loss == "cross_entropy"

    _, wants = packed_oracle(model, tokens, lengths, labels)
    check_file(got, wants)

    # the padded batch vs each example alone (batch of 1, its own length): the mean over the
    # batch's N scored tokens weighs example b's gradient by n_b / N against its own mean
    total = sum(lengths)
    sums: dict[str, list[float]] = {k: [0.0] * steps for k in wants}
    cells: dict[str, list[float]] = {k: [0.0] * steps for k in wants}
    for b, n in enumerate(lengths):
        alone = diagnose(model, (tokens[b:b + 1, :n], torch.tensor([n])), labels[b:b + 1, :n])
        assert alone.modules[0].seq_len == n and alone.batch is not None
        assert alone.batch.batch_size == 1
        for d in alone.modules[0].layers:
            key = f"rnn/{d.layer}/{d.direction.value}"
            for t in range(n):
                sums[key][t] += (n / total * d.grad_norm[t]) ** 2
                if d.cell_grad_norm is not None:
                    cells[key][t] += (n / total * d.cell_grad_norm[t]) ** 2
    for d in got.modules[0].layers:
        key = f"rnn/{d.layer}/{d.direction.value}"
        close([x * x for x in d.grad_norm], sums[key], f"{key} alone vs batch")
        if d.cell_grad_norm is not None:
            close_cells([x * x for x in d.cell_grad_norm], cells[key], f"{key} cells")


def test_exploding_packed_tagger_clip_suggestion() -> None:
    """A packed ReLU tagger whose recurrence explodes, padded past its longest example: the
    verdict against the oracle, and every number of the clip suggestion computed
    independently: N_b from each example's own loss, run alone on its own length; the loss
    on the scored tokens; the step cap divided by the steps the recurrence ran (the longest
    example's 11, not the padded 14); the loss cap; the suggestion, their minimum."""
    torch.manual_seed(3)
    model = PackedTagger(cell="relu").double()
    with torch.no_grad():
        for name, p in model.rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(2.5 * torch.eye(p.shape[0], dtype=p.dtype))
    lengths, steps, classes, lr, b = [7, 11, 3, 9, 11], 14, 5, 0.05, 4
    tokens = torch.randint(1, 30, (len(lengths), steps))
    tokens[torch.arange(steps).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)] = 0
    labels = masked_labels(lengths, steps, classes)
    got = diagnose(model, (tokens, torch.tensor(lengths)), labels, lr=lr, optimizer="sgd",
                   train_batch_size=b)

    loss, wants = packed_oracle(model, tokens, lengths, labels)
    assert worst(wants) == "exploding"
    check_file(got, wants)

    params = list(model.parameters())
    grads = []
    for i, n in enumerate(lengths):
        alone, _ = unroll(model.rnn, model.embed(tokens[i:i + 1, :n]), "rnn")
        one = F.cross_entropy(model.head(alone).reshape(-1, classes),
                              labels[i, :n].reshape(-1))
        grads.append(torch.autograd.grad(one, params, allow_unused=True))
    per_example_grads = [[g if g is not None else torch.zeros_like(p)
                          for g, p in zip(gs, params, strict=True)] for gs in grads]
    nb = clip_oracle.expected_norm(per_example_grads, b)
    norm = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in params))
    c = got.clip
    assert c is not None and c.expected_norm is not None and c.examples == len(lengths)
    inputs = {i.name: i.value for i in c.inputs}
    close([c.expected_norm, inputs["loss"], inputs["param_norm"]],
          [nb, float(loss.detach()), norm], "N_b, loss, ||theta||")
    assert inputs["steps"] == max(lengths) == got.modules[0].seq_len
    close([c.step_cap, c.loss_cap],
          [0.005 * norm / lr / max(lengths), float(loss.detach()) / (lr * nb)],
          "step cap, loss cap")
    terms = [x for x in (c.expected_norm, c.step_cap, c.curvature_cap, c.loss_cap)
             if x is not None]
    assert c.suggested_max_norm == min(terms)


# ---------------------------------------------------------------------------------------------
# 2. Time-major language model with tied weights.


@pytest.mark.parametrize(
    ("cell", "flatten"),
    [("lstm", False), ("gru", False), ("lstm", True), ("gru", True)],
    ids=["lstm-(T,B,V)", "gru-(T,B,V)", "lstm-flat-(T*B,V)", "gru-flat-(T*B,V)"],
)
def test_time_major_tied_language_model(cell: str, flatten: bool) -> None:
    torch.manual_seed(1)
    model = TiedLM(cell=cell, flatten=flatten).double()
    damp_recurrence(model.rnn)  # forgets within a few steps: vanishing by construction
    steps, batch, vocab = 20, 6, 24
    tokens = torch.randint(0, vocab, (steps, batch))
    targets = torch.randint(0, vocab, (steps, batch))
    y = targets.reshape(-1) if flatten else targets
    got = diagnose(model, tokens, y, train_batch_size=3)
    [module] = got.modules
    assert got.batch is not None and got.batch.batch_size == batch and got.batch.seq_len == steps
    assert module.batch_size == batch and module.seq_len == steps

    out, chains = unroll(model.rnn, model.embed(tokens).transpose(0, 1), "rnn")
    logits = model.decoder(out.transpose(0, 1))  # (T, B, V), the tied weight
    scored = logits.reshape(-1, vocab) if flatten else logits
    loss = F.cross_entropy(scored.reshape(-1, vocab), y.reshape(-1))
    wants = oracle(loss, chains, batch,
                   Scored([scored], [flat_time_major if flatten else time_major],
                          torch.ones(batch, steps, dtype=torch.bool)))
    assert worst(wants) == "vanishing"
    check_file(got, wants)

    # clip: per-example gradients cut along B (axis 1 of the time-major tensors)
    per_example = []
    for i in range(batch):
        part = targets[:, [i]]
        one = F.cross_entropy(model(tokens[:, [i]]).reshape(-1, vocab), part.reshape(-1))
        per_example.append(torch.autograd.grad(one, list(model.parameters())))
    assert got.clip is not None and got.clip.examples == batch
    close([got.clip.expected_norm], [clip_oracle.expected_norm(per_example, 3)], "N_b")


# ---------------------------------------------------------------------------------------------
# 3. Encoder-decoder with attention, decoder cell stepped in a Python loop.


def test_seq2seq_with_attention() -> None:
    torch.manual_seed(2)
    model = Seq2Seq().double()
    batch, src_len, tgt_len, vocab = 4, 9, 7, 16
    src = torch.randint(0, 20, (batch, src_len))
    gold = torch.randint(1, vocab, (batch, tgt_len))
    tgt_in = torch.cat([torch.zeros(batch, 1, dtype=torch.long), gold[:, :-1]], dim=1)  # BOS
    targets = masked_labels([7, 5, 7, 6], tgt_len, vocab)  # shorter targets end in -100
    targets[targets != -100] = gold[targets != -100]
    got = diagnose(model, (src, tgt_in), targets)
    names = [m.spec.name for m in got.modules]
    assert names == ["encoder", "decoder.cell"]

    memory, chains = unroll(model.encoder, model.src_embed(src), "encoder")
    encoder = chains["encoder/0/forward"]
    h, c_t = encoder.at(src_len - 1), _slot(encoder, "c")[src_len - 1][0][0]
    dec, hs, cs, logits = model.decoder, [], [], []
    for t in range(tgt_len):  # the model's own loop, written out
        h, c_t = dec.cell(dec.embed(tgt_in[:, t]), (h, c_t))
        attn = torch.bmm(memory, h.unsqueeze(2)).squeeze(2).softmax(1)
        context = torch.bmm(attn.unsqueeze(1), memory).squeeze(1)
        logits.append(dec.out(torch.cat([h, context], dim=1)))
        hs.append(h)
        cs.append(c_t)
    out = torch.stack(logits, dim=1)
    chains["decoder.cell/0/forward"] = cell_chain(hs, cs)
    loss = F.cross_entropy(out.reshape(-1, vocab), targets.reshape(-1))
    wants = oracle(loss, chains, batch, Scored([out], [batch_first], targets != -100))
    assert wants["encoder/0/forward"].basis == "loss"
    assert wants["decoder.cell/0/forward"].basis == "credit"
    check_file(got, wants)


# ---------------------------------------------------------------------------------------------
# 4. CTC acoustic model: projected bidirectional LSTM, time-major log-probs, custom loss.


def test_ctc_speech_model_with_custom_loss(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    model = SpeechCTC().double()
    steps, batch = 14, 3
    feats = torch.randn(steps, batch, 6, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 3, 2], [4, 4, 0, 0], [5, 6, 1, 0]])  # 0: blank padding

    out, chains = unroll(model.rnn, feats.transpose(0, 1), "rnn")
    log_probs = F.log_softmax(model.head(out.transpose(0, 1)), dim=-1)  # (T, B, C)
    loss = ctc_loss(log_probs, targets)
    g = torch.autograd.grad(loss, log_probs, retain_graph=True)[0]
    assert bool((g != 0).any(2).all())  # CTC scores every frame
    wants = oracle(loss, chains, batch, Scored([log_probs], [time_major],
                                               torch.ones(batch, steps, dtype=torch.bool)))

    got = diagnose(model, feats, targets, loss=ctc_loss)
    assert got.loss == "custom:ctc_loss" and got.modules[0].spec.proj_size == 5
    check_file(got, wants)

    # the same through the CLI: --model and --loss imported from this package
    monkeypatch.chdir(ROOT)
    ckpt, batch_file = tmp_path / "ctc.safetensors", tmp_path / "batch.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
    save_file({"inputs": feats, "targets": targets}, batch_file)
    code = main(["check", str(ckpt), "--batch", str(batch_file), "--model",
                 "tests.realistic_models:SpeechCTC", "--loss", "tests.realistic_models:ctc_loss",
                 "--format", "json", "--dtype", "float64"])
    out_text, err = capsys.readouterr()
    assert code in (0, 1), err
    doc = json.loads(out_text)
    assert doc["files"][0]["loss"] == "custom:tests.realistic_models:ctc_loss"
    check_document(doc, wants)


# ---------------------------------------------------------------------------------------------
# 5. Forecaster whose initial state comes from static features.


@pytest.mark.parametrize("squeeze", [False, True], ids=["(B,T,1)", "(B,T)"])
def test_forecaster_with_initial_state_from_static_features(squeeze: bool) -> None:
    torch.manual_seed(4)
    model = Forecaster(squeeze=squeeze).double()
    batch, steps = 5, 16
    series = torch.randn(batch, steps, 1, dtype=torch.float64).cumsum(1) * 0.3
    static = torch.randn(batch, 4, dtype=torch.float64)
    future = torch.randn(batch, steps, 1, dtype=torch.float64)
    targets = future.squeeze(-1) if squeeze else future
    got = diagnose(model, {"series": series, "static": static}, targets)
    assert got.loss == "mse"

    h0 = torch.tanh(model.init(static)).view(batch, 2, 10).transpose(0, 1).contiguous()
    out, chains = unroll(model.rnn, series, "rnn", h0=h0)
    y = model.head(out)
    y = y.squeeze(-1) if squeeze else y
    loss = F.mse_loss(y, targets)
    wants = oracle(loss, chains, batch, Scored([y], [per_step if squeeze else batch_first],
                                               torch.ones(batch, steps, dtype=torch.bool)))
    check_file(got, wants)


# ---------------------------------------------------------------------------------------------
# 6. Residual stack of single-layer LSTMs with LayerNorm.


def test_residual_layernorm_lstm_stack() -> None:
    torch.manual_seed(5)
    model = ResidualLSTMStack().double()
    batch, steps, classes = 4, 13, 4
    tokens, labels = torch.randint(0, 25, (batch, steps)), torch.randint(0, classes, (batch, steps))
    got = diagnose(model, tokens, labels)
    assert [m.spec.name for m in got.modules] == ["layers.0", "layers.1", "layers.2"]

    x, chains = model.embed(tokens), {}
    for i, (norm, lstm) in enumerate(zip(model.norms, model.layers, strict=True)):
        y, found = unroll(lstm, norm(x), f"layers.{i}")
        chains.update(found)
        x = x + y
    logits = model.head(x)
    loss = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1))
    wants = oracle(loss, chains, batch, Scored([logits], [batch_first],
                                               torch.ones(batch, steps, dtype=torch.bool)))
    check_file(got, wants)


# ---------------------------------------------------------------------------------------------
# 7. Siamese encoders: a shared nn.LSTM called twice, a shared LSTMCell stepped over both.


def test_siamese_shared_encoders() -> None:
    torch.manual_seed(6)
    model = Siamese().double()
    damp_recurrence(model.lstm)
    damp_recurrence(model.cell)  # both forget fast: vanishing by construction
    batch = 4
    a = torch.randn(batch, 16, 5, dtype=torch.float64)
    b = torch.randn(batch, 12, 5, dtype=torch.float64)
    similar = torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=torch.float64)
    got = diagnose(model, (a, b), similar)
    assert sorted(m.spec.name for m in got.modules) == ["cell", "cell#2", "lstm", "lstm#2"]

    chains, features = {}, []
    for x, suffix in ((a, ""), (b, "#2")):
        _, found = unroll(model.lstm, x, "lstm" + suffix)
        chains.update(found)
        s = x.new_zeros(batch, 10)
        c = torch.zeros_like(s)
        hs, cs = [], []
        for t in range(x.shape[1]):
            s, c = model.cell(x[:, t], (s, c))
            hs.append(s)
            cs.append(c)
        chains["cell" + suffix + "/0/forward"] = cell_chain(hs, cs)
        features.append(torch.cat([found[f"lstm{suffix}/0/forward"].at(x.shape[1] - 1), s], 1))
    loss = F.mse_loss(F.cosine_similarity(features[0], features[1], dim=1), similar)
    wants = oracle(loss, chains, batch)
    assert {w.basis for w in wants.values()} == {"loss"}
    assert worst(wants) == "vanishing"
    check_file(got, wants)


# ---------------------------------------------------------------------------------------------
# 8. Dict output: logits and hidden states.


@pytest.mark.parametrize("how", ["no-key", "output-key", "custom-loss-on-dict"])
def test_dict_output(how: str) -> None:
    torch.manual_seed(7)
    model = DictTagger().double()
    batch, steps, classes = 4, 10, 5
    tokens = torch.randint(0, 20, (batch, steps))
    labels = masked_labels([10, 6, 8, 10], steps, classes)
    if how == "no-key":  # "hidden" (B, T, 12) also fits (B, T) class ids below 12: ambiguous
        with pytest.raises(RnnDiagError, match="--output-key"):
            diagnose(model, tokens, labels)
        return
    if how == "output-key":
        got = diagnose(model, tokens, labels, output_key="logits")
        assert got.loss == "cross_entropy on output[logits]"
    else:
        got = diagnose(model, tokens, labels, loss=tagging_with_activation_penalty)
        assert got.loss == "custom:tagging_with_activation_penalty"

    hidden, chains = unroll(model.rnn, model.embed(tokens), "rnn")
    output = {"logits": model.head(hidden), "hidden": hidden}
    if how == "output-key":
        logits = output["logits"]
        loss = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1))
        scored = Scored([logits], [batch_first], labels != -100)
    else:  # the penalty scores every position, the cross-entropy only the labelled ones
        loss = tagging_with_activation_penalty(output, labels)
        scored = Scored([output["logits"], output["hidden"]], [batch_first, batch_first],
                        torch.ones(batch, steps, dtype=torch.bool))
    check_file(got, oracle(loss, chains, batch, scored))


# ---------------------------------------------------------------------------------------------
# 9. Padded tagger whose final positions are ignored (once a false "exploding").


def test_padded_tagger_with_ignored_final_positions() -> None:
    torch.manual_seed(8)
    model = PaddedTagger().double()
    lengths, steps, classes = [12, 8, 5, 10, 6], 12, 4
    batch = len(lengths)
    tokens = torch.randint(1, 20, (batch, steps))
    tokens[torch.arange(steps).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1)] = 0
    labels = masked_labels(lengths, steps, classes)
    labels[:, -2:] = -100  # the end-of-sequence positions are never scored
    labels[2] = -100  # and one example is not labelled at all
    got = diagnose(model, tokens, labels)

    out, chains = unroll(model.rnn, model.embed(tokens), "rnn")
    logits = model.head(out)
    loss = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1))
    wants = oracle(loss, chains, batch, Scored([logits], [batch_first], labels != -100))
    assert wants["rnn/0/forward"].skipped_positions == [10, 11]
    check_file(got, wants)
    assert any("sampled positions 10, 11 of 12" in n for n in got.notes), got.notes
    assert any("1 example(s) score no position" in n for n in got.notes), got.notes
    for d in got.modules[0].layers:  # finite norms never read as exploding
        assert all(math.isfinite(x) for x in d.state_grad_norm)
        assert d.verdict.value != "exploding"


# ---------------------------------------------------------------------------------------------
# 10. Checkpoint mode (no --model) with `lengths` in the batch file.


def _cli_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code = main(["check", *args, "--format", "json", "--dtype", "float64"])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    doc: dict[str, Any] = json.loads(out)
    return doc


def final_energy(chains: Mapping[str, Chain], n: int) -> Tensor:
    """1/2 sum over the top layer's directions of ||h_final||^2, for one example of length n
    (pieces of a per-example run): its share of the checkpoint objective, times B."""
    top = [_slot(chains["/1/forward"], "h")[n - 1], _slot(chains["/1/reverse"], "h")[0]]
    return sum((h.pow(2).sum() for [(h, _)] in top), torch.zeros((), dtype=torch.float64)) / 2


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU],
                         ids=["lstm", "gru"])
def test_checkpoint_mode_with_lengths(kind: type[nn.LSTM] | type[nn.GRU], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(9)
    rnn = kind(4, 8, num_layers=2, bidirectional=True, batch_first=True).double()
    lengths, steps = [9, 4, 7, 9], 9
    batch = len(lengths)
    inputs = torch.randn(batch, steps, 4, dtype=torch.float64)  # padding is noise: unused
    ckpt, batch_file = tmp_path / "rnn.safetensors", tmp_path / "batch.safetensors"
    save_file({k: v.contiguous() for k, v in rnn.state_dict().items()}, ckpt)
    save_file({"inputs": inputs, "lengths": torch.tensor(lengths)}, batch_file)
    doc = _cli_json([str(ckpt), "--batch", str(batch_file)], capsys)
    [module] = doc["files"][0]["modules"]
    assert module["batch_size"] == batch and module["name"] == ""

    # oracle: each example alone at its own length; the batch objective 1/(2B) sum_b ... is
    # the mean of the examples' own objectives
    found = [unroll(rnn, inputs[b:b + 1, :n], "", rows=[b])[1] for b, n in enumerate(lengths)]
    loss = torch.stack([final_energy(chains, n)
                        for chains, n in zip(found, lengths, strict=True)]).mean()
    wants = oracle(loss, per_example(found, lengths), batch)
    check_document(doc, wants)

    # each example through the CLI on its own: the oracle's numbers for it, and its share
    # (1/B of its gradient) of the batch's squared norms
    shares = {key: [0.0] * steps for key in wants}
    for b, n in enumerate(lengths):
        alone_file = tmp_path / f"alone{b}.safetensors"
        save_file({"inputs": inputs[b:b + 1, :n].contiguous()}, alone_file)
        alone = _cli_json([str(ckpt), "--batch", str(alone_file)], capsys)
        _, own = unroll(rnn, inputs[b:b + 1, :n], "")
        solo = oracle(final_energy(own, n), own, 1)
        for layer in alone["files"][0]["modules"][0]["layers"]:
            key = f"/{layer['layer']}/{layer['direction']}"
            check_layer(layer, solo[key], f"alone {b} {key}")
            for t, x in enumerate(layer["state_grad_norm"]):
                shares[key][t] += (x / batch) ** 2
    for layer in module["layers"]:
        key = f"/{layer['layer']}/{layer['direction']}"
        close([x * x for x in layer["state_grad_norm"]], shares[key], f"{key} batch vs alone")


# ---------------------------------------------------------------------------------------------
# Known bug: a lower reverse layer under a loss on out[:, -1].


@pytest.mark.xfail(strict=True, reason=(
    "basis-loss ratios are total derivatives against the direction's last processed step: "
    "a lower reverse layer whose gradient enters at every step from the layer above, most at "
    "t = T-1 where the loss reads, is called exploding from that injection profile although "
    "its own recurrence contracts (a measure of transport through the direction's own "
    "recurrence is needed; README, 'Known issues')"))
def test_lower_reverse_layer_under_a_last_step_readout_is_not_exploding() -> None:
    """The GRU sample as trained (bidirectional, 2 layers, `head(out[:, -1])`, MSE on the adding
    problem). Layer 0's reverse direction gets the loss's gradient at every step through layer
    1, most at t = T-1 (layer 1's forward direction forgets by about 0.82 per step). Its own
    recurrence, checked here with GRUCell copies of its weights, carries a cotangent from its
    last processed step (t = 0) to t = 99 shrunk by far more than 1e3: through time its
    gradient vanishes; it does not explode."""
    from sample_models.make_samples import Model, adding_batch

    model = Model(nn.GRU(2, 16, num_layers=2, bidirectional=True, batch_first=True), 32)
    saved = torch.load(ROOT / "sample_models" / "gru_bidir_2layer.pt", weights_only=True)
    model.load_state_dict({k.removeprefix("module."): v
                           for k, v in saved["model_state_dict"].items()})
    model = model.double()
    x, y = adding_batch(32, 100, torch.Generator().manual_seed(1000))
    x, y = x.double(), y.double()

    _, chains = unroll(model.rnn, x, "rnn")  # the oracle's own states, one cell step at a time
    reverse = chains["rnn/0/reverse"]
    v = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    carried = torch.autograd.grad(reverse.at(0), reverse.at(99), grad_outputs=v)[0]
    assert float(carried.norm() / v.norm()) < VANISH  # its own recurrence: vanishing

    got = diagnose(model, x, y)
    [layer] = [d for d in got.modules[0].layers if (d.layer, d.direction.value) == (0, "reverse")]
    assert layer.verdict.value != "exploding", f"ratio up to {max(r for r in layer.ratio if r)}"


class _MeanPooled(nn.Module):
    """A classifier head on the mean over time of a plain RNN's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 16, batch_first=True)
        self.head = nn.Linear(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out.mean(1)).squeeze(1)


@pytest.mark.xfail(strict=True, reason=(
    "basis-loss ratios are total derivatives: under a loss on a mean over time every step gets "
    "its own share of the gradient, so the ratio stays near 1 and the verdict is healthy "
    "although the recurrence forgets within a step or two (README, 'Known issues')"))
def test_mean_pooled_rnn_that_forgets_is_not_healthy() -> None:
    """W_hh scaled to 0.05x: the recurrence carries a cotangent 10 steps back shrunk by far
    more than 1e3 (oracle: RNNCell copies of its weights), so the model cannot learn
    a dependency 10 steps long, whatever reaches each step from the pooling."""
    torch.manual_seed(0)
    model = _MeanPooled().double()
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(0.05)
    x = torch.randn(16, 60, 3, dtype=torch.float64)
    y = torch.randn(16, dtype=torch.float64)

    _, chains = unroll(model.rnn, x, "rnn")
    forward = chains["rnn/0/forward"]
    v = torch.randn(16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    carried = torch.autograd.grad(forward.at(59), forward.at(49), grad_outputs=v)[0]
    assert float(carried.norm() / v.norm()) < VANISH  # its own recurrence: vanishing

    got = diagnose(model, x, y)
    [layer] = got.modules[0].layers
    found = [r for r in layer.ratio if r is not None]
    assert layer.verdict.value == "vanishing", f"ratio {min(found)}..{max(found)}"


class _Readout(nn.Module):
    """A bidirectional GRU and a head on one step of its output, or on h_n."""

    def __init__(self, layers: int, read: str) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 6, num_layers=layers, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, 1)
        self.read = read

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if lengths is not None:  # packed; read each example's last valid output
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True)
            return self.head(out[torch.arange(len(lengths)), lengths - 1]).squeeze(1)
        out, h_n = self.rnn(x)
        if self.read == "h_n":
            return self.head(torch.cat([h_n[-2], h_n[-1]], dim=1)).squeeze(1)
        return self.head(out[:, -1 if self.read == "last" else 0]).squeeze(1)


@pytest.mark.parametrize(("layers", "read", "want"), [
    (1, "last", {(0, "reverse")}), (2, "last", {(1, "reverse")}), (1, "first", {(0, "forward")}),
    (2, "h_n", set()), (1, "packed", {(0, "reverse")})])
def test_a_direction_read_only_at_its_first_step_is_reported(layers: int, read: str,
                                                             want: set[tuple[int, str]]) -> None:
    """RD009 names the directions the loss reaches at one step only, the first they process
    (oracle: the gradient of the loss with respect to each direction's states, by autograd on
    cell copies, is non-zero there and nowhere else); reading h_n raises none."""
    torch.manual_seed(0)
    model = _Readout(layers, read).double()
    x, y = torch.randn(5, 9, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    lengths = torch.tensor([9, 4, 7, 9, 2])
    inputs = (x, lengths) if read == "packed" else x
    got = diagnose(model, inputs, y)
    found = {(f.layer, f.direction) for f in findings(got) if f.rule is Rule.FIRST_STEP_ONLY}
    assert found == {(layer, d) for layer, d in want}

    if read != "packed":  # the oracle: where the loss's gradient reaches each direction
        out, chains = unroll(model.rnn, x, "rnn")
        h_n = torch.cat([chains[f"rnn/{layers - 1}/forward"].at(8),
                         chains[f"rnn/{layers - 1}/reverse"].at(0)], dim=1)
        pick = {"last": out[:, -1], "first": out[:, 0], "h_n": h_n}[read]
        loss = F.mse_loss(model.head(pick).squeeze(1), y)
        reached = {}
        for key, chain in chains.items():
            grads = torch.autograd.grad(loss, [chain.at(t) for t in range(9)],
                                        retain_graph=True, allow_unused=True)
            reached[key] = [t for t, g in enumerate(grads) if g is not None and bool(g.any())]
        first = {"forward": 0, "reverse": 8}
        oracle = {(int(k.split("/")[1]), k.split("/")[2]) for k, ts in reached.items()
                  if ts == [first[k.split("/")[2]]]}
        assert oracle == found


def test_no_first_step_finding_under_temporal_credit() -> None:
    """A stacked bidirectional tagger labelled at its last position only: layer 0's reverse
    direction gets that credit behind its reference (through layer 1's forward direction),
    where credit is not measured, so its ratio stands at the reference alone; RD009 is not
    raised from that (it reads the pattern only under basis loss, where it is exact)."""
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(3, 6, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(12, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.rnn(x)[0])

    model = Tagger().double()
    x = torch.randn(5, 9, 3, dtype=torch.float64)
    labels = torch.full((5, 9), -100)
    labels[:, -1] = torch.randint(0, 4, (5,))
    got = diagnose(model, x, labels)
    assert {d.basis.value for d in got.modules[0].layers} == {"credit"}
    lower = next(d for d in got.modules[0].layers if (d.layer, d.direction.value) == (0, "reverse"))
    assert [t for t, r in enumerate(lower.ratio) if r is not None] == [lower.final_step]
    assert not [f for f in findings(got) if f.rule is Rule.FIRST_STEP_ONLY]
