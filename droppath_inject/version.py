"""The installed package's version, for ``__version__`` and reports."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("droppath-inject")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
