"""Stochastic depth (DropPath) for the residual branches of any PyTorch model."""

from __future__ import annotations

from . import _quiet_torch  # noqa: F401 - first: torch imported without its NumPy warning
from .api import find_residuals, inject_droppath
from .attach import AttachKind
from .control import remove_droppath, set_drop_rates
from .curricula import Curriculum
from .errors import (
    CurriculumError,
    DropPathInjectError,
    DropPathWarning,
    ExampleInputError,
    VerificationError,
)
from .granularity import BlockHandling, BlockLayerDrop, Granularity, LayerDropReport
from .layers import DropPath, drop_path
from .report import Report, Site, SiteStatus, Skipped
from .schedule import drop_rates
from .scheduler import DropPathScheduler
from .version import __version__

__all__ = [
    "AttachKind",
    "BlockHandling",
    "BlockLayerDrop",
    "Curriculum",
    "CurriculumError",
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
    "remove_droppath",
    "set_drop_rates",
]
