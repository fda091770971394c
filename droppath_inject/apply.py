"""Applying attachments to a model: hooks, slots and re-rated drop paths, all undoable.

Nothing here replaces a user's module or its ``forward``. Each DropPath this package adds, and
each existing drop path it re-rates, carries a ``droppath_place`` (a ``Placement``) so that
``set_drop_rates`` and ``remove_droppath`` find them again, after pickling or deepcopy too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .attach import AttachKind, Attachment
from .block_gate import BlockDropPath, LayerGate, ResidualGate
from .droppaths import drop_path_rate_of, set_drop_path_rate
from .internals import remove_forward_hooks, tree_flatten, tree_unflatten
from .layers import DropPath, Mode
from .plan import Plan, site_report
from .report import Site, SiteStatus

PLACE_ATTRIBUTE = "droppath_place"


@dataclass(frozen=True)
class Placement:
    """A drop path's place in the depth schedule, and how it came to be there.

    ``original_rate`` is the rate an existing drop path had before its first re-rating;
    ``slot`` the ``nn.Identity`` a DropPath replaced, put back by ``remove_droppath``.
    """

    block_index: int
    num_blocks: int
    kind: AttachKind
    original_rate: float | None = None
    slot: nn.Module | None = None


class BranchHook:
    """A forward hook applying a DropPath to a module's output (or to leaf ``leaf`` of it).

    A module-level class holding the DropPath, so the hook survives ``torch.save``/``torch.load``
    and ``copy.deepcopy`` (which keeps it pointing at the copied model's DropPath).
    """

    def __init__(self, drop_path: DropPath, leaf: int | None) -> None:
        self.drop_path = drop_path
        self.leaf = leaf

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.leaf is None:
            return self.drop_path(output)
        leaves, spec = tree_flatten(output)
        value = leaves[self.leaf]
        dropped = self.drop_path(value)
        if dropped is value:
            return None  # unchanged (eval mode, rate 0): keep the module's own output object
        leaves[self.leaf] = dropped
        return tree_unflatten(leaves, spec)


def _set_placement(module: nn.Module, placement: Placement | None) -> None:
    """Set (or, given None, delete) ``module.droppath_place``, a plain attribute."""
    if placement is None:
        delattr(module, PLACE_ATTRIBUTE)
    else:
        setattr(module, PLACE_ATTRIBUTE, placement)


def placement_of(module: nn.Module) -> Placement | None:
    place = getattr(module, PLACE_ATTRIBUTE, None)
    return place if isinstance(place, Placement) else None


def _free_name(module: nn.Module, base: str) -> str:
    name, suffix = base, 1
    while hasattr(module, name):
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


@dataclass(frozen=True)
class Outcome:
    """What attaching one site did."""

    status: SiteStatus
    rate: float
    previous_rate: float | None = None


@dataclass
class Attacher:
    """Applies attachments to ``model``, remembering how to undo each change."""

    model: nn.Module
    mode: Mode
    rerate_existing: bool = True
    make_drop: Callable[[Attacher, Attachment, float, tuple[int, int]], DropPath] | None = None
    #: which existing drop paths of other libraries to replace by a new DropPath when re-rating
    #: (``skip_compute``: theirs cannot follow a decision drawn before the branch runs)
    replaces_existing: Callable[[Attachment], bool] | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _done: dict[tuple[str, int | None], Outcome] = field(default_factory=dict)

    def attach(self, attachment: Attachment, rate: float, place: tuple[int, int]) -> Outcome:
        """Give the site ``attachment`` describes the rate ``rate`` at ``place`` (index, count).

        A module already attached in this call (one shared by the sites of several blocks, as
        in a weight-shared layer run in a loop) keeps the first site's rate; the leaves of one
        call's output (the two streams of a joint attention) are attached one by one.
        """
        key = (attachment.module, attachment.leaf)
        if key in self._done:
            return self._done[key]
        parts = (attachment, *attachment.parts)
        if attachment.kind is AttachKind.EXISTING and self._replacing(attachment):
            outcome = self._replace_existing(attachment, rate, place)
        elif attachment.kind is AttachKind.EXISTING:
            outcome = self._existing(attachment, rate, place)
            for part in attachment.parts:  # this package's DropPaths of a parallel sum
                self._existing(part, rate, place)
        else:
            drop = self._new_drop(attachment, rate, place)
            drops = [drop] if not attachment.parts else self._shared(attachment, drop, rate)
            for part, each in zip(parts, drops, strict=True):
                each.batch_dim = part.batch_dim
                self._place(part, each, place)
            outcome = Outcome(SiteStatus.INJECTED, rate)
        for part in parts:
            self._done[(part.module, part.leaf)] = outcome
        return outcome

    def _new_drop(self, attachment: Attachment, rate: float, place: tuple[int, int]) -> DropPath:
        if self.make_drop is None:
            return DropPath(rate, self.mode)
        return self.make_drop(self, attachment, rate, place)

    def _shared(self, attachment: Attachment, drop: DropPath, rate: float) -> list[DropPath]:
        """DropPaths for every term of a parallel sum, following one decision: the block's
        (``drop``'s gate) under block granularity, else a ``ResidualGate`` on the add's owner."""
        if isinstance(drop, BlockDropPath):
            gate: LayerGate = drop.gate
        else:
            gate = ResidualGate(self.mode, batch_dim=attachment.batch_dim)
            owner = self.model.get_submodule(attachment.holder)
            handle = owner.register_forward_pre_hook(gate, with_kwargs=True)
            self._undo.append(handle.remove)
            drop = BlockDropPath(gate, rate, self.mode)
        parts = [BlockDropPath(gate, rate, self.mode) for _ in attachment.parts]
        for part in parts:  # every term's value runs on the kept rows where the branch does
            part.branch_rows = getattr(drop, "branch_rows", None)
        return [drop, *parts]

    def _place(self, attachment: Attachment, drop: DropPath, place: tuple[int, int]) -> None:
        """Put ``drop`` in a slot or on a hook, as ``attachment`` says."""
        slot = None
        if attachment.kind is AttachKind.SLOT:
            slot = self.model.get_submodule(attachment.module)
        _set_placement(drop, Placement(*place, attachment.kind, slot=slot))
        if slot is not None:
            self._replace(attachment.module, drop)
        else:
            self._hook(attachment, drop)

    def _replace(self, path: str, drop: DropPath) -> None:
        parent_path, _, name = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        slot = parent.get_submodule(name)
        drop.training = slot.training
        setattr(parent, name, drop)
        self._undo.append(lambda: setattr(parent, name, slot))

    def _hook(self, attachment: Attachment, drop: DropPath) -> None:
        holder = self.model.get_submodule(attachment.holder)
        module = self.model.get_submodule(attachment.module)
        name = _free_name(holder, "drop_path_injected")
        drop.training = module.training
        holder.add_module(name, drop)
        handle = module.register_forward_hook(BranchHook(drop, attachment.leaf))

        def undo() -> None:
            handle.remove()
            delattr(holder, name)

        self._undo.append(undo)

    def _replacing(self, attachment: Attachment) -> bool:
        module = self.model.get_submodule(attachment.module)
        return (
            self.rerate_existing
            and self.replaces_existing is not None
            and not attachment.parts
            and not isinstance(module, DropPath)
            and drop_path_rate_of(module) is not None
            and self.replaces_existing(attachment)
        )

    def _replace_existing(
        self, attachment: Attachment, rate: float, place: tuple[int, int]
    ) -> Outcome:
        """Re-rate another library's drop path by putting a DropPath of this package in its
        place (``remove_droppath`` puts it back, its own rate untouched)."""
        module = self.model.get_submodule(attachment.module)
        previous = drop_path_rate_of(module)
        drop = self._new_drop(attachment, rate, place)
        drop.batch_dim = attachment.batch_dim
        _set_placement(drop, Placement(*place, AttachKind.EXISTING, previous, slot=module))
        self._replace(attachment.module, drop)
        return Outcome(SiteStatus.RE_RATED, rate, previous)

    def _existing(self, attachment: Attachment, rate: float, place: tuple[int, int]) -> Outcome:
        """Re-rate a drop path on the branch: ours always, another library's unless kept."""
        module = self.model.get_submodule(attachment.module)
        previous = drop_path_rate_of(module)
        earlier = placement_of(module)
        ours = (
            isinstance(module, DropPath)
            and earlier is not None
            and (earlier.original_rate is None or earlier.slot is not None)
        )
        if previous is None or not (ours or self.rerate_existing):
            return Outcome(SiteStatus.KEPT, float("nan") if previous is None else previous)
        if ours:
            assert earlier is not None and isinstance(module, DropPath)
            placement = Placement(*place, earlier.kind, earlier.original_rate, earlier.slot)
            mode_before, module.mode = module.mode, self.mode
            batch_dim_before, module.batch_dim = module.batch_dim, attachment.batch_dim
        else:
            original = previous if earlier is None else earlier.original_rate
            placement = Placement(*place, AttachKind.EXISTING, original)
            mode_before, batch_dim_before = None, 0
        set_drop_path_rate(module, rate)
        _set_placement(module, placement)

        def undo() -> None:
            set_drop_path_rate(module, previous)
            _set_placement(module, earlier)
            if mode_before is not None and isinstance(module, DropPath):
                module.mode, module.batch_dim = mode_before, batch_dim_before

        self._undo.append(undo)
        return Outcome(SiteStatus.RE_RATED, rate, previous)

    def on_undo(self, step: Callable[[], None]) -> None:
        """Have ``undo`` run ``step`` too (in reverse order with the attacher's own changes)."""
        self._undo.append(step)

    def undo(self) -> None:
        """Undo every change, last first."""
        for step in reversed(self._undo):
            step()
        self._undo.clear()
        self._done.clear()


def scheduled_drop_paths(model: nn.Module) -> list[tuple[str, nn.Module, Placement]]:
    """Every drop path with a ``Placement`` (attached or re-rated by this package), by path."""
    found = []
    for path, module in model.named_modules():
        place = placement_of(module)
        if place is not None:
            found.append((path, module, place))
    return found


def detach(model: nn.Module) -> int:
    """Remove every DropPath this package attached and restore re-rated rates; returns a count."""
    count = 0
    for module in model.modules():
        remove_forward_hooks(module, lambda hook: isinstance(hook, BranchHook))
    for path, module, place in scheduled_drop_paths(model):
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if place.kind is AttachKind.FORWARD_HOOK:
            delattr(parent, name)
        elif place.kind is AttachKind.SLOT or place.slot is not None:
            # a slot's Identity, or the drop path of another library this one replaced
            slot = place.slot if place.slot is not None else nn.Identity()
            slot.training = module.training
            setattr(parent, name, slot)
        else:
            if place.original_rate is not None:
                set_drop_path_rate(module, place.original_rate)
            _set_placement(module, None)
        count += 1
    return count


def attach_all(plan: Plan, rates: list[float], attacher: Attacher) -> list[Site]:
    """Attach every planned site at its block's rate; the report line of each."""
    sites = []
    for planned in plan.sites:
        rate = rates[planned.block_index]
        if isinstance(planned.attachment, Attachment):
            place = (planned.block_index, plan.num_blocks)
            outcome = attacher.attach(planned.attachment, rate, place)
            sites.append(site_report(planned, outcome.rate, outcome.status, outcome.previous_rate))
        else:
            sites.append(site_report(planned, rate, SiteStatus.SKIPPED))
    return sites
