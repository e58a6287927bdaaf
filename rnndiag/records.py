"""Frozen records passed between stages; tensors never cross this boundary (plain floats only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class CellType(StrEnum):
    """Recurrence equations, independent of the nn.Module wrapper."""

    RNN = "rnn"
    LSTM = "lstm"
    GRU = "gru"

    @property
    def gates(self) -> int:
        """Row multiple of `weight_ih`: 1 (RNN), 4 (LSTM: i,f,g,o), 3 (GRU: r,z,n)."""
        return {CellType.RNN: 1, CellType.LSTM: 4, CellType.GRU: 3}[self]


class ModuleKind(StrEnum):
    """The PyTorch class a group of tensors came from."""

    RNN = "RNN"
    LSTM = "LSTM"
    GRU = "GRU"
    RNN_CELL = "RNNCell"
    LSTM_CELL = "LSTMCell"
    GRU_CELL = "GRUCell"

    @property
    def cell_type(self) -> CellType:
        return CellType(self.value.removesuffix("Cell").lower())

    @property
    def is_cell(self) -> bool:
        return self.value.endswith("Cell")


class Direction(StrEnum):
    FORWARD = "forward"
    REVERSE = "reverse"


class Verdict(StrEnum):
    """Ordered by severity: `worst()` picks the most severe."""

    HEALTHY = "healthy"
    VANISHING = "vanishing"
    EXPLODING = "exploding"

    @property
    def severity(self) -> int:
        return [Verdict.HEALTHY, Verdict.VANISHING, Verdict.EXPLODING].index(self)

    @staticmethod
    def worst(verdicts: list[Verdict]) -> Verdict:
        return max(verdicts, key=lambda v: v.severity, default=Verdict.HEALTHY)


class SpanKind(StrEnum):
    VANISHING = "vanishing"
    EXPLODING = "exploding"


class FileStatus(StrEnum):
    OK = "ok"  # replayed and analysed
    SKIPPED = "skipped"  # readable, but holds no recurrent layer
    ERROR = "error"  # unusable input; see FileDiagnosis.error


class PascanuReading(StrEnum):
    """Pascanu et al. 2013 on a plain RNN: sigma_max(W_hh) against 1/gamma."""

    VANISHING_GUARANTEED = "vanishing_guaranteed"  # sigma_max < 1/gamma (sufficient)
    EXPLODING_POSSIBLE = "exploding_possible"  # sigma_max > 1/gamma (necessary, not sufficient)
    BOUNDARY = "boundary"  # sigma_max == 1/gamma
    NOT_APPLICABLE = "not_applicable"  # gated cells: the bound does not apply


@dataclass(frozen=True)
class ModuleSpec:
    """A recurrent module found in a state dict, from key names and shapes alone.

    `name` is the key prefix without the trailing dot ("" for a bare module); parameter keys are
    `name + "." + local` (or `local` when name is ""), e.g. `weight_hh_l1_reverse`.
    """

    name: str
    kind: ModuleKind
    input_size: int
    hidden_size: int
    proj_size: int  # 0: no projection
    num_layers: int
    bidirectional: bool
    bias: bool
    nonlinearity: str | None  # "tanh" | "relu" for RNN/RNNCell, None otherwise
    embedding: str | None = None  # key of an (V, input_size) matrix that may feed token ids
    # how `embedding` was chosen: "option" (--embedding), "same-parent" (the one candidate
    # under the module's own parent), "only-candidate" (a guess: the one such matrix in the
    # file); or, with `embedding` None, the candidates rnndiag refused to choose between
    wiring: str | None = None
    candidates: tuple[str, ...] = ()

    @property
    def cell_type(self) -> CellType:
        return self.kind.cell_type

    @property
    def directions(self) -> tuple[Direction, ...]:
        if self.bidirectional:
            return (Direction.FORWARD, Direction.REVERSE)
        return (Direction.FORWARD,)

    @property
    def output_size(self) -> int:
        """Width of h_t: proj_size when projected, hidden_size otherwise."""
        return self.proj_size or self.hidden_size

    def key(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    def local_name(self, base: str, layer: int, direction: Direction) -> str:
        """Parameter name inside the module: `weight_ih_l0_reverse`, or `weight_ih` for cells."""
        if self.kind.is_cell:
            return base
        suffix = "_reverse" if direction is Direction.REVERSE else ""
        return f"{base}_l{layer}{suffix}"


@dataclass(frozen=True)
class Span:
    """A maximal run of time steps `start..end` (inclusive, by time index t) with one kind."""

    kind: SpanKind
    start: int
    end: int
    extreme_ratio: float | None  # min r_t (vanishing) / max finite r_t (exploding) in the span


@dataclass(frozen=True)
class ForgetBias:
    """Effective LSTM forget-gate bias b_if + b_hf over the hidden units."""

    mean: float
    min: float
    max: float
    mean_gate_at_rest: float  # mean of sigmoid(b_f): the forget gate with zero input and state


@dataclass(frozen=True)
class Credit:
    """The temporal credit matrix of one layer and direction (rnndiag.credit).

    For each referenced output position s (a time index of the scored output), `norms[i][t]`
    is ||dL_s/dh_t||_2 over the `examples[i]` examples referenced at s, L_s being the loss's
    linearisation restricted to position s (its cotangent zero at every other position); the
    LSTM cell state is included as in `state_grad_norm`. `skipped` lists sampled positions
    that no example scores.
    """

    positions: tuple[int, ...]
    norms: tuple[tuple[float, ...], ...]
    skipped: tuple[int, ...] = ()
    examples: tuple[int, ...] = ()


class RatioBasis(StrEnum):
    """What `ratio` compares (see README, "What is measured")."""

    LOSS = "loss"  # the whole loss's gradient, against each example's last step it reaches
    CREDIT = "credit"  # per-position terms, by distance s - t from each scored position s


@dataclass(frozen=True)
class LayerDiagnosis:
    """One layer and direction. Series are indexed by time step t = 0..T-1."""

    layer: int
    direction: Direction
    grad_norm: tuple[float, ...]  # ||dL/dh_t||_2 over the batch (examples alive at t)
    cell_grad_norm: tuple[float, ...] | None  # ||dL/dc_t||_2 (LSTM only)
    state_grad_norm: tuple[float, ...]  # sqrt(grad_norm^2 + cell_grad_norm^2)
    # r at distance k = |t - final_step| from every reference (rnndiag.credit); None where no
    # reference reaches that far (steps after the last scored position, or beyond every length)
    ratio: tuple[float | None, ...]
    final_step: int  # the latest reference step (forward), the earliest (reverse)
    growth_per_step: float | None
    horizon: int | None
    sigma_max_hh: float
    pascanu: PascanuReading
    forget_bias: ForgetBias | None
    spans: tuple[Span, ...]
    verdict: Verdict
    basis: RatioBasis = RatioBasis.LOSS
    references: int = 0  # (example, position) references pooled into `ratio`
    skipped_references: int = 0  # references left out: their own gradient is zero
    credit: Credit | None = None  # basis CREDIT only

@dataclass(frozen=True)
class ModuleDiagnosis:
    spec: ModuleSpec
    inputs: str  # how the replay was fed, e.g. "synthetic N(0,1)" or "batch file: inputs"
    loss: float  # value of the objective on the replayed batch
    layers: tuple[LayerDiagnosis, ...]
    batch_size: int
    seq_len: int
    objective: str = "final_state_energy"  # the loss whose gradient was captured

    @property
    def verdict(self) -> Verdict:
        return Verdict.worst([layer.verdict for layer in self.layers])


@dataclass(frozen=True)
class BatchInfo:
    source: str  # "synthetic" | path of the batch file
    batch_size: int
    seq_len: int
    seed: int | None  # synthetic batches only


@dataclass(frozen=True)
class NonFiniteTensor:
    """A tensor holding NaN or Inf values, with their counts."""

    name: str
    nan: int
    inf: int
    recurrent: bool = True  # a recurrent module's parameter
    fatal: bool = True  # decides the verdict: recurrent, or any tensor with --strict-nonfinite


@dataclass(frozen=True)
class StaticLayer:
    """Data-free facts about one layer and direction (no replay)."""

    layer: int
    direction: Direction
    sigma_max_hh: float
    pascanu: PascanuReading
    forget_bias: ForgetBias | None


@dataclass(frozen=True)
class StaticModule:
    spec: ModuleSpec
    layers: tuple[StaticLayer, ...]


@dataclass(frozen=True)
class InspectDiagnosis:
    """`rnndiag inspect`: architecture, non-finite weights, static readings; no replay."""

    path: str
    format: str
    status: FileStatus
    modules: tuple[StaticModule, ...] = ()
    nonfinite_weights: tuple[NonFiniteTensor, ...] = ()
    notes: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class TrainingState:
    """What a training checkpoint says about its optimizer (None: not stored)."""

    optimizer: str | None  # "sgd" | "adam" | ... as rnndiag.clip names them
    lr: float | None  # param_groups[0]["lr"]


@dataclass(frozen=True)
class ClipInput:
    """One input of the clip rule and where it came from."""

    name: str  # "train_batch_size" | "optimizer" | "lr" | "param_norm" | "curvature" |
    #            "coherence" (G/S)
    value: str | float | int | None
    source: str  # "option" | "config" | "checkpoint" | "batch" | "measured" | "missing"


@dataclass(frozen=True)
class ClipSuggestion:
    """See rnndiag.clip for the rule and the definitions."""

    suggested_max_norm: float | None  # None: nothing can be suggested (see `advice`)
    decided_by: str  # "expected_norm" (N_b) | "step_cap" (rho*||theta||/lr) |
    #                  "curvature_cap" (2 N_b/(lambda lr)) | "loss_cap" (L/(lr N_b)) | "none"
    expected_norm: float | None  # N_b: expected pre-clip norm at the training batch size
    spread: tuple[float, float, float] | None  # p10, p50, p90 of that norm (resampled)
    fraction_clipped: float | None  # expected fraction of training steps clipped
    step_cap: float | None  # rho * ||theta|| / lr (SGD-family, learning rate known)
    curvature_cap: float | None  # 2 N_b / (lambda lr) (SGD-family, lambda and lr known,
    #                              near a stationary point: G <= S/2)
    loss_cap: float | None  # L / (lr N_b) (SGD-family, lr known, exploding gradient, task loss
    #                         bounded below by 0)
    examples: int  # per-example gradients measured
    parameters: str  # "model" (all model parameters that require grad) | "recurrent"
    parameter_count: int
    inputs: tuple[ClipInput, ...]
    advice: str


@dataclass(frozen=True)
class FileDiagnosis:
    path: str
    format: str  # "safetensors" | "torch" | "unknown"
    status: FileStatus
    modules: tuple[ModuleDiagnosis, ...] = ()
    batch: BatchInfo | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None
    nonfinite_weights: tuple[NonFiniteTensor, ...] = ()
    clip: ClipSuggestion | None = None
    loss: str = "final_state_energy"  # the loss backpropagated (see rnndiag.losses)
    ignores: tuple[Ignore, ...] = ()  # accepted findings for this file (config `ignore`)

    @property
    def verdict(self) -> Verdict | None:
        """Worst module verdict (NaN/Inf weights count as exploding); None unless replayed."""
        if self.status is not FileStatus.OK:
            return None
        extra = [Verdict.EXPLODING] if any(t.fatal for t in self.nonfinite_weights) else []
        return Verdict.worst([m.verdict for m in self.modules] + extra)


@dataclass(frozen=True)
class Thresholds:
    """Span thresholds on r_t: vanishing below `vanish`, exploding above `explode`; with
    `context` N, only steps within N steps of their reference count (--context)."""

    vanish: float = 1e-3
    explode: float = 1e3
    context: int | None = None


@dataclass(frozen=True)
class Ignore:
    """An accepted finding (config `ignore`): its rule, and where (None: anywhere)."""

    rule: str
    module: str | None = None
    layer: int | None = None
    direction: str | None = None


@dataclass(frozen=True)
class Override:
    """Settings for the files matching `patterns` (fnmatch on the path relative to `root`,
    the config file's folder, or on the path as given)."""

    patterns: tuple[str, ...]
    values: tuple[tuple[str, object], ...]  # (CheckOptions or Thresholds field, value)
    root: str = "."


@dataclass(frozen=True)
class CheckOptions:
    """Everything `diagnose_file` needs besides the path."""

    batch_path: str | None = None
    batch_size: int = 16
    seq_len: int = 100
    seed: int = 0
    nonlinearity: str | None = None  # None: from file metadata, else "tanh"
    dtype: str = "float32"
    thresholds: Thresholds = field(default_factory=Thresholds)
    train_batch_size: int | None = None  # b of the clip rule; None: the batch's B
    lr: float | None = None  # None: the checkpoint's optimizer state, if any
    optimizer: str | None = None  # sgd | adam | ... ; None: from the checkpoint, if any
    from_config: tuple[str, ...] = ()  # fields the configuration set (for reporting sources)
    model: str | None = None  # --model package.module:callable
    model_kwargs: str | None = None  # JSON object
    loss: str | None = None  # --loss package.module:callable
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    max_memory: int | None = None  # bytes; None: half of physical memory
    debug: bool = False  # let a bug in rnndiag raise (for the traceback) instead of reporting it
    state_key: str | None = None  # --state-key: the sub-dict of a container holding the weights
    output_key: str | None = None  # --output-key: which element of a tuple/dict output to score
    time_axis: int | None = None  # --time-axis 0|1 of the output; None: from sizes
    ignore_index: int = -100  # cross-entropy targets with this value are not scored
    strict_nonfinite: bool = False  # NaN/Inf in any tensor is fatal, not only recurrent ones
    embeddings: tuple[tuple[str, str], ...] = ()  # --embedding MODULE=TENSOR, in order
    ignores: tuple[Ignore, ...] = ()  # accepted findings (config `ignore`)
    overrides: tuple[Override, ...] = ()  # per-file settings from the config, in order
