"""Controlling an injected model during and after training: rates and removal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from .apply import detach, scheduled_drop_paths
from .droppaths import set_drop_path_rate
from .errors import DropPathInjectError
from .layer_drop import remove_layer_drop
from .schedule import Schedule, drop_rates
from .wrappers import inner_module


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
        model: a model given to ``inject_droppath`` (or one containing it, or its wrapper).
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
    their original rates; the decisions' pre-hooks and the instance ``forward`` of skipping
    layers and branch units (``skip_compute``) are taken out. The result no longer needs this
    package, so it can be exported or deployed as it was.

    Args:
        model: a model given to ``inject_droppath`` (or one containing it, or its wrapper).

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
    with inner_module(model) as module:
        _require_injected(module)
        remove_layer_drop(module)
        detach(module)
    return model
