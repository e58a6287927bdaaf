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
