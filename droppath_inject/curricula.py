"""Time curricula: the largest drop rate at each step of training, for ``DropPathScheduler``.

A ``Curriculum`` holds the rate at ``initial_drop`` until ``start``, moves it to ``final_drop``
by ``stop`` along a ``shape``, and holds it there. Warm-up (0 up to the rate), annealing (the
rate down to a final one), and early or late drop path (Liu et al. 2023, "Dropout Reduces
Underfitting": on only before, or only after, one point) are all of this form; the
``DropPathScheduler`` factories build them. Points are steps, or with ``by_fraction=True``
fractions of ``total_steps`` (step ``s`` is at ``s / total_steps``, as Hugging Face's learning
rate schedules count), which ``DropPathCallback`` takes from the Trainer when not given. Each
step's rate is then spread over the blocks by the depth schedule (``drop_rates``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from .errors import CurriculumError
from .schedule import check_count, check_rate

#: The ramp from ``initial_drop`` to ``final_drop``, as a function of progress ``u`` in [0, 1].
SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda u: u,
    "cosine": lambda u: (1.0 - math.cos(math.pi * u)) / 2.0,
    "exponential": lambda u: 2.0**u - 1.0,  # LayerSkip's time curriculum, e^(u ln 2) - 1
}


def _check_point(name: str, value: object, by_fraction: bool) -> None:
    """A point of training: a number >= 0, and <= 1 when it is a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    upper = 1.0 if by_fraction else math.inf
    if not 0.0 <= value <= upper or math.isinf(value):  # NaN fails the comparison too
        unit = "a fraction of training in [0, 1]" if by_fraction else "a step >= 0"
        raise ValueError(f"{name} must be {unit}, got {value!r}")


@dataclass(frozen=True)
class Curriculum:
    """The largest drop rate as a function of the step: call it with a step.

    Args:
        initial_drop: the rate up to ``start``, in [0, 1].
        final_drop: the rate from ``stop`` on, in [0, 1].
        start: where the ramp begins (a step, or a fraction with ``by_fraction``).
        stop: where it ends, >= ``start``; equal to it, the rate jumps there.
        shape: ``"linear"``, ``"cosine"`` (half a cosine) or ``"exponential"`` (``2^u - 1``
            of the progress ``u``, LayerSkip's).
        by_fraction: ``start`` and ``stop`` are fractions of ``total_steps``.
        total_steps: the length of training, for ``by_fraction``; None until known.

    Raises:
        TypeError, ValueError: an argument of the wrong type or outside its range.

    Example:
        >>> warmup = Curriculum(0.0, 0.2, start=0, stop=0.5, by_fraction=True, total_steps=10)
        >>> [round(warmup(step), 2) for step in (0, 1, 5, 9)]
        [0.0, 0.04, 0.2, 0.2]
    """

    initial_drop: float
    final_drop: float
    start: float
    stop: float
    shape: str = "linear"
    by_fraction: bool = False
    total_steps: int | None = None

    def __post_init__(self) -> None:
        check_rate("initial_drop", self.initial_drop)
        check_rate("final_drop", self.final_drop)
        _check_point("start", self.start, self.by_fraction)
        _check_point("stop", self.stop, self.by_fraction)
        if self.stop < self.start:
            raise ValueError(f"stop ({self.stop!r}) must not come before start ({self.start!r})")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {tuple(SHAPES)}")
        if self.total_steps is not None:
            if not self.by_fraction:
                raise ValueError(
                    "total_steps sizes a curriculum by fraction of training; this one counts "
                    "steps (pass by_fraction=True, or leave total_steps out)"
                )
            check_count("total_steps", self.total_steps, 1)

    @property
    def needs_total_steps(self) -> bool:
        """Whether the length of training must still be given (``sized``) before step 1."""
        return self.by_fraction and self.total_steps is None

    def sized(self, total_steps: int) -> Curriculum:
        """The same curriculum for a training of ``total_steps`` steps.

        Raises:
            ValueError: it counts steps, or ``total_steps`` < 1.
            TypeError: ``total_steps`` is not an int.
        """
        return replace(self, total_steps=total_steps)

    def __call__(self, step: int) -> float:
        """The largest rate at ``step`` (0 before the first optimizer step).

        Raises:
            ValueError: ``step`` < 0.
            CurriculumError: a fraction-based curriculum without ``total_steps``, past step 0.
        """
        position = self._position(check_count("step", step, 0))
        if position >= self.stop:
            return self.final_drop
        if position <= self.start:
            return self.initial_drop
        progress = (position - self.start) / (self.stop - self.start)
        rate = self.initial_drop + (self.final_drop - self.initial_drop) * SHAPES[self.shape](
            progress
        )
        low, high = sorted((self.initial_drop, self.final_drop))
        return min(max(rate, low), high)  # rounding never leaves the interval

    def _position(self, step: int) -> float:
        """Where ``step`` lies, in the unit of ``start`` and ``stop``."""
        if not self.by_fraction:
            return float(step)
        if self.total_steps is not None:
            return step / self.total_steps
        if step == 0:
            return 0.0
        raise CurriculumError(
            "this curriculum is set by fraction of training but does not know its length: "
            "pass total_steps=..., or train with DropPathCallback, which takes the Trainer's "
            "max_steps"
        )


def span(name: str, steps: int | None, fraction: float | None) -> tuple[float, bool]:
    """The point of training ``steps`` or ``fraction`` names, and whether it is a fraction.

    Args:
        name: what the point is, for messages (``"warmup"``).
        steps: a number of optimizer steps, >= 1.
        fraction: a fraction of training, in (0, 1].

    Returns:
        ``(point, by_fraction)``.

    Raises:
        ValueError: neither or both given, or a value out of range.
        TypeError: ``steps`` is not an int, or ``fraction`` not a number.

    Example:
        >>> span("warmup", steps=None, fraction=0.1)
        (0.1, True)
    """
    if steps is not None and fraction is None:
        return float(check_count(f"{name} steps", steps, 1)), False
    if fraction is not None and steps is None:
        _check_point(f"{name} fraction", fraction, by_fraction=True)
        if fraction == 0:
            raise ValueError(f"{name} fraction must be in (0, 1], got {fraction!r}")
        return float(fraction), True
    raise ValueError(f"{name}: give exactly one of steps=... and fraction=...")
