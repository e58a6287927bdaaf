"""Per-example gradients recorded in the model mode's backward pass (rnndiag.pergrad) against
the loop (one forward/backward per example, rnndiag.clip.per_example_gram), in float64.

Every case runs `check_model` with targets; the Gram matrix the clip rule receives is compared
with the loop's on the same examples, and the route taken is checked: the one-pass route where
it applies, the loop where it must not (a model it cannot attribute per example): each
formula's mistake shows as a case sent to the loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnndiag
from rnndiag import clip, modelcheck, pergrad

B, T, V, D = 5, 7, 11, 6


class Tagger(nn.Module):
    def __init__(self, cell: type[nn.Module] = nn.LSTM, **kw: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D, padding_idx=0)
        self.rnn = cell(D, 8, num_layers=2, bidirectional=True, batch_first=True, **kw)
        self.head = nn.Linear(2 * (kw.get("proj_size") or 8), 4)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)  # type: ignore[no-any-return]


class TimeMajorGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 9)
        self.head = nn.Linear(9, 2)

    def forward(self, x: Tensor) -> Tensor:  # (T, B, 3) -> (T, B, 2)
        return self.head(self.rnn(x)[0])  # type: ignore[no-any-return]


class FinalState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 8, nonlinearity="relu", bidirectional=True, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 3) -> (B, 3)
        _, h = self.rnn(x)
        return self.head(torch.cat([h[0], h[1]], dim=1))  # type: ignore[no-any-return]


class Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.rnn = nn.LSTM(D, 8, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths, batch_first=True,
                                      enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True,
                                     total_length=tokens.shape[1])
        return self.head(out)  # type: ignore[no-any-return]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.rnn = nn.LSTM(D, D, batch_first=True)
        self.head = nn.Linear(D, V)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])  # type: ignore[no-any-return]


class Flattened(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:  # (B*T, 4)
        out, _ = self.rnn(x)
        return self.head(out.reshape(-1, 8))  # type: ignore[no-any-return]


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.embed.requires_grad_(False)  # frozen: no per-example gradient, no record
        self.rnn = nn.LSTM(D, 8, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.plain = nn.LayerNorm(8, elementwise_affine=False)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(self.plain(self.norm(out)))  # type: ignore[no-any-return]


class Seq2Seq(nn.Module):  # forward(src, tgt), a dict output, two recurrent modules
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.encoder = nn.LSTM(D, 8, batch_first=True)
        self.decoder = nn.GRU(D, 8, batch_first=True)
        self.head = nn.Linear(8, V)

    def forward(self, src: Tensor, tgt: Tensor) -> dict[str, Tensor]:
        _, (h, _) = self.encoder(self.embed(src))
        out, _ = self.decoder(self.embed(tgt), h)
        return {"logits": self.head(out), "state": h}


class CellLoop(nn.Module):
    """A cell stepped in the model's own loop, an attention-style read of the states so far."""

    def __init__(self, kind: type[nn.Module], **kw: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.cell = kind(D, 8, **kw)
        self.head = nn.Linear(16, 4)
        self.lstm = kind is nn.LSTMCell

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.head.weight.new_zeros(tokens.shape[0], 8)
        state: Any = (h, torch.zeros_like(h)) if self.lstm else None  # None: the cell's zeros
        outs, seen = [], []
        for t in range(tokens.shape[1]):
            state = self.cell(self.embed(tokens[:, t]), state)
            h = state[0] if self.lstm else state
            seen.append(h)
            outs.append(self.head(torch.cat([h, torch.stack(seen[-3:]).mean(0)], 1)))
        return torch.stack(outs, dim=1)


class OwnParameter(Tagger):  # a parameter outside any known module: the loop
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, tokens: Tensor) -> Tensor:
        return super().forward(tokens) * self.scale


class Mixing(Tagger):  # examples see each other: the two-example check sends it to the loop
    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out - out.mean(0, keepdim=True))  # type: ignore[no-any-return]


class ReadOutside(Tagger):  # the head's weight also read directly: the check sends it to the loop
    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out) + F.linear(out, self.head.weight)  # type: ignore[no-any-return]


def _tokens() -> Tensor:
    torch.manual_seed(3)
    tokens = torch.randint(1, V, (B, T))
    tokens[1, 4:] = 0  # padding tokens (padding_idx 0: no gradient for that row)
    return tokens


def _labels(padded: bool = True) -> Tensor:
    y = torch.randint(0, 4, (B, T))
    if padded:
        y[1, 4:] = -100  # padding labels
        y[3] = -100  # an example that scores nothing: left out by both routes
    return y


def _case(name: str) -> tuple[nn.Module, Any, Tensor, bool]:
    """(model, inputs, targets, whether the one-pass route must be taken)."""
    tokens = _tokens()
    if name == "lstm-tagger":
        return Tagger(), tokens, _labels(), True
    if name == "gru-tagger":
        return Tagger(nn.GRU), tokens, _labels(), True
    if name == "rnn-tagger-nobias":
        return Tagger(nn.RNN, bias=False), tokens, _labels(), True
    if name == "time-major-gru-mse":
        return TimeMajorGRU(), torch.randn(T, B, 3), torch.randn(T, B, 2), True
    if name == "final-state-relu":
        return FinalState(), torch.randn(B, T, 3), torch.randint(0, 3, (B,)), True
    if name == "packed":
        lengths = torch.tensor([7, 3, 5, 7, 2])
        y = _labels(padded=False)
        y[torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)] = -100
        return Packed(), (tokens, lengths), y, True
    if name == "tied":
        return Tied(), tokens, torch.randint(0, V, (B, T)), True
    if name == "flattened":
        return Flattened(), torch.randn(B, T, 3), torch.randint(0, 4, (B * T,)), True
    if name == "layernorm-frozen-embedding":
        return Normed(), tokens, _labels(), True
    if name == "seq2seq-dict":
        src = torch.randint(0, V, (B, T + 2))
        return Seq2Seq(), (src, tokens), torch.randint(0, V, (B, T)), True
    if name == "lstm-cell-loop":
        return CellLoop(nn.LSTMCell), tokens, _labels(), True
    if name == "gru-cell-loop":
        return CellLoop(nn.GRUCell), tokens, _labels(), True
    if name == "relu-cell-loop-nobias":
        return CellLoop(nn.RNNCell, nonlinearity="relu", bias=False), tokens, _labels(), True
    if name == "own-parameter":
        return OwnParameter(), tokens, _labels(), False
    if name == "mixing":
        return Mixing(), tokens, _labels(), False
    if name == "read-outside":
        return ReadOutside(), tokens, _labels(), False
    if name == "lstm-proj":
        return Tagger(proj_size=3), tokens, _labels(), False
    if name == "lstm-tagger-dropout":  # inactive in eval mode; cuDNN stays off for the loop
        return Tagger(dropout=0.3), tokens, _labels(), True
    raise AssertionError(name)


def _double(x: Tensor) -> Tensor:
    return x.double() if x.is_floating_point() else x


CASES = ["lstm-tagger", "gru-tagger", "rnn-tagger-nobias", "time-major-gru-mse",
         "final-state-relu", "packed", "tied", "flattened", "layernorm-frozen-embedding",
         "seq2seq-dict", "lstm-cell-loop", "gru-cell-loop", "relu-cell-loop-nobias",
         "own-parameter", "mixing",
         "read-outside", "lstm-proj", "lstm-tagger-dropout"]


def _spied(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record the Gram matrix the clip rule receives, the route that made it, and the loop's
    on the same examples."""
    seen: dict[str, Any] = {"loop": 0}
    loop = clip.per_example_gram
    gram_of = modelcheck._gram

    def counted(*a: Any, **k: Any) -> Tensor:
        seen["loop"] += 1
        return loop(*a, **k)

    def spy(one: Callable[[int], Tensor | None], some: Any, params: Any, n: int,
            shares: Any) -> Tensor:
        seen["ours"] = gram_of(one, some, params, n, shares)
        seen["route"] = "loop" if seen["loop"] else "one pass"
        seen["reference"] = loop(one, params, n)
        return seen["ours"]  # type: ignore[no-any-return]

    monkeypatch.setattr(clip, "per_example_gram", counted)
    monkeypatch.setattr(modelcheck, "_gram", spy)
    return seen


@pytest.mark.parametrize("name", CASES)
def test_recorded_gram_equals_the_loop(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model, inputs, targets, one_pass = _case(name)
    seen = _spied(monkeypatch)
    inputs = tuple(map(_double, inputs)) if isinstance(inputs, tuple) else _double(inputs)
    rnndiag.check_model(model.double(), inputs, _double(targets), train_batch_size=4)
    assert seen["route"] == ("one pass" if one_pass else "loop")
    ours, reference = seen["ours"], seen["reference"]
    assert ours.shape == reference.shape and ours.shape[0] >= 2
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-12 * float(
        reference.abs().max()))
    assert float(reference.abs().max()) > 0  # not vacuous


@pytest.mark.parametrize("which", [0, 4, None], ids=["first", "last", "none"])
def test_a_wrong_share_at_either_end_sends_the_model_to_the_loop(
        which: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first and the last scoring example (0 and 4 here: example 3 scores nothing) are
    checked together, as a batch of two; a share 1% off on either one fails the check."""
    real = pergrad.Recorder.shares

    def corrupted(self: pergrad.Recorder, *a: Any, **k: Any) -> Any:
        found = real(self, *a, **k)
        if which is None or isinstance(found, str):
            return found
        found = [pergrad.dense(g) for g in found]
        for g in found:
            g[which] *= 1.01
        return found

    monkeypatch.setattr(pergrad.Recorder, "shares", corrupted)
    seen = _spied(monkeypatch)
    model, inputs, targets, _ = _case("lstm-tagger")
    rnndiag.check_model(model.double(), inputs, targets, train_batch_size=4)
    assert seen["route"] == ("one pass" if which is None else "loop")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["lstm-tagger", "gru-tagger", "lstm-cell-loop", "gru-cell-loop",
                                  "lstm-tagger-dropout", "packed"])
def test_recorded_gram_on_cuda_equals_the_loop(name: str, monkeypatch: pytest.MonkeyPatch,
                                               ) -> None:
    """On a GPU the cells are fused kernels (an LSTMCell's c' -> h' path is inside them)."""
    torch.manual_seed(0)
    model, inputs, targets, _ = _case(name)
    seen = _spied(monkeypatch)
    inputs = tuple(x.cuda() if x.dim() > 1 else x for x in inputs) if isinstance(
        inputs, tuple) else inputs.cuda()  # lengths stay on the CPU
    rnndiag.check_model(model.double().cuda(), inputs, targets.cuda(), train_batch_size=4)
    assert seen["route"] == "one pass"
    torch.testing.assert_close(seen["ours"], seen["reference"], rtol=1e-7, atol=1e-10)


def test_unsupported_says_why() -> None:
    assert pergrad.unsupported(Tagger()) is None
    assert "scale" not in (pergrad.unsupported(Tagger()) or "")
    assert "the model (OwnParameter)" in (pergrad.unsupported(OwnParameter()) or "")
    assert "proj_size" in (pergrad.unsupported(Tagger(proj_size=3)) or "")
    by_frequency = Tagger()
    by_frequency.embed.scale_grad_by_freq = True  # batch-wide counts: not per example
    assert "frequency" in (pergrad.unsupported(by_frequency) or "")
    assert pergrad.unsupported(nn.Sequential(nn.LSTMCell(3, 4), nn.Linear(4, 2))) is None
    assert "Conv1d" in (pergrad.unsupported(nn.Sequential(nn.Conv1d(3, 4, 2))) or "")
    frozen = Tagger()
    frozen.requires_grad_(False)
    frozen.head.requires_grad_(True)
    assert pergrad.unsupported(frozen) is None


def test_scales_turn_shares_into_each_examples_own_gradient() -> None:
    counts = torch.tensor([3, 0, 1])
    assert pergrad.scales(counts, 4).tolist() == [4 / 3, 0.0, 4.0]


def test_float32_inner_products_match_float64() -> None:
    torch.manual_seed(1)
    rows = torch.randn(6, 3 * clip.CHUNK + 17)
    exact = rows.double() @ rows.double().T
    torch.testing.assert_close(clip.inner_products(rows), exact, rtol=1e-5, atol=1e-3)
    assert clip.inner_products(rows.double()).dtype == torch.float64


def test_per_example_passes_use_cudnn_only_where_train_mode_changes_nothing() -> None:
    """cuDNN's RNN backward needs train mode: plain modules without dropout get it for the
    passes (and eval mode back after); with dropout cuDNN is off and the modes stay."""
    plain, dropped = Tagger().eval(), Tagger(dropout=0.3).eval()
    with modelcheck._cudnn_backward(plain):
        assert plain.rnn.training and not plain.head.training
        assert torch.backends.cudnn.enabled
    assert not plain.rnn.training
    with modelcheck._cudnn_backward(dropped):
        assert not dropped.rnn.training and not torch.backends.cudnn.enabled
    assert torch.backends.cudnn.enabled


@pytest.mark.parametrize("block", [1, 7 * 5 * 8, 2**30], ids=["row", "rows", "whole"])
def test_outer_shares_equal_their_product(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recurrent weight's shares held as factors (pergrad.Outer): each example's, all of
    them, and their Gram matrix block by block of gate rows (one row at a time, a few rows,
    all at once), for every example and for a subset, against the product written out."""
    monkeypatch.setattr(pergrad, "BLOCK_BYTES", block)
    gen = torch.Generator().manual_seed(0)
    steps = torch.randn(6, 5, 9, dtype=torch.float64, generator=gen)  # (T, n, G) time-major
    x = torch.randn(6, 5, 7, dtype=torch.float64, generator=gen)  # (T, n, I)
    outer = pergrad.Outer(steps.permute(1, 2, 0), x.transpose(0, 1))
    full = torch.einsum("tng,tni->ngi", steps, x)
    torch.testing.assert_close(outer.full(), full)
    torch.testing.assert_close(outer[3], full[3])
    assert outer.shape == (5, 9, 7)
    flat = full.reshape(5, -1)
    torch.testing.assert_close(outer.inner(None), flat @ flat.T)
    rows = torch.tensor([0, 2, 4])
    torch.testing.assert_close(outer.inner(rows), flat[rows] @ flat[rows].T)
    torch.testing.assert_close(pergrad.dense(outer), full)
