"""A gradient-clipping threshold that keeps training stable (validated by bench/validate_clip.py).

From n per-example gradients g_i of the task loss (each example's loss on its own, all model
parameters that require grad), with S = mean ||g_i||^2 and F = ||mean g_i||^2:

    G   = max(0, (n F - S) / (n - 1))        an unbiased estimate of ||E g||^2
    N_b = sqrt(G + (S - G) / b)              the expected pre-clip gradient norm of a training
                                             mini-batch of b examples (mean-reduced loss)

The suggestion, for SGD-family optimizers with learning rate lr and parameters theta:

    c = min(N_b, rho * ||theta||_2 / lr),    rho = 0.005

N_b is Pascanu et al.'s "around the average norm", at the batch size training uses; the cap
limits one SGD step to 0.5% of the parameter norm and takes over when the measured norms are
meaningless (an exploding model). Adam-family optimizers normalise the step themselves: the
cap does not apply, N_b is reported as the typical norm, and clipping well below it only slows
training. Without a task loss (checkpoint mode) no norm is measured: only the cap, when the
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

from rnndiag.records import CheckOptions, ClipInput, ClipSuggestion, TrainingState

RHO = 0.005  # the cap: one SGD step moves the parameters by at most 0.5% of their norm
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
    with _one_thread(any(p.device.type == "cpu" for p in params)):
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
    stacked = torch.stack(flat)  # (n, P)
    return (stacked.double() @ stacked.double().T).cpu()


@contextlib.contextmanager
def _one_thread(cpu: bool) -> Iterator[None]:
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


def step_cap(param_norm: float, lr: float | None) -> float | None:
    return None if lr is None or lr <= 0 else RHO * param_norm / lr


def suggest(gram: Tensor | None, inputs: Sequence[ClipInput], b: int, optimizer: str | None,
            lr: float | None, param_norm: float, parameters: str, count: int,
            exploding: bool, unavailable: str | None = None) -> ClipSuggestion:
    """The suggestion and every number behind it (see the module docstring); `gram` None:
    no per-example gradients (`unavailable` says why; default: no task loss)."""
    cap = step_cap(param_norm, lr) if optimizer not in ADAM_FAMILY else None
    n = 0 if gram is None else gram.shape[0]
    if gram is None or n < 2 or not bool(torch.isfinite(gram).all()):
        why = (unavailable or "no task loss: the final-state objective's gradient is not a "
               "training norm; --model with targets measures one") if gram is None else (
            "the per-example gradients are not finite" if n >= 2 else
            "fewer than two examples have a loss term")
        return ClipSuggestion(cap, "step_cap" if cap is not None else "none", None, None, None,
                              cap, n, parameters, count, tuple(inputs),
                              _advice(cap, None, optimizer, exploding, why))
    nb, _, _ = expected_norm(gram, b)
    norms = resampled_norms(gram, b)
    spread = tuple(float(torch.quantile(norms, q)) for q in (0.1, 0.5, 0.9))
    value = nb if cap is None else min(nb, cap)
    clipped = float((norms > value).double().mean())
    return ClipSuggestion(value, "step_cap" if cap is not None and cap < nb else "expected_norm",
                          nb, (spread[0], spread[1], spread[2]), clipped, cap, n, parameters,
                          count, tuple(inputs), _advice(cap, nb, optimizer, exploding, None))


def _advice(cap: float | None, nb: float | None, optimizer: str | None, exploding: bool,
            why: str | None) -> str:
    if optimizer in ADAM_FAMILY:
        text = (f"{optimizer} normalises its steps: clipping well below the typical norm only "
                "slows training")
        if exploding:
            text += ("; the gradient explodes through time here, and clipping is not the fix: "
                     "lower the learning rate, or change the cell or its initialisation")
        return text + "."
    if why is not None:
        if cap is not None:
            return (f"No measured norm ({why}); the step cap rho*||theta||/lr limits an SGD "
                    "step to 0.5% of the parameter norm.")
        return (f"No suggestion: {why}; give the learning rate (--lr) for the step cap, "
                "or --model with targets for a measured norm.")
    if optimizer is None:
        return ("The expected norm at the training batch size; give --optimizer and --lr for "
                "the step cap that keeps plain SGD stable when the model explodes.")
    return "Use as clip_grad_norm_(params, max_norm), Lightning gradient_clip_val or HF " \
        "max_grad_norm."


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


def recommend(gram: Tensor | None, options: CheckOptions, state: TrainingState | None,
              batch: int, param_norm: float, parameters: str, count: int, exploding: bool,
              unavailable: str | None = None) -> ClipSuggestion:
    """`suggest` with the rule's inputs chosen from the options, the checkpoint's optimizer
    state and the replayed batch (`clip_inputs`), the parameter norm reported as measured."""
    chosen = clip_inputs(options, state, batch)
    return suggest(gram, (*chosen.inputs, ClipInput("param_norm", param_norm, "measured")),
                   chosen.batch, chosen.optimizer, chosen.lr, param_norm, parameters, count,
                   exploding, unavailable)
