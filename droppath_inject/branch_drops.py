"""``skip_compute=True``: DropPaths whose branches run on the kept rows only.

The same plan, the same sites, blocks, rates and ``existing`` handling as without
``skip_compute``: skipping is a way of attaching. A ``BranchDrops`` is the ``Attacher``'s
DropPath factory. For a site whose branch ``branch_skip`` can run on the kept rows, it makes a
``BlockDropPath`` following a gate drawn before the branch runs (a ``ResidualGate`` on the
module enclosing the branch and its add, or, under block granularity, the block's
``LayerGate``), and puts a ``BranchUnit`` in front of each unit of the branch. Under block
granularity a layer that ``LayerSkip`` skips whole needs none of this. Every other site keeps
the mask, and its ``SkipPlan`` says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Protocol

from torch import nn

from .apply import Attacher
from .attach import AttachKind, Attachment
from .block_gate import BlockDropPath, LayerGate, ResidualGate
from .branch_rows import BranchRows, install, uninstall
from .branch_skip import BranchUnits, plan_branch_units
from .granularity import BlockHandling
from .inputs import ExampleInputs
from .layer_drop import BlockDrops
from .layers import DropPath, Mode
from .plan import Plan
from .provenance import shared_arguments
from .report import Site, SiteStatus, SkipCompute, SkipPlan


class Switchable(Protocol):
    """What skips and can be told to run masked instead (``enabled`` off)."""

    enabled: bool

    def reset_counts(self) -> None:
        """Forget the calls counted so far (the check's own)."""


@dataclass(frozen=True)
class Skipper:
    """One branch or layer that skips: its name for people, its switch, and how to make it
    mask for good (given the reason)."""

    name: str
    switch: Switchable
    demote: Callable[[str], None]
    #: where a fully dropped branch's code fails on an empty batch: run it on one row instead
    one_row: Callable[[str], None] | None = None


@dataclass
class _Skipping:
    """One site's plan, and what was installed for it."""

    plan: BranchUnits | SkipPlan
    rows: BranchRows | None = None
    block_index: int | None = None  # the layer skipped whole that holds the site
    note: str = ""  # how the branch runs besides its plan (one row when fully dropped)


def _kept_rows_plan(units: BranchUnits, mode: Mode, gather_batch_norm: bool) -> SkipPlan:
    if not units.batch_norms or mode == "batch":
        return SkipPlan(SkipCompute.KEPT_ROWS)
    if gather_batch_norm:
        return SkipPlan(SkipCompute.KEPT_ROWS_BATCH_NORM_GATHERED)
    return SkipPlan(SkipCompute.KEPT_ROWS_UNLESS_BATCH_NORM_TRAINS)


class BranchDrops:
    """The ``Attacher``'s DropPath factory under ``skip_compute=True`` (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        inputs: ExampleInputs,
        mode: Mode,
        gather_batch_norm: bool,
        blocks: BlockDrops | None,
    ) -> None:
        self.model = model
        self.mode: Mode = mode
        self.gather_batch_norm = gather_batch_norm
        self.blocks = blocks
        self.sites: dict[str, _Skipping] = {}
        for planned, units in zip(plan.sites, plan_branch_units(plan), strict=True):
            if isinstance(units, BranchUnits) and units.inline_reads and mode != "batch":
                units = SkipPlan(SkipCompute.MASKS, units.inline_reads)  # batch gathers nothing
            if isinstance(planned.attachment, Attachment):
                self.sites[planned.attachment.module] = _Skipping(units)
        paths = {
            path
            for s in self.sites.values()
            if isinstance(s.plan, BranchUnits)
            for path in s.plan.units
        }
        modules = {path: model.get_submodule(path) for path in paths}
        self.shared = shared_arguments(model, inputs, modules) if modules else {}

    def __call__(
        self, attacher: Attacher, attachment: Attachment, rate: float, place: tuple[int, int]
    ) -> DropPath:
        skipping = self.sites[attachment.module]
        drop = (
            DropPath(rate, self.mode)
            if self.blocks is None
            else self.blocks(attacher, attachment, rate, place)
        )
        if not isinstance(skipping.plan, BranchUnits):
            return drop
        units = skipping.plan
        gate: LayerGate
        if self.blocks is not None and isinstance(drop, BlockDropPath):
            block = self.blocks.block_at(place[0])
            if block.handling is BlockHandling.SKIPPED:
                skipping.plan = SkipPlan(SkipCompute.SKIPS_LAYER)
                skipping.block_index = place[0]
                return drop
            if not _encloses(block.module or "", units.scope):
                skipping.plan = SkipPlan(
                    SkipCompute.MASKS,
                    f"the branch starts before its layer {block.module} is called, where the "
                    "layer's decision is drawn",
                )
                return drop
            gate = drop.gate
            if block.reason.startswith("masked: "):
                block.reason = (
                    f"its branches skip on their own (the layer as a whole cannot: "
                    f"{block.reason.removeprefix('masked: ')})"
                )
        else:
            gate = ResidualGate(self.mode, skip_compute=True, lazy=True)
            scope = self.model.get_submodule(units.scope)
            handle = scope.register_forward_pre_hook(gate, with_kwargs=True)
            attacher.on_undo(handle.remove)
            drop = BlockDropPath(gate, rate, self.mode)
        modules = [self.model.get_submodule(path) for path in units.units]
        rows = BranchRows(gate, modules, self.mode, self.gather_batch_norm)
        drop.branch_rows = rows
        skipping.rows = rows
        for path, module in zip(units.units, modules, strict=True):
            install(module, rows, self.shared.get(path, frozenset()))
        attacher.on_undo(lambda: _uninstall_all(modules))
        return drop

    def replaces_existing(self, attachment: Attachment) -> bool:
        """Whether another library's drop path on this site gives way to a DropPath that
        follows a decision drawn before the branch runs (its branch can skip)."""
        skipping = self.sites.get(attachment.module)
        return skipping is not None and isinstance(skipping.plan, BranchUnits)

    def demote(self, module: str, reason: str) -> None:
        """Make a site mask after all (its units taken out): the check at injection failed."""
        skipping = self.sites[module]
        rows = skipping.rows
        if rows is None:
            return
        for unit in rows.units:
            uninstall(unit)
        for drop in rows.gate.members:
            if isinstance(drop, BlockDropPath) and drop.branch_rows is rows:
                drop.branch_rows = None
        skipping.rows = None
        skipping.plan = SkipPlan(SkipCompute.MASKS, reason)

    def skippers(self) -> list[Skipper]:
        """What skips, for the check at injection: each branch running on its kept rows (by
        the module its DropPath is attached to), and each layer skipped whole."""
        found = [
            Skipper(module, s.rows, partial(self.demote, module), partial(self._one_row, module))
            for module, s in self.sites.items()
            if s.rows is not None
        ]
        if self.blocks is not None:
            found += [
                Skipper(
                    self.blocks.block_at(index).module or "",
                    layer,
                    partial(self._demote_layer, index),
                )
                for index, layer in self.blocks.skips.items()
            ]
        return found

    def _one_row(self, module: str, reason: str) -> None:
        skipping = self.sites[module]
        assert skipping.rows is not None
        skipping.rows.one_row_when_dropped = True
        skipping.note = reason

    def _demote_layer(self, index: int, reason: str) -> None:
        assert self.blocks is not None
        self.blocks.demote(index, reason)
        for skipping in self.sites.values():
            if skipping.block_index == index:
                skipping.plan = SkipPlan(SkipCompute.MASKS, reason)

    def plan_of(self, site: Site, attachment: Attachment | None) -> SkipPlan:
        """What the site's dropped branch costs, for its report line."""
        if attachment is None or site.status is SiteStatus.SKIPPED:
            return SkipPlan(SkipCompute.MASKS, "no DropPath is attached")
        if attachment.kind is AttachKind.EXISTING and site.status is not SiteStatus.INJECTED:
            existing = self.model.get_submodule(attachment.module)
            if not (isinstance(existing, BlockDropPath) and existing.branch_rows is not None):
                return SkipPlan(
                    SkipCompute.MASKS,
                    "a drop path already there draws its own decisions (existing='keep')",
                )
        skipping = self.sites[attachment.module]
        if isinstance(skipping.plan, BranchUnits):
            kept = _kept_rows_plan(skipping.plan, self.mode, self.gather_batch_norm)
            return replace(kept, reason=skipping.note) if skipping.note else kept
        return skipping.plan

    def annotate(self, sites: list[Site], attachments: list[Attachment | None]) -> list[Site]:
        """The report lines with each site's ``SkipPlan``."""
        return [
            replace(site, skip_compute=self.plan_of(site, attachment))
            for site, attachment in zip(sites, attachments, strict=True)
        ]


def _uninstall_all(modules: list[nn.Module]) -> None:
    for module in modules:
        uninstall(module)


def _encloses(outer: str, inner: str) -> bool:
    return not outer or inner == outer or inner.startswith(outer + ".")
