"""Checkpoints as people save them: the state_dict inside a training checkpoint's dict, with
the prefix DDP (``module.``) or ``torch.compile`` (``_orig_mod.``) put on its keys.

The key choice follows ``timm.models.load_state_dict`` (EMA weights first, then
``state_dict``, then ``model``), and the prefixes are removed by timm's own
``timm.models.clean_state_dict`` when timm is installed; ``_clean_keys`` does the same without
it. timm's ``load_state_dict`` itself is not called because it does not say what it unwrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

#: Checked in this order, as timm does (``use_ema=True``).
WRAPPER_KEYS: tuple[str, ...] = ("state_dict_ema", "model_ema", "state_dict", "model")
PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class Unwrapped:
    """A state_dict taken out of a checkpoint, and what had to be taken off to get it."""

    state_dict: dict[str, Any]
    key: str | None  # the checkpoint entry it came from, None if the file is the state_dict
    prefixes: tuple[str, ...]  # key prefixes removed

    def describe(self) -> str | None:
        """``took "state_dict" from the checkpoint, removed "module." prefix``, or None."""
        parts = [f'took "{self.key}" from the checkpoint'] if self.key else []
        if self.prefixes:
            names = ", ".join(f'"{p}"' for p in self.prefixes)
            parts.append(f"removed {names} prefix" + ("es" if len(self.prefixes) > 1 else ""))
        return ", ".join(parts) or None


def is_state_dict(value: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _remove_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def _clean_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``module.`` and ``_orig_mod.`` removed from every key, in either order."""
    return {_remove_prefix(k): v for k, v in state_dict.items()}


def _cleaner() -> Callable[[dict[str, Any]], dict[str, Any]]:
    try:
        from timm.models import clean_state_dict
    except ImportError:
        return _clean_keys
    cleaner: Callable[[dict[str, Any]], dict[str, Any]] = clean_state_dict
    return cleaner


def _removed_prefixes(before: Mapping[str, Any]) -> tuple[str, ...]:
    found = []
    for key in before:
        while key.startswith(PREFIXES):
            prefix = next(p for p in PREFIXES if key.startswith(p))
            if prefix not in found:
                found.append(prefix)
            key = key[len(prefix) :]
    return tuple(found)


def unwrap(checkpoint: Any) -> Unwrapped | None:
    """The state_dict in ``checkpoint`` (itself or under a wrapper key), keys cleaned, or None."""
    key = None
    value = checkpoint
    if isinstance(checkpoint, Mapping) and not is_state_dict(checkpoint):
        key = next((k for k in WRAPPER_KEYS if is_state_dict(checkpoint.get(k))), None)
        value = None if key is None else checkpoint[key]
    if not is_state_dict(value):
        return None
    state_dict = dict(value)
    prefixes = _removed_prefixes(state_dict)
    if prefixes:
        state_dict = _cleaner()(state_dict)
    return Unwrapped(state_dict, key, prefixes)
