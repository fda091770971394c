"""Which reported sites skip their dropped work: the benchmarks' one reading of the skip plan."""

from __future__ import annotations

from droppath_inject.report import Site, SkipCompute

#: The skip plans under which a training step still computes a dropped branch on every row
#: (a BatchNorm that trains keeps the mask in row and fixed modes without gather_batch_norm).
MASKING = frozenset({SkipCompute.MASKS, SkipCompute.KEPT_ROWS_UNLESS_BATCH_NORM_TRAINS})


def skips(site: Site) -> bool:
    """Whether a reported site skips its dropped work in training rather than masking it."""
    plan = site.skip_compute
    return plan is not None and plan.how not in MASKING
