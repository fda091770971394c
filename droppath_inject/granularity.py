"""What block granularity did to each block: shared decisions, skipping, or why it fell back.

Plain data (enums and frozen dataclasses) so that ``Report.to_dict()`` carries it to JSON and
callers can test it without parsing text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, TypeAlias

GranularityName: TypeAlias = Literal["branch", "block"]


class Granularity(Enum):
    """Whose keep decision a DropPath follows: its own branch's, or its whole block's."""

    BRANCH = "branch"  # one decision per residual branch (timm, torchvision)
    BLOCK = "block"  # one decision per block, shared by its branches (LayerDrop, LayerSkip)

    @classmethod
    def parse(cls, value: str) -> Granularity:
        """The member named ``value``; ValueError for anything else."""
        for member in cls:
            if member.value == value:
                return member
        raise ValueError(f"granularity must be one of {[m.value for m in cls]}, got {value!r}")


class BlockHandling(Enum):
    """How the branches of one block are dropped in training."""

    SHARED = "shared decision"  # one decision per block, branches masked
    SKIPPED = "skips compute"  # one decision per block, a dropped block (row) is not run
    PER_BRANCH = "per-branch decisions"  # fell back to branch granularity; ``reason`` says why


@dataclass(frozen=True)
class BlockLayerDrop:
    """One block under block granularity: its module, branch count and handling."""

    block_index: int
    module: str
    branches: int
    handling: BlockHandling
    reason: str = ""  # free text for people: why skipping or sharing fell back


@dataclass(frozen=True)
class LayerDropReport:
    """Block granularity's part of a ``Report``."""

    granularity: Granularity
    skip_compute: bool
    blocks: list[BlockLayerDrop] = field(default_factory=list)

    def count(self, handling: BlockHandling) -> int:
        """How many blocks are handled so."""
        return sum(b.handling is handling for b in self.blocks)
