"""Make the sample checkpoints in this folder, deterministically: `python make_samples.py`.

Every model reads the adding problem (Hochreiter & Schmidhuber 1997): at each of T = 100 steps
the input is (value ~ U(0, 1), marker), exactly two markers are 1 (one in each half of the
sequence) and the target is the sum of the two marked values. A model that cannot carry
information across ~50-100 steps is stuck at the variance baseline (MSE ~0.167).

Each model is `rnn` (the recurrent module) + `head` (Linear on the last output), trained with
Adam on MSE. Single-threaded, fixed seeds: the same torch version writes the same bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).resolve().parent
T, BATCH = 100, 64


def adding_batch(n: int, seq_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (n, T, 2), targets (n,)): one marker in each half of the sequence."""
    values = torch.rand(n, seq_len, generator=gen)
    first = torch.randint(0, seq_len // 2, (n,), generator=gen)
    second = torch.randint(seq_len // 2, seq_len, (n,), generator=gen)
    markers = torch.zeros(n, seq_len)
    markers[torch.arange(n), first] = 1.0
    markers[torch.arange(n), second] = 1.0
    return torch.stack([values, markers], dim=2), (values * markers).sum(dim=1)


class Model(nn.Module):
    def __init__(self, rnn: nn.Module, width: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(1)


def train(model: Model, steps: int, lr: float, seed: int,
          clip: float | None = None) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    test_x, test_y = adding_batch(1000, T, torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        x, y = adding_batch(BATCH, T, gen)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    with torch.no_grad():
        test = nn.functional.mse_loss(model(test_x), test_y)
    return {"steps": steps, "lr": lr, "test_mse": round(float(test), 4)}


def tensors(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def make_tanh_rnn() -> dict[str, float]:
    torch.manual_seed(1)
    model = Model(nn.RNN(2, 32, batch_first=True), 32)
    stats = train(model, steps=600, lr=1e-3, seed=10)
    save_file(tensors(model), HERE / "rnn_tanh_vanishing.safetensors",
              metadata={"rnndiag.nonlinearity": "tanh", "task": "adding problem, T=100"})
    return stats


def make_lstm() -> dict[str, float]:
    torch.manual_seed(2)
    lstm = nn.LSTM(2, 32, batch_first=True)
    with torch.no_grad():  # forget-gate bias 1 (Jozefowicz et al. 2015): a common, good init
        lstm.bias_ih_l0[32:64].fill_(1.0)
        lstm.bias_hh_l0[32:64].zero_()
    model = Model(lstm, 32)
    stats = train(model, steps=1500, lr=1e-2, seed=20, clip=1.0)
    save_file(tensors(model), HERE / "lstm_healthy.safetensors",
              metadata={"task": "adding problem, T=100"})
    return stats


def make_relu_rnn() -> dict[str, float]:
    torch.manual_seed(3)
    rnn = nn.RNN(2, 32, nonlinearity="relu", batch_first=True)
    with torch.no_grad():  # IRNN (Le et al. 2015) initialised a little above the identity
        rnn.weight_hh_l0.copy_(1.1 * torch.eye(32))
        rnn.bias_hh_l0.zero_()
        rnn.bias_ih_l0.fill_(0.1)
    model = Model(rnn, 32)
    stats = train(model, steps=50, lr=1e-4, seed=30)
    save_file(tensors(model), HERE / "rnn_relu_exploding.safetensors",
              metadata={"rnndiag.nonlinearity": "relu", "task": "adding problem, T=100"})
    return stats


def make_gru() -> dict[str, float]:
    torch.manual_seed(4)
    model = Model(nn.GRU(2, 16, num_layers=2, bidirectional=True, batch_first=True), 32)
    stats = train(model, steps=300, lr=3e-3, seed=40, clip=1.0)
    # Saved the way DataParallel training scripts do: a container dict, `module.` prefixes.
    torch.save({"epoch": 1, "model_state_dict": tensors(model, "module.")},
               HERE / "gru_bidir_2layer.pt")
    return stats


def make_tagger() -> dict[str, float]:
    """The `--model` example: user_models.Tagger labels token t with (token[t - 10] mod 3)."""
    from user_models import Tagger

    torch.manual_seed(5)
    model = Tagger()
    gen = torch.Generator().manual_seed(50)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, 20, (n, 40), generator=g)
        labels = torch.roll(tokens, 10, dims=1) % 3
        return tokens, labels

    for _ in range(300):
        x, y = batch(32, gen)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = batch(16, torch.Generator().manual_seed(51))
    save_file(tensors(model), HERE / "tagger.safetensors")
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()},
              HERE / "tagger_batch.safetensors")
    return {"steps": 300, "lr": 3e-3, "final_train_loss": round(loss.item(), 4)}


def make_batch() -> None:
    x, y = adding_batch(16, T, torch.Generator().manual_seed(99))
    save_file({"inputs": x.contiguous(), "targets": y.contiguous()},
              HERE / "adding_batch.safetensors", metadata={"task": "adding problem, T=100"})


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    which = set(sys.argv[1:])
    sys.path.insert(0, str(HERE))
    makers = {"tanh": make_tanh_rnn, "lstm": make_lstm, "relu": make_relu_rnn, "gru": make_gru,
              "tagger": make_tagger}
    make_batch()
    for name, make in makers.items():
        if not which or name in which:
            print(name, json.dumps(make()), flush=True)


if __name__ == "__main__":
    main()
