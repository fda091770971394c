"""Controlling an injected model during and after training: rates, curricula, removal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from .apply import detach, scheduled_drop_paths
from .curricula import Curriculum, span
from .droppaths import set_drop_path_rate
from .errors import DropPathInjectError
from .layer_drop import remove_layer_drop
from .schedule import Schedule, check_rate, drop_rates
from .surgery import InjectedBlock, restore_original


def injected_blocks(model: nn.Module) -> list[tuple[str, InjectedBlock]]:
    """The blocks ``inject_droppath(skip_compute=True)`` rewrote, with their paths.

    Args:
        model: a model given to ``inject_droppath`` (or one containing it).

    Returns:
        ``(path, block)`` pairs, outermost first; empty unless ``skip_compute`` was used.

    Example:
        >>> import torchvision
        >>> from droppath_inject import inject_droppath
        >>> model = inject_droppath(torchvision.models.resnet18(), skip_compute=True, mode="batch")
        >>> [path for path, _ in injected_blocks(model)][:2]
        ['layer1.0', 'layer1.1']
    """
    return [(path, m) for path, m in model.named_modules() if isinstance(m, InjectedBlock)]


@dataclass(frozen=True)
class _Scheduled:
    """A drop path under the package's schedule: where it is and which block it belongs to."""

    path: str
    block_index: int
    num_blocks: int
    set_rate: Callable[[float], None]


def _scheduled(model: nn.Module) -> list[_Scheduled]:
    found = [
        _Scheduled(path, place.block_index, place.num_blocks, partial(set_drop_path_rate, module))
        for path, module, place in scheduled_drop_paths(model)
    ]
    for path, block in injected_blocks(model):
        info = block.droppath_info
        for drop in block.drop_paths:
            found.append(
                _Scheduled(
                    path, info.block_index, info.num_blocks, partial(setattr, drop, "drop_prob")
                )
            )
    return found


def _require_injected(model: nn.Module) -> list[_Scheduled]:
    scheduled = _scheduled(model)
    if not scheduled:
        raise DropPathInjectError(
            f"{type(model).__name__} holds no DropPath placed by inject_droppath; call it first"
        )
    return scheduled


def set_drop_rates(model: nn.Module, max_drop: float, schedule: Schedule = "linear") -> list[float]:
    """Re-schedule every DropPath ``inject_droppath`` placed or re-rated, in place.

    Blocks keep the positions they were given at injection, so ``schedule`` spreads
    ``max_drop`` exactly as injection did. Cheap enough to call every step: it only sets
    attributes.

    Args:
        model: a model given to ``inject_droppath`` (or one containing it).
        max_drop: the new largest rate.
        schedule: ``"linear"``, ``"uniform"``, ``"exponential"`` (LayerSkip) or a callable
            ``(index, num_blocks, max_drop)``; see ``drop_rates``.

    Returns:
        The rate of each block, by block index.

    Raises:
        DropPathInjectError: the model holds no injected DropPath, or the DropPaths of separate
            calls with different block counts.

    Example:
        >>> import torchvision
        >>> from droppath_inject import inject_droppath
        >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
        >>> [round(rate, 4) for rate in set_drop_rates(model, 0.35)]
        [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35]
    """
    scheduled = _require_injected(model)
    sizes: dict[int, str] = {}
    for entry in scheduled:
        sizes.setdefault(entry.num_blocks, entry.path.rpartition(".")[0] or entry.path)
    if len(sizes) > 1:  # positions of separate injections index schedules of different lengths
        parts = ", ".join(f"{size} blocks from {path}" for size, path in sorted(sizes.items()))
        raise DropPathInjectError(
            f"{type(model).__name__} holds blocks of separate inject_droppath calls ({parts}): "
            "call set_drop_rates on each injected part"
        )
    rates = drop_rates(scheduled[0].num_blocks, max_drop, schedule)
    for entry in scheduled:
        entry.set_rate(rates[entry.block_index])
    return rates


def remove_droppath(model: nn.Module) -> nn.Module:
    """Take out every DropPath ``inject_droppath`` added, in place; returns ``model``.

    Hooks are removed, drop-path slots get their ``nn.Identity`` back, re-rated drop paths
    their original rates, rewritten blocks (``skip_compute``) their original objects with the
    current weights. The result no longer needs this package, so it can be exported or
    deployed as it was.

    Args:
        model: a model given to ``inject_droppath`` (or one containing it).

    Returns:
        ``model``, without any DropPath of this package.

    Raises:
        DropPathInjectError: the model holds no injected DropPath.

    Example:
        >>> import torchvision
        >>> from droppath_inject import DropPath, inject_droppath
        >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
        >>> model = remove_droppath(model)
        >>> any(isinstance(m, DropPath) for m in model.modules())
        False
    """
    _require_injected(model)
    remove_layer_drop(model)
    detach(model)
    while blocks := injected_blocks(model):
        path, block = blocks[0]
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, restore_original(block))
    return model


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
        curriculum = Curriculum(max_drop, 0.0, point, point, "linear", by_fraction, total_steps)
        return cls(model, curriculum, schedule)

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
        curriculum = Curriculum(0.0, max_drop, point, point, "linear", by_fraction, total_steps)
        return cls(model, curriculum, schedule)

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
