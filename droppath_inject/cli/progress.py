"""Progress of a run: one stderr line per finished stage, with the time elapsed since the start."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``stage("loaded torchvision:resnet18")`` prints ``[  1.2s] loaded torchvision:resnet18``
    on stderr, unless quiet."""

    def __init__(self, quiet: bool, stream: TextIO | None = None) -> None:
        self.quiet = quiet
        self.stream = stream
        self.start = time.monotonic()

    def stage(self, text: str) -> None:
        if not self.quiet:
            elapsed = time.monotonic() - self.start
            print(f"[{elapsed:5.1f}s] {text}", file=self.stream or sys.stderr, flush=True)
