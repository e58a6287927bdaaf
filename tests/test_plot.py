"""`--plot`: one matplotlib figure per run, drawn from the pipeline's own records; written
atomically, byte-identical on a rerun, untouched by the user's matplotlib settings."""

from __future__ import annotations

import math
import os
import stat
import sys
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import rnndiag
from rnndiag.errors import OptionError
from rnndiag.records import FileDiagnosis, FileStatus, LayerDiagnosis, SpanKind, Thresholds
from tests.conftest import SAMPLES

matplotlib = pytest.importorskip("matplotlib")  # the optional extra `rnndiag[plot]`

from rnndiag.plot import MAX_ROWS, TITLE_CHARS, credit_matrix, figure, save_plot  # noqa: E402

TH = Thresholds()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE = "weird$\\frac{1}{0}$_and_$\\nosuchcommand{$\\"  # mathtext would parse, and fail


class GruTagger(nn.Module):
    """Embedding -> batch-first GRU -> per-token labels: cross-entropy gives a credit matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.rnn = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, 3)
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)


@pytest.fixture(scope="module")
def checked() -> tuple[FileDiagnosis, ...]:
    """Vanishing RNN (1 row), 2-layer bidirectional GRU (4 rows), LSTM (1 row); no credit."""
    names = ["rnn_tanh_vanishing.safetensors", "gru_bidir_2layer.pt", "lstm_healthy.safetensors"]
    files = rnndiag.check_files([SAMPLES / n for n in names], batch_size=4, seq_len=30).files
    assert [f.status for f in files] == [FileStatus.OK] * 3
    return files


@pytest.fixture(scope="module")
def tagged() -> FileDiagnosis:
    torch.manual_seed(0)
    tokens, labels = torch.randint(0, 10, (4, 9)), torch.randint(0, 3, (4, 9))
    (found,) = rnndiag.check_model(GruTagger(), tokens, labels).files
    assert found.modules[0].layers[0].credit is not None
    return found


def _layers(files: tuple[FileDiagnosis, ...]) -> list[LayerDiagnosis]:
    return [d for f in files for m in f.modules for d in m.layers]


def test_png_has_one_panel_per_layer_direction(checked: tuple[FileDiagnosis, ...],
                                               tmp_path: Path) -> None:
    out = tmp_path / "flow.png"
    assert save_plot(checked, out, TH) == len(_layers(checked)) == 6
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir()] == ["flow.png"]  # no temporary file left


def test_svg_panels_axes_and_spans(checked: tuple[FileDiagnosis, ...], tmp_path: Path) -> None:
    out = tmp_path / "flow.svg"
    panels = save_plot(checked, out, TH)
    text = out.read_text()
    ET.fromstring(text)  # well-formed XML
    assert "<dc:date>" not in text  # no timestamp
    assert text.count('<g id="panel-flow-') == panels == 6
    assert text.count('<g id="axes_') == panels  # the r_t axis of each panel, nothing else
    assert 'id="panel-credit-' not in text
    spans = [s for d in _layers(checked) for s in d.spans]
    assert spans and text.count('id="span-') == len(spans)
    assert text.count('id="reference-') == panels


def test_vanishing_spans_are_shaded_where_the_record_says(
        checked: tuple[FileDiagnosis, ...]) -> None:
    fig, _ = figure(checked, TH)
    flows = [ax for ax in fig.axes if str(ax.get_gid()).startswith("panel-flow-")]
    assert len(flows) == 6
    for ax, d in zip(flows, _layers(checked), strict=True):
        shaded = [p for p in ax.patches if str(p.get_gid()).startswith("span-")]
        assert len(shaded) == len(d.spans)
        for patch, span in zip(shaded, d.spans, strict=True):
            x0, _, width, _ = patch.get_bbox().bounds  # data x, axes y
            assert (x0, width) == (span.start - 0.5, span.end - span.start + 1)
            colour = matplotlib.colors.to_hex(patch.get_facecolor(), keep_alpha=False)
            assert colour == matplotlib.colors.to_hex(
                "gold" if span.kind is SpanKind.VANISHING else "tab:red")
    vanishing = checked[0].modules[0].layers[0]
    assert [s.kind for s in vanishing.spans] == [SpanKind.VANISHING]
    assert vanishing.spans[0].start == 0  # the first steps, far from the final state
    reference = [ln for ln in flows[0].lines if ln.get_gid() == "reference-0"]
    assert list(reference[0].get_xdata()) == [vanishing.final_step] * 2


def test_credit_panels(tagged: FileDiagnosis, tmp_path: Path) -> None:
    out = tmp_path / "credit.svg"
    assert save_plot([tagged], out, TH) == 2  # one GRU direction: its flow and its credit
    text = out.read_text()
    assert text.count('<g id="panel-flow-') == text.count('<g id="panel-credit-') == 1
    assert text.count('<g id="axes_') == 2  # the r_t axis and the colourbar
    fig, panels = figure([tagged], TH)
    assert panels == 2 and len(fig.axes) == 4
    credit = tagged.modules[0].layers[0].credit
    assert credit is not None
    (image,) = next(ax for ax in fig.axes if ax.get_gid() == "panel-credit-0").images
    drawn = image.get_array()
    assert drawn.shape == (len(credit.positions), tagged.modules[0].seq_len)
    for i, s in enumerate(credit.positions):
        assert drawn[i, s] == 0.0  # the position's own term: log10 1
        for t in range(s + 1, drawn.shape[1]):  # causal GRU: no path from s back to t > s
            assert credit.norms[i][t] == 0.0 and drawn.mask[i, t]


def test_credit_matrix_masks_what_is_undefined() -> None:
    credit = rnndiag.records.Credit(positions=(1, 2), norms=((0.1, 1.0, 0.0), (1.0, 0.0, 0.0)))
    (row1, row2) = credit_matrix(credit)
    assert row1[:2] == [-1.0, 0.0] and math.isnan(row1[2])
    assert all(math.isnan(x) for x in row2)  # its own norm is zero: nothing to compare with


def test_two_runs_give_identical_bytes_whatever_the_user_style(
        checked: tuple[FileDiagnosis, ...], tagged: FileDiagnosis, tmp_path: Path) -> None:
    files = (checked[0], tagged)
    for suffix in (".png", ".svg"):
        first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
        save_plot(files, first, TH)
        user = {"lines.linewidth": 7.0, "font.size": 20.0, "svg.hashsalt": None,
                "axes.prop_cycle": matplotlib.cycler(color=["k"])}
        with matplotlib.rc_context(user):
            save_plot(files, second, TH)
            assert matplotlib.rcParams["lines.linewidth"] == 7.0  # theirs, restored
        assert first.read_bytes() == second.read_bytes(), suffix


def test_leaves_matplotlib_global_state_alone(checked: tuple[FileDiagnosis, ...],
                                              tmp_path: Path) -> None:
    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = matplotlib.rcParams._get_backend_or_none()  # unresolved: stays unresolved
    before = dict(matplotlib.rcParams.copy())  # copy(): reading "backend" would resolve it
    save_plot(checked[:1], tmp_path / "x.png", TH)
    assert dict(matplotlib.rcParams.copy()) == before
    assert matplotlib.rcParams._get_backend_or_none() == backend
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_names_from_checkpoints_are_plain_text(checked: tuple[FileDiagnosis, ...],
                                               tmp_path: Path) -> None:
    f = checked[0]
    module = replace(f.modules[0], spec=replace(f.modules[0].spec, name=HOSTILE))
    hostile = replace(f, path="m\x1b[31m$\\x$.pt", modules=(module,))
    assert save_plot([hostile], tmp_path / "x.svg", TH) == 1
    assert save_plot([hostile], tmp_path / "x.png", TH) == 1
    fig, _ = figure([hostile], TH)
    title = fig.axes[0].get_title(loc="left")
    assert title.startswith(f"m\\x1b[31m$\\x$.pt: {HOSTILE} 0 forward — vanishing (")


def test_long_paths_lose_their_middle(checked: tuple[FileDiagnosis, ...]) -> None:
    f = checked[0]
    long = replace(f, path="runs/" + "x" * 200 + "/model.safetensors")
    fig, _ = figure([long], TH)
    title = fig.axes[0].get_title(loc="left")
    assert len(title) == TITLE_CHARS and title.startswith("runs/xx")
    assert "…" in title and "x/model.safetensors: rnn 0 forward — vanishing (" in title


def test_nonfinite_norms_are_marked(checked: tuple[FileDiagnosis, ...], tmp_path: Path) -> None:
    f = checked[0]
    d = f.modules[0].layers[0]
    norms = list(d.state_grad_norm)
    norms[3], norms[7] = math.inf, math.nan
    ratio = list(d.ratio)
    ratio[3], ratio[7], ratio[9] = math.inf, None, None
    broken = replace(d, grad_norm=tuple(norms), state_grad_norm=tuple(norms), ratio=tuple(ratio))
    module = replace(f.modules[0], layers=(broken,))
    fig, _ = figure([replace(f, modules=(module,))], TH)
    (marks,) = [ln for ln in fig.axes[0].lines if ln.get_gid() == "nonfinite-0"]
    assert list(marks.get_xdata()) == [3, 7]
    assert save_plot([replace(f, modules=(module,))], tmp_path / "x.png", TH) == 1


def test_rows_are_capped_at_the_most_severe(checked: tuple[FileDiagnosis, ...]) -> None:
    healthy, vanishing = checked[1].modules[0].layers[0], checked[0].modules[0].layers[0]
    many = (healthy,) * MAX_ROWS + (vanishing,) + (healthy,) * 5
    big = replace(checked[0], modules=(replace(checked[0].modules[0], layers=many),))
    fig, panels = figure([big], TH)
    assert panels == MAX_ROWS
    titles = [ax.get_title(loc="left") for ax in fig.axes if ax.get_gid()]
    assert sum("vanishing (" in t for t in titles) == 1  # the vanishing one is kept
    notes = [t.get_text() for t in fig.texts]
    assert notes == [f"showing the {MAX_ROWS} most severe of {len(many)} layer/directions; "
                     "all are in the JSON (--format json)"]


def test_replaced_file_keeps_its_mode(checked: tuple[FileDiagnosis, ...],
                                      tmp_path: Path) -> None:
    out = tmp_path / "flow.png"
    out.write_bytes(b"old")
    os.chmod(out, 0o640)
    save_plot(checked[:1], out, TH)
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640


def test_missing_matplotlib_is_an_option_error(checked: tuple[FileDiagnosis, ...],
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(OptionError, match=r"^--plot needs matplotlib: pip install "
                                          r"'rnndiag\[plot\]'$"):
        save_plot(checked, tmp_path / "flow.png", TH)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["flow.pdf", "flow", "flow.png.txt"],
                         ids=["pdf", "no-suffix", "double-suffix"])
def test_unknown_picture_type_is_an_option_error(checked: tuple[FileDiagnosis, ...],
                                                 tmp_path: Path, name: str) -> None:
    with pytest.raises(OptionError, match=r"\.png or \.svg"):
        save_plot(checked, tmp_path / name, TH)
    assert not list(tmp_path.iterdir())


def test_upper_case_suffix_is_accepted(checked: tuple[FileDiagnosis, ...],
                                       tmp_path: Path) -> None:
    out = tmp_path / "FLOW.SVG"
    save_plot(checked[:1], out, TH)
    ET.fromstring(out.read_text())


def test_nothing_replayed_is_an_option_error(checked: tuple[FileDiagnosis, ...],
                                             tmp_path: Path) -> None:
    skipped = FileDiagnosis("empty.safetensors", "safetensors", FileStatus.SKIPPED)
    failed = FileDiagnosis("bad.pt", "torch", FileStatus.ERROR, error="cannot read")
    for files in ([], [skipped, failed]):
        with pytest.raises(OptionError, match="nothing to draw: no file was replayed"):
            save_plot(files, tmp_path / "flow.png", TH)
    assert not list(tmp_path.iterdir())


def test_missing_folder_is_an_option_error(checked: tuple[FileDiagnosis, ...],
                                           tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="does not exist"):
        save_plot(checked, tmp_path / "nope" / "flow.png", TH)


def test_cli_plot_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rnndiag.cli import main
    from tests.conftest import SAMPLES

    target = tmp_path / "flow.svg"
    assert main(["check", str(SAMPLES / "rnn_tanh_vanishing.safetensors"), "--seq-len", "40",
                 "--plot", str(target)]) == 1
    assert target.read_bytes().lstrip().startswith(b"<?xml")
    assert main(["check", str(SAMPLES / "rnn_tanh_vanishing.safetensors"),
                 "--plot", str(tmp_path / "flow.gif")]) == 2
    assert "--plot" in capsys.readouterr().err
