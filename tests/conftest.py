"""Shared fixtures: paths to the bundled sample models."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
ADDING_BATCH = SAMPLES / "adding_batch.safetensors"


@pytest.fixture
def samples() -> Path:
    return SAMPLES


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true",
                     help="Rewrite tests/golden/* from the current output instead of comparing.")


@pytest.fixture
def regen_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regen-golden"))
