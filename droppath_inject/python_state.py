"""The plain Python attributes of a model's modules, kept across the runs injection makes.

Capture, verification and shape propagation run the user's ``forward``, whose code may count
its calls (``self.calls += 1``), cache a tensor (``self.last = h``) or append to a list. Each
of those runs restores every module's attributes as they were before it, whether it ended,
failed or was interrupted: attributes it set are put back, ones it added are removed, and the
contents of lists, dicts and sets kept in an attribute are put back into the same objects (a
shallow copy; objects inside them, tensors included, are kept by reference, so in-place changes
to those are not undone).

Left to their own mechanisms: parameters, buffers and submodules (eval mode and ``no_grad``
keep them), the bookkeeping torch keeps in every module (hooks, ``training``) and lazy modules
(``nn.Lazy*``), which a first run materialises on purpose. Only what injection itself does
between runs (hooks, re-rated drop paths) remains.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

#: Attributes torch itself keeps in every module's ``__dict__``: not the user's state.
_TORCH_OWN = frozenset(vars(nn.Module()))
#: Containers whose contents are saved, so that changes made in place are undone too.
_CONTAINERS = (list, dict, set)


@dataclass(frozen=True)
class _ModuleState:
    """One module's attributes, and a copy of the contents of the containers among them."""

    module: nn.Module
    attributes: dict[str, Any]
    contents: dict[str, Any]

    @classmethod
    def of(cls, module: nn.Module) -> _ModuleState:
        attributes = {k: v for k, v in vars(module).items() if k not in _TORCH_OWN}
        contents = {k: v.copy() for k, v in attributes.items() if type(v) in _CONTAINERS}
        return cls(module, attributes, contents)

    def restore(self) -> None:
        current = vars(self.module)
        for name in [k for k in current if k not in _TORCH_OWN and k not in self.attributes]:
            del current[name]
        for name, value in self.attributes.items():
            current[name] = value
            if name in self.contents:
                saved = self.contents[name]
                if isinstance(value, list):
                    value[:] = saved
                else:
                    value.clear()
                    value.update(saved)


@contextmanager
def python_state_kept(model: nn.Module) -> Iterator[None]:
    """Run the block, then put back the plain Python attributes of ``model``'s modules."""
    states = [_ModuleState.of(m) for m in model.modules() if not isinstance(m, LazyModuleMixin)]
    try:
        yield
    finally:
        for state in states:
            state.restore()


@contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[None]:
    """Temporarily set every submodule's ``training`` flag, restoring each one's own flag after."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.train(mode)
        yield
    finally:
        for m, flag in saved:
            m.training = flag
