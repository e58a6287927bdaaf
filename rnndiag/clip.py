"""A gradient-clipping threshold that keeps training stable (validated by bench/validate_clip.py).

From n per-example gradients g_i of the task loss (each example's loss on its own, all model
parameters that require grad), with S = mean ||g_i||^2 and F = ||mean g_i||^2:

    G   = max(0, (n F - S) / (n - 1))        an unbiased estimate of ||E g||^2
    N_b = sqrt(G + (S - G) / b)              the expected pre-clip gradient norm of a training
                                             mini-batch of b examples (mean-reduced loss)

The suggestion, for SGD-family optimizers with learning rate lr and parameters theta:

    c = min(N_b, rho * ||theta||_2 / lr, 2 * N_b / (lambda * lr), L / (lr * N_b)),  rho = 0.005

N_b is Pascanu et al.'s "around the average norm", at the batch size training uses; the step
cap limits one SGD step to 0.5% of the parameter norm and takes over when the measured norms
are meaningless (an exploding model); when the gradient explodes through time, it is divided
by the sequence length T (a relative change e of W_hh moves a T-step product of Jacobians by
about T e: 0.5% of that product). The loss cap L / (lr N_b) applies only then too: L is the task
loss on the batch, and a step of lr c along a gradient of norm N_b lowers the loss, to first
order, by lr c N_b, which must not exceed L itself (Polyak's step size with the loss floor 0,
so only for losses bounded below by 0: mean squared error and cross-entropy, not a custom one).
T e is an estimate, from the recurrence alone, of how fast the loss moves; the loss cap measures
it from the loss and its gradient (bench/validate_clip.py: on the exploding ReLU sample a step
of 0.5%/T of the parameter norm raised the loss fourfold, the first-order prediction being
about 4 L). Where the recurrence does not explode it does not apply: an IRNN whose outputs explode
but whose gradient does not grow through time needs steps far above L / N_b to repair itself
(loss 19 under the loss cap against 0.2-0.3 under the step cap).

The curvature cap is gradient descent's stability edge: lambda is the top eigenvalue of the
task loss's Hessian on the batch (`top_curvature`), and a step of a gradient of norm N_b
clipped to c moves lr * c along it; on the local quadratic model that step cannot raise the
loss only while lr * c <= 2 * N_b / lambda' for the curvature lambda' <= lambda along the
gradient, i.e. while the step's effective learning rate lr * c / N_b stays within the classical
2 / lambda. It is below N_b only when lr * lambda > 2, where unclipped SGD is unstable. That is
linear stability around a stationary point, so the curvature cap applies only near one: when
G <= S / 2 (the per-example gradients disagree more than they agree; G ~ 0 at a minimum). When
G > S / 2 the examples agree on a slope and training is in transit: in a model whose outputs
explode, lambda is set by the explosion and falls by orders of magnitude as training repairs it
(bench/validate_clip.py, fresh IRNN), so the start's lambda would hold training back; the step
cap governs there. Adam-family optimizers normalise the step themselves: neither cap applies,
N_b is reported as the typical norm, and clipping well below it only slows training. Without a
task loss (checkpoint mode) no norm and no curvature are measured: only the step cap, when the
learning rate is known.

The spread of the norm at batch size b and the fraction of steps the suggestion clips come from
simulated batches (`resampled_norms`) computed through the Gram matrix K_ij = <g_i, g_j>: the
per-example gradients are never kept beyond it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rnndiag.records import (
    CheckOptions,
    ClipInput,
    ClipSuggestion,
    ModuleDiagnosis,
    TrainingState,
    Verdict,
)

RHO = 0.005  # the cap: one SGD step moves the parameters by at most 0.5% of their norm
EDGE = 2.0  # the curvature cap: effective learning rate * lambda <= 2, GD's stability edge
COHERENT = 0.5  # G/S above this: the examples agree on a slope, training is in transit
LANCZOS_STEPS = 30  # Hessian-vector products at most, for lambda (Lanczos)
LANCZOS_TOLERANCE = 1e-4  # relative change of the top Ritz value that stops the iteration
ADAM_FAMILY = ("adam", "adamw", "nadam", "radam", "adamax", "adagrad", "rmsprop", "adadelta")
SGD_FAMILY = ("sgd",)
OPTIMIZERS = SGD_FAMILY + ADAM_FAMILY
MAX_EXAMPLES = 64  # per-example gradients measured at most
GRAM_BYTES = 512 * 2**20  # the per-example gradients kept at once (float32 count), at most
RESAMPLES = 2000


def examples_for(batch: int, parameters: int) -> int:
    """How many per-example gradients to measure: up to 64, within the memory budget."""
    return max(1, min(batch, MAX_EXAMPLES, GRAM_BYTES // max(1, 4 * parameters)))


def per_example_gram(loss_of: Callable[[int], Tensor | None], params: Sequence[Tensor],
                     count: int) -> Tensor:
    """K (n, n) float64 of the per-example gradients of `loss_of(i)` (None: example i has no
    loss term, left out); one forward/backward pass per example through the model itself.

    On the CPU the passes run on one thread: a single example's operations are too small to
    share (2.4x faster per example than two threads on a busy 2-core machine)."""
    flat: list[Tensor] = []
    with one_thread(any(p.device.type == "cpu" for p in params)):
        for i in range(count):
            with torch.enable_grad():
                loss = loss_of(i)
                if loss is None or not loss.requires_grad:
                    continue
                grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).detach()
                                   .reshape(-1) for g, p in zip(grads, params, strict=True)]))
    if not flat:
        return torch.zeros(0, 0, dtype=torch.float64)
    return inner_products(torch.stack(flat))  # (n, P) -> (n, n)


CHUNK = 65536  # columns per float32 product in `inner_products`


def inner_products(rows: Tensor) -> Tensor:
    """rows @ rows^T (n, n) float64 on the CPU. Float32 rows are multiplied in chunks of
    CHUNK columns, each chunk's product summed in float64 (10x faster than converting the
    rows to float64; measured 2e-7 relative to it on 32 x 786,432 Gaussian rows)."""
    if rows.dtype == torch.float64:
        return (rows @ rows.T).cpu()
    out = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64, device=rows.device)
    for part in rows.split(CHUNK, dim=1):
        out += (part @ part.T).double()
    return out.cpu()


@contextlib.contextmanager
def one_thread(cpu: bool) -> Iterator[None]:
    """torch's intra-op threads set to one while the block runs (when `cpu`), then restored."""
    before = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if cpu:
            torch.set_num_threads(before)


def expected_norm(gram: Tensor, b: int) -> tuple[float, float, float]:
    """(N_b, S, G) from the Gram matrix of n >= 2 per-example gradients."""
    n = gram.shape[0]
    s = float(gram.diagonal().mean())
    f = float(gram.sum()) / (n * n)
    g = max(0.0, (n * f - s) / (n - 1))
    return math.sqrt(g + (s - g) / b), s, g


def resampled_norms(gram: Tensor, b: int, seed: int = 0) -> Tensor:
    """Norms of RESAMPLES simulated training batches of b examples (float64).

    A batch's mean gradient is m + e: m the mean gradient (scaled so that ||m||^2 = G), e
    Gaussian with the per-example covariance over b, both within the span of the measured
    g_i; so its expected square is exactly N_b^2, whatever b is against n.
    """
    n = gram.shape[0]
    gen = torch.Generator().manual_seed(seed)
    _, s, g = expected_norm(gram, b)
    f = float(gram.sum()) / (n * n)
    scale = math.sqrt(g / f) if f > 0 else 0.0
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    z = torch.randn(RESAMPLES, n, generator=gen, dtype=torch.float64)
    coef = scale / n + (z @ centre) / math.sqrt(b * (n - 1))
    return ((coef @ gram) * coef).sum(1).clamp(min=0).sqrt()


def exploding_steps(modules: Sequence[ModuleDiagnosis]) -> int | None:
    """The longest sequence among the modules whose verdict is exploding (`suggest`'s
    `steps`), or None: none explodes."""
    return max((m.seq_len for m in modules if m.verdict is Verdict.EXPLODING), default=None)


def step_cap(param_norm: float, lr: float | None) -> float | None:
    return None if lr is None or lr <= 0 else RHO * param_norm / lr


def curvature_cap(nb: float | None, curvature: float | None, lr: float | None) -> float | None:
    """2 N_b / (lambda lr): the clipped step's effective learning rate at the stability edge."""
    if nb is None or curvature is None or curvature <= 0 or lr is None or lr <= 0:
        return None
    return EDGE * nb / (curvature * lr)


def loss_cap(loss: float | None, nb: float, lr: float | None) -> float | None:
    """L / (lr N_b): the clip at which a step's first-order loss decrease equals the loss
    (Polyak's step size, floor 0); None when the loss, N_b or lr is unknown or not positive."""
    if loss is None or not math.isfinite(loss) or loss <= 0 or lr is None or lr <= 0 \
            or not nb > 0 or not math.isfinite(nb):
        return None
    return loss / (lr * nb)


def top_curvature(loss_of: Callable[[], Tensor], params: Sequence[Tensor],
                  seed: int = 0) -> float:
    """lambda: the largest eigenvalue of the Hessian of `loss_of()` in `params`.

    Lanczos on Hessian-vector products (double backward through the model; three vectors
    kept, no reorthogonalisation, which spoils only interior Ritz values): the top Ritz value
    of the tridiagonal matrix, a lower bound that converges fast to the top eigenvalue, until
    it changes by under LANCZOS_TOLERANCE (at most LANCZOS_STEPS products). It bounds the
    curvature along any direction, the gradient's included; <= 0: no direction curves up.
    0.0: the gradient does not depend on the parameters. cuDNN has no double backward for its
    RNN kernels: they are off while this runs.
    """
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
        grads = torch.autograd.grad(loss_of(), list(params), create_graph=True,
                                    allow_unused=True)
        pairs = [(g, p) for g, p in zip(grads, params, strict=True)
                 if g is not None and g.requires_grad]
        if not pairs:
            return 0.0

        def hvp(v: list[Tensor]) -> list[Tensor]:
            hv = torch.autograd.grad([g for g, _ in pairs], [p for _, p in pairs],
                                     grad_outputs=v, retain_graph=True, allow_unused=True)
            return [h.detach() if h is not None else torch.zeros_like(p)
                    for h, (_, p) in zip(hv, pairs, strict=True)]

        gen = torch.Generator().manual_seed(seed)
        v = _unit([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                   for _, p in pairs])
        return _lanczos(hvp, v)


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


def _unit(v: list[Tensor]) -> list[Tensor]:
    norm = math.sqrt(_dot(v, v))
    return [x / norm for x in v]


def _lanczos(hvp: Callable[[list[Tensor]], list[Tensor]], v: list[Tensor]) -> float:
    """The top Ritz value of Lanczos from the unit vector v (see `top_curvature`)."""
    alphas: list[float] = []
    betas: list[float] = []
    previous: list[Tensor] = [torch.zeros_like(x) for x in v]
    top = -math.inf
    for _ in range(LANCZOS_STEPS):
        w = hvp(v)
        alpha = _dot(w, v)
        w = [a - alpha * b - (betas[-1] if betas else 0.0) * c
             for a, b, c in zip(w, v, previous, strict=True)]
        alphas.append(alpha)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        ritz, last = float(torch.linalg.eigvalsh(tri)[-1]), top
        top = ritz
        if not math.isfinite(ritz) or abs(ritz - last) <= LANCZOS_TOLERANCE * abs(ritz):
            break
        beta = math.sqrt(_dot(w, w))
        if beta <= 1e-10 * max(abs(a) for a in alphas):  # an invariant subspace: exact
            break
        betas.append(beta)
        previous, v = v, [x / beta for x in w]
    return top


def suggest(gram: Tensor | None, inputs: Sequence[ClipInput], b: int, optimizer: str | None,
            lr: float | None, param_norm: float, parameters: str, count: int,
            exploding: bool, unavailable: str | None = None,
            curvature: float | None = None, steps: int | None = None,
            loss: float | None = None) -> ClipSuggestion:
    """The suggestion and every number behind it (see the module docstring); `gram` None:
    no per-example gradients (`unavailable` says why; default: no task loss); `curvature`:
    lambda of the task loss on the batch (None: not measured); `steps`: the sequence length
    over which an `exploding` gradient grows (the step cap is divided by it); `loss`: the task
    loss on the batch when it is bounded below by 0 (None: unknown, or no such bound), for the
    loss cap of an `exploding` model."""
    cap = step_cap(param_norm, lr) if optimizer not in ADAM_FAMILY else None
    if cap is not None and exploding and steps is not None and steps > 1:
        # a relative change e of W_hh changes a T-step product of Jacobians by about T e:
        # for a recurrence that explodes, 0.5% of that product, not of the parameters
        cap /= steps
        inputs = (*inputs, ClipInput("steps", float(steps), "batch"))
    n = 0 if gram is None else gram.shape[0]
    if gram is None or n < 2 or not bool(torch.isfinite(gram).all()):
        why = (unavailable or "no task loss: the final-state objective's gradient is not a "
               "training norm; --model with targets measures one") if gram is None else (
            "the per-example gradients are not finite" if n >= 2 else
            "fewer than two examples have a loss term")
        return ClipSuggestion(cap, "step_cap" if cap is not None else "none", None, None, None,
                              cap, None, None, n, parameters, count, tuple(inputs),
                              _advice(None, optimizer, exploding, why, cap is not None))
    nb, s, g = expected_norm(gram, b)
    near = g <= COHERENT * s  # no coherent slope: near a stationary point, where lambda holds
    bent = curvature_cap(nb, curvature, lr) if optimizer not in ADAM_FAMILY and near else None
    polyak = loss_cap(loss, nb, lr) if cap is not None and exploding else None
    if polyak is not None:
        inputs = (*inputs, ClipInput("loss", loss, "measured"))
    value, decided = min([(nb, "expected_norm")] + [(x, k) for x, k in (
        (cap, "step_cap"), (bent, "curvature_cap"), (polyak, "loss_cap")) if x is not None],
        key=lambda t: t[0])
    norms = resampled_norms(gram, b)
    spread = tuple(float(torch.quantile(norms, q)) for q in (0.1, 0.5, 0.9))
    clipped = float((norms > value).double().mean())
    coherence = ClipInput("coherence", g / s if s > 0 else 0.0, "measured")
    return ClipSuggestion(value, decided, nb, (spread[0], spread[1], spread[2]), clipped, cap,
                          bent, polyak, n, parameters, count, (*inputs, coherence),
                          _advice(decided, optimizer, exploding, None, cap is not None)
                          + (_TRANSIT if curvature is not None and not near and
                             optimizer not in ADAM_FAMILY else "")
                          + (_NO_FLOOR if cap is not None and exploding and loss is None
                             else ""))


_NO_FLOOR = (" The loss cap L/(lr*N_b) is not applied: it needs a loss bounded below by 0 "
             "(the built-in MSE or cross-entropy), and a custom loss's floor is unknown.")
_TRANSIT = (" The examples agree on a slope (coherence G/S > 0.5): training is in transit, "
            "where the curvature changes along the way, so the curvature cap does not apply.")


def _advice(decided: str | None, optimizer: str | None, exploding: bool, why: str | None,
            capped: bool) -> str:
    if optimizer in ADAM_FAMILY:
        text = (f"{optimizer} normalises its steps: clipping well below the typical norm only "
                "slows training")
        if exploding:
            text += ("; the gradient explodes through time here, and clipping is not the fix: "
                     "lower the learning rate, or change the cell or its initialisation")
        return text + "."
    if why is not None:
        if capped:
            return (f"No measured norm ({why}); the step cap rho*||theta||/lr limits an SGD "
                    "step to 0.5% of the parameter norm" + (
                        " over the sequence length, as the gradient explodes through time."
                        if exploding else "."))
        return (f"No suggestion: {why}; give the learning rate (--lr) for the step cap, "
                "or --model with targets for a measured norm.")
    if optimizer is None:
        return ("The expected norm at the training batch size; give --optimizer and --lr for "
                "the caps that keep plain SGD stable when the model explodes.")
    use = "Use as clip_grad_norm_(params, max_norm), Lightning gradient_clip_val or HF " \
        "max_grad_norm."
    if decided == "curvature_cap":
        use += (" The learning rate is past the stability edge 2/lambda of this loss's "
                "curvature: the clip keeps steps at that edge")
        use += (", but an exploding model barely moves under it: change the cell or its "
                "initialisation." if exploding else "; a lower learning rate does the same.")
    elif exploding and decided == "loss_cap":
        # bench/validate_clip.py: the exploding ReLU sample (loss 1e5 at the start) stayed
        # below the divergence line at every SGD rate, at 0.82-0.86x clip 0.01's loss, where
        # clips from 0.1 up diverged; it learned little (README, Validation)
        use += (" The gradient explodes through time here: the loss cap L/(lr*N_b) keeps each "
                "SGD step's first-order loss decrease within the loss itself (Polyak's step "
                "size). In validation that kept an exploding RNN from diverging, but one whose "
                "loss had already diverged learned little under it: lower the learning rate, "
                "or change the cell or its initialisation.")
    elif exploding and decided == "step_cap":
        # bench/validate_clip.py: divided by T, the step cap kept the exploding GRU sample at
        # the best fixed clip's loss; a fresh IRNN at 1.08 I, which needs large steps to repair
        # its explosion, stayed at loss 400 at lr 1 (README, Validation)
        use += (" The gradient explodes through time here: the step cap keeps each SGD step "
                "within 0.5%/T of the parameter norm (T the sequence length: a change of the "
                "recurrent weights moves a T-step product of Jacobians T times as much). In "
                "validation that kept exploding RNNs from diverging, but one that needed large "
                "steps to repair its explosion learned little under it: lower the learning "
                "rate, or change the cell or its initialisation.")
    return use


@dataclass(frozen=True)
class Chosen:
    """The rule's inputs, each with where it came from."""

    batch: int
    optimizer: str | None
    lr: float | None
    inputs: tuple[ClipInput, ...]


def clip_inputs(options: CheckOptions, state: TrainingState | None, batch: int) -> Chosen:
    """Training batch size, optimizer and learning rate: the option (or config), else the
    checkpoint's optimizer state, else (batch size) the replayed batch's B."""
    def source(field: str) -> str:
        return "config" if field in options.from_config else "option"

    if options.train_batch_size is not None:
        b, b_src = options.train_batch_size, source("train_batch_size")
    else:
        b, b_src = batch, "batch"
    found = state or TrainingState(None, None)
    optimizer, o_src = ((options.optimizer, source("optimizer")) if options.optimizer
                        else (found.optimizer, "checkpoint") if found.optimizer
                        else (None, "missing"))
    lr, l_src = ((options.lr, source("lr")) if options.lr is not None
                 else (found.lr, "checkpoint") if found.lr is not None else (None, "missing"))
    return Chosen(b, optimizer, lr, (ClipInput("train_batch_size", b, b_src),
                                     ClipInput("optimizer", optimizer, o_src),
                                     ClipInput("lr", lr, l_src)))


def measured_curvature(loss_of: Callable[[], Tensor], params: Sequence[Tensor],
                       options: CheckOptions, state: TrainingState | None,
                       batch: int) -> float | None:
    """lambda of the task loss (`top_curvature`) when the curvature cap can apply (not an
    Adam-family optimizer, learning rate known), else None; NaN when it could not be measured
    (an operation without a double backward, a non-finite loss)."""
    chosen = clip_inputs(options, state, batch)
    if chosen.optimizer in ADAM_FAMILY or chosen.lr is None:
        return None
    try:
        value = top_curvature(loss_of, params)
    except RuntimeError:  # e.g. a custom autograd Function without a double backward
        return math.nan
    return value if math.isfinite(value) else math.nan


def recommend(gram: Tensor | None, options: CheckOptions, state: TrainingState | None,
              batch: int, param_norm: float, parameters: str, count: int, exploding: bool,
              unavailable: str | None = None,
              curvature: float | None = None, steps: int | None = None,
              loss: float | None = None) -> ClipSuggestion:
    """`suggest` with the rule's inputs chosen from the options, the checkpoint's optimizer
    state and the replayed batch (`clip_inputs`), the parameter norm (and the curvature, when
    given: NaN when it could not be measured) reported as measured; `steps`: the longest
    exploding sequence's length; `loss`: the task loss, when bounded below by 0."""
    chosen = clip_inputs(options, state, batch)
    measured = [ClipInput("param_norm", param_norm, "measured")]
    if curvature is not None:  # NaN: it applied but could not be measured
        failed = math.isnan(curvature)
        measured.append(ClipInput("curvature", None if failed else curvature,
                                  "missing" if failed else "measured"))
        curvature = None if failed else curvature
    return suggest(gram, (*chosen.inputs, *measured), chosen.batch, chosen.optimizer,
                   chosen.lr, param_norm, parameters, count, exploding, unavailable, curvature,
                   steps, loss)
