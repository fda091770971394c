"""The symbolic pipeline: trace -> find sites -> schedule -> rewrite blocks -> verify.

Used where the branch must be cut out of its block (``skip_compute=True``) and for a dry run
with no example input. Blocks are found on a trace of the whole model (or of its largest
traceable pieces), then each block is traced on its own, with nested blocks kept as calls, and
replaced by that trace plus DropPath nodes. Nothing is changed until the plan is complete, and
every change is undone if applying or verifying it fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, fx, nn

from .attach import AttachKind
from .droppaths import drop_path_rate_of
from .errors import ExampleInputError, VerificationError
from .inputs import (
    ExampleInputs,
    positional_arguments,
    propagate_shapes,
    resolve_inputs,
    run_eval,
)
from .layers import DropPath
from .provenance import Provenance
from .report import Report, Site, SiteStatus, Skipped
from .residuals import ResidualSite, find_residual_sites
from .schedule import Schedule, drop_rates
from .skipping import BranchCut, NoCut, describe_plan, plan_cuts
from .surgery import InjectedBlock, Rewrite, Surgery, build_injected_block
from .tracing import (
    mode_dependent_submodules,
    trace_in_both_modes,
    trace_pieces,
)
from .verify import Change, diagnose, verify_eval

_ROOT_OWNED = (
    "holds a residual add in its own forward; the model object itself is never replaced "
    "(so its class and methods survive): move the residual into a submodule to get DropPath"
)


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


@dataclass
class _Block:
    """A residual block: its path in the model, its own trace, and the sites found in it."""

    path: str
    module: nn.Module
    graph_module: fx.GraphModule
    sites: list[ResidualSite]
    shared: frozenset[str] = frozenset()  # placeholders fed the model's state, not data
    cuts: dict[ResidualSite, BranchCut | NoCut] = field(default_factory=dict)  # skip_compute

    @property
    def new_sites(self) -> list[ResidualSite]:
        """The sites without a drop path yet: each gets a DropPath (or a cut) of its own."""
        return [site for site in self.sites if site.existing_drop_path is None]

    def drop_path_at(self, site: ResidualSite) -> nn.Module | None:
        if site.existing_drop_path is None:
            return None
        return self.graph_module.get_submodule(site.existing_drop_path)


@dataclass
class _Plan:
    blocks: list[_Block]
    skipped: list[Skipped]
    reference: Any = None  # eval outputs of the unchanged model, when inputs were given


def _find_owners(model: nn.Module, inputs: ExampleInputs | None) -> tuple[list[str], _Plan]:
    """Paths of the modules owning residual adds, in execution order, and the plan's start.

    With ``inputs``, one eval run gives the reference outputs and each piece's arguments, from
    which shapes are propagated through the piece's graph.
    """
    pieces, untraceable = trace_pieces(model)
    plan = _Plan(
        [], [Skipped(u.path, f"not traceable ({u.reason}); its submodules were traced instead")
             for u in untraceable]
    )  # fmt: skip
    if inputs is not None:
        piece_modules = {p.path: model.get_submodule(p.path) for p in pieces}
        plan.reference, captured = _reference_run(model, inputs, piece_modules)
        for piece in pieces:
            args = captured.get(piece.path)
            module = piece_modules[piece.path]
            positional = None if args is None else positional_arguments(module, args)
            if positional is not None:
                propagate_shapes(piece.graph_module, positional)
    owners: dict[str, None] = {}
    for piece in pieces:
        for site in find_residual_sites(piece.graph_module):
            owners.setdefault(_join(piece.path, site.owner))
    if "" in owners:
        del owners[""]
        plan.skipped.append(Skipped("", _ROOT_OWNED))
    return list(owners), plan


def _plan_block(
    model: nn.Module,
    path: str,
    nested: list[nn.Module],
    inputs: ExampleInputs | None,
    provenance: Provenance | None = None,
) -> _Block | Skipped:
    """Trace one block on its own and find its residual sites there; ``provenance`` of the run
    that gave ``inputs`` tells which of them hold the model's state."""
    module = model.get_submodule(path)
    try:
        graph_module, same = trace_in_both_modes(module, nested)
        if not same:
            leaves = nested + mode_dependent_submodules(module, graph_module, nested)
            graph_module, same = trace_in_both_modes(module, leaves)
    except Exception as error:  # noqa: BLE001 - reported, the block is left as it is
        return Skipped(path, f"not traceable on its own ({type(error).__name__}: {error})")
    if not same:
        return Skipped(path, "its own forward branches on self.training, which tracing freezes")
    positional = positional_arguments(module, inputs) if inputs is not None else None
    if positional is not None:
        propagate_shapes(graph_module, positional)
    sites = [s for s in find_residual_sites(graph_module) if s.owner == ""]
    if not sites:
        return Skipped(path, "no residual add found when traced on its own")
    shared: frozenset[str] = frozenset()
    if positional is not None and provenance is not None:
        placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        shared = frozenset(
            str(node.target)
            for node, value in zip(placeholders, positional, strict=False)
            if isinstance(value, Tensor) and provenance.shared(value)
        )
    return _Block(path, module, graph_module, sites, shared)


def _plan(model: nn.Module, inputs: ExampleInputs | None) -> _Plan:
    """Everything injection will do, found without changing the model."""
    owners, plan = _find_owners(model, inputs)
    captured: dict[str, ExampleInputs] = {}
    provenance = None
    if inputs is not None and owners:
        with Provenance(model, (inputs.args, inputs.kwargs)) as provenance:
            _, captured = run_eval(model, inputs, {p: model.get_submodule(p) for p in owners})
    for path in owners:
        nested = [model.get_submodule(p) for p in owners if p.startswith(f"{path}.")]
        planned = _plan_block(model, path, nested, captured.get(path), provenance)
        if isinstance(planned, Skipped):
            plan.skipped.append(planned)
        else:
            plan.blocks.append(planned)
    return plan


def _describe(node: fx.Node, block_path: str) -> str:
    if node.op == "call_module":
        return _join(block_path, str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    return node.name


def _site_reports(plan: _Plan, rates: list[float], rewrite: Rewrite | None = None) -> list[Site]:
    """One line per site; with ``rewrite``, how its skipping branches would run, if requested."""
    skip_mode = rewrite.mode if rewrite and rewrite.skip_compute else None
    gather = bool(rewrite and rewrite.gather_batch_norm)
    reports = []
    for index, (block, rate) in enumerate(zip(plan.blocks, rates, strict=True)):
        for site in block.sites:
            existing = block.drop_path_at(site)
            attached, previous, skipping = "", None, None
            if existing is None:
                status, site_rate, how = SiteStatus.INJECTED, rate, AttachKind.REWRITTEN
                if skip_mode:
                    skipping = describe_plan(block.cuts[site], skip_mode, gather)
            elif isinstance(existing, DropPath):
                status, site_rate, how = SiteStatus.RE_RATED, rate, AttachKind.REWRITTEN
                previous = existing.drop_prob
            else:
                status, how = SiteStatus.KEPT, AttachKind.EXISTING
                attached = _join(block.path, str(site.existing_drop_path))
                site_rate = drop_path_rate_of(existing) or 0.0
            skip = "identity" if site.skip is site.fork else _describe(site.skip, block.path)
            branch = _describe(site.branch, block.path)
            reports.append(
                Site(
                    block.path,
                    index,
                    branch,
                    skip,
                    site_rate,
                    status,
                    attached,
                    how,
                    previous,
                    skip_compute=skipping,
                )  # fmt: skip
            )
    return reports


def _apply(plan: _Plan, rates: list[float], rewrite: Rewrite, surgery: Surgery) -> None:
    """Rewrite every block that needs a DropPath, innermost first; update injected ones.

    Inner blocks go first so that an outer block's copy, built from the module as it is now,
    already holds their replacements.
    """
    num_blocks = len(plan.blocks)
    order = sorted(range(num_blocks), key=lambda i: -plan.blocks[i].path.count("."))
    for index in order:
        block, rate = plan.blocks[index], rates[index]
        position = (index, num_blocks)
        if isinstance(block.module, InjectedBlock):
            surgery.update(block.module, rate, rewrite.mode, position)
            continue
        if block.new_sites:
            sites = {site: block.cuts.get(site) for site in block.new_sites}
            original = surgery.model.get_submodule(block.path)
            graph = block.graph_module.graph
            replacement = build_injected_block(original, graph, sites, rate, position, rewrite)
            surgery.replace(block.path, replacement)


def _reference_run(
    model: nn.Module, inputs: ExampleInputs, capture: dict[str, nn.Module]
) -> tuple[Any, dict[str, ExampleInputs]]:
    """Eval outputs of the unchanged model, turning a failure into a clear input error."""
    try:
        return run_eval(model, inputs, capture)
    except Exception as error:
        raise ExampleInputError(
            f"{type(model).__name__} failed on the example input {inputs.describe(origin=True)} "
            f"({type(error).__name__}: {error}); pass example_inputs that fit the model"
        ) from error


def dry_run(model: nn.Module, max_drop: float, schedule: Schedule) -> Report:
    """``find_residuals`` without an example input: the symbolic trace alone decides."""
    plan = _plan(model, None)
    rates = drop_rates(len(plan.blocks), max_drop, schedule)
    return Report(_site_reports(plan, rates), plan.skipped, len(plan.blocks))


def _rewriting(model: nn.Module, block: _Block, rate: float, rewrite: Rewrite) -> Change:
    """Rewriting one block alone, as a change ``diagnose`` can try."""
    surgery = Surgery(model)
    return Change(
        f"rewriting {block.path}",
        lambda: _apply(_Plan([block], []), [rate], rewrite, surgery),
        surgery.undo,
    )


def inject_traced(
    model: nn.Module,
    max_drop: float,
    schedule: Schedule,
    example_inputs: Any,
    verify: bool,
    rewrite: Rewrite,
) -> Report:
    """``inject_droppath(skip_compute=True)`` once its arguments are checked: plan, rewrite,
    verify or undo; returns the report."""
    inputs = resolve_inputs(model, example_inputs, required=verify)
    plan = _plan(model, inputs)
    if rewrite.skip_compute:  # planned once, for the report and the rewrite
        for block in plan.blocks:
            block.cuts = plan_cuts(block.graph_module, block.new_sites, block.shared)
    rates = drop_rates(len(plan.blocks), max_drop, schedule)
    report = Report(_site_reports(plan, rates, rewrite), plan.skipped, len(plan.blocks))
    surgery = Surgery(model)
    try:
        _apply(plan, rates, rewrite, surgery)
        if inputs is not None and verify:
            report.verification = verify_eval(model, inputs, plan.reference)
            if not report.verification.passed:
                surgery.undo()
                changes = [
                    _rewriting(model, block, rate, rewrite)
                    for block, rate in zip(plan.blocks, rates, strict=True)
                ]
                reason = diagnose(model, inputs, plan.reference, changes, "rewriting every block")
                raise VerificationError(reason)
    except BaseException:
        surgery.undo()
        raise
    return report
