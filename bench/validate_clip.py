"""Does rnndiag's clip suggestion keep training stable? Train with it, without clipping, and
with fixed thresholds spanning decades, and compare.

Task: the adding problem of sample_models/make_samples.py (its `adding_batch`, T = 100), MSE,
training batches of B = 32, 150 steps per run. Models: the four sample models, rebuilt as
make_samples.py defines them and loaded from the committed weights (training continues from
there), plus a fresh exploding IRNN (`nn.RNN(2, 32, nonlinearity="relu")`, W_hh = 1.05 I, zero
biases; plain SGD diverges on its first step). Settings: SGD at several learning rates
(3 seeds) and Adam (2 seeds); the GRU, 8x slower per step, gets one seed fewer. A seed fixes
the data stream (and the IRNN's initialisation); every policy of a seed sees the same batches.

Policies: no clipping; `clip_grad_norm_` at fixed thresholds; and rnndiag's suggestion, got
as a user would: before training, `rnndiag.check_model(model, x, y, train_batch_size=B, lr=lr,
optimizer=...)` on the first training batch, then `d.files[0].clip.suggested_max_norm` (None:
"no suggestion", trained without clipping and said so).

A run diverges when its training loss is NaN/Inf or above 1e6 at any step (or on one more
batch after the last step); it stops there. Its final loss is the mean training loss of its
last 20 steps. A cell is the median final loss over the seeds that did not diverge, and
`div k/n` when k of n seeds diverged.

Pass criterion per row (model x learning rate), from the issue "Advice must survive contact
with training": the suggestion diverges in no more seeds than the best fixed threshold (so:
no divergence wherever some fixed threshold had none), and its final loss is within 5x of the
best fixed threshold's (best: fewest divergences, then lowest final loss).

Run: .venv/bin/python bench/validate_clip.py [--quick] [--workers N] [--output FILE]
(the full grid writes bench/clip_validation.md; --quick, a smoke test of under a minute,
writes nothing unless --output is given). Deterministic: one thread per worker, fixed seeds.

Out-of-sample checks (a rule must also pass on data it was not designed on): --seed-base S
runs seeds S, S+1, ... instead of 0, 1, ... (other data streams, other IRNN initialisations);
--seq-len and --batch change the task's T and the training batch B (the suggestion is then
measured at that B); --models and --optimizers select rows; --irnn-scale S makes the fresh
IRNN's W_hh = S I (1.08: verdict-exploding at T = 100). Rule variants, for exploration only:
--rho R, --edge E, --gate X and --polyak K recompute the suggestion from the reported N_b, step
cap, lambda, coherence G/S and the check batch's loss L as min(N_b, step_cap * R / 0.005,
E * N_b / (lambda * lr), K * L / (lr * N_b)), the curvature term only where G/S <= X (E = 0: no
curvature cap; X = 1: no gate), the loss term only for verdict-exploding models unless
--polyak-all (K = 0: none); without them the library's own value is used unchanged. Any
non-default option writes nothing unless --output is given.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
sys.path.insert(0, str(SAMPLES))
from make_samples import Model, adding_batch  # noqa: E402  (the task's own generator)

DIVERGED = 1e6  # a training loss above this (or non-finite) is divergence
LAST = 20  # final loss: mean over the last LAST steps
FACTOR = 5.0  # the suggestion's final loss must be within FACTOR x the best fixed threshold's
IRNN_SCALE = 1.05
DATA_SEED = 1000  # a seed s streams batches from torch.Generator().manual_seed(DATA_SEED + s)
NAMES = {"tanh": "tanh RNN (vanishing sample)", "lstm": "LSTM (healthy sample)",
         "relu": "ReLU RNN (exploding sample)", "gru": "GRU bidir 2-layer (sample)",
         "irnn": f"fresh IRNN, W_hh={IRNN_SCALE}·I"}


@dataclass(frozen=True)
class Grid:
    models: tuple[str, ...]
    settings: tuple[tuple[str, tuple[float, ...], int], ...]  # (optimizer, lrs, seeds)
    thresholds: tuple[float, ...]
    steps: int
    slow: tuple[str, ...] = ()  # models run with one seed fewer (for time)
    batch: int = 32
    seq_len: int = 100
    seed_base: int = 0  # seeds seed_base, seed_base + 1, ...
    rho: float | None = None  # None: the library's step cap; else recomputed with this rho
    edge: float | None = None  # None: the library's curvature cap; else recomputed (0: none)
    gate: float | None = None  # None: the library's coherence gate; else recomputed (1: none)
    polyak: float | None = None  # None: the library's loss cap; else K * L / (lr * N_b) (0: none)
    polyak_all: bool = False  # that loss cap for every model, not only exploding ones
    irnn_scale: float = IRNN_SCALE  # the fresh IRNN's W_hh = irnn_scale * I

    def seeds(self, model: str, seeds: int) -> int:
        return max(1, seeds - 1) if model in self.slow else seeds

    def seed_range(self, model: str, seeds: int) -> range:
        return range(self.seed_base, self.seed_base + self.seeds(model, seeds))


FULL = Grid(("tanh", "lstm", "relu", "gru", "irnn"),
            (("sgd", (0.01, 0.1, 1.0), 3), ("adam", (1e-3, 1e-2), 2)),
            (0.01, 0.1, 1.0, 10.0, 100.0), steps=150, slow=("gru",))
QUICK = Grid(("tanh", "irnn"), (("sgd", (0.1,), 1), ("adam", (1e-3,), 1)),
             (0.1, 1.0, 10.0), steps=30)


@dataclass(frozen=True)
class Job:
    optimizer: str
    lr: float
    model: str
    seed: int
    grid: Grid


@dataclass(frozen=True)
class Run:
    diverged: bool
    final: float  # mean training loss of the last LAST steps (inf when diverged)
    steps: int  # steps taken (the step that diverged, when it did)
    clipped: float  # fraction of steps whose pre-clip norm exceeded the threshold
    median_norm: float  # median pre-clip gradient norm


@dataclass(frozen=True)
class Suggestion:
    value: float | None
    decided_by: str
    expected_norm: float | None
    step_cap: float | None
    curvature_cap: float | None
    loss_cap: float | None
    note: str  # why there is no value, else ""
    curvature: float | None = None  # lambda, as reported in the inputs
    coherence: float | None = None  # G/S, as reported in the inputs
    loss: float | None = None  # the task loss on the check batch (variants only)
    exploding: bool = False  # some module's verdict is exploding (variants only)


@dataclass(frozen=True)
class Cell:
    job: Job
    suggestion: Suggestion
    runs: tuple[tuple[str, Run], ...]  # (policy label, run)


def build(name: str, seed: int, scale: float = IRNN_SCALE) -> Model:
    """The model at the start of training: a sample model's committed weights, or a fresh
    IRNN (initialised from `seed`, W_hh = scale * I)."""
    torch.manual_seed(seed)
    if name == "irnn":
        irnn = nn.RNN(2, 32, nonlinearity="relu", batch_first=True)
        with torch.no_grad():  # IRNN (Le et al. 2015) a little above the identity
            irnn.get_parameter("weight_hh_l0").copy_(scale * torch.eye(32))
            irnn.get_parameter("bias_hh_l0").zero_()
            irnn.get_parameter("bias_ih_l0").zero_()
        return Model(irnn, 32)
    if name == "gru":
        model = Model(nn.GRU(2, 16, num_layers=2, bidirectional=True, batch_first=True), 32)
        saved = torch.load(SAMPLES / "gru_bidir_2layer.pt", weights_only=True)
        state = {k.removeprefix("module."): v for k, v in saved["model_state_dict"].items()}
    else:
        rnn: nn.Module = (nn.LSTM(2, 32, batch_first=True) if name == "lstm" else
                          nn.RNN(2, 32, nonlinearity="relu" if name == "relu" else "tanh",
                                 batch_first=True))
        model = Model(rnn, 32)
        file = {"tanh": "rnn_tanh_vanishing", "lstm": "lstm_healthy",
                "relu": "rnn_relu_exploding"}[name]
        state = load_file(SAMPLES / f"{file}.safetensors")
    model.load_state_dict(state)
    return model


def stream(job: Job) -> torch.Generator:
    return torch.Generator().manual_seed(DATA_SEED + job.seed)


def suggestion(job: Job) -> Suggestion:
    """rnndiag's suggestion, as a user gets it: check_model on the first training batch."""
    import rnndiag

    x, y = adding_batch(job.grid.batch, job.grid.seq_len, stream(job))
    model = build(job.model, job.seed, job.grid.irnn_scale)
    with torch.no_grad():  # for the variants' loss cap (check_model leaves the model as it was)
        loss = float(nn.functional.mse_loss(model(x), y))
    try:
        d = rnndiag.check_model(model, x, y,
                                train_batch_size=job.grid.batch, lr=job.lr,
                                optimizer=job.optimizer)
    except rnndiag.RnnDiagError as err:
        return Suggestion(None, "error", None, None, None, None, f"check_model raised: {err}")
    clip = d.files[0].clip
    if clip is None:
        return Suggestion(None, "none", None, None, None, None, "no clip record")
    note = "" if clip.suggested_max_norm is not None else clip.advice
    measured = {i.name: i.value for i in clip.inputs if isinstance(i.value, float)}
    found = Suggestion(clip.suggested_max_norm, clip.decided_by, clip.expected_norm,
                       clip.step_cap, clip.curvature_cap, clip.loss_cap, note,
                       measured.get("curvature"),
                       measured.get("coherence"), loss,
                       any(m.verdict.value == "exploding" for m in d.files[0].modules))
    grid = job.grid
    return found if (grid.rho, grid.edge, grid.gate, grid.polyak) == (None,) * 4 else \
        variant(found, grid, job.lr)


def variant(s: Suggestion, grid: Grid, lr: float) -> Suggestion:
    """The suggestion recomputed with --rho / --edge / --gate from the reported N_b, step cap,
    curvature lambda and coherence G/S."""
    from rnndiag import clip

    cap = s.step_cap if grid.rho is None or s.step_cap is None else \
        s.step_cap * grid.rho / clip.RHO
    edge = clip.EDGE if grid.edge is None else grid.edge
    gate = clip.COHERENT if grid.gate is None else grid.gate
    near = s.coherence is not None and s.coherence <= gate
    bent = (edge * s.expected_norm / (s.curvature * lr) if near and edge > 0 and s.curvature
            and s.curvature > 0 and s.expected_norm is not None and s.step_cap is not None
            else None)
    polyak = s.loss_cap if grid.polyak is None else (
        grid.polyak * s.loss / (lr * s.expected_norm) if grid.polyak and s.loss and
        s.expected_norm and s.step_cap is not None and (grid.polyak_all or s.exploding)
        else None)
    terms = [(x, k) for x, k in ((s.expected_norm, "expected_norm"), (cap, "step_cap"),
                                 (bent, "curvature_cap"), (polyak, "loss_cap")) if x is not None]
    if not terms:
        return s
    value, by = min(terms, key=lambda t: t[0])
    return Suggestion(value, by, s.expected_norm, cap, bent, polyak, s.note, s.curvature,
                      s.coherence, s.loss, s.exploding)


def bad(loss: float) -> bool:
    return not math.isfinite(loss) or loss > DIVERGED


def train(job: Job, max_norm: float | None) -> Run:
    """`job.grid.steps` steps with clip_grad_norm_(max_norm) before each (None: no clipping)."""
    model, gen, grid = build(job.model, job.seed, job.grid.irnn_scale), stream(job), job.grid
    params = list(model.parameters())
    opt = (torch.optim.SGD(params, lr=job.lr) if job.optimizer == "sgd"
           else torch.optim.Adam(params, lr=job.lr))
    losses: list[float] = []
    norms: list[float] = []
    for step in range(grid.steps + 1):
        x, y = adding_batch(grid.batch, grid.seq_len, gen)
        loss = nn.functional.mse_loss(model(x), y)
        if bad(loss.item()):
            return Run(True, math.inf, step, _frac(norms, max_norm), _median(norms))
        if step == grid.steps:  # one more batch: did the last update blow up?
            break
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        norms.append(float(nn.utils.get_total_norm([p.grad for p in params]) if max_norm is None
                           else nn.utils.clip_grad_norm_(params, max_norm)))
        opt.step()
    return Run(False, statistics.fmean(losses[-LAST:]), grid.steps, _frac(norms, max_norm),
               _median(norms))


def _frac(norms: list[float], max_norm: float | None) -> float:
    if not norms or max_norm is None:
        return 0.0
    return sum(n > max_norm for n in norms) / len(norms)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def run_cell(job: Job) -> Cell:
    """Every policy for one (optimizer, lr, model, seed): no clip, each fixed threshold, and
    rnndiag's suggestion."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    s = suggestion(job)
    runs = [("none", train(job, None))]
    runs += [(_num(c), train(job, c)) for c in job.grid.thresholds]
    runs.append(("rnndiag", train(job, s.value)))
    return Cell(job, s, tuple(runs))


def jobs(grid: Grid) -> list[Job]:
    """Every cell, the slow GRU first so that the workers finish together."""
    out = [Job(opt, lr, model, seed, grid) for opt, lrs, seeds in grid.settings
           for model in grid.models for lr in lrs for seed in grid.seed_range(model, seeds)]
    return sorted(out, key=lambda j: j.model != "gru")


# ---- aggregation and the markdown report -------------------------------------------------

@dataclass(frozen=True)
class Agg:
    """One policy over the seeds of a row."""

    diverged: int
    seeds: int
    final: float  # median final loss of the seeds that did not diverge (inf: all diverged)

    def key(self) -> tuple[int, float]:
        return (self.diverged, self.final)

    def text(self) -> str:
        div = f"div {self.diverged}/{self.seeds}" if self.diverged else ""
        if self.diverged == self.seeds:
            return div
        return f"{_num(self.final)} {div}".strip()


def aggregate(runs: Iterable[Run]) -> Agg:
    runs = list(runs)
    ok = [r.final for r in runs if not r.diverged]
    return Agg(len(runs) - len(ok), len(runs), statistics.median(ok) if ok else math.inf)


def verdict(fixed: dict[str, Agg], ours: Agg) -> tuple[bool, str]:
    """The pass criterion (module docstring) for one row."""
    label, best = min(fixed.items(), key=lambda item: item[1].key())
    if ours.diverged > best.diverged:
        return False, f"FAIL: diverged {ours.diverged}/{ours.seeds}, {label} {best.diverged}/" \
            f"{best.seeds}"
    if not math.isfinite(best.final):
        return True, "PASS (every fixed threshold diverged)"
    ratio = ours.final / best.final
    word = "PASS" if ratio <= FACTOR else "FAIL"
    return ratio <= FACTOR, f"{word} {ratio:.2f}x best ({label})"


def _num(value: float) -> str:
    """Two significant digits; whole numbers (thresholds) as written."""
    if not math.isfinite(value) or (value == int(value) and abs(value) < 1e4):
        return f"{value:g}"
    return f"{value:.2g}"


def _sug_text(sugs: list[Suggestion]) -> str:
    values = [s.value for s in sugs if s.value is not None]
    if not values:
        return "no suggestion"
    tags = {"step_cap": "cap", "expected_norm": "N_b", "curvature_cap": "curv",
            "loss_cap": "loss"}
    by = "/".join(sorted({tags.get(s.decided_by, s.decided_by) for s in sugs if s.value}))
    missing = f", none {len(sugs) - len(values)}/{len(sugs)}" if len(values) < len(sugs) else ""
    return f"c={_num(statistics.median(values))} {by}{missing}"


def row_cells(cells: list[Cell]) -> tuple[list[str], bool, list[str]]:
    """(markdown cells of the result row, passed, markdown cells of the details row)."""
    labels = [label for label, _ in cells[0].runs]
    aggs = {label: aggregate(dict(c.runs)[label] for c in cells) for label in labels}
    fixed = {label: aggs[label] for label in labels[1:-1]}
    ok, why = verdict(fixed, aggs["rnndiag"])
    sugs = [c.suggestion for c in cells]
    ours = f"{aggs['rnndiag'].text()} ({_sug_text(sugs)})"
    result = [aggs[label].text() for label in labels[:-1]] + [ours, why]
    ours_runs = [dict(c.runs)["rnndiag"] for c in cells]
    details = [_med(s.expected_norm for s in sugs), _med(s.step_cap for s in sugs),
               _med(s.curvature_cap for s in sugs), _med(s.loss_cap for s in sugs),
               _med(s.value for s in sugs),
               ", ".join(sorted({s.decided_by for s in sugs})),
               f"{statistics.median(r.clipped for r in ours_runs):.0%}",
               _med(r.median_norm for r in ours_runs),
               "; ".join(sorted({s.note for s in sugs if s.note}))[:160]]
    return result, ok, details


def _med(values: Iterable[float | None]) -> str:
    got = [v for v in values if v is not None and not math.isnan(v)]
    return _num(statistics.median(got)) if got else "-"


def name(model: str, grid: Grid) -> str:
    return NAMES[model].replace(f"{IRNN_SCALE}", f"{grid.irnn_scale:g}")


def render(cells: list[Cell], grid: Grid, header: list[str]) -> tuple[str, int, int]:
    """The markdown report; (text, rows passed, rows)."""
    lines, passed, total = list(header), 0, 0
    for opt, lrs, seeds in grid.settings:
        thr = [_num(c) for c in grid.thresholds]
        fewer = "".join(f"; {m}: {grid.seeds(m, seeds)}" for m in grid.slow if m in grid.models)
        lines += ["", f"## {opt.upper()} (seeds: {seeds}{fewer})", "",
                  "| model | lr | no clip | " + " | ".join(thr) + " | rnndiag | result |",
                  "|---|---:|" + "---:|" * (len(thr) + 2) + "---|"]
        details = ["", f"Suggestion details ({opt}): medians over seeds; `clipped` is the "
                   "fraction of steps the suggestion clipped in training.", "",
                   "| model | lr | N_b | step cap | curvature cap | loss cap | c | decided by | "
                   "clipped | pre-clip norm | note |",
                   "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
        for model in grid.models:
            for lr in lrs:
                row = sorted((c for c in cells if (c.job.optimizer, c.job.model, c.job.lr)
                              == (opt, model, lr)), key=lambda c: c.job.seed)
                result, ok, more = row_cells(row)
                passed, total = passed + ok, total + 1
                lines.append(f"| {name(model, grid)} | {_num(lr)} | " + " | ".join(result) + " |")
                details.append(f"| {name(model, grid)} | {_num(lr)} | " + " | ".join(more) + " |")
        lines += details
    lines += ["", f"**Rows passed: {passed}/{total}.**"]
    return "\n".join(lines) + "\n", passed, total


def header(grid: Grid, argv: list[str], seconds: float, workers: int) -> list[str]:
    settings = "; ".join(f"{opt} lr {', '.join(_num(lr) for lr in lrs)} x {seeds} seeds"
                         for opt, lrs, seeds in grid.settings)
    settings += f" (seeds from {grid.seed_base})"
    rule = "the library's rule" if (grid.rho, grid.edge, grid.gate, grid.polyak) == (None,) * 4 \
        else (f"a VARIANT recomputed from the reported terms: rho = {grid.rho or 0.005:g}, "
              f"edge = {2.0 if grid.edge is None else grid.edge:g}, "
              f"gate = {0.5 if grid.gate is None else grid.gate:g}, "
              + ("library's loss cap" if grid.polyak is None else
                 f"loss cap {grid.polyak:g}·L/(lr·N_b) "
                 f"({'every model' if grid.polyak_all else 'exploding models'})"))
    return ["# Clip-norm suggestion: validation by training", "",
            f"- command: `{' '.join(['.venv/bin/python', 'bench/validate_clip.py', *argv])}`",
            f"- torch {torch.__version__}, CPU, {workers} worker process(es) x 1 thread; "
            f"wall time {seconds:.0f} s; {datetime.date.today().isoformat()}",
            f"- task: adding problem (sample_models/make_samples.py), T = {grid.seq_len}, "
            f"training batch B = {grid.batch}, MSE; {grid.steps} steps per run",
            f"- grid: models {', '.join(grid.models)}; {settings}; fixed thresholds "
            f"{', '.join(_num(c) for c in grid.thresholds)}"
            + (f"; {', '.join(grid.slow)}: one seed fewer (time)" if grid.slow else ""),
            "- rnndiag: `check_model(model, x, y, train_batch_size=B, lr=lr, optimizer=...)` on "
            "the first training batch; `c` is `files[0].clip.suggested_max_norm` (median over "
            "seeds), decided by `N_b` (expected norm), `cap` (rho·||θ||/lr, over T when the "
            "gradient explodes through time), `curv` (2·N_b/(λ·lr)) or `loss` (L/(lr·N_b), "
            f"only when it explodes); {rule}",
            f"- cell: median final loss (mean training loss of the last {LAST} steps) over the "
            f"seeds that did not diverge; `div k/n`: k of n seeds diverged (loss NaN/Inf or "
            f"> {DIVERGED:.0e})",
            f"- result: PASS when the suggestion diverges in no more seeds than the best fixed "
            f"threshold and its final loss is within {FACTOR:g}x of the best fixed threshold's "
            "(best: fewest divergences, then lowest loss)"]


def variant_grid(grid: Grid, args: argparse.Namespace) -> Grid:
    """The grid with the out-of-sample and variant options applied."""
    models = tuple(args.models.split(",")) if args.models else grid.models
    unknown = [m for m in models if m not in NAMES]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(NAMES)}")
    optimizers = args.optimizers.split(",") if args.optimizers else [o for o, _, _ in
                                                                      grid.settings]
    settings = tuple(s for s in grid.settings if s[0] in optimizers)
    return replace(grid, models=models, settings=settings, seed_base=args.seed_base,
                   seq_len=args.seq_len or grid.seq_len, batch=args.batch or grid.batch,
                   rho=args.rho, edge=args.edge, gate=args.gate, polyak=args.polyak,
                   polyak_all=args.polyak_all, irnn_scale=args.irnn_scale or IRNN_SCALE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny grid (smoke test)")
    parser.add_argument("--workers", type=int, default=min(2, multiprocessing.cpu_count()))
    parser.add_argument("--output", type=Path, default=None,
                        help="default: bench/clip_validation.md (none with --quick or any "
                        "option below)")
    parser.add_argument("--seed-base", type=int, default=0, help="first seed (fresh: 100)")
    parser.add_argument("--seq-len", type=int, default=None, help="the task's T (100)")
    parser.add_argument("--batch", type=int, default=None, help="training batch B (32)")
    parser.add_argument("--models", default=None, help="comma-separated subset of " +
                        ",".join(FULL.models))
    parser.add_argument("--optimizers", default=None, help="comma-separated: sgd,adam")
    parser.add_argument("--irnn-scale", type=float, default=None,
                        help=f"the fresh IRNN's W_hh = S * I ({IRNN_SCALE})")
    parser.add_argument("--rho", type=float, default=None, help="variant: step cap's rho")
    parser.add_argument("--edge", type=float, default=None,
                        help="variant: curvature cap's factor (0: none)")
    parser.add_argument("--gate", type=float, default=None,
                        help="variant: coherence G/S up to which the curvature cap applies "
                        "(1: always)")
    parser.add_argument("--polyak", type=float, default=None,
                        help="variant: the loss cap as K * L / (lr * N_b), L the check batch's "
                        "loss (exploding models only, unless --polyak-all; 0: none)")
    parser.add_argument("--polyak-all", action="store_true", help="variant: --polyak for every "
                        "model")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    grid = variant_grid(QUICK if args.quick else FULL, args)
    default = grid == FULL
    output = args.output or (ROOT / "bench" / "clip_validation.md" if default else None)
    start = time.perf_counter()
    todo = jobs(grid)
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        cells = []
        for i, cell in enumerate(pool.imap_unordered(run_cell, todo), 1):
            cells.append(cell)
            print(f"[{i}/{len(todo)} {time.perf_counter() - start:.0f}s] {cell.job.optimizer} "
                  f"{cell.job.model} lr={cell.job.lr} seed={cell.job.seed}",
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    text, passed, total = render(cells, grid, header(grid, argv, seconds, args.workers))
    print(text)
    if output is not None:
        output.write_text(text)
        print(f"written to {output}", file=sys.stderr)
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
