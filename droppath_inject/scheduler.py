"""``DropPathScheduler``: rates over training time, driving ``set_drop_rates`` step by step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .control import set_drop_rates
from .curricula import Curriculum, span
from .schedule import Schedule, check_rate


class DropPathScheduler:
    """Drives ``set_drop_rates`` from a step (or epoch) counter, like an LR scheduler.

    ``max_drop_at(step)`` gives the largest rate at each step, which ``schedule`` spreads over
    the blocks by depth. The factories build the usual time curricula (``Curriculum``s):
    ``warmup``, ``anneal``, ``early_drop``, ``late_drop``, each over a number of ``steps`` or a
    ``fraction`` of training (of ``total_steps``, or of the Trainer's ``max_steps`` under
    ``DropPathCallback``). Call ``step()`` once per optimizer step or epoch.

    Args:
        model: a model given to ``inject_droppath``.
        max_drop_at: the largest rate at each step, such as a ``Curriculum``.
        schedule: the depth schedule, as in ``set_drop_rates``.

    Raises:
        DropPathInjectError: the model holds no injected DropPath.

    Example:
        >>> import torchvision
        >>> from droppath_inject import DropPathScheduler, inject_droppath
        >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
        >>> scheduler = DropPathScheduler.anneal(model, 0.2, steps=4, shape="linear")
        >>> [round(scheduler.step(), 4) for _ in range(5)]
        [0.15, 0.1, 0.05, 0.0, 0.0]
    """

    def __init__(
        self,
        model: nn.Module,
        max_drop_at: Callable[[int], float],
        schedule: Schedule = "linear",
    ) -> None:
        self.model = model
        self.max_drop_at = max_drop_at
        self.schedule = schedule
        self.count = 0
        self.max_drop = max_drop_at(0)
        set_drop_rates(model, self.max_drop, schedule)

    @classmethod
    def warmup(
        cls,
        model: nn.Module,
        max_drop: float,
        *,
        steps: int | None = None,
        fraction: float | None = None,
        total_steps: int | None = None,
        shape: str = "linear",
        schedule: Schedule = "linear",
    ) -> DropPathScheduler:
        """Ramp the largest rate from 0 to ``max_drop`` over the first ``steps`` steps (or
        ``fraction`` of training), then hold it. ``shape="exponential"`` over ``fraction=1.0``
        is LayerSkip's time curriculum.

        Raises:
            ValueError, TypeError: neither or both of ``steps`` and ``fraction``, or an
                argument out of range (see ``Curriculum``).

        Example:
            >>> import torchvision
            >>> from droppath_inject import inject_droppath
            >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
            >>> scheduler = DropPathScheduler.warmup(model, 0.1, fraction=0.1, total_steps=1000)
        """
        check_rate("max_drop", max_drop)
        point, by_fraction = span("warmup", steps, fraction)
        curriculum = Curriculum(0.0, max_drop, 0, point, shape, by_fraction, total_steps)
        return cls(model, curriculum, schedule)

    @classmethod
    def anneal(
        cls,
        model: nn.Module,
        max_drop: float,
        *,
        final_drop: float = 0.0,
        steps: int | None = None,
        fraction: float | None = None,
        total_steps: int | None = None,
        shape: str = "cosine",
        schedule: Schedule = "linear",
    ) -> DropPathScheduler:
        """Decay the largest rate from ``max_drop`` to ``final_drop`` over the first ``steps``
        steps (or ``fraction`` of training), then hold it.

        Raises:
            ValueError, TypeError: as ``warmup``, or ``final_drop`` above ``max_drop``.

        Example:
            >>> import torchvision
            >>> from droppath_inject import inject_droppath
            >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
            >>> scheduler = DropPathScheduler.anneal(model, 0.3, fraction=1.0, total_steps=500)
        """
        if check_rate("final_drop", final_drop) > check_rate("max_drop", max_drop):
            raise ValueError(
                f"final_drop ({final_drop!r}) must not exceed max_drop ({max_drop!r}): "
                "anneal lowers the rate; warmup raises it"
            )
        point, by_fraction = span("anneal", steps, fraction)
        curriculum = Curriculum(max_drop, final_drop, 0, point, shape, by_fraction, total_steps)
        return cls(model, curriculum, schedule)

    @classmethod
    def early_drop(
        cls,
        model: nn.Module,
        max_drop: float,
        *,
        steps: int | None = None,
        fraction: float | None = None,
        total_steps: int | None = None,
        schedule: Schedule = "linear",
    ) -> DropPathScheduler:
        """Drop at ``max_drop`` for the first ``steps`` steps (or ``fraction``), then not at
        all: early stochastic depth, against underfitting (Liu et al. 2023).

        Raises:
            ValueError, TypeError: as ``warmup``.

        Example:
            >>> import torchvision
            >>> from droppath_inject import inject_droppath
            >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
            >>> scheduler = DropPathScheduler.early_drop(model, 0.1, steps=2000)
        """
        check_rate("max_drop", max_drop)
        point, by_fraction = span("early_drop", steps, fraction)
        return cls(model, _switch(max_drop, 0.0, point, by_fraction, total_steps), schedule)

    @classmethod
    def late_drop(
        cls,
        model: nn.Module,
        max_drop: float,
        *,
        steps: int | None = None,
        fraction: float | None = None,
        total_steps: int | None = None,
        schedule: Schedule = "linear",
    ) -> DropPathScheduler:
        """Train without drop path for the first ``steps`` steps (or ``fraction``), then at
        ``max_drop``: late stochastic depth, against overfitting (Liu et al. 2023).

        Raises:
            ValueError, TypeError: as ``warmup``.

        Example:
            >>> import torchvision
            >>> from droppath_inject import inject_droppath
            >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
            >>> scheduler = DropPathScheduler.late_drop(model, 0.1, fraction=0.5)
        """
        check_rate("max_drop", max_drop)
        point, by_fraction = span("late_drop", steps, fraction)
        return cls(model, _switch(0.0, max_drop, point, by_fraction, total_steps), schedule)

    @classmethod
    def linear_warmup(
        cls, model: nn.Module, max_drop: float, warmup_steps: int, schedule: Schedule = "linear"
    ) -> DropPathScheduler:
        """Ramp the largest rate linearly from 0 to ``max_drop`` over ``warmup_steps`` steps:
        ``warmup(model, max_drop, steps=warmup_steps, schedule=schedule)``."""
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps!r}")
        return cls.warmup(model, max_drop, steps=warmup_steps, schedule=schedule)

    def set_step(self, step: int) -> float:
        """Go to ``step`` and apply its rates; returns its largest rate."""
        max_drop = self.max_drop_at(step)
        set_drop_rates(self.model, max_drop, self.schedule)
        self.count, self.max_drop = step, max_drop
        return max_drop

    def step(self) -> float:
        """Advance one step and apply that step's rates; returns the new largest rate."""
        return self.set_step(self.count + 1)

    def state_dict(self) -> dict[str, Any]:
        """The step counter, for checkpoints; the curriculum is rebuilt as it was made."""
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved step and apply its rates."""
        self.set_step(int(state["count"]))


def _switch(
    before: float, after: float, point: float, by_fraction: bool, total_steps: int | None
) -> Curriculum:
    """A curriculum that holds ``before`` until ``point`` and ``after`` from there on."""
    return Curriculum(before, after, point, point, "linear", by_fraction, total_steps)
