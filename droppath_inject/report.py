"""What an injection found and did: residual sites, skipped modules, verification."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .verify import Verification


@dataclass(frozen=True)
class Site:
    """One residual add: its owner block, the branch and skip operands, and the rate applied.

    ``drop_path`` says what carries the rate: ``"injected"``, ``"updated"`` (a DropPath from an
    earlier injection, given the new rate) or ``"existing <path> (<Class>)"`` for a drop path
    the model already had, whose rate is left as it was.
    """

    owner: str
    block_index: int
    branch: str
    skip: str
    rate: float
    drop_path: str


@dataclass(frozen=True)
class Skipped:
    """A module left untouched, and why."""

    module: str
    reason: str


@dataclass
class Report:
    """The result of ``find_residuals`` or ``inject_droppath``; ``str()`` renders it as a table."""

    sites: list[Site] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    num_blocks: int = 0
    verification: Verification | None = None

    @property
    def injected(self) -> list[Site]:
        """Sites that carry a DropPath of this package (new or updated)."""
        return [s for s in self.sites if s.drop_path.startswith(("injected", "updated"))]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self)

    def table(self) -> str:
        """A readable, fixed-width rendering."""
        header = ("#", "block", "branch", "skip", "rate", "drop path")
        rows = [
            (str(s.block_index), s.owner, s.branch, s.skip, f"{s.rate:.4f}", s.drop_path)
            for s in self.sites
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [f"{len(self.sites)} residual sites in {self.num_blocks} blocks"]
        for row in [header, tuple("-" * w for w in widths), *rows]:
            lines.append(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )
        if self.skipped:
            lines.append(f"{len(self.skipped)} modules left untouched:")
            lines += [f"  {s.module or '<model>'}: {s.reason}" for s in self.skipped]
        if self.verification is not None:
            lines.append(f"verification: {self.verification.describe()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
