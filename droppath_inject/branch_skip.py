"""Which residual branches can run on the kept rows only, read off the captured run.

A branch is computed by module calls (a norm, an attention, an MLP) and by the Python of the
forward that calls them (views, a layer scale). Under ``skip_compute=True`` the branch's
*units*, its outermost module calls, get an instance ``forward`` (``branch_rows``) that runs them
on the kept samples only: the units that read values from outside the branch (the fork, an
attention mask, position embeddings) gather those values' rows, the values inside the branch
already hold the kept rows, and the DropPath at the branch's end puts them back in place. A
fully dropped branch calls none of its units.

That is sound when every per-sample value from outside the branch enters it through a unit's
arguments. One read inline, by the forward's own Python (``x + fc(x) * t`` with a per-sample
``t``), would meet the kept rows with all of them: the site masks, and ``SkipPlan`` says why.
So does a site whose DropPath acts on a module called inside one of its units (a hook on
``attn.proj`` where the unit is ``attn``): a fully dropped branch does not call the unit, so the
DropPath would never put its zeros in place.
What the captured graph cannot show (a size read off a tensor outside the branch and used
inside it) the forced-decision check at injection catches (``skip_verify``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx

from .attach import Attachment
from .batch_dims import batch_dim_of
from .capture import CapturedRun
from .graph_facts import unaliased
from .internals import batch_norms_in
from .plan import Plan, PlannedSite
from .report import SkipCompute, SkipPlan
from .residuals import ResidualSite


@dataclass(frozen=True)
class BranchUnits:
    """A branch that can run on the kept rows: its outermost module calls that run once per
    forward, in execution order (a module also called elsewhere runs on the rows it is given),
    and the module whose call encloses them and the add (where its decision is drawn)."""

    units: tuple[str, ...]
    scope: str
    batch_norms: bool  # a BatchNorm runs in some unit
    inline_reads: str = ""  # a per-sample value read inline: rows cannot be gathered (why)


def _attached_values(site: ResidualSite, attachment: Attachment) -> list[fx.Node]:
    """The branch values the site's DropPaths act on (one per term of a parallel sum)."""
    values = []
    for part in (attachment, *attachment.parts):
        for node in site.branch_region:
            outputs = node.meta.get("module_outputs", [])
            if any(o.call.path == part.module and o.leaf == part.leaf for o in outputs):
                values.append(node)
                break
    return values


def _ancestors(values: Sequence[fx.Node], region: set[fx.Node]) -> set[fx.Node]:
    """``values`` and what they are computed from, inside ``region``."""
    found = set(values)
    stack = list(values)
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent in region and parent not in found:
                found.add(parent)
                stack.append(parent)
    return found


def _describe(node: fx.Node) -> str:
    outputs = node.meta.get("module_outputs", [])
    if outputs:
        return f"the output of {outputs[-1].call.path or 'the model'}"
    if node.op == "placeholder":
        return f"the input {node.name}"
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return f"the result of {target}()"


class _Planner:
    """Plans every site of one captured run (see the module docstring)."""

    def __init__(self, run: CapturedRun, sites: Sequence[PlannedSite]) -> None:
        self.run = run
        self.inside = run.call_nodes
        self.data = run.data
        self.live = run.live
        self.adds = {p.site.add for p in sites}

    def _within(self, key: str, region: set[fx.Node]) -> bool:
        """The call computes data for the branch only: each of its live data values lies in
        ``region`` or is read inside the call alone (a mask it builds from its arguments).
        A cast to its own dtype is its argument itself (``x.to(x.dtype)`` in Llama's RMSNorm
        returns ``x``, which the recorder binds to the cast)."""
        inside = self.inside.get(key, set())
        nodes = [
            n for n in inside if n in self.data and n in self.live and unaliased(n) in (n, *inside)
        ]
        return bool(nodes) and all(n in region or all(u in inside for u in n.users) for n in nodes)

    def _unit_of(self, node: fx.Node, region: set[fx.Node]) -> str | None:
        """The key of the outermost module call holding ``node`` that lies in ``region``."""
        for key in node.meta.get("nn_module_stack", {}):
            if self._within(key, region):
                return str(key)
        return None

    def _leak(
        self, node: fx.Node, region: set[fx.Node], tail: set[fx.Node], unit: str | None
    ) -> bool:
        """A value of the branch read where the kept rows would meet all of them: after the
        DropPath (unless it is the DropPath's value), or by another stream's branch."""
        for user in node.users:
            if user in region or user not in self.live or "tensor_meta" not in user.meta:
                continue
            if unit is not None and user in self.inside.get(unit, set()):
                continue
            if user not in tail:
                return True
        return False

    def plan(self, planned: PlannedSite) -> BranchUnits | SkipPlan:
        site, attachment = planned.site, planned.attachment
        if not isinstance(attachment, Attachment):
            return SkipPlan(SkipCompute.MASKS, "no DropPath is attached")
        if attachment.batch_dim != 0 or batch_dim_of(site.fork) != 0:
            return SkipPlan(
                SkipCompute.MASKS,
                "the branch holds the samples in another dimension than 0, where rows are run",
            )
        values = _attached_values(site, attachment)
        if len(values) != len(attachment.modules):
            return SkipPlan(SkipCompute.MASKS, "the DropPath's value is not in the branch")
        region = _ancestors(values, set(site.branch_region))
        nested = [a for a in self.adds if a in region and a is not site.add]
        if nested:
            return SkipPlan(
                SkipCompute.MASKS, "the branch holds another residual, with decisions of its own"
            )
        units: dict[str, None] = {}
        entries: set[str] = set()  # units reading values from outside the branch
        inline_reads = ""  # why rows cannot be gathered (batch mode gathers none)
        full_rows: set[fx.Node] = set()  # inline ops before any unit: they see every row
        tail = set(site.branch_region) | {site.add}
        for node in site.branch_region:
            if node not in region:
                continue
            unit = self._unit_of(node, region)
            if unit is not None:
                units.setdefault(unit)
            if self._leak(node, region, tail if node in values else set(), unit):
                return SkipPlan(
                    SkipCompute.MASKS,
                    f"{_describe(node)} is read outside the rows the branch runs on (after its "
                    "DropPath, or by another stream)",
                )
            outside = [
                v
                for v in node.all_input_nodes
                if v in self.data and (v not in region or v in full_rows)
            ]
            if unit is not None:
                for value in outside:
                    if value in self.inside.get(unit, ()):
                        continue
                    entries.add(unit)
                    if batch_dim_of(value) not in (0, None):
                        return SkipPlan(
                            SkipCompute.MASKS,
                            f"{_describe(value)} enters the branch with its samples in dimension "
                            f"{batch_dim_of(value)}, where rows are gathered in dimension 0",
                        )
            elif not any(v in region and v not in full_rows for v in node.all_input_nodes):
                full_rows.add(node)  # computed before any unit, from outside values: all rows
            elif outside and not inline_reads:
                inline_reads = (
                    f"{_describe(outside[0])} enters the branch inline, in "
                    f"{site.owner or 'the model'}'s forward, where no module call can "
                    "gather its rows"
                )
        if not units:
            return SkipPlan(SkipCompute.MASKS, "no module call computes the branch")
        paths = []
        for key in units:
            path = key.rpartition("@")[0]
            if self.run.call_counts[path] == 1:
                paths.append(path)
            elif key in entries:
                return SkipPlan(
                    SkipCompute.MASKS,
                    f"{path} gathers the branch's rows but runs "
                    f"{self.run.call_counts[path]} times per forward",
                )
            # else: called elsewhere too (torchvision's one ReLU per Bottleneck), it runs on
            # whatever rows it is given, and is no unit
        if not paths:
            return SkipPlan(SkipCompute.MASKS, "no module call of the branch runs once")
        for module in attachment.modules:
            outer = next((p for p in paths if module.startswith(p + ".")), None)
            if outer is not None:
                return SkipPlan(
                    SkipCompute.MASKS,
                    f"its DropPath acts on {module}, called inside {outer}, which a fully "
                    "dropped branch does not run",
                )
        scope = self._scope(site, region)
        if scope is None:
            return SkipPlan(
                SkipCompute.MASKS, "no module call encloses the branch and its add once"
            )
        batch_norms = bool(batch_norms_in(self.run.modules[path] for path in paths))
        return BranchUnits(tuple(paths), scope, batch_norms, inline_reads)

    def _scope(self, site: ResidualSite, region: set[fx.Node]) -> str | None:
        """The innermost module call holding the add and the whole branch, called once."""
        common = list(site.add.meta.get("nn_module_stack", {}).items())
        for node in region:
            stack = node.meta.get("nn_module_stack", {})
            common = [(key, entry) for key, entry in common if key in stack]
        for _, (path, _) in reversed(common):
            if self.run.call_counts[path] == 1:
                return str(path)
        return None


def plan_branch_units(plan: Plan) -> list[BranchUnits | SkipPlan]:
    """For each planned site, in order: its units, or why it masks."""
    planner = _Planner(plan.run, plan.sites)
    return [planner.plan(planned) for planned in plan.sites]
