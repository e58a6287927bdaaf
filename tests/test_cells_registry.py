"""The cell units (rnndiag.cells) against PyTorch's own modules, and dispatch through the registry.

Facts (gate multiple, parameter names, shapes and order, cell state, projection, activation,
where b_hh goes) are checked against nn.RNN/LSTM/GRU and the nn.*Cell classes, and each unit's
step against the nn.*Cell on random data (float64).
A toy cell kind (a minimal gated unit) registered here, and nowhere else, is picked up by
discover, static, resources and the replay.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rnndiag import cells, resources, static
from rnndiag.cells import CellUnit, LayerWeights, StaticReading, StepOut
from rnndiag.discover import discover
from rnndiag.errors import ArchitectureError
from rnndiag.records import CellType, Direction, ForgetBias, ModuleKind, ModuleSpec, PascanuReading
from rnndiag.replay import unroll, zero_states
from rnndiag.routes import replay

IN, H, PROJ, T, B = 3, 5, 2, 6, 4
STACKED: dict[CellType, type[nn.Module]] = {CellType.RNN: nn.RNN, CellType.LSTM: nn.LSTM,
                                            CellType.GRU: nn.GRU}
CELL_CLASSES: dict[CellType, type[nn.Module]] = {CellType.RNN: nn.RNNCell,
                                                 CellType.LSTM: nn.LSTMCell,
                                                 CellType.GRU: nn.GRUCell}
UNITS = [cells.unit(c) for c in CellType]
IDS = [u.name for u in UNITS]


def spec_of(u: CellUnit, stacked: bool = True, proj: int = 0, bias: bool = True,
            nonlinearity: str | None = None, layers: int = 1, bidirectional: bool = False,
            ) -> ModuleSpec:
    return ModuleSpec("", u.kind(stacked), IN, H, proj, layers, bidirectional, bias,
                      nonlinearity or u.default_nonlinearity)


# -- the registry ------------------------------------------------------------------------------

def test_registry_covers_every_cell_type() -> None:
    assert set(cells.REGISTRY) == set(CellType)
    for cell, u in cells.REGISTRY.items():
        assert u.cell_type is cell and cells.unit(cell) is u


def test_gate_multiples_name_one_unit_each() -> None:
    """Discovery tells kinds apart by the gate multiple alone."""
    gates = [u.gates for u in cells.units()]
    assert len(set(gates)) == len(gates) and gates == sorted(gates)
    for u in UNITS:
        assert cells.by_gates(u.gates) is u
        assert len(u.gate_order) == u.gates
    assert cells.by_gates(2) is None


def test_import_is_torch_free() -> None:
    """`rnndiag inspect` reads the registry through discover and static without torch."""
    code = ("import sys, rnndiag.cells, rnndiag.discover, rnndiag.static, rnndiag.resources; "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "NO-TORCH", out.stderr


# -- facts against PyTorch's modules -----------------------------------------------------------

def build(cell: CellType, stacked: bool, bias: bool, proj: int = 0, layers: int = 2,
          bidirectional: bool = True, **kw: Any) -> nn.Module:
    if not stacked:
        return CELL_CLASSES[cell](IN, H, bias=bias, dtype=torch.float64, **kw)
    if proj:
        kw["proj_size"] = proj
    return STACKED[cell](IN, H, num_layers=layers, bidirectional=bidirectional, bias=bias,
                         batch_first=True, dtype=torch.float64, **kw)


def activation(nonlinearity: str | None) -> dict[str, Any]:
    return {"nonlinearity": nonlinearity} if nonlinearity else {}


SHAPE_CASES = [(c, stacked, bias, proj) for c in CellType for stacked in (True, False)
               for bias in (True, False)
               for proj in ((0, PROJ) if stacked and c is CellType.LSTM else (0,))]


@pytest.mark.parametrize(("cell", "stacked", "bias", "proj"), SHAPE_CASES,
                         ids=[f"{c.value}-{'stacked' if s else 'cell'}-{'bias' if b else 'nobias'}"
                              f"{f'-proj{p}' if p else ''}" for c, s, b, p in SHAPE_CASES])
def test_param_names_shapes_and_order_match_pytorch(cell: CellType, stacked: bool, bias: bool,
                                                    proj: int) -> None:
    u = cells.unit(cell)
    module = build(cell, stacked, bias, proj)
    spec = spec_of(u, stacked, proj, bias, layers=2 if stacked else 1, bidirectional=stacked)
    expected = []
    for layer in range(spec.num_layers):
        width = IN if layer == 0 else len(spec.directions) * spec.output_size
        for direction in spec.directions:
            expected += [(spec.local_name(base, layer, direction), shape)
                         for base, shape in u.param_shapes(width, H, proj, bias).items()]
    assert expected == [(n, tuple(p.shape)) for n, p in module.named_parameters()]
    assert u.kind(stacked).value == type(module).__name__
    assert {n.split("_l")[0] for n, _ in module.named_parameters()} <= set(u.bases(stacked))


@pytest.mark.parametrize("u", UNITS, ids=IDS)
def test_discover_reads_pytorch_state_dicts_as_the_unit(u: CellUnit) -> None:
    proj = PROJ if u.projection else 0
    shapes = {f"m.{k}": tuple(v.shape)
              for k, v in build(u.cell_type, True, True, proj).state_dict().items()}
    [spec] = discover(shapes)
    assert (spec.kind, spec.hidden_size, spec.proj_size) == (u.kind(True), H, proj)
    assert spec.nonlinearity == u.default_nonlinearity


@pytest.mark.parametrize("u", UNITS, ids=IDS)
def test_projection_only_where_pytorch_allows_it(u: CellUnit) -> None:
    if u.projection:
        build(u.cell_type, True, True, PROJ)
    else:
        with pytest.raises(ValueError, match="proj_size"):
            build(u.cell_type, True, True, PROJ)
        with pytest.raises(ValueError, match="projection"):
            u.param_shapes(IN, H, PROJ, True)
    assert "weight_hr" not in u.bases(stacked=False)  # no nn.*Cell projects


@pytest.mark.parametrize("u", UNITS, ids=IDS)
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "cell"])
def test_cell_state_matches_what_pytorch_returns(u: CellUnit, stacked: bool) -> None:
    module = build(u.cell_type, stacked, True)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    state = module(x)[1] if stacked else module(x[:, 0])
    assert isinstance(state, tuple) == u.has_cell_state
    if u.has_cell_state:
        assert state[1].shape[-1] == H  # c is (.., H) even when h is projected


@pytest.mark.parametrize("u", UNITS, ids=IDS)
def test_nonlinearity_choices_match_pytorch(u: CellUnit) -> None:
    module = build(u.cell_type, True, True)
    if not u.nonlinearities:
        assert not hasattr(module, "nonlinearity")
        return
    assert module.nonlinearity == u.default_nonlinearity
    for choice in u.nonlinearities:
        build(u.cell_type, True, True, nonlinearity=choice)
    with pytest.raises(ValueError):
        build(u.cell_type, True, True, nonlinearity="sigmoid")


@pytest.mark.parametrize("u", UNITS, ids=IDS)
def test_folding_b_hh_into_b_ih_keeps_pytorch_outputs_iff_the_unit_folds(u: CellUnit) -> None:
    torch.manual_seed(1)
    module = build(u.cell_type, False, True)
    folded = build(u.cell_type, False, True)
    with torch.no_grad():
        folded.load_state_dict(module.state_dict())
        folded.bias_ih += folded.bias_hh  # type: ignore[operator]
        folded.bias_hh.zero_()  # type: ignore[operator]
    x = torch.randn(B, IN, dtype=torch.float64)
    h = torch.randn(B, H, dtype=torch.float64)
    state: Any = (h, h.clone()) if u.has_cell_state else h
    first, second = module(x, state), folded(x, state)
    out1, out2 = (first[0], second[0]) if u.has_cell_state else (first, second)
    assert torch.allclose(out1, out2, rtol=0, atol=1e-12) == u.folds_hidden_bias


# -- step equations against nn.*Cell -----------------------------------------------------------

STEP_CASES = [(c, nl, bias) for c in CellType
              for nl in (cells.unit(c).nonlinearities or (None,)) for bias in (True, False)]


@pytest.mark.parametrize(("cell", "nonlinearity", "bias"), STEP_CASES,
                         ids=[f"{c.value}-{nl or 'fixed'}-{'bias' if b else 'nobias'}"
                              for c, nl, b in STEP_CASES])
def test_step_equals_pytorch_cell(cell: CellType, nonlinearity: str | None,
                                  bias: bool) -> None:
    torch.manual_seed(2)
    u = cells.unit(cell)
    module = build(cell, False, bias, **activation(nonlinearity))
    spec = spec_of(u, False, bias=bias, nonlinearity=nonlinearity)
    w = LayerWeights.of(spec, dict(module.named_parameters()), 0, Direction.FORWARD)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    xs = cells.input_terms(x, w, cell)
    h = torch.randn(B, H, dtype=torch.float64)
    c = torch.randn(B, H, dtype=torch.float64) if u.has_cell_state else None
    with torch.no_grad():
        for t in range(T):
            out = u.step(nonlinearity, xs[:, t], h, c, w)
            want = module(x[:, t], (h, c) if c is not None else h)
            want_h, want_c = want if c is not None else (want, None)
            torch.testing.assert_close(out.h, want_h, rtol=0, atol=1e-12)
            if want_c is not None:
                assert out.c is not None
                torch.testing.assert_close(out.c, want_c, rtol=0, atol=1e-12)
            assert (out.c is None) == (not u.has_cell_state)
            h, c = out.h, out.c


def test_projected_lstm_steps_equal_nn_lstm() -> None:
    """No nn.LSTMCell projects: the steps of one layer against nn.LSTM(proj_size) itself."""
    torch.manual_seed(3)
    u = cells.unit(CellType.LSTM)
    module = build(CellType.LSTM, True, True, PROJ, layers=1, bidirectional=False)
    spec = spec_of(u, proj=PROJ)
    w = LayerWeights.of(spec, dict(module.named_parameters()), 0, Direction.FORWARD)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    xs = cells.input_terms(x, w, CellType.LSTM)
    h = torch.zeros(B, PROJ, dtype=torch.float64)
    c: Tensor | None = torch.zeros(B, H, dtype=torch.float64)
    with torch.no_grad():
        want, (h_n, c_n) = module(x)
        for t in range(T):
            out = u.step(None, xs[:, t], h, c, w)
            torch.testing.assert_close(out.h, want[:, t], rtol=0, atol=1e-12)
            h, c = out.h, out.c
    torch.testing.assert_close(h, h_n[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(c, c_n[0], rtol=0, atol=1e-12)


def test_compat_step_dispatches_to_the_unit() -> None:
    torch.manual_seed(4)
    for u in UNITS:
        w = LayerWeights(torch.randn(u.gates * H, IN, dtype=torch.float64),
                         torch.randn(u.gates * H, H, dtype=torch.float64), None, None, None)
        xt = torch.randn(B, u.gates * H, dtype=torch.float64)
        h = torch.randn(B, H, dtype=torch.float64)
        c = h.clone() if u.has_cell_state else None
        assert torch.equal(cells.step(u.cell_type, u.default_nonlinearity, xt, h, c, w).h,
                           u.step(u.default_nonlinearity, xt, h, c, w).h)


# -- what the replay captures ------------------------------------------------------------------

@pytest.mark.parametrize("u", UNITS, ids=IDS)
def test_replay_captures_dh_and_dc_iff_the_unit_has_one(u: CellUnit) -> None:
    proj = PROJ if u.projection else 0
    spec = spec_of(u, proj=proj)
    params = dict(build(u.cell_type, True, True, proj, layers=1, bidirectional=False)
                  .named_parameters())
    [adj] = replay(spec, params, torch.randn(B, T, IN, dtype=torch.float64)).adjoints
    assert adj.dh.shape == (T, B, spec.output_size)
    assert (adj.dc is not None) == u.has_cell_state
    if adj.dc is not None:
        assert adj.dc.shape == (T, B, H)  # c is (.., H) even when h is projected


@pytest.mark.parametrize("u", UNITS, ids=IDS)
def test_zero_states_carry_c_iff_the_unit_has_one(u: CellUnit) -> None:
    h0, c0 = zero_states(spec_of(u), B, torch.zeros(1))
    assert (c0 is not None) == u.has_cell_state and h0.shape == (1, B, H)


# -- a toy cell kind, registered here only -----------------------------------------------------

def mgu_step(nonlinearity: str | None, xt: Tensor, h: Tensor, c: Tensor | None,
             w: LayerWeights) -> StepOut:
    """Minimal gated unit (Zhou et al. 2016): f = sigmoid(x_f + h U_f^T),
    n = tanh(x_n + (f * h) U_n^T), h_t = (1 - f) * h + f * n; gates (f, n)."""
    hidden = h.shape[1]
    x_f, x_n = xt.split([hidden, hidden], dim=1)
    u_f, u_n = w.w_hh.split([hidden, hidden], dim=0)
    f = x_f.addmm(h, u_f.t()).sigmoid()
    n = x_n.addmm(f * h, u_n.t()).tanh()
    return StepOut(h.lerp(n, f), None)


def mgu_static(spec: ModuleSpec, get: Callable[[str], Any], sigma: float) -> StaticReading:
    """The MGU's forget gate is its first row block."""
    hidden = spec.hidden_size
    b = np.asarray(get("bias_ih"))[:hidden] + np.asarray(get("bias_hh"))[:hidden]
    return StaticReading(PascanuReading.NOT_APPLICABLE,
                         ForgetBias(float(b.mean()), float(b.min()), float(b.max()), 0.5))


MGU = CellUnit(cell_type=CellType.GRU, name="MGU", gates=2, gate_order=("f", "n"),
               projection=False, has_cell_state=False, nonlinearities=(),
               folds_hidden_bias=True, memory_units=9, step=mgu_step, static=mgu_static)


@pytest.fixture
def mgu(monkeypatch: pytest.MonkeyPatch) -> CellUnit:
    """The toy takes the GRU's key (CellType is a closed vocabulary in rnndiag.records)."""
    monkeypatch.setitem(cells.REGISTRY, CellType.GRU, MGU)
    return MGU


def mgu_params(layers: int = 2) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(6)
    out = {}
    for layer in range(layers):
        width = IN if layer == 0 else H
        for base, shape in MGU.param_shapes(width, H, 0, True).items():
            out[f"{base}_l{layer}"] = torch.randn(shape, generator=gen, dtype=torch.float64)
    return out


def test_toy_kind_is_discovered(mgu: CellUnit) -> None:
    shapes = {f"enc.{k}": tuple(v.shape) for k, v in mgu_params().items()}
    [spec] = discover(shapes)
    assert (spec.kind, spec.hidden_size, spec.num_layers) == (ModuleKind.GRU, H, 2)
    assert cells.unit(spec.cell_type) is mgu
    gru_shapes = {k: tuple(v.shape) for k, v in build(CellType.GRU, True, True).state_dict()
                  .items()}
    with pytest.raises(ArchitectureError, match=r"G = 1 \(RNN\), 2 \(MGU\) or 4 \(LSTM\)"):
        discover(gru_shapes)  # the real GRU is no longer registered


def test_toy_kind_is_read_by_static(mgu: CellUnit) -> None:
    params = mgu_params(1)
    spec = ModuleSpec("", ModuleKind.GRU, IN, H, 0, 1, False, True, None)
    layer = static.static_layer(spec, {k: v.numpy() for k, v in params.items()}, 0,
                                Direction.FORWARD)
    want = (params["bias_ih_l0"][:H] + params["bias_hh_l0"][:H]).mean().item()
    assert layer.forget_bias is not None and math.isclose(layer.forget_bias.mean, want)
    assert math.isclose(layer.sigma_max_hh,
                        float(torch.linalg.matrix_norm(params["weight_hh_l0"], ord=2)))


def test_toy_kind_sizes_the_memory_estimate(mgu: CellUnit) -> None:
    spec = ModuleSpec("", ModuleKind.GRU, IN, H, 0, 2, True, True, None)
    assert resources.estimate(spec, B, T, 4) == math.ceil(1.25 * 9 * T * B * H * 4 * 2 * 2)


def test_toy_kind_is_replayed(mgu: CellUnit) -> None:
    params = mgu_params()
    spec = ModuleSpec("", ModuleKind.GRU, IN, H, 0, 2, False, True, None)
    x = torch.randn(B, T, IN, dtype=torch.float64)
    h0, c0 = zero_states(spec, B, x)
    run = unroll(spec, params, x, h0, c0)
    layer_input = x
    for layer in range(2):
        p = {k.removesuffix(f"_l{layer}"): v for k, v in params.items() if k.endswith(str(layer))}
        h, hs = x.new_zeros(B, H), []
        for t in range(T):
            xt = layer_input[:, t] @ p["weight_ih"].t() + p["bias_ih"] + p["bias_hh"]
            f = torch.sigmoid(xt[:, :H] + h @ p["weight_hh"][:H].t())
            n = torch.tanh(xt[:, H:] + (f * h) @ p["weight_hh"][H:].t())
            h = (1 - f) * h + f * n
            hs.append(h)
        layer_input = torch.stack(hs, dim=1)
    assert run.output is not None
    torch.testing.assert_close(run.output, layer_input, rtol=0, atol=1e-12)
