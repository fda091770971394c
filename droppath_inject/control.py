"""Controlling an injected model during and after training: rates, warmup, removal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .errors import DropPathInjectError
from .schedule import Schedule, drop_rates
from .surgery import InjectedBlock, restore_original


def injected_blocks(model: nn.Module) -> list[tuple[str, InjectedBlock]]:
    """The blocks ``inject_droppath`` rewrote, with their paths, outermost first."""
    return [(path, m) for path, m in model.named_modules() if isinstance(m, InjectedBlock)]


def _require_injected(model: nn.Module) -> list[tuple[str, InjectedBlock]]:
    blocks = injected_blocks(model)
    if not blocks:
        raise DropPathInjectError(
            f"{type(model).__name__} holds no block rewritten by inject_droppath; call it first"
        )
    return blocks


def set_drop_rates(model: nn.Module, max_drop: float, schedule: Schedule = "linear") -> list[float]:
    """Re-schedule every injected DropPath in place; returns the rate of each block by index.

    Blocks keep the positions they were given at injection (including blocks whose drop path
    the model already had), so ``schedule`` spreads ``max_drop`` exactly as injection did.
    Cheap enough to call every step: it only sets attributes.
    """
    blocks = _require_injected(model)
    sizes = {block.droppath_info.num_blocks: path for path, block in reversed(blocks)}
    if len(sizes) > 1:  # positions of separate injections index schedules of different lengths
        parts = ", ".join(f"{size} blocks from {path}" for size, path in sorted(sizes.items()))
        raise DropPathInjectError(
            f"{type(model).__name__} holds blocks of separate inject_droppath calls ({parts}): "
            "call set_drop_rates on each injected part"
        )
    num_blocks = blocks[0][1].droppath_info.num_blocks
    rates = drop_rates(num_blocks, max_drop, schedule)
    for _, block in blocks:
        for drop in block.drop_paths:
            drop.drop_prob = rates[block.droppath_info.block_index]
    return rates


def remove_droppath(model: nn.Module) -> nn.Module:
    """Put back the original blocks (same objects, current weights), in place; returns ``model``.

    The result no longer needs this package, so it can be exported or deployed as it was.
    """
    _require_injected(model)
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
