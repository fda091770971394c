"""DropPath that skips the work it throws away: dropped branches are not computed.

timm's and torchvision's DropPath multiply an already computed branch by a zero mask. Here the
branch of a residual add is cut out of its block's graph into a GraphModule of its own, and a
``SkippingDropPath`` computes ``skip + DropPath(branch(...))`` itself:

- ``mode="batch"``: a dropped block's branch is not executed at all;
- ``mode="row"``: the branch runs on the kept samples only (gathered with ``index_select``) and
  its scaled result is added back with ``index_add``. This needs a sample-independent branch:
  one holding BatchNorm in train mode (whose batch statistics would change; ``gather_batch_norm``
  opts in), reducing over the batch, or reading sizes computed outside it keeps the mask.

Keep decisions are drawn like ``drop_path`` draws its mask, so under one seed both drop the
same samples on the CPU; batch-mode decisions are always drawn on the CPU (no device sync).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from torch import fx, nn

from .graph_facts import data_derived, is_inplace_add
from .internals import BATCH_NORM_BASE
from .layers import Mode, SkippingDropPath
from .residuals import ResidualSite


@dataclass(frozen=True)
class BranchCut:
    """The nodes that move into a branch graph, and the outside values the branch reads.

    ``per_sample`` says which inputs have the batch as their first dimension (gathered in row
    mode); it is None when row mode cannot gather, with the reason in ``row_fallback``.
    """

    site: ResidualSite
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    per_sample: tuple[bool, ...] | None
    row_fallback: str | None
    batch_norms: tuple[nn.Module, ...]

    def mapped(self, new_node: Mapping[fx.Node, fx.Node], site: ResidualSite) -> BranchCut:
        """The same cut in a copy of its graph (``new_node``: original node to copy)."""
        nodes = tuple(new_node[n] for n in self.nodes)
        return replace(self, site=site, nodes=nodes, inputs=tuple(new_node[n] for n in self.inputs))


@dataclass(frozen=True)
class NoCut:
    """Why a site's branch cannot be cut out: it keeps a plain mask."""

    reason: str


def _sizes_of_tensors(graph: fx.Graph) -> set[fx.Node]:
    """Non-tensor values read off tensors (``x.shape[0]``, ``x.size(1)``, arithmetic on them)."""
    sizes: set[fx.Node] = set()
    for node in graph.nodes:
        if "tensor_meta" not in node.meta and node.op != "placeholder":
            inputs = node.all_input_nodes
            if any("tensor_meta" in n.meta or n in sizes for n in inputs):
                sizes.add(node)
    return sizes


def _batch_size(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return int(shape[0]) if shape else None


_REDUCTIONS = frozenset(
    {
        "mean", "sum", "std", "var", "std_mean", "var_mean", "amax", "amin", "max", "min",
        "argmax", "argmin", "norm", "prod", "logsumexp", "softmax", "log_softmax", "cumsum",
        "cumprod", "median", "all", "any",
    }
)  # fmt: skip


def _mixes_samples(node: fx.Node) -> bool:
    """An op that combines values across the batch: functional batch norm, or a reduction
    (softmax, cumsum, ...) over dimension 0 or over everything."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name == "batch_norm":
        return True
    if name not in _REDUCTIONS:
        return False
    dim = node.kwargs.get("dim", node.kwargs.get("axis"))
    if dim is None and len(node.args) > 1:
        dim = node.args[1]
    if dim is None:
        return True
    source = node.args[0] if node.args else None
    ndim = len(getattr(getattr(source, "meta", {}).get("tensor_meta"), "shape", ()))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return any(isinstance(d, int) and (d == 0 or (ndim and d + ndim == 0)) for d in dims)


def _batch_norms(graph_module: fx.GraphModule, nodes: Sequence[fx.Node]) -> tuple[nn.Module, ...]:
    """BatchNorm modules the nodes run, directly or inside leaf modules."""
    return tuple(
        module
        for node in nodes
        if node.op == "call_module"
        for module in graph_module.get_submodule(str(node.target)).modules()
        if isinstance(module, BATCH_NORM_BASE)
    )


def cut_branch(
    graph_module: fx.GraphModule, site: ResidualSite, shared: Collection[str] = ()
) -> BranchCut | NoCut:
    """Plan cutting ``site``'s branch out of the graph, or say why it cannot be cut; the
    placeholders named in ``shared`` hold the model's state, so they are never gathered."""
    graph = graph_module.graph
    if is_inplace_add(site.add) and site.add.args[0] is site.skip:
        return NoCut("in-place add into the skip")  # later readers of the skip see the sum
    moved = set(site.branch_region)
    order = list(graph.nodes)
    start, stop = order.index(site.fork), order.index(site.add)
    for node in order[start + 1 : stop]:  # sizes and views read from the branch's tensors
        if node not in moved and any(n in moved for n in node.all_input_nodes):
            moved.add(node)
    nodes = tuple(n for n in order[start + 1 : stop] if n in moved)
    if any(user not in moved and user is not site.add for n in nodes for user in n.users):
        return NoCut("a value computed in the branch is used outside it")
    inputs = [site.fork]
    for node in nodes:
        inputs += [n for n in node.all_input_nodes if n not in moved and n not in inputs]
    batch = _batch_size(site.add)
    derived = data_derived(graph, shared)
    per_sample = tuple(
        n is site.fork or (n in derived and batch is not None and _batch_size(n) == batch)
        for n in inputs
    )
    row_fallback = None
    mixing = next((n for n in nodes if _mixes_samples(n)), None)
    if mixing is not None:
        row_fallback = f"the branch combines samples ({mixing.name})"
    elif batch is None:
        row_fallback = "no shapes (no example input) to tell which inputs are per-sample"
    elif any(n in derived for n in set(inputs) & _sizes_of_tensors(graph)):
        row_fallback = "the branch reads sizes computed outside it"
    return BranchCut(
        site,
        nodes,
        tuple(inputs),
        None if row_fallback else per_sample,
        row_fallback,
        _batch_norms(graph_module, nodes),
    )


def plan_cuts(
    graph_module: fx.GraphModule, sites: Sequence[ResidualSite], shared: Collection[str] = ()
) -> dict[ResidualSite, BranchCut | NoCut]:
    """For each site of one block: how its branch is cut out, or why it keeps a plain mask.

    A branch that contains another site's add (a residual nested in the same forward) keeps
    the mask, so that every cut moves nodes no other site needs. ``shared`` as in
    ``cut_branch``.
    """
    plans: dict[ResidualSite, BranchCut | NoCut] = {}
    for site in sites:
        if any(other.add in site.branch_region for other in sites):
            plans[site] = NoCut("the branch holds another residual of the block")
        else:
            plans[site] = cut_branch(graph_module, site, shared)
    return plans


class SkipCompute(Enum):
    """What a dropped branch costs under ``skip_compute``."""

    SKIPS_DROPPED_BLOCKS = "skips dropped blocks"
    KEPT_ROWS = "computes kept rows only"
    KEPT_ROWS_BATCH_NORM_GATHERED = "computes kept rows only (BatchNorm statistics from kept rows)"
    KEPT_ROWS_UNLESS_BATCH_NORM_TRAINS = (
        "computes kept rows only, but masks while a BatchNorm in it trains"
    )
    MASKS = "masks"
    MASKS_IN_ROW_MODE = "masks in row mode"


@dataclass(frozen=True)
class SkipPlan:
    """How a site's dropped branch runs, and why it keeps the mask where it does."""

    how: SkipCompute
    reason: str = ""

    def describe(self) -> str:
        return f"{self.how.value}: {self.reason}" if self.reason else self.how.value


def describe_plan(plan: BranchCut | NoCut, mode: Mode, gather_batch_norm: bool = False) -> SkipPlan:
    """What a dropped branch costs, for the report."""
    if isinstance(plan, NoCut):
        return SkipPlan(SkipCompute.MASKS, plan.reason)
    if mode == "batch":
        return SkipPlan(SkipCompute.SKIPS_DROPPED_BLOCKS)
    if plan.per_sample is None:
        return SkipPlan(SkipCompute.MASKS_IN_ROW_MODE, plan.row_fallback or "")
    if plan.batch_norms and gather_batch_norm:
        return SkipPlan(SkipCompute.KEPT_ROWS_BATCH_NORM_GATHERED)
    if plan.batch_norms:
        return SkipPlan(SkipCompute.KEPT_ROWS_UNLESS_BATCH_NORM_TRAINS)
    return SkipPlan(SkipCompute.KEPT_ROWS)


def branch_module(root: nn.Module, cut: BranchCut) -> fx.GraphModule:
    """A GraphModule computing the branch from ``cut.inputs``, sharing ``root``'s submodules."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for index, node in enumerate(cut.inputs):
        env[node] = graph.placeholder(f"{node.name}_{index}")
    for node in cut.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[cut.site.branch])
    return fx.GraphModule(root, graph, "Branch")


def install_skipping_drop_path(
    block: fx.GraphModule,
    cut: BranchCut,
    name: str,
    rate: float,
    mode: Mode,
    gather_batch_norm: bool,
) -> None:
    """Replace the cut's branch nodes and add in ``block``'s graph by one SkippingDropPath call."""
    branch = branch_module(block, cut)
    drop = SkippingDropPath(branch, cut.per_sample, cut.batch_norms, rate, mode, gather_batch_norm)
    drop.training = block.training
    block.add_module(name, drop)
    site, graph = cut.site, block.graph
    with graph.inserting_before(site.add):
        call = graph.call_module(name, (site.skip, *cut.inputs))
    site.add.replace_all_uses_with(call)
    graph.erase_node(site.add)
    for node in reversed(cut.nodes):
        graph.erase_node(node)
