"""Stochastic depth (DropPath) for the residual branches of any PyTorch model."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import DropPathInjectError, TracingError, VerificationError
from .layers import DropPath, drop_path
from .schedule import drop_rates

try:
    __version__ = version("droppath-inject")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "DropPath",
    "DropPathInjectError",
    "TracingError",
    "VerificationError",
    "__version__",
    "drop_path",
    "drop_rates",
]
