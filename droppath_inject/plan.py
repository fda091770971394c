"""The plan of an injection, built from one captured run: sites, blocks and attachments.

``make_plan`` captures the model on its example input, finds the residual sites in the
captured graph, groups them into blocks and finds where each site's DropPath goes. It changes
nothing; ``inject_droppath`` applies the plan and ``find_residuals`` reports it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from .attach import AttachKind, Attachment, NoAttachment, plan_attachments
from .blocks import LayerStacks, block_key, group_blocks
from .capture import CapturedRun, capture
from .droppaths import drop_path_rate_of
from .errors import ExampleInputError
from .inputs import ExampleInputs, side_effect_free_eval
from .report import Site, SiteStatus
from .residuals import ResidualSite, find_sites


@dataclass(frozen=True)
class PlannedSite:
    """A residual site, its block's index in execution order, and where its DropPath goes;
    ``layer`` is the module of its layer (None: an iteration of its owner's loop, or none)."""

    site: ResidualSite
    block_index: int
    attachment: Attachment | NoAttachment
    layer: str | None = None


@dataclass
class Plan:
    """Everything an injection will do, and the captured run it was read from."""

    run: CapturedRun
    sites: list[PlannedSite]
    num_blocks: int


def _capture(model: nn.Module, inputs: ExampleInputs) -> CapturedRun:
    try:
        with side_effect_free_eval(model):
            return capture(model, (inputs.args, dict(inputs.kwargs)))
    except Exception as error:
        raise ExampleInputError(
            f"{type(model).__name__} failed on the example input {inputs.describe(origin=True)} "
            f"({type(error).__name__}: {error}); pass example_inputs that fit the model"
        ) from error


def _branch_module(site: ResidualSite, attachment: Attachment | NoAttachment) -> str:
    """What computes the branch: its module, else the innermost module its last op ran in."""
    if attachment.computed_by:
        return attachment.computed_by
    if isinstance(attachment, Attachment):
        return attachment.module
    paths = [path for path, _ in site.branch.meta.get("nn_module_stack", {}).values()]
    return paths[-1] if paths else site.owner


def make_plan(model: nn.Module, inputs: ExampleInputs) -> Plan:
    """Capture ``model`` on ``inputs`` and plan every site's DropPath; the model is unchanged.

    Raises:
        ExampleInputError: the model failed on ``inputs``.
    """
    run = _capture(model, inputs)
    sites = find_sites(run)
    attachments = plan_attachments(run, sites)
    stacks = LayerStacks((site.owner for site in sites), run.modules)
    branches = [_branch_module(s, a) for s, a in zip(sites, attachments, strict=True)]
    keys = [
        block_key(site, branch, run.modules, stacks)
        for site, branch in zip(sites, branches, strict=True)
    ]
    blocks = group_blocks(keys)
    layers = [stacks.layer_of(s.owner, b) for s, b in zip(sites, branches, strict=True)]
    planned = [
        PlannedSite(*fields) for fields in zip(sites, blocks, attachments, layers, strict=True)
    ]
    return Plan(run, planned, len(set(blocks)))


def describe_value(node: fx.Node, fork: fx.Node) -> str:
    """What computes a value, for people: ``identity``, the outermost module returning it, or
    its op."""
    if node is fork:
        return "identity"
    outputs = node.meta.get("module_outputs", [])
    if outputs:
        return str(outputs[-1].call.path) or "<model>"
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{getattr(node.target, '__name__', node.target)}()"


def site_report(
    planned: PlannedSite, rate: float, status: SiteStatus, previous_rate: float | None = None
) -> Site:
    """The report line of a planned site, given what attaching it did (or would do)."""
    site, attachment = planned.site, planned.attachment
    branch = _branch_module(site, attachment)
    skip = describe_value(site.skip, site.fork)
    if isinstance(attachment, NoAttachment):
        return Site(
            site.owner, planned.block_index, branch, skip, rate, SiteStatus.SKIPPED,
            detail=attachment.reason,
        )  # fmt: skip
    shared_with = tuple(part.module for part in attachment.parts)
    return Site(
        site.owner, planned.block_index, branch, skip, rate, status,
        attachment.module, attachment.kind, previous_rate, shared_with=shared_with,
    )  # fmt: skip


def attachments_of(plan: Plan) -> list[Attachment | None]:
    """Each planned site's attachment, None where it has none."""
    return [p.attachment if isinstance(p.attachment, Attachment) else None for p in plan.sites]


def dry_sites(plan: Plan, rates: list[float], keep_existing: bool) -> list[Site]:
    """The report lines ``inject_droppath`` would give: existing drop paths re-rated or kept."""
    sites = []
    for planned in plan.sites:
        attachment = planned.attachment
        status, current, rate = SiteStatus.INJECTED, None, rates[planned.block_index]
        if isinstance(attachment, Attachment) and attachment.kind is AttachKind.EXISTING:
            current = drop_path_rate_of(plan.run.modules[attachment.module])
            status = SiteStatus.KEPT if keep_existing else SiteStatus.RE_RATED
            if keep_existing and current is not None:
                rate = current
        sites.append(site_report(planned, rate, status, current))
    return sites
