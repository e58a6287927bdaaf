"""rnndiag: find where gradients vanish or explode through time in PyTorch recurrent models.

The Python API (the `rnndiag` command is a thin layer over it). Importing the package does not
import torch; the functions do when called.

    import rnndiag
    d = rnndiag.check_model(model, x, y)      # a live nn.Module and its batch
    print(d.verdict, d.exit_code)
    print(d.to_text())                        # the report; d.to_json() the JSON document

    rnndiag.check_files(["model.safetensors"], batch="val.safetensors")
    rnndiag.inspect_files(["model.safetensors"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rnndiag._version import __version__
from rnndiag.errors import RnnDiagError

if TYPE_CHECKING:
    from rnndiag.api import Diagnosis, Inspection, check_files, check_model, inspect_files
    from rnndiag.outcome import FailOn
    from rnndiag.records import CheckOptions, Thresholds, Verdict

__all__ = ["CheckOptions", "Diagnosis", "FailOn", "Inspection", "RnnDiagError", "Thresholds",
           "Verdict", "__version__", "check_files", "check_model", "inspect_files"]

_LAZY = {"check_model": "rnndiag.api", "check_files": "rnndiag.api",
         "inspect_files": "rnndiag.api", "Diagnosis": "rnndiag.api", "Inspection": "rnndiag.api",
         "CheckOptions": "rnndiag.records", "Thresholds": "rnndiag.records",
         "Verdict": "rnndiag.records", "FailOn": "rnndiag.outcome"}


def __getattr__(name: str) -> Any:
    """Import the API's modules on first use (they are torch-free until a function runs)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rnndiag' has no attribute {name!r}")
