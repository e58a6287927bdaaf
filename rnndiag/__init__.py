"""rnndiag: find where gradients vanish or explode through time in PyTorch recurrent models.

The library API (the CLI is a thin layer over it); importing it does not import torch:

    from rnndiag.diagnose import diagnose_files   # imports torch
    from rnndiag.records import CheckOptions
    files = diagnose_files([Path("model.safetensors")], CheckOptions())
"""

from rnndiag._version import __version__
from rnndiag.errors import RnnDiagError

__all__ = ["RnnDiagError", "__version__"]
