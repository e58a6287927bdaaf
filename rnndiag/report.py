"""Render diagnoses as Rich renderables for people. Returns renderables; the CLI prints them.

Every string that came from a file (paths, tensor names, metadata) goes through `safe()` and
into `Text` objects, never into markup, so a checkpoint cannot inject styles or control codes.
The gradient-flow strip encodes log10 r_t in the glyph height as well as in colour, so it reads
the same with NO_COLOR.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.table import Table
from rich.text import Text

from rnndiag.findings import Advice, advice, findings
from rnndiag.records import (
    ClipSuggestion,
    FileDiagnosis,
    FileStatus,
    ForgetBias,
    InspectDiagnosis,
    LayerDiagnosis,
    ModuleDiagnosis,
    ModuleSpec,
    PascanuReading,
    RatioBasis,
    Span,
    SpanKind,
    StaticLayer,
    Thresholds,
    Verdict,
)

VERDICT_STYLE = {Verdict.HEALTHY: "bold green", Verdict.VANISHING: "bold yellow",
                 Verdict.EXPLODING: "bold red"}
PASCANU_TEXT = {
    PascanuReading.VANISHING_GUARANTEED: "< 1/γ: vanishing guaranteed",
    PascanuReading.EXPLODING_POSSIBLE: "> 1/γ: exploding possible",
    PascanuReading.BOUNDARY: "= 1/γ: boundary",
    PascanuReading.NOT_APPLICABLE: "n/a (gated cell)",
}
GLYPHS = "▁▂▃▄▅▆▇█"
NONFINITE_GLYPH = "×"
STRIP_DECADES_BELOW = 9  # the strip spans vanish/1e9 .. explode on a log scale


def safe(text: str) -> str:
    """Replace control characters (ANSI escapes, newlines, ...) with visible escapes."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def recorded(renderable: RenderableType, width: int = 100) -> Console:
    """A console that has recorded `renderable` at `width` columns, in colour, for the text,
    SVG and HTML exports (`--output`, `--save-svg`, `--save-html`, `.to_text()`)."""
    import io

    console = Console(record=True, highlight=False, width=width, file=io.StringIO(),
                      force_terminal=True, color_system="truecolor")
    console.print(renderable)
    return console


def to_plain_text(renderable: RenderableType, width: int = 100) -> str:
    """The renderable as plain text at `width` columns: what `--output` writes."""
    return recorded(renderable, width).export_text(clear=False, styles=False)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return "non-finite"
    return f"{x:.{digits}g}"


def render(files: Sequence[FileDiagnosis], thresholds: Thresholds) -> RenderableType:
    parts: list[RenderableType] = []
    for f in files:
        parts.extend(_file(f, thresholds))
    parts.extend(_advice(advice(files)))
    parts.append(_summary(files, thresholds))
    return Group(*parts)


def _verdict_text(v: Verdict | None, status: FileStatus) -> Text:
    if v is None:
        style = "bold magenta" if status is FileStatus.ERROR else "dim"
        return Text(status.value.upper(), style=style)
    return Text(v.value.upper(), style=VERDICT_STYLE[v])


def _file(f: FileDiagnosis, th: Thresholds) -> list[RenderableType]:
    head = Text.assemble(_verdict_text(f.verdict, f.status), "  ",
                         Text(safe(f.path), style="bold"), f"  ({f.format})")
    out: list[RenderableType] = [Text(""), head]
    if f.error:
        out.append(Text(f"  error: {safe(f.error)}", style="magenta"))
    if f.batch is not None and f.modules:
        out.append(Text(f"  {_scope(f, th)}", style="dim"))
    for note in f.notes:
        out.append(Text(f"  note: {safe(note)}", style="dim"))
    for x in findings(f):
        if x.ignored:
            where = " ".join(str(p) for p in (x.module, x.layer, x.direction) if p is not None)
            out.append(Text(f"  ignored (config): {x.rule.value} {safe(where)}: "
                            f"{safe(x.message)}", style="dim"))
    for t in f.nonfinite_weights:
        what = "non-finite weights" if t.recurrent else "non-finite values (not recurrent)"
        out.append(Text(f"  {what}: {safe(t.name)}: {t.nan} NaN, {t.inf} Inf",
                        style="bold red" if t.fatal else "yellow"))
    for m in f.modules:
        out.extend(_module(m, f, th))
    if f.clip is not None:
        out.append(_clip(f.clip, f.loss))
    return out


def _clip(c: ClipSuggestion, loss: str) -> RenderableType:
    which = "all model parameters" if c.parameters == "model" else "the recurrent parameters"
    used = ", ".join(f"{i.name} {_value(i.value)} ({i.source})" for i in c.inputs)
    if c.suggested_max_norm is None:
        head = Text("no clip suggestion", style="bold")
    else:
        rule = {"expected_norm": "the expected pre-clip norm N_b at the training batch size",
                "step_cap": "the step cap 0.005·‖θ‖/lr, below N_b" if c.expected_norm
                else "the step cap 0.005·‖θ‖/lr",
                "curvature_cap": "the curvature cap 2·N_b/(λ·lr), below N_b and the step cap",
                "loss_cap": "the loss cap L/(lr·N_b), below N_b and the step cap",
                }.get(c.decided_by, c.decided_by)
        head = Text.assemble((f"max_norm ≈ {fmt(c.suggested_max_norm)}", "bold"),
                             f" ({rule}; {which})")
    lines: list[RenderableType] = [head]
    if c.expected_norm is not None and c.spread is not None:
        lo, mid, hi = c.spread
        clipped = "" if c.fraction_clipped is None else \
            f"; clips about {c.fraction_clipped:.0%} of training steps"
        lines.append(Text(f"N_b {fmt(c.expected_norm)} (p10..p90 {fmt(lo)}..{fmt(hi)}, from "
                          f"{c.examples} per-example gradients of {safe(loss)}){clipped}",
                          style="dim"))
    lines.append(Text(f"inputs: {safe(used)}", style="dim"))
    lines.append(Text(safe(c.advice), style="dim"))
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row("  clip", Group(*lines))
    return grid


def _value(x: object) -> str:
    return fmt(x) if isinstance(x, float) else "-" if x is None else str(x)


def describe(m: ModuleDiagnosis) -> str:
    return _describe_spec(m.spec)


def _describe_spec(s: ModuleSpec) -> str:
    arch = s.kind.value + (f"({s.nonlinearity})" if s.nonlinearity else "")
    sizes = f"input {s.input_size}, hidden {s.hidden_size}"
    if s.proj_size:
        sizes += f", proj {s.proj_size}"
    if s.kind.is_cell:
        return f"{arch}  {sizes}, cell applied for T steps"
    layers = f"{s.num_layers} layer{'s' if s.num_layers > 1 else ''}"
    dirs = "bidirectional" if s.bidirectional else "unidirectional"
    return f"{arch}  {sizes}, {layers}, {dirs}{'' if s.bias else ', no bias'}"


def _scope(f: FileDiagnosis, th: Thresholds) -> str:
    """What the verdict holds for: the sequence length, the inputs, the context."""
    assert f.batch is not None
    steps = max(m.seq_len for m in f.modules)
    where = "a synthetic batch" if f.batch.source == "synthetic" else safe(f.batch.source)
    within = (f" within {th.context} steps back (--context)" if th.context is not None
              else ", every step back (--context N: only N)")
    hint = "; --batch: your data" if f.batch.source == "synthetic" else ""
    return f"verdict for T={steps} on {where}{within}{hint}"


def _module(m: ModuleDiagnosis, f: FileDiagnosis, th: Thresholds) -> list[RenderableType]:
    seed = f", seed {f.batch.seed}" if f.batch and f.batch.seed is not None else ""
    title = Text.assemble("  ", Text(safe(m.spec.name or "<root>"), style="bold cyan"), "  ",
                          describe(m), "  ", Text(m.verdict.value, style=VERDICT_STYLE[m.verdict]))
    fed = Text(f"  replayed on {safe(m.inputs)}: B={m.batch_size}, T={m.seq_len}{seed}; "
               f"L = {safe(m.objective)} = {fmt(m.loss)}", style="dim")
    if any(d.basis is RatioBasis.CREDIT for d in m.layers):
        fed.append("\n  ratios are temporal credit: each scored position's own loss term, "
                   "measured k steps back from that position")
    for d in m.layers:
        if d.skipped_references:
            fed.append(f"\n  {layer_label(d)}: {d.skipped_references} reference(s) skipped: "
                       "no gradient at the reference step itself")
    return [title, fed, _layers_table(m.layers), FlowStrips(m.layers, th),
            *_spans_table(m.layers), *_credit(m.layers, th)]


def layer_label(d: LayerDiagnosis) -> str:
    return f"{d.layer} {'fwd' if d.direction.value == 'forward' else 'rev'}"


def static_reading(reading: PascanuReading, fb: ForgetBias | None, sigma: float) -> str:
    if not math.isfinite(sigma):
        return "undefined (non-finite W_hh)"
    if fb is None:
        return PASCANU_TEXT[reading]
    return f"forget bias {fb.mean:+.2f}, gate at rest {fb.mean_gate_at_rest:.2f}"


def _layers_table(layers: Sequence[LayerDiagnosis]) -> Table:
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("  layer", justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("growth/step", justify="right", no_wrap=True)
    table.add_column("horizon", justify="right", no_wrap=True)
    table.add_column("σmax(W_hh)", justify="right", no_wrap=True)
    table.add_column("static reading")
    for d in layers:
        table.add_row(
            layer_label(d), Text(d.verdict.value, style=VERDICT_STYLE[d.verdict]),
            fmt(d.growth_per_step), "-" if d.horizon is None else f"{d.horizon} steps",
            fmt(d.sigma_max_hh), static_reading(d.pascanu, d.forget_bias, d.sigma_max_hh),
        )
    return table


class FlowStrips:
    """One line per layer/direction: log10 r_t over time, bucketed to the available width."""

    def __init__(self, layers: Sequence[LayerDiagnosis], th: Thresholds) -> None:
        self.layers = layers
        self.th = th

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for d in self.layers:
            yield strip_line(f"{layer_label(d):>6}", d.ratio, options.max_width, self.th)


def strip_line(label: str, ratios: Sequence[float | None], max_width: int,
               th: Thresholds) -> Text:
    """`  label t=0 ▁▂▃… T-1`: one strip fitted to the width."""
    prefix, suffix = f"  {label} t=0 ", f" {len(ratios) - 1}"
    width = max(4, min(max_width - len(prefix) - len(suffix), 120))
    line = Text(prefix, no_wrap=True, overflow="crop")
    for glyph, style in strip(ratios, width, th):
        line.append(glyph, style=style)
    line.append(suffix, style="dim")
    return line


def buckets(n: int, width: int) -> list[range]:
    """Split time steps 0..n-1 into at most `width` consecutive, near-equal buckets."""
    count = min(n, width)
    edges = [round(i * n / count) for i in range(count + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(count)]


def strip(ratios: Sequence[float | None], width: int, th: Thresholds,
          ) -> Iterator[tuple[str, str]]:
    """(glyph, style) per bucket; a bucket shows its most extreme r_t (farthest from 1); a
    bucket no reference reaches is blank."""
    lo = math.log10(th.vanish) - STRIP_DECADES_BELOW
    hi = math.log10(th.explode)
    for bucket in buckets(len(ratios), width):
        values = [r for r in (ratios[t] for t in bucket) if r is not None]
        if not values:
            yield " ", "dim"
            continue
        if any(not math.isfinite(r) for r in values):
            yield NONFINITE_GLYPH, "bold red"
            continue
        r = max(values, key=lambda v: abs(math.log10(v)) if v > 0 else math.inf)
        level = math.log10(r) if r > 0 else -math.inf
        index = round((min(max(level, lo), hi) - lo) / (hi - lo) * (len(GLYPHS) - 1))
        style = "red" if r > th.explode else "yellow" if r < th.vanish else "green"
        yield GLYPHS[index], style


CREDIT_ROWS = 4  # sampled positions drawn per layer in the text report (all are in the JSON)


def _credit(layers: Sequence[LayerDiagnosis], th: Thresholds) -> list[RenderableType]:
    """The credit matrix in a few lines: for some sampled positions s, ||dL_s/dh_t|| relative
    to ||dL_s/dh_s|| over t, drawn like the ratio strips (the top layer of each module)."""
    lines: list[RenderableType] = []
    top = max((d.layer for d in layers if d.credit is not None), default=None)
    for d in layers:  # the top layer's: the one the loss reads (all layers are in the JSON)
        if d.credit is None or not d.credit.positions or d.layer != top:
            continue
        rows = list(zip(d.credit.positions, d.credit.norms, strict=True))
        step = max(1, math.ceil(len(rows) / CREDIT_ROWS))
        lines.append(Text(f"  {layer_label(d)} credit of the term at position s, by step t:",
                          style="dim"))
        lines.extend(CreditRow(s, norms, th) for s, norms in rows[::-1][::step][::-1])
    return lines


class CreditRow:
    """One sampled position s: ||dL_s/dh_t|| / ||dL_s/dh_s|| over t, bucketed like a strip."""

    def __init__(self, s: int, norms: Sequence[float], th: Thresholds) -> None:
        self.s, self.th = s, th
        ref = norms[s]
        # a zero is no path at all (a state after s, in a causal direction): drawn blank
        self.r: list[float | None] = [None if ref == 0 or x == 0 else x / ref for x in norms]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield strip_line(f"{f's={self.s}':>8}", self.r, options.max_width, self.th)


def _spans_table(layers: Sequence[LayerDiagnosis]) -> list[RenderableType]:
    rows = [(d, s) for d in layers for s in d.spans]
    if not rows:
        return []
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("  layer", justify="right", no_wrap=True)
    table.add_column("span", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("finding")
    for d, s in rows:
        style = VERDICT_STYLE[Verdict(s.kind.value)]
        table.add_row(layer_label(d), f"t={s.start}..{s.end}", str(s.end - s.start + 1),
                      Text(span_text(s), style=style))
    return [table]


def span_text(s: Span) -> str:
    if s.kind is SpanKind.VANISHING:
        return f"vanishing, r down to {fmt(s.extreme_ratio, 2)}"
    if s.extreme_ratio is None:
        return "exploding, non-finite"
    return f"exploding, r up to {fmt(s.extreme_ratio, 2)}"


def _advice(items: Sequence[Advice]) -> list[RenderableType]:
    if not items:
        return []
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column()
    for item in items:
        lines = [Text(item.action)]
        for ev in item.evidence[:3]:
            where = f"{safe(ev.path)}: {safe(ev.module) or '<root>'}"
            if ev.layer is not None:
                where += f" {ev.layer} {ev.direction}"
            lines.append(Text(f"evidence [{ev.rule}] {where}: {safe(ev.message)}", style="dim"))
        if len(item.evidence) > 3:
            lines.append(Text(f"and {len(item.evidence) - 3} more", style="dim"))
        grid.add_row("  •", Group(*lines))
    return [Text("\nWhat to do", style="bold"), grid]


def _summary(files: Sequence[FileDiagnosis], th: Thresholds) -> RenderableType:
    counts: dict[str, int] = {}
    for f in files:
        key = f.verdict.value if f.verdict else f.status.value
        counts[key] = counts.get(key, 0) + 1
    body = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    lo = th.vanish / 10**STRIP_DECADES_BELOW
    legend = Text.assemble(
        "\nr_t = ‖∂L/∂s_t‖ / ‖∂L/∂s_ref‖, k = |t - ref| steps from each example's reference "
        "(its final step; under temporal credit, each scored position's own term); s = h, and "
        "c for LSTM; L2 over the batch. Strip: ",
        (GLYPHS[0], "yellow"), f" r ≤ {lo:.0e} … ", (GLYPHS[-1], "red"),
        f" r ≥ {th.explode:.0e} (log scale), ", (NONFINITE_GLYPH, "bold red"), " non-finite; ",
        ("yellow", "yellow"), f" < {th.vanish:g}, ", ("red", "red"), f" > {th.explode:g}.",
        style="dim")
    plural = "s" if len(files) != 1 else ""
    total = Text(f"{len(files)} file{plural} checked: {body}", style="bold")
    return Group(legend, total) if any(f.modules for f in files) else Group(Text(""), total)


def render_inspect(files: Sequence[InspectDiagnosis]) -> RenderableType:
    parts: list[RenderableType] = []
    for f in files:
        status = Text(f.status.value.upper(), style="bold magenta" if f.error else "bold")
        if any(t.fatal for t in f.nonfinite_weights):
            status = Text("NON-FINITE WEIGHTS", style="bold red")
        parts += [Text(""), Text.assemble(status, "  ", Text(safe(f.path), style="bold"),
                                          f"  ({f.format})")]
        if f.error:
            parts.append(Text(f"  error: {safe(f.error)}", style="magenta"))
        parts += [Text(f"  note: {safe(n)}", style="dim") for n in f.notes]
        for t in f.nonfinite_weights:
            where = "" if t.recurrent else " (not a recurrent weight: warning)"
            parts.append(Text(f"  {safe(t.name)}: {t.nan} NaN, {t.inf} Inf{where}",
                              style="red" if t.fatal else "yellow"))
        for m in f.modules:
            parts.append(Text.assemble("  ", Text(safe(m.spec.name or "<root>"),
                                                  style="bold cyan"), "  ", _describe_spec(m.spec)))
            parts.append(_static_table(m.layers))
    parts.append(Text(f"\n{len(files)} file{'s' if len(files) != 1 else ''} inspected "
                      "(static: no replay; run `rnndiag check` for per-step gradients)",
                      style="bold"))
    return Group(*parts)


def _static_table(layers: Sequence[StaticLayer]) -> Table:
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("  layer", justify="right", no_wrap=True)
    table.add_column("σmax(W_hh)", justify="right", no_wrap=True)
    table.add_column("static reading")
    for x in layers:
        label = f"{x.layer} {'fwd' if x.direction.value == 'forward' else 'rev'}"
        reading = static_reading(x.pascanu, x.forget_bias, x.sigma_max_hh)
        table.add_row(label, fmt(x.sigma_max_hh), reading)
    return table
