"""Example user models for `rnndiag check --model` (see "Diagnose your own model" in the README).

    rnndiag check sample_models/tagger.safetensors \\
        --model sample_models.user_models:Tagger --batch sample_models/tagger_batch.safetensors

`Tagger`: embedding -> 2-layer bidirectional GRU -> linear head, one label per token
(cross-entropy over every step). `Decoder`: an LSTMCell called in a Python loop, regressing a
value per sequence (MSE).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Tagger(nn.Module):
    def __init__(self, vocab: int = 20, width: int = 8, hidden: int = 16, labels: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, labels)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, labels)
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)


class Decoder(nn.Module):
    def __init__(self, inputs: int = 2, hidden: int = 12) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(inputs, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, inputs) -> (B,)
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h).squeeze(1)
