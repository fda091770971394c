"""Replacing residual blocks by traced copies with DropPath on their branches, and undoing it.

A replacement is an ``InjectedBlock``: a GraphModule that holds the very same submodules,
parameters and buffers as the block it stands for (so ``state_dict()`` keys and storage are
shared), plus one DropPath child per residual branch. Every change is recorded so that a failed
injection can be undone, and the original block is remembered for ``remove_droppath``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import fx, nn

from .internals import module_state, move_children_and_tensors
from .layers import DropPath, Mode
from .residuals import ResidualSite
from .skipping import BranchCut, NoCut, install_skipping_drop_path


@dataclass(frozen=True)
class Rewrite:
    """How sites are rewritten: DropPath mode, and whether dropped branches skip their work."""

    mode: Mode
    skip_compute: bool = False
    gather_batch_norm: bool = False


@dataclass(frozen=True)
class BlockInfo:
    """What an injected block remembers: the block it replaced and its place in the schedule."""

    original: nn.Module
    block_index: int
    num_blocks: int
    drop_path_names: tuple[str, ...]


class InjectedBlock(fx.GraphModule):
    """A residual block's traced copy with DropPath on its branches (see ``build_injected_block``).

    It holds the very same children, parameters and buffers as the block it replaced, so
    ``state_dict()`` keys and storage are shared, and ``droppath_info`` remembers that block.
    Pickling and deepcopy keep this structure whole, where a plain GraphModule would keep only
    the attributes its code touches, in generic containers.
    """

    droppath_info: BlockInfo

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild, args = super().__reduce__()
        return (_unpickle_block, (rebuild, args, _structure(vars(self))))

    def __deepcopy__(self, memo: dict[int, Any]) -> InjectedBlock:
        copied = super().__deepcopy__(memo)
        assert isinstance(copied, InjectedBlock)  # GraphModule copies keep their class
        _adopt(copied, copy.deepcopy(vars(self), memo))
        return copied

    @property
    def drop_paths(self) -> list[DropPath]:
        """The DropPath modules this block was given, one per residual site."""
        return [getattr(self, name) for name in self.droppath_info.drop_path_names]


def _structure(attributes: dict[str, Any]) -> dict[str, Any]:
    """The attributes that GraphModule's own pickling and copying would drop or rebuild."""
    info = {k: v for k, v in attributes.items() if k == "droppath_info"}
    return {**module_state(attributes), **info}


def _adopt(target: nn.Module, source: dict[str, Any]) -> None:
    """Give ``target`` the children, parameters, buffers, hooks and attributes in ``source``."""
    own = vars(target)
    for key, value in _structure(source).items():
        own[key] = copy.copy(value)  # a container of its own, holding the same objects
    for key, value in source.items():
        own.setdefault(key, value)
    target.training = source["training"]


def _unpickle_block(
    rebuild: Callable[..., fx.GraphModule], args: tuple[Any, ...], structure: dict[str, Any]
) -> InjectedBlock:
    plain = rebuild(*args)
    vars(plain).update(structure)
    class_name = type(structure["droppath_info"].original).__name__
    block = InjectedBlock(plain, plain.graph, class_name)
    _adopt(block, vars(plain))
    return block


def _free_name(module: nn.Module, base: str, taken: set[str]) -> str:
    name, suffix = base, 1
    while hasattr(module, name) or name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def _mapped(site: ResidualSite, new_node: dict[fx.Node, fx.Node]) -> ResidualSite:
    """``site`` with its nodes replaced by their copies."""
    return dataclasses.replace(
        site,
        add=new_node[site.add],
        branch=new_node[site.branch],
        skip=new_node[site.skip],
        fork=new_node[site.fork],
        branch_region=tuple(new_node[n] for n in site.branch_region),
    )


def build_injected_block(
    original: nn.Module,
    graph: fx.Graph,
    sites: Mapping[ResidualSite, BranchCut | NoCut | None],
    rate: float,
    position: tuple[int, int],
    rewrite: Rewrite,
) -> InjectedBlock:
    """A traced copy of ``original`` with a DropPath on the branch edge of each site.

    ``graph`` is ``original``'s own trace and ``sites`` are residual adds found in it, each
    with its planned cut (``BranchCut``: a ``SkippingDropPath`` computes the branch; else a
    plain DropPath). The graph is copied, so it can serve again. ``position`` is (block index,
    number of blocks).
    """
    graph_copy = fx.Graph()
    new_node: dict[fx.Node, fx.Node] = {}
    graph_copy.output(graph_copy.graph_copy(graph, new_node))
    block = InjectedBlock(original, graph_copy, type(original).__name__)
    _adopt(block, vars(original))
    mapped = {site: _mapped(site, new_node) for site in sites}
    plans = {
        mapped[site]: cut.mapped(new_node, mapped[site])
        for site, cut in sites.items()
        if isinstance(cut, BranchCut)
    }
    names: dict[ResidualSite, str] = {}
    for site in mapped.values():
        names[site] = _free_name(block, "drop_path_injected", set(names.values()))
    for site in mapped.values():
        if site not in plans:
            drop = DropPath(rate, rewrite.mode)
            drop.training = original.training
            block.add_module(names[site], drop)
            with graph_copy.inserting_after(site.branch):
                dropped = graph_copy.call_module(names[site], (site.branch,))
            site.add.replace_input_with(site.branch, dropped)
    for site in reversed(mapped.values()):  # later cuts first: an earlier add may feed a later one
        if site in plans:
            gather = rewrite.gather_batch_norm
            install_skipping_drop_path(block, plans[site], names[site], rate, rewrite.mode, gather)
    block.droppath_info = BlockInfo(original, *position, tuple(names.values()))
    block.graph.lint()
    block.recompile()
    return block


def restore_original(block: InjectedBlock) -> nn.Module:
    """The block ``block`` replaced, given ``block``'s current children, parameters and buffers.

    Children replaced since injection (nested blocks, user changes) and moved buffers are kept;
    only the DropPath modules injected here are left out.
    """
    info = block.droppath_info
    original = info.original
    move_children_and_tensors(block, original, leave_out=set(info.drop_path_names))
    original.training = block.training
    return original


@dataclass
class Surgery:
    """Module swaps and rate changes applied to a model, in order, so they can be undone."""

    model: nn.Module
    _swaps: list[tuple[str, nn.Module]] = field(default_factory=list)
    _updates: list[tuple[InjectedBlock, BlockInfo, list[tuple[float, Mode]]]] = field(
        default_factory=list
    )

    def replace(self, path: str, replacement: nn.Module) -> None:
        """Put ``replacement`` at ``path`` (a dotted submodule path, never the model itself)."""
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        self._swaps.append((path, parent.get_submodule(name)))
        setattr(parent, name, replacement)

    def update(
        self, block: InjectedBlock, rate: float, mode: Mode, position: tuple[int, int]
    ) -> None:
        """Give an already injected block a new rate, mode and place in the schedule."""
        before = [(drop.drop_prob, drop.mode) for drop in block.drop_paths]
        self._updates.append((block, block.droppath_info, before))
        for drop in block.drop_paths:
            drop.drop_prob, drop.mode = rate, mode
        index, count = position
        block.droppath_info = replace(block.droppath_info, block_index=index, num_blocks=count)

    def undo(self) -> None:
        """Restore every replaced module and updated block, last change first."""
        for path, original in reversed(self._swaps):
            parent_path, _, name = path.rpartition(".")
            setattr(self.model.get_submodule(parent_path), name, original)
        for block, info, before in reversed(self._updates):
            for drop, (rate, mode) in zip(block.drop_paths, before, strict=True):
                drop.drop_prob, drop.mode = rate, mode
            block.droppath_info = info
        self._swaps.clear()
        self._updates.clear()
