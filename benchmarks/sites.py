"""Which reported sites skip their dropped work: the benchmarks' one reading of the skip plan."""

from __future__ import annotations

from droppath_inject.report import Site

#: The skip plans (``Site.skip_compute.how`` members, by name) under which a training step
#: still computes a dropped branch on every row.
MASKING = frozenset({"MASKS", "MASKS_IN_ROW_MODE", "KEPT_ROWS_UNLESS_BATCH_NORM_TRAINS"})


def skips(site: Site) -> bool:
    """Whether a reported site skips its dropped work in training rather than masking it.

    The one place that reads the core's skip plan, whose enum is the core's to change."""
    plan = site.skip_compute
    return plan is not None and plan.how.name not in MASKING
