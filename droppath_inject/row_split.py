"""Splitting a call's arguments by rows: how skipping layers and branch units run on kept rows.

A call's per-sample tensors (found by a rule the caller gives) are gathered to the kept rows,
walking tuples, lists and dicts; plain values pass, and so does a Hugging Face cache the kept
rows may fill; anything else cannot be split, and the call runs masked (``Refused``).
Arguments the example run computed from the model's state alone (``shared``, positions and
keywords) are never gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor

from .row_caches import is_cache

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


class Refused(Exception):
    """Internal: a call's arguments cannot be split by rows, so it runs masked instead."""


def is_plain(value: object) -> bool:
    """A value that holds no samples: None, a number, a string, a dtype or a device."""
    return isinstance(value, _PLAIN)


def channels_last_format(x: Tensor) -> torch.memory_format | None:
    """The channels_last format ``x`` is strided in, if any (an empty slice keeps its source's
    strides, so a branch that kept no row still tells)."""
    if x.ndim in (4, 5) and x.shape[1] > 1 and x.stride(1) == 1 and x.stride(-1) == x.shape[1]:
        return torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    return None


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x``'s rows ``rows`` in its memory format (``index_select`` makes channels_last
    contiguous; indexing keeps it, so the convolutions after run as they would)."""
    return x[rows] if channels_last_format(x) is not None else x.index_select(0, rows)


def zero_rows_like(x: Tensor, batch: int) -> Tensor:
    """Zeros of ``batch`` rows in ``x``'s dtype and memory format."""
    out = x.new_zeros((batch, *x.shape[1:]))
    fmt = channels_last_format(x)
    return out if fmt is None else out.contiguous(memory_format=fmt)


def split(value: Any, take: Callable[[Tensor], Tensor], fillable: Callable[[object], bool]) -> Any:
    """``value`` with ``take`` applied to each tensor in it (``take`` gathers or keeps it, or
    raises ``Refused``); raises ``Refused`` for what cannot be split."""
    if isinstance(value, Tensor):
        return take(value)
    if isinstance(value, (tuple, list)):
        parts = [split(v, take, fillable) for v in value]
        return type(value)(parts) if type(value) in (tuple, list) else parts
    if isinstance(value, dict):
        return {k: split(v, take, fillable) for k, v in value.items()}
    if is_plain(value):
        return value
    if is_cache(value):
        if fillable(value):
            return value
        raise Refused(
            f"a {type(value).__name__} that holds this layer's keys already, or is read without "
            "gradients, cannot be split by rows; pass use_cache=False in training"
        )
    raise Refused(f"an argument of type {type(value).__name__} cannot be split by rows")


def split_arguments(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    shared: Collection[int | str],
    take: Callable[[Tensor], Tensor],
    fillable: Callable[[object], bool],
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's positional and keyword arguments split by rows, ``shared`` ones left whole."""
    inner_args = tuple(a if i in shared else split(a, take, fillable) for i, a in enumerate(args))
    inner_kwargs = {k: v if k in shared else split(v, take, fillable) for k, v in kwargs.items()}
    return inner_args, inner_kwargs
