"""Render diagnoses as a Rich renderable for people. Returns renderables; the CLI prints them.

Every string that came from a file (paths, tensor names, metadata) goes through `safe()` and
into `Text` objects, never into markup, so a checkpoint cannot inject styles or control codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from rnndiag.records import (
    FileDiagnosis,
    FileStatus,
    LayerDiagnosis,
    ModuleDiagnosis,
    PascanuReading,
    Span,
    Verdict,
)

VERDICT_STYLE = {Verdict.HEALTHY: "bold green", Verdict.VANISHING: "bold yellow",
                 Verdict.EXPLODING: "bold red"}
PASCANU_TEXT = {
    PascanuReading.VANISHING_GUARANTEED: "< 1/gamma: vanishing guaranteed",
    PascanuReading.EXPLODING_POSSIBLE: "> 1/gamma: exploding possible",
    PascanuReading.BOUNDARY: "= 1/gamma: boundary",
    PascanuReading.NOT_APPLICABLE: "gated cell: bound n/a",
}


def safe(text: str) -> str:
    """Replace control characters (ANSI escapes, newlines, ...) with visible escapes."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "non-finite"
    return f"{x:.{digits}g}"


def render(files: Sequence[FileDiagnosis]) -> RenderableType:
    parts: list[RenderableType] = []
    for f in files:
        parts.extend(_file(f))
    parts.append(_summary(files))
    return Group(*parts)


def _verdict_text(v: Verdict | None, status: FileStatus) -> Text:
    if v is None:
        return Text(status.value.upper(), style="bold magenta" if status is FileStatus.ERROR
                    else "dim")
    return Text(v.value.upper(), style=VERDICT_STYLE[v])


def _file(f: FileDiagnosis) -> list[RenderableType]:
    head = Text.assemble(Text(safe(f.path), style="bold"), f"  ({f.format})  ",
                         _verdict_text(f.verdict, f.status))
    out: list[RenderableType] = [Text(""), head]
    if f.error:
        out.append(Text(f"  error: {safe(f.error)}", style="magenta"))
    for note in f.notes:
        out.append(Text(f"  note: {safe(note)}", style="dim"))
    for m in f.modules:
        out.extend(_module(m, f))
    return out


def _module(m: ModuleDiagnosis, f: FileDiagnosis) -> list[RenderableType]:
    s = m.spec
    arch = s.kind.value + (f"({s.nonlinearity})" if s.nonlinearity else "")
    sizes = f"input {s.input_size}, hidden {s.hidden_size}"
    if s.proj_size:
        sizes += f", proj {s.proj_size}"
    shape = (f"{s.num_layers} layer{'s' if s.num_layers > 1 else ''}, "
             f"{'bidirectional' if s.bidirectional else 'unidirectional'}"
             f"{'' if s.bias else ', no bias'}")
    if s.kind.is_cell:
        shape = "cell applied recurrently"
    seed = f", seed {f.batch.seed}" if f.batch and f.batch.seed is not None else ""
    title = Text.assemble("  ", Text(safe(s.name or "<root>"), style="bold cyan"),
                          f"  {arch}  {sizes}, {shape}")
    fed = Text(f"  replayed on {safe(m.inputs)}: B={m.batch_size}, T={m.seq_len}{seed}; "
               f"L = {fmt(m.loss)}", style="dim")
    return [title, fed, _layers_table(m.layers, m.seq_len), *_spans(m.layers)]


def _layers_table(layers: Sequence[LayerDiagnosis], seq_len: int) -> Table:
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("  layer", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("growth/step", justify="right", no_wrap=True)
    table.add_column("horizon", justify="right", no_wrap=True)
    table.add_column("σmax(W_hh)", justify="right", no_wrap=True)
    table.add_column("static reading")
    for d in layers:
        reading = PASCANU_TEXT[d.pascanu]
        if d.forget_bias is not None:
            reading = (f"forget bias {d.forget_bias.mean:+.2f} "
                       f"(gate at rest {d.forget_bias.mean_gate_at_rest:.2f})")
        table.add_row(
            _layer_label(d), Text(d.verdict.value, style=VERDICT_STYLE[d.verdict]),
            fmt(d.growth_per_step), "-" if d.horizon is None else f"{d.horizon} steps",
            fmt(d.sigma_max_hh), reading,
        )
    return table


def _layer_label(d: LayerDiagnosis) -> str:
    return f"{d.layer} {'fwd' if d.direction.value == 'forward' else 'rev'}"


def _spans(layers: Sequence[LayerDiagnosis]) -> list[RenderableType]:
    lines: list[RenderableType] = []
    for d in layers:
        for s in d.spans:
            lines.append(Text.assemble(f"    {_layer_label(d)}  ",
                                       Text(span_line(s), style=VERDICT_STYLE[Verdict(s.kind)])))
    return lines


def span_line(s: Span) -> str:
    if s.kind.value == "vanishing":
        tail = f"r down to {fmt(s.extreme_ratio, 2)}"
    else:
        tail = "r non-finite" if s.extreme_ratio is None else f"r up to {fmt(s.extreme_ratio, 2)}"
    return f"t={s.start}..{s.end} {s.kind.value}, {tail}"


def _summary(files: Sequence[FileDiagnosis]) -> Text:
    counts: dict[str, int] = {}
    for f in files:
        key = f.verdict.value if f.verdict else f.status.value
        counts[key] = counts.get(key, 0) + 1
    body = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    legend = ("r_t = ‖∂L/∂s_t‖ / ‖∂L/∂s_final‖ (s: h, and c for LSTM; L2 over the batch); "
              "growth/step < 1 shrinks going back in time; horizon: steps back until r_t < "
              "vanish threshold")
    return Text.assemble(Text(f"\n{legend}", style="dim"),
                         f"\n{len(files)} file{'s' if len(files) != 1 else ''} checked: {body}")
