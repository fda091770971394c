"""Replacing residual blocks by traced copies with DropPath on their branches, and undoing it.

A replacement is a GraphModule that holds the very same submodules, parameters and buffers as
the block it stands for (so ``state_dict()`` keys and storage are shared), plus one DropPath
child per residual branch. Everything is recorded so that a failed injection can be undone.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from .layers import DropPath, Mode
from .residuals import ResidualSite

_STATE_ATTRIBUTES = ("_modules", "_parameters", "_buffers")


def _share_state(replacement: fx.GraphModule, original: nn.Module) -> None:
    """Give ``replacement`` exactly ``original``'s children, parameters, buffers and attributes."""
    for name in _STATE_ATTRIBUTES:
        setattr(replacement, name, OrderedDict(getattr(original, name)))
    replacement._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
    own = vars(replacement)
    for key, value in vars(original).items():
        if key not in own or "hook" in key:  # user attributes, and hooks registered on the block
            own[key] = value
    replacement.training = original.training


def _free_name(module: nn.Module, base: str) -> str:
    name, suffix = base, 1
    while hasattr(module, name):
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def build_injected_block(
    original: nn.Module,
    graph: fx.Graph,
    sites: Sequence[ResidualSite],
    rate: float,
    mode: Mode,
) -> fx.GraphModule:
    """A traced copy of ``original`` with a DropPath on the branch edge of each site.

    ``graph`` is ``original``'s own trace and ``sites`` are residual adds found in it; the
    graph is copied, so it can serve again (to undo or retry).
    """
    copy = fx.Graph()
    new_node: dict[fx.Node, fx.Node] = {}
    copy.output(copy.graph_copy(graph, new_node))
    replacement = fx.GraphModule(original, copy, type(original).__name__)
    _share_state(replacement, original)
    for site in sites:
        name = _free_name(replacement, "drop_path_injected")
        drop = DropPath(rate, mode)
        drop.train(original.training)
        replacement.add_module(name, drop)
        branch, add = new_node[site.branch], new_node[site.add]
        with copy.inserting_after(branch):
            dropped = copy.call_module(name, (branch,))
        add.replace_input_with(branch, dropped)
    replacement.graph.lint()
    replacement.recompile()
    return replacement


@dataclass
class Surgery:
    """Module swaps and rate changes applied to a model, in order, so they can be undone."""

    model: nn.Module
    _swaps: list[tuple[str, nn.Module]] = field(default_factory=list)
    _rates: list[tuple[DropPath, float, str]] = field(default_factory=list)

    def replace(self, path: str, replacement: nn.Module) -> None:
        """Put ``replacement`` at ``path`` (a dotted submodule path, never the model itself)."""
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        self._swaps.append((path, parent.get_submodule(name)))
        setattr(parent, name, replacement)

    def set_rate(self, drop: DropPath, rate: float, mode: Mode) -> None:
        """Update an already injected DropPath in place."""
        self._rates.append((drop, drop.drop_prob, drop.mode))
        drop.drop_prob, drop.mode = rate, mode

    def undo(self) -> None:
        """Restore every replaced module and rate, last change first."""
        for path, original in reversed(self._swaps):
            parent_path, _, name = path.rpartition(".")
            setattr(self.model.get_submodule(parent_path), name, original)
        for drop, rate, mode in reversed(self._rates):
            drop.drop_prob, drop.mode = rate, mode
        self._swaps.clear()
        self._rates.clear()
