"""Recognising drop-path modules of any library, and reading and setting their rates.

timm has ``DropPath``, torchvision ``StochasticDepth``, Hugging Face one class per model
(``ConvNextDropPath``, ``SwinDropPath``, ``BeitDropPath``, ...), and research code many copies
of timm's layer. They are told by class name (or, for a parameterless module, by the name it is
stored under) and carry their rate in ``drop_prob`` (timm, Hugging Face), ``p`` (torchvision)
or ``drop_rate``. An ``nn.Identity`` stored under a drop-path name is the slot timm and
Hugging Face leave when a model is built at rate 0.
"""

from __future__ import annotations

import re

from torch import nn

from .layers import DropPath

_DROP_PATH_NAME = re.compile(r"drop_?path|stochastic_?depth|droppath", re.IGNORECASE)
_RATE_ATTRIBUTES = ("drop_prob", "p", "drop_rate", "drop_path_rate")


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def is_drop_path_module(module: nn.Module, name: str = "") -> bool:
    """A stochastic-depth module: ours, or another library's, by class name or by its name.

    Args:
        module: the module.
        name: its path in the model (optional): a parameterless module with a rate attribute
            stored under a drop-path name (``blocks.0.drop_path``) counts too.
    """
    if isinstance(module, DropPath) or _DROP_PATH_NAME.search(type(module).__name__):
        return True
    if isinstance(module, nn.Identity) or _has_parameters(module):
        return False
    return (
        bool(_DROP_PATH_NAME.search(name.rpartition(".")[2])) and rate_attribute(module) is not None
    )


def is_drop_path_slot(module: nn.Module, name: str) -> bool:
    """An ``nn.Identity`` stored under a drop-path name: where a model built at rate 0 left one."""
    return type(module) is nn.Identity and bool(_DROP_PATH_NAME.search(name.rpartition(".")[2]))


def rate_attribute(module: nn.Module) -> str | None:
    """The attribute holding a drop-path module's rate, or None if it has none we know."""
    for attribute in _RATE_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return attribute
    return None


def drop_path_rate_of(module: nn.Module) -> float | None:
    """The rate a drop-path module carries, or None if it has no rate attribute we know."""
    attribute = rate_attribute(module)
    return None if attribute is None else float(getattr(module, attribute))


def set_drop_path_rate(module: nn.Module, rate: float) -> None:
    """Give a drop-path module a new rate (its class keeps its own mode and scaling)."""
    attribute = rate_attribute(module)
    if attribute is None:
        raise ValueError(f"{type(module).__name__} has no rate attribute among {_RATE_ATTRIBUTES}")
    setattr(module, attribute, rate)
