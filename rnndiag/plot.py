"""Draw diagnoses as one matplotlib figure (`--plot FILE.png|.svg`) to paste into a pull
request or an experiment tracker. Needs the optional extra `rnndiag[plot]`; matplotlib is
imported only when a function here runs.

One row per replayed (file, module, layer, direction), time step t on the x axis:

- left panel: s_t = `state_grad_norm[t]` (solid; `grad_norm[t]` dashed where it differs, i.e.
  LSTM) on a log axis, and r_t = `ratio[t]` on a second log axis (right) with the vanishing and
  exploding thresholds. Vanishing spans are shaded yellow, exploding spans red, each covering
  t = start - 0.5 .. end + 0.5 (spans are inclusive by time index). The reference step
  `final_step` is a dashed vertical line; r_t = None (no reference reaches t) and zero norms
  are gaps; a non-finite norm or ratio is a red x at the top of the panel.
- right panel, only where the layer has a credit matrix: row i is the sampled position
  s = positions[i], column t, colour log10(norms[i][t] / norms[i][s]) (0 at t = s); a zero
  norm (no path from s to t) is left out, showing the grey background.

No pyplot: the figure is a plain `Figure` on an Agg canvas, so a user's backend and open
figures are untouched. Drawing happens under matplotlib's default style with a fixed SVG hash
salt and no date, so the same diagnosis gives the same bytes whatever the user's rcParams.
Checkpoint names reach matplotlib as plain text (mathtext and TeX off), never as markup.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rnndiag.atomic import check_folder, write_atomic_bytes
from rnndiag.errors import OptionError
from rnndiag.records import Credit, FileDiagnosis, FileStatus, LayerDiagnosis, Thresholds
from rnndiag.report import STRIP_DECADES_BELOW, fmt, safe

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg"}
MAX_ROWS = 24  # rows drawn at most (the most severe); every layer is in the JSON
DPI = 100
ROW_HEIGHT = 2.6  # inches per row
# inches: left, right, top (legend, note), bottom; gaps between columns and between rows
LEFT, RIGHT, TOP, BOTTOM, GAP_X, GAP_Y = 0.8, 0.8, 0.9, 0.5, 1.3, 0.9
TITLE_CHARS = 110  # longer titles lose the middle of the path
NORM_COLOUR, RATIO_COLOUR = "tab:blue", "tab:purple"
SPAN_COLOUR = {"vanishing": "gold", "exploding": "tab:red"}
INSTALL_HINT = "--plot needs matplotlib: pip install 'rnndiag[plot]'"


@dataclass(frozen=True)
class Row:
    """One layer and direction of one module of one file: a row of the figure."""

    path: str
    module: str
    layer: LayerDiagnosis

    @property
    def credit(self) -> Credit | None:
        credit = self.layer.credit
        return credit if credit is not None and credit.positions else None


def check_target(path: Path) -> str:
    """The format for `path` ("png" | "svg"), after checking that matplotlib is installed:
    the CLI can call this before a long replay. Raises OptionError."""
    fmt_ = FORMATS.get(path.suffix.lower())
    if fmt_ is None:
        raise OptionError(f"--plot {path}: unknown picture type {path.suffix or '(none)'!r}; "
                          "give a file name ending in .png or .svg")
    check_folder(path)
    _matplotlib()
    return fmt_


def save_plot(files: Sequence[FileDiagnosis], path: Path, thresholds: Thresholds) -> int:
    """Draw every replayed layer/direction of `files` into one figure at `path` (.png or .svg,
    chosen by suffix); return the number of panels drawn.

    Written atomically (a temporary file beside `path`, then a rename keeping the mode of the
    file it replaces). Raises OptionError when matplotlib is missing, the suffix is neither
    .png nor .svg, or no file was replayed.
    """
    kind = check_target(path)
    if not rows(files):
        raise OptionError(f"--plot {path}: nothing to draw: no file was replayed")
    with _style():
        fig, panels = figure(files, thresholds)
        buf = io.BytesIO()
        # no timestamp: the SVG's dc:date is dropped; Agg writes no PNG creation time
        fig.savefig(buf, format=kind, dpi=DPI, metadata={"Date": None} if kind == "svg" else {})
    write_atomic_bytes(path, buf.getvalue())
    return panels


def figure(files: Sequence[FileDiagnosis], thresholds: Thresholds) -> tuple[Figure, int]:
    """The figure `save_plot` writes, and its number of panels (for notebooks and trackers
    that take a Figure, e.g. `wandb.log({"rnndiag": fig})`; drawn in the style active when it
    is drawn, where save_plot uses matplotlib's default). Raises OptionError."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    every = rows(files)
    if not every:
        raise OptionError("--plot: nothing to draw: no file was replayed")
    shown = most_severe(every, MAX_ROWS)
    columns = 2 if any(r.credit for r in shown) else 1
    fig = Figure(figsize=(15 if columns == 2 else 10, ROW_HEIGHT * len(shown) + TOP + BOTTOM),
                 dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(shown), columns, squeeze=False,
                        gridspec_kw={"width_ratios": [3, 2][:columns]})
    _margins(fig, len(shown), columns)
    panels = 0
    for i, row in enumerate(shown):
        _flow_panel(axes[i][0], row, thresholds, i)
        panels += 1
        if row.credit is not None:
            _credit_panel(fig, axes[i][1], row.credit, thresholds, i)
            panels += 1
        elif columns == 2:
            axes[i][1].remove()
    _header(fig, len(shown), len(every), any(_draws_h(r.layer) for r in shown))
    return fig, panels


def rows(files: Sequence[FileDiagnosis]) -> list[Row]:
    """Every replayed layer/direction, in report order."""
    return [Row(f.path, m.spec.name or "<root>", d) for f in files
            if f.status is FileStatus.OK for m in f.modules for d in m.layers]


def most_severe(every: Sequence[Row], limit: int) -> list[Row]:
    """At most `limit` rows, the most severe verdicts first, kept in report order."""
    if len(every) <= limit:
        return list(every)
    ranked = sorted(range(len(every)), key=lambda i: -every[i].layer.verdict.severity)
    return [every[i] for i in sorted(ranked[:limit])]


def title(row: Row) -> str:
    """`path: module layer direction — verdict (growth/step, horizon)`, control characters
    escaped, the middle of a long path elided."""
    d = row.layer
    horizon = "-" if d.horizon is None else f"{d.horizon} steps"
    tail = (f": {safe(row.module)} {d.layer} {d.direction.value} — {d.verdict.value} "
            f"(growth/step {fmt(d.growth_per_step)}, horizon {horizon})")
    path = safe(row.path)
    room = max(TITLE_CHARS - len(tail), 20)
    if len(path) > room:
        path = path[: room // 2 - 1] + "…" + path[-(room - room // 2):]
    return path + tail


def _flow_panel(ax: Axes, row: Row, th: Thresholds, index: int) -> None:
    d = row.layer
    steps = range(len(d.state_grad_norm))
    ax.set_gid(f"panel-flow-{index}")
    # a file's names are plain text: no mathtext ($...$), no TeX
    ax.set_title(title(row), loc="left", fontsize=9, y=1.01, parse_math=False, usetex=False)
    for k, span in enumerate(d.spans):
        ax.axvspan(span.start - 0.5, span.end + 0.5, color=SPAN_COLOUR[span.kind.value],
                   alpha=0.3, lw=0, gid=f"span-{index}-{k}-{span.kind.value}")
    ax.axvline(d.final_step, color="0.3", ls="--", lw=0.8, gid=f"reference-{index}")
    ax.plot(steps, _positive(d.state_grad_norm), color=NORM_COLOUR, lw=1.4)
    if _draws_h(d):
        ax.plot(steps, _positive(d.grad_norm), color=NORM_COLOUR, lw=1.0, ls="--")
    _log_axis(ax, [*d.state_grad_norm, *d.grad_norm])
    ax.set_xlim(-0.5, len(steps) - 0.5)
    ax.set_xlabel("time step t", fontsize=8)
    ax.set_ylabel("‖∂L/∂s_t‖", fontsize=8, color=NORM_COLOUR)
    ax.tick_params(labelsize=7)
    ratio = ax.twinx()
    ratio.plot(steps, _positive(d.ratio), color=RATIO_COLOUR, lw=1.0)
    ratio.axhline(th.vanish, color="goldenrod", ls=":", lw=1.0)
    ratio.axhline(th.explode, color="tab:red", ls=":", lw=1.0)
    _log_axis(ratio, [r for r in d.ratio if r is not None] + [th.vanish, th.explode])
    ratio.set_ylabel("r_t", fontsize=8, color=RATIO_COLOUR)
    ratio.tick_params(labelsize=7)
    bad = [t for t in steps if not all(math.isfinite(v) for v in _at(d, t))]
    if bad:  # x in data units, y in axes units: at the top whatever the scale
        ax.plot(bad, [0.95] * len(bad), "x", color="red", ms=6, mew=1.5, clip_on=False,
                transform=ax.get_xaxis_transform(), gid=f"nonfinite-{index}")


def _credit_panel(fig: Figure, ax: Axes, credit: Credit, th: Thresholds, index: int) -> None:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    matrix = np.ma.masked_invalid(np.array(credit_matrix(credit), dtype=float))  # (S, T)
    finite = matrix.compressed()
    low = math.log10(th.vanish) - STRIP_DECADES_BELOW  # where the text strips stop too
    vmin = max(min(float(finite.min()) if finite.size else -1.0, -1.0), low)
    vmax = max(float(finite.max()) if finite.size else 1.0, 1.0)
    steps, count = matrix.shape[1], matrix.shape[0]
    ax.set_gid(f"panel-credit-{index}")
    ax.set_facecolor("0.85")  # masked cells show it: no path from s to t
    image = ax.imshow(matrix, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, vmin, vmax),
                      aspect="auto", interpolation="nearest", origin="lower",
                      extent=(-0.5, steps - 0.5, -0.5, count - 0.5))
    stride = max(1, math.ceil(count / 8))
    ax.set_yticks(range(0, count, stride), [str(s) for s in credit.positions[::stride]])
    ax.set_xlabel("time step t", fontsize=8)
    ax.set_ylabel("scored position s", fontsize=8)
    ax.set_title("credit of the loss term at s (grey: no path)", loc="left", fontsize=9,
                 y=1.01)
    ax.tick_params(labelsize=7)
    bar = fig.colorbar(image, ax=ax, extend="min" if vmin == low else "neither")
    bar.set_label("log10 ‖∂L_s/∂s_t‖ / ‖∂L_s/∂s_s‖", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def credit_matrix(credit: Credit) -> list[list[float]]:
    """(S, T): log10(norms[i][t] / norms[i][s]) with s = positions[i]; NaN where undefined (a
    zero or non-finite norm, or a position whose own norm is zero)."""
    out: list[list[float]] = []
    for s, norms in zip(credit.positions, credit.norms, strict=True):
        ref = norms[s]
        usable = ref > 0 and math.isfinite(ref)
        out.append([math.log10(x / ref) if usable and x > 0 and math.isfinite(x) else math.nan
                    for x in norms])
    return out


def _header(fig: Figure, shown: int, total: int, lstm: bool) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [
        Line2D([], [], color=NORM_COLOUR, lw=1.4, label="‖∂L/∂s_t‖ (s: h, and c for LSTM)")]
    if lstm:
        handles.append(Line2D([], [], color=NORM_COLOUR, ls="--", label="‖∂L/∂h_t‖"))
    handles += [
        Line2D([], [], color=RATIO_COLOUR, label="r_t (right axis)"),
        Line2D([], [], color="0.3", ls="--", lw=0.8, label="reference step"),
        Patch(color=SPAN_COLOUR["vanishing"], alpha=0.3, label="vanishing span"),
        Patch(color=SPAN_COLOUR["exploding"], alpha=0.3, label="exploding span"),
        Line2D([], [], color="red", marker="x", ls="", label="not finite"),
    ]
    height = fig.get_size_inches()[1]
    fig.legend(handles=handles, loc="upper center", ncols=len(handles), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.0))
    if shown < total:
        fig.text(0.5, 1 - 0.36 / height, f"showing the {shown} most severe of {total} layer/"
                 "directions; all are in the JSON (--format json)", ha="center", va="top",
                 fontsize=9, color="0.3")


def _draws_h(d: LayerDiagnosis) -> bool:
    """Whether h's own norm differs from the state's (LSTM: the state includes c)."""
    return d.cell_grad_norm is not None and d.grad_norm != d.state_grad_norm


def _at(d: LayerDiagnosis, t: int) -> tuple[float, ...]:
    ratio = d.ratio[t]
    return (d.state_grad_norm[t], d.grad_norm[t]) + (() if ratio is None else (ratio,))


def _positive(values: Sequence[float | None]) -> list[float]:
    """Drawable on a log axis: None, zero and non-finite values become NaN (gaps)."""
    return [v if v is not None and v > 0 and math.isfinite(v) else math.nan for v in values]


def _log_axis(ax: Axes, values: Sequence[float]) -> None:
    """A log y axis over whole decades around the drawable `values`, major ticks only: every
    panel gets labelled decades, and drawing stays fast (minor ticks cost most of the time)."""
    from matplotlib.ticker import LogLocator, NullLocator

    drawable = [v for v in values if v > 0 and math.isfinite(v)]
    low = math.floor(math.log10(min(drawable))) if drawable else -1
    high = math.ceil(math.log10(max(drawable))) if drawable else 1
    ax.set_yscale("log")
    # a fifth of a decade of room, so that a threshold on a decade is not hidden in the frame
    ax.set_ylim(10.0 ** (low - 0.2), 10.0 ** (max(high, low + 1) + 0.2))
    ax.yaxis.set_major_locator(LogLocator(numticks=6))
    ax.yaxis.set_minor_locator(NullLocator())


def _margins(fig: Figure, rows: int, columns: int) -> None:
    """Fixed gaps in inches (a layout engine would triple the drawing time)."""
    width, height = fig.get_size_inches()
    axes_height = (height - TOP - BOTTOM - (rows - 1) * GAP_Y) / rows
    axes_width = (width - LEFT - RIGHT - (columns - 1) * GAP_X) / columns
    # wspace and hspace are fractions of the mean axes width and height
    fig.subplots_adjust(left=LEFT / width, right=1 - RIGHT / width, top=1 - TOP / height,
                        bottom=BOTTOM / height, wspace=GAP_X / axes_width,
                        hspace=GAP_Y / axes_height)


def _matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise OptionError(INSTALL_HINT) from None


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """matplotlib's default style and the reproducibility settings, restored afterwards."""
    import matplotlib
    import matplotlib.style

    # a fixed hash salt: SVG ids are derived from it (else random); glyphs as paths, no TeX
    with matplotlib.style.context("default"), matplotlib.rc_context(
            {"svg.hashsalt": "rnndiag", "svg.fonttype": "path", "text.usetex": False}):
        yield
