"""A ``forward`` set on a module instance, in front of its class's: how skipping runs.

``nn.Module.__call__`` looks ``forward`` up on the instance first, so a callable stored in
``vars(module)["forward"]`` runs after every hook (a gate's pre-hook, FSDP2's unshard, the
user's) and decides whether and on what the class's ``forward`` (the user's code, unchanged)
runs. A ``forward`` already set on the instance (accelerate's) is called instead, and put back
when the shadow is removed. The class, ``state_dict()`` keys and hooks stay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class InstanceForward:
    """Base of the instance ``forward``s of this package: ``run`` calls what it stands in
    front of."""

    def __init__(self, module: nn.Module, previous: Callable[..., Any] | None) -> None:
        self.module = module
        self.previous = previous

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


def previous_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The ``forward`` already set on ``module``'s instance, if any."""
    forward: Callable[..., Any] | None = vars(module).get("forward")
    return forward


def shadow(module: nn.Module, forward: InstanceForward) -> None:
    vars(module)["forward"] = forward


def unshadow(module: nn.Module, kind: type[InstanceForward]) -> bool:
    """Remove an instance ``forward`` of type ``kind`` from ``module`` (putting back the one it
    stood in front of); False if there is none."""
    forward = vars(module).get("forward")
    if not isinstance(forward, kind):
        return False
    if forward.previous is None:
        del vars(module)["forward"]
    else:
        vars(module)["forward"] = forward.previous
    return True
