"""Models written the way people write them, for tests/test_realistic.py.

Each is an ordinary nn.Module with the idioms rnndiag must follow through: packed sequences,
time-major layouts, tied weights, encoder-decoder loops with attention, projections, an initial
state computed from other inputs, residual stacks, shared modules called twice, dict outputs.
The custom losses are importable for `--loss tests.realistic_models:<name>`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

BLANK = 0  # CTC blank, also the padding of CTC label sequences


def damp_recurrence(module: nn.Module, scale: float = 0.05, gate_bias: float = -5.0) -> None:
    """Make a recurrent module forget fast (vanishing by construction): every W_hh scaled by
    `scale`, and the gate that carries the old state (LSTM forget: rows H..2H of (i, f, g, o);
    GRU update z: rows H..2H of (r, z, n)) biased to `gate_bias` (b_ih + b_hh)."""
    hidden: int = module.hidden_size  # type: ignore[assignment]
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("weight_hh"):
                p.mul_(scale)
            elif name.startswith("bias_ih"):
                p[hidden:2 * hidden] = gate_bias
            elif name.startswith("bias_hh"):
                p[hidden:2 * hidden] = 0.0


class PackedTagger(nn.Module):
    """Embedding -> packed bidirectional 2-layer LSTM (or GRU, or ReLU RNN) -> Linear: a label
    per token."""

    def __init__(self, vocab: int = 30, width: int = 8, hidden: int = 10, labels: int = 5,
                 cell: str = "lstm") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.rnn: nn.RNNBase
        if cell == "relu":
            self.rnn = nn.RNN(width, hidden, num_layers=2, bidirectional=True, batch_first=True,
                              nonlinearity="relu")
        else:
            kind = nn.LSTM if cell == "lstm" else nn.GRU
            self.rnn = kind(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, labels)

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:  # (B, T), (B,) -> (B, T, C)
        packed = pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.rnn(packed)
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        logits: Tensor = self.head(padded)
        return logits


class TiedLM(nn.Module):
    """A time-major language model, decoder weight tied to the embedding (Press & Wolf)."""

    def __init__(self, vocab: int = 24, width: int = 10, cell: str = "lstm",
                 flatten: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn: nn.LSTM | nn.GRU = nn.LSTM(width, width) if cell == "lstm" \
            else nn.GRU(width, width)
        self.decoder = nn.Linear(width, vocab)
        self.decoder.weight = self.embed.weight
        self.flatten = flatten

    def forward(self, tokens: Tensor) -> Tensor:  # (T, B) -> (T, B, V) or (T*B, V)
        out, _ = self.rnn(self.embed(tokens))
        logits: Tensor = self.decoder(out)
        return logits.view(-1, logits.shape[-1]) if self.flatten else logits


class AttentionDecoder(nn.Module):
    """An LSTMCell stepped in a loop with dot-product attention over the encoder outputs."""

    def __init__(self, vocab: int, width: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.cell = nn.LSTMCell(width, hidden)
        self.out = nn.Linear(2 * hidden, vocab)

    def forward(self, tgt: Tensor, memory: Tensor, state: tuple[Tensor, Tensor]) -> Tensor:
        h, c = state
        logits = []
        for t in range(tgt.shape[1]):  # teacher forcing: the gold previous token
            h, c = self.cell(self.embed(tgt[:, t]), (h, c))
            scores = torch.bmm(memory, h.unsqueeze(2)).squeeze(2)  # (B, S)
            context = torch.bmm(scores.softmax(1).unsqueeze(1), memory).squeeze(1)
            logits.append(self.out(torch.cat([h, context], dim=1)))
        return torch.stack(logits, dim=1)  # (B, T, V)


class Seq2Seq(nn.Module):
    """LSTM encoder; the decoder starts from its final state and attends to its outputs."""

    def __init__(self, src_vocab: int = 20, tgt_vocab: int = 16, width: int = 8,
                 hidden: int = 12) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(src_vocab, width)
        self.encoder = nn.LSTM(width, hidden, batch_first=True)
        self.decoder = AttentionDecoder(tgt_vocab, width, hidden)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:  # (B, S), (B, T) -> (B, T, V)
        memory, (h, c) = self.encoder(self.src_embed(src))
        out: Tensor = self.decoder(tgt, memory, (h[-1], c[-1]))
        return out


class SpeechCTC(nn.Module):
    """Acoustic model: a projected bidirectional LSTM over (T, B, F) features, CTC log-probs."""

    def __init__(self, feats: int = 6, hidden: int = 12, proj: int = 5, classes: int = 7,
                 ) -> None:
        super().__init__()
        self.rnn = nn.LSTM(feats, hidden, num_layers=2, bidirectional=True, proj_size=proj)
        self.head = nn.Linear(2 * proj, classes)

    def forward(self, feats: Tensor) -> Tensor:  # (T, B, F) -> (T, B, C) log-probabilities
        out, _ = self.rnn(feats)
        return F.log_softmax(self.head(out), dim=-1)


def ctc_loss(log_probs: Tensor, targets: Tensor) -> Tensor:
    """F.ctc_loss on time-major log-probs (T, B, C); `targets` (B, S) labels, BLANK-padded."""
    steps, batch = log_probs.shape[:2]
    input_lengths = torch.full((batch,), steps, dtype=torch.long)
    return F.ctc_loss(log_probs, targets, input_lengths, (targets != BLANK).sum(1),
                      blank=BLANK, zero_infinity=True)


class Forecaster(nn.Module):
    """A GRU forecaster whose initial state comes from static features: h0 = tanh(W s + b)."""

    def __init__(self, statics: int = 4, hidden: int = 10, layers: int = 2,
                 squeeze: bool = False) -> None:
        super().__init__()
        self.init = nn.Linear(statics, layers * hidden)
        self.rnn = nn.GRU(1, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, 1)
        self.layers, self.hidden, self.squeeze = layers, hidden, squeeze

    def forward(self, series: Tensor, static: Tensor) -> Tensor:  # (B, T, 1), (B, S)
        h0 = torch.tanh(self.init(static)).view(-1, self.layers, self.hidden)
        out, _ = self.rnn(series, h0.transpose(0, 1).contiguous())
        y: Tensor = self.head(out)  # (B, T, 1)
        return y.squeeze(-1) if self.squeeze else y


class ResidualLSTMStack(nn.Module):
    """Pre-norm residual stack of single-layer LSTMs: x = x + LSTM(LayerNorm(x))."""

    def __init__(self, vocab: int = 25, width: int = 12, depth: int = 3, labels: int = 4,
                 ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(depth))
        self.layers = nn.ModuleList(nn.LSTM(width, width, batch_first=True)
                                    for _ in range(depth))
        self.head = nn.Linear(width, labels)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, C)
        x = self.embed(tokens)
        for norm, lstm in zip(self.norms, self.layers, strict=True):
            y, _ = lstm(norm(x))
            x = x + y
        out: Tensor = self.head(x)
        return out


class Siamese(nn.Module):
    """Two encoders, each shared by both inputs: an nn.LSTM called twice and an LSTMCell
    stepped over each sequence; the output is the cosine similarity of the final states."""

    def __init__(self, feats: int = 5, hidden: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(feats, hidden, batch_first=True)
        self.cell = nn.LSTMCell(feats, hidden)

    def encode(self, x: Tensor) -> Tensor:
        _, (h, _) = self.lstm(x)
        s = x.new_zeros(x.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(s)
        for t in range(x.shape[1]):
            s, c = self.cell(x[:, t], (s, c))
        return torch.cat([h[-1], s], dim=1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:  # (B, Ta, F), (B, Tb, F) -> (B,)
        return F.cosine_similarity(self.encode(a), self.encode(b), dim=1)


class DictTagger(nn.Module):
    """A tanh-RNN tagger returning a dict, as Hugging Face-style heads do."""

    def __init__(self, vocab: int = 20, width: int = 8, hidden: int = 12, labels: int = 5,
                 ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.RNN(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, labels)

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        hidden, _ = self.rnn(self.embed(tokens))
        return {"logits": self.head(hidden), "hidden": hidden}


def tagging_with_activation_penalty(output: dict[str, Tensor], targets: Tensor) -> Tensor:
    """Cross-entropy on output["logits"] plus an activation penalty on output["hidden"]
    (AR, Merity et al. 2017): a loss that scores two tensors of the output."""
    logits = output["logits"]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=-100)
    return ce + 0.01 * output["hidden"].pow(2).mean()


class PaddedTagger(nn.Module):
    """A bidirectional GRU tagger run on padded (not packed) batches."""

    def __init__(self, vocab: int = 20, width: int = 8, hidden: int = 10, labels: int = 4,
                 ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.rnn = nn.GRU(width, hidden, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, labels)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, C)
        out, _ = self.rnn(self.embed(tokens))
        logits: Tensor = self.head(out)
        return logits
