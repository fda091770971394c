"""Stochastic depth (DropPath) for the residual branches of any PyTorch model."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .api import find_residuals, inject_droppath
from .control import DropPathScheduler, injected_blocks, remove_droppath, set_drop_rates
from .errors import DropPathInjectError, DropPathWarning, ExampleInputError, VerificationError
from .granularity import BlockHandling, BlockLayerDrop, Granularity, LayerDropReport
from .layers import DropPath, drop_path
from .report import Report, Site, SiteStatus, Skipped
from .schedule import drop_rates

try:
    __version__ = version("droppath-inject")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BlockHandling",
    "BlockLayerDrop",
    "Granularity",
    "LayerDropReport",
    "DropPath",
    "DropPathScheduler",
    "DropPathInjectError",
    "DropPathWarning",
    "ExampleInputError",
    "Report",
    "Site",
    "SiteStatus",
    "Skipped",
    "VerificationError",
    "__version__",
    "drop_path",
    "drop_rates",
    "find_residuals",
    "inject_droppath",
    "injected_blocks",
    "remove_droppath",
    "set_drop_rates",
]
