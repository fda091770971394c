"""Controlling an injected model during and after training: rates, warmup, removal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn

from .apply import detach, scheduled_drop_paths
from .droppaths import set_drop_path_rate
from .errors import DropPathInjectError
from .layer_drop import remove_layer_drop
from .schedule import Schedule, drop_rates
from .surgery import InjectedBlock, restore_original


def injected_blocks(model: nn.Module) -> list[tuple[str, InjectedBlock]]:
    """The blocks ``inject_droppath(skip_compute=True)`` rewrote, with their paths, outermost
    first."""
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
        schedule: ``"linear"``, ``"uniform"`` or a callable ``(index, num_blocks, max_drop)``.

    Returns:
        The rate of each block, by block index.

    Raises:
        DropPathInjectError: the model holds no injected DropPath, or the DropPaths of separate
            calls with different block counts.
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

    Raises:
        DropPathInjectError: the model holds no injected DropPath.
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

    ``max_drop_at(step)`` gives the largest rate at each step; ``linear_warmup`` builds the
    common ramp from 0 to ``max_drop``. Call ``step()`` once per optimizer step or epoch.
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
    def linear_warmup(
        cls, model: nn.Module, max_drop: float, warmup_steps: int, schedule: Schedule = "linear"
    ) -> DropPathScheduler:
        """Ramp the largest rate linearly from 0 to ``max_drop`` over ``warmup_steps`` steps."""
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps!r}")
        return cls(model, lambda step: max_drop * min(step, warmup_steps) / warmup_steps, schedule)

    def step(self) -> float:
        """Advance one step and apply that step's rates; returns the new largest rate."""
        self.count += 1
        self.max_drop = self.max_drop_at(self.count)
        set_drop_rates(self.model, self.max_drop, self.schedule)
        return self.max_drop

    def state_dict(self) -> dict[str, Any]:
        """The step counter, for checkpoints."""
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved step and apply its rates."""
        self.count = int(state["count"])
        self.max_drop = self.max_drop_at(self.count)
        set_drop_rates(self.model, self.max_drop, self.schedule)
