"""What a second ``inject_droppath`` call on an injected model may change: only the rates.

A call re-rates what an earlier one placed. Switching ``skip_compute`` or ``granularity``
would put a second kind of DropPath beside the first, so it raises and says to call
``remove_droppath`` first.
"""

from __future__ import annotations

from torch import nn

from .apply import scheduled_drop_paths
from .branch_rows import units_of
from .errors import DropPathInjectError
from .layer_drop import gates_of
from .layers import DropPath


def check_repeat_call(model: nn.Module, by_block: bool, skip_compute: bool) -> None:
    """Raise ``DropPathInjectError`` if ``model`` was injected with another kind of DropPath."""
    if not by_block:
        _check_same_kind(model, skip_compute)
    check_same_granularity(model, by_block, skip_compute)


def _check_same_kind(model: nn.Module, skip_compute: bool) -> None:
    """A second call re-rates what the first placed: it cannot switch ``skip_compute``."""
    attached = any(isinstance(m, DropPath) for _, m, _ in scheduled_drop_paths(model))
    skipping = bool(units_of(model))
    if attached and skipping != skip_compute:
        before, now = ("False", "True") if skip_compute else ("True", "False")
        raise DropPathInjectError(
            f"{type(model).__name__} was injected with skip_compute={before}; this call asks for "
            f"skip_compute={now}, which would add a second kind of DropPath: call "
            "remove_droppath(model) first"
        )


def check_same_granularity(model: nn.Module, by_block: bool, skip_compute: bool) -> None:
    """A second call re-rates what the first placed: it cannot switch granularity or, under
    block granularity, ``skip_compute``."""
    gates = gates_of(model)
    if not gates:
        return
    before = gates[0].skip_compute
    if not by_block or before != skip_compute:
        raise DropPathInjectError(
            f"{type(model).__name__} was injected with granularity='block', "
            f"skip_compute={before}; this call asks for granularity="
            f"{'block' if by_block else 'branch'!r}, skip_compute={skip_compute}: call "
            "remove_droppath(model) first"
        )
