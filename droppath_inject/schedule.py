"""Depth schedules: the drop rate of each residual block, by its position in execution order.

Deeper blocks are dropped more often (Huang et al. 2016): under ``"linear"``, block i of L gets
``max_drop * i / (L - 1)``, so the first block is never dropped and the last gets ``max_drop``.
``"exponential"`` is LayerSkip's rule (Elhoushi et al. 2024),
``max_drop * (e^(i ln 2 / (L - 1)) - 1)``: the same two ends, with the middle blocks dropped
less than under ``"linear"``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TypeAlias

Schedule: TypeAlias = str | Callable[[int, int, float], float]
SCHEDULES: tuple[str, ...] = ("linear", "uniform", "exponential")


def _linear(block_index: int, num_blocks: int, max_drop: float) -> float:
    """``max_drop * i / (L - 1)``, the ratio taken first: the last rate is exactly max_drop."""
    if num_blocks == 1:
        return 0.0
    return max_drop * (block_index / (num_blocks - 1))


def _uniform(block_index: int, num_blocks: int, max_drop: float) -> float:
    """The same rate, ``max_drop``, for every block."""
    return max_drop


def _exponential(block_index: int, num_blocks: int, max_drop: float) -> float:
    """``max_drop * (e^(i ln 2 / (L - 1)) - 1)``, written ``2 ** (i / (L - 1)) - 1`` so that the
    first rate is exactly 0 and the last exactly max_drop."""
    if num_blocks == 1:
        return 0.0
    return max_drop * (2.0 ** (block_index / (num_blocks - 1)) - 1.0)


_BUILTIN: dict[str, Callable[[int, int, float], float]] = {
    "linear": _linear,
    "uniform": _uniform,
    "exponential": _exponential,
}


def _resolve(schedule: Schedule) -> Callable[[int, int, float], float]:
    """The rate function a schedule name or callable stands for."""
    if isinstance(schedule, str):
        if schedule not in _BUILTIN:
            raise ValueError(
                f"unknown schedule {schedule!r}; choose one of {SCHEDULES} or pass a callable "
                "(block_index, num_blocks, max_drop) -> rate"
            )
        return _BUILTIN[schedule]
    if not callable(schedule):
        raise TypeError(f"schedule must be a name in {SCHEDULES} or a callable, got {schedule!r}")
    return schedule


def schedule_name(schedule: Schedule) -> str:
    """A schedule's name, or the qualified name of a callable one (for reports)."""
    if isinstance(schedule, str):
        return schedule
    return str(getattr(schedule, "__qualname__", None) or repr(schedule))


def check_count(name: str, value: int, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, or TypeError/ValueError naming it."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return count


def check_rate(name: str, value: float) -> float:
    """``value`` as a float, or ValueError naming it when it is not a number in [0, 1]."""
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= rate <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return rate


def drop_rates(num_blocks: int, max_drop: float, schedule: Schedule = "linear") -> list[float]:
    """Drop rate of each of ``num_blocks`` residual blocks, in execution order.

    Args:
        num_blocks: how many blocks, ``L``.
        max_drop: the largest rate, in [0, 1].
        schedule: ``"linear"`` (block i gets ``max_drop * i / (L - 1)``), ``"uniform"`` (every block
            ``max_drop``), ``"exponential"`` (LayerSkip: ``max_drop * (e^(i ln 2 / (L - 1)) - 1)``),
            or a callable ``(block_index, num_blocks, max_drop)`` returning a rate. With one
            block, linear and exponential give 0.

    Returns:
        One rate per block, each checked to lie in [0, 1].

    Raises:
        TypeError: ``num_blocks`` is not an int, or ``schedule`` neither a name nor a callable.
        ValueError: ``num_blocks`` < 0, ``max_drop`` or a rate outside [0, 1], an unknown name.

    Example:
        >>> drop_rates(3, 0.2)
        [0.0, 0.1, 0.2]
        >>> [round(rate, 4) for rate in drop_rates(3, 0.2, "exponential")]
        [0.0, 0.0828, 0.2]
    """
    count = check_count("num_blocks", num_blocks, 0)
    top = check_rate("max_drop", max_drop)
    rate_of = _resolve(schedule)
    rates = []
    for i in range(count):
        name = f"the rate of block {i} (of {count}) from schedule {schedule!r}"
        rates.append(check_rate(name, rate_of(i, count, top)))
    return rates
