"""Finding residual adds in an FX graph: which operand is the branch, which the skip.

An add ``a + b`` is a residual when both operands descend from a common fork ``x``, each side
is a closed region (no tensor it computes from ``x`` is used outside it), and one side, the
branch, holds a longer chain of weight-bearing ops than the other, the skip. A skip that is not
``x`` itself must be a shortcut of it: a sum of two sides linear in ``x`` is one weight op in
disguise (LoRA, RepVGG), and a nonlinear skip two weight ops deep makes a parallel sum
(attention + MLP of a parallel block), which is no residual but can be a residual's branch.
See docs/DESIGN.md.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from torch import fx

from .capture import CapturedRun
from .droppaths import is_drop_path_module
from .graph_facts import (
    GraphFacts,
    add_operands,
    is_inplace_add,
    rejoins_add,
    stacked_terms,
    writes_back,
)


@dataclass(frozen=True, eq=False)
class ResidualSite:
    """One residual add in a traced graph.

    ``owner`` is the path (relative to the traced module) of the innermost module whose forward
    contains the add and both of its sides; ``branch_region`` holds the tensor ops computed
    from the fork on the way to the branch operand (inclusive), in execution order;
    ``existing_drop_path`` names a drop-path module already on the branch, if any;
    ``owner_call`` is the key of the owner's call in ``nn_module_stack``, ``weightless``
    says the branch won on parameterized ops alone (no conv, linear, matmul or attention),
    ``parallel_sums`` are the parallel sums in the branch region (the branch may be one), and
    the sums written as ``torch.stack(terms).sum(dim=0)`` there; ``feeds`` are the ops outside
    the branch that read values it computes, each inside another residual's branch (the other
    stream of a joint attention), empty for a closed branch.
    """

    add: fx.Node
    branch: fx.Node
    skip: fx.Node
    fork: fx.Node
    branch_region: tuple[fx.Node, ...]
    owner: str
    branch_depth: int
    skip_depth: int
    existing_drop_path: str | None
    owner_call: str = ""
    weightless: bool = False
    parallel_sums: frozenset[fx.Node] = frozenset()
    feeds: frozenset[fx.Node] = frozenset()


@dataclass(frozen=True, eq=False)
class _ParallelSum:
    """An add of two paths from one fork, neither a shortcut of it (both nonlinear in the
    fork, each two weight ops deep or more: attention and MLP of a parallel block, a shared
    expert and the routed experts): no residual itself, but a residual whose branch it is gets
    a DropPath on each of its terms."""

    add: fx.Node


def _latest_common_ancestor(facts: GraphFacts, a: fx.Node, b: fx.Node) -> fx.Node | None:
    """The latest node (in topological order) that both ``a`` and ``b`` depend on through tensors.

    Walks backwards from both operands in decreasing topological order and stops as soon as
    one side has nothing left to explore, so the cost is local to the add's neighbourhood.
    """
    marks = {a: 1, b: 2}
    pending = {1: 1, 2: 1}  # number of queued nodes reachable from each side
    heap = [-facts.index[a], -facts.index[b]]
    heapq.heapify(heap)
    while heap and pending[1] and pending[2]:
        node = facts.nodes[-heapq.heappop(heap)]
        mark = marks[node]
        for side in (1, 2):
            pending[side] -= bool(mark & side)
        if mark == 3:
            return node
        for parent in facts.data_inputs(node):
            previous = marks.get(parent, 0)
            if previous | mark == previous:
                continue
            marks[parent] = previous | mark
            for side in (1, 2):
                pending[side] += bool(mark & side) and not previous & side
            if not previous:
                heapq.heappush(heap, -facts.index[parent])
    return None


def _region(facts: GraphFacts, fork: fx.Node, operand: fx.Node) -> list[fx.Node]:
    """Nodes computed from ``fork`` on the way to ``operand`` (inclusive), in topological order."""
    if operand is fork:
        return []
    start = facts.index[fork]
    ancestors = {operand}
    stack = [operand]
    while stack:
        for parent in facts.tensor_inputs(stack.pop()):
            if facts.index[parent] > start and parent not in ancestors:
                ancestors.add(parent)
                stack.append(parent)
    region: list[fx.Node] = []
    members = {fork}
    for node in sorted(ancestors, key=facts.index.__getitem__):
        if any(parent in members for parent in facts.tensor_inputs(node)):
            members.add(node)
            region.append(node)
    return region


def _leaks(facts: GraphFacts, region: list[fx.Node], add: fx.Node) -> frozenset[fx.Node]:
    """The readers outside ``region`` (or the output) of tensors it computes, ``add`` aside.

    Users that only read metadata (``x.shape``, ``x.size(0)``) and dead values (the attention
    weights of ``out, _ = mha(q, k, v)``, a write into a cache the run never reads) are not
    leaks. A region with none is closed.
    """
    inside = set(region)
    inside.add(add)
    return frozenset(
        user
        for node in region
        for user in node.users
        if not (
            user in inside
            or writes_back(user, add)
            or rejoins_add(user, add)
            or (user.op != "output" and (not facts.is_tensor(user) or facts.is_dead(user)))
        )
    )


def _reaches(
    value: fx.Node,
    target: fx.Node,
    parents: Callable[[fx.Node], list[fx.Node]],
    index: dict[fx.Node, int],
    avoid: fx.Node | None = None,
) -> bool:
    """``value`` is computed from ``target`` through ``parents`` (an input relation), along a
    path that does not pass through ``avoid``."""
    start = index[target]
    seen = {value}
    stack = [value]
    while stack:
        node = stack.pop()
        if node is target:
            return True
        for parent in parents(node):
            if parent is not avoid and parent not in seen and index[parent] >= start:
                seen.add(parent)
                stack.append(parent)
    return False


def _state_fork(facts: GraphFacts, a: fx.Node, b: fx.Node) -> fx.Node | None:
    """An operand computed from parameters alone that the other operand reads: its own fork.

    A class token or learned queries expanded to the batch share no data-derived ancestor with
    the branch, yet ``x_cls + attn(cat(x_cls, x))`` (CaiT's first class-attention layer, a
    Perceiver's or Q-Former's first layer) is a residual over them.
    """
    for state, other in ((a, b), (b, a)):
        if _reaches(other, state, facts.tensor_inputs, facts.index):  # parameters included
            return state
    return None


def _subtracts_parallel_paths(facts: GraphFacts, fork: fx.Node, region: list[fx.Node]) -> bool:
    """The region subtracts two values both computed from ``fork`` (RepMixer's
    ``mixer(x) - norm(x)``); ``f(x) - x`` (EfficientViM's ``x + a * (f(x) - x)``) is not that."""
    members = set(region)
    return any(
        facts.is_subtraction(node) and sum(n in members for n in facts.data_inputs(node)) >= 2
        for node in region
    )


def _summed_with_parallel_path(facts: GraphFacts, fork: fx.Node, add: fx.Node) -> bool:
    """The add's result is summed with another value computed from ``fork`` beside it, as in
    MobileOne's ``out = conv_scale(x) + identity_bn(x); out += conv_kxk(x)``."""
    for user in add.users:
        if not facts.is_sum(user):
            continue
        others = [n for n in facts.data_inputs(user) if n is not add]
        if any(
            _reaches(other, fork, facts.data_inputs, facts.index, avoid=add) for other in others
        ):
            return True
    return False


def _chain_depth(
    facts: GraphFacts, fork: fx.Node, region: list[fx.Node], counts: Callable[[fx.Node], bool]
) -> int:
    """Length of the longest chain of ``counts`` ops from ``fork`` to the region's last node."""
    depth = {fork: 0}
    for node in region:
        parents = [depth[p] for p in facts.tensor_inputs(node) if p in depth]
        depth[node] = max(parents) + counts(node)
    return depth[region[-1]] if region else 0


def _module_path(node: fx.Node) -> list[str]:
    return [qualname for qualname, _ in node.meta.get("nn_module_stack", {}).values()]


def _call_keys(node: fx.Node) -> list[str]:
    return list(node.meta.get("nn_module_stack", {}))


def _common_owner(
    nodes: Iterable[fx.Node], path_of: Callable[[fx.Node], list[str]] = _module_path
) -> str:
    """The innermost module path (or call key) that every node's module stack passes through."""
    common: list[str] | None = None
    for node in nodes:
        path = path_of(node)
        if common is None:
            common = path
            continue
        length = 0
        while length < min(len(common), len(path)) and common[length] == path[length]:
            length += 1
        common = common[:length]
    return common[-1] if common else ""


def _same_shape(facts: GraphFacts, add: fx.Node, a: fx.Node, b: fx.Node) -> bool:
    if not facts.shapes_known:
        return True
    shapes = {facts.shape(add), facts.shape(a), facts.shape(b)}
    return len(shapes) == 1 and None not in shapes


def _classify(facts: GraphFacts, add: fx.Node) -> ResidualSite | _ParallelSum | None:
    operands = add_operands(add)
    if operands is None or not all(facts.is_tensor(n) for n in operands):
        return None
    a, b = operands
    if not _same_shape(facts, add, a, b):
        return None
    fork = _latest_common_ancestor(facts, a, b) or _state_fork(facts, a, b)
    if fork is None:
        return None
    region_a, region_b = _region(facts, fork, a), _region(facts, fork, b)
    leaks_a, leaks_b = _leaks(facts, region_a, add), _leaks(facts, region_b, add)
    if leaks_a and leaks_b:
        return None
    depth_a, depth_b = (
        _chain_depth(facts, fork, r, facts.is_weight_op) for r in (region_a, region_b)
    )
    weightless = depth_a == depth_b == 0
    if weightless:  # e.g. a norm + pooling token mixer (PoolFormer) against identity
        depth_a, depth_b = (
            _chain_depth(facts, fork, r, facts.has_parameters) for r in (region_a, region_b)
        )
    if depth_a == depth_b:
        return None  # parallel branches of equal weight (RepVGG-style), or no weights at all
    if depth_a > depth_b:
        branch, skip, branch_region, skip_region, feeds = a, b, region_a, region_b, leaks_a
    else:
        branch, skip, branch_region, skip_region, feeds = b, a, region_b, region_a, leaks_b
    if leaks_a | leaks_b != feeds:
        return None  # the skip side is read elsewhere: a merge of two paths, not a residual
    if is_inplace_add(add) and branch is operands[0] and len(branch.users) > 1:
        return None  # the mutated branch is read after the add: no edge to cut
    if skip is not fork:
        if facts.is_linear(fork, skip_region):
            if facts.is_linear(fork, branch_region):
                return None  # both linear in the fork (LoRA, DoRA, RepVGG): one weight op
        elif _chain_depth(facts, fork, skip_region, facts.is_weight_op) > 1:
            return _ParallelSum(add)  # no shortcut: two computations summed side by side
    if (
        not weightless
        and max(depth_a, depth_b) == 1
        and (
            _subtracts_parallel_paths(facts, fork, branch_region)
            or _summed_with_parallel_path(facts, fork, add)
            or _chain_depth(facts, fork, skip_region, facts.has_parameters) > 0
        )
    ):
        # one layer of parallel convs and norms (RepVGG and MobileOne's identity BN, RepMixer's
        # ``mixer(x) - norm(x)``): a re-parameterizable block, which folds into a single conv
        return None
    existing = next(
        (
            str(n.target)
            for n in branch_region
            if n.op == "call_module" and is_drop_path_module(facts.module_of(n))
        ),
        None,
    )
    return ResidualSite(
        add=add,
        branch=branch,
        skip=skip,
        fork=fork,
        branch_region=tuple(branch_region),
        owner=_common_owner([add, *branch_region, *skip_region]),
        branch_depth=max(depth_a, depth_b),
        skip_depth=min(depth_a, depth_b),
        existing_drop_path=existing,
        owner_call=_common_owner([add, *branch_region, *skip_region], _call_keys),
        weightless=weightless,
        feeds=feeds,
    )


def _branch_readers(sites: Sequence[ResidualSite]) -> dict[fx.Node, list[ResidualSite]]:
    """The sites whose branch region holds each node."""
    readers: dict[fx.Node, list[ResidualSite]] = {}
    for site in sites:
        for node in site.branch_region:
            readers.setdefault(node, []).append(site)
    return readers


def _joint(
    site: ResidualSite,
    readers: dict[fx.Node, list[ResidualSite]],
    regions: dict[ResidualSite, set[fx.Node]],
) -> bool:
    """Every op outside ``site``'s branch that reads its values lies in the branch of another
    site (``readers``) whose branch does not contain ``site``'s add."""
    return all(
        any(other is not site and site.add not in regions[other] for other in readers.get(user, ()))
        for user in site.feeds
    )


def _jointly_closed(sites: list[ResidualSite]) -> list[ResidualSite]:
    """The sites whose branch is read outside itself only inside other sites' branches.

    Two streams attending jointly (SD3's image and text tokens in one attention, its output
    split back) each have a residual whose branch also computes part of the other's: neither
    branch is closed alone, their union is. A site's branch values may feed another branch that
    does not contain the site's add (a branch enclosing it would make the add a merge inside
    that branch, as in Res2Net's split-and-add); the check is repeated until no site is dropped.
    """
    regions = {site: set(site.branch_region) for site in sites}
    kept = sites
    while True:
        readers = _branch_readers(kept)
        remaining = [site for site in kept if not site.feeds or _joint(site, readers, regions)]
        if len(remaining) == len(kept):
            return kept
        kept = remaining


def joint_regions(sites: Sequence[ResidualSite]) -> dict[ResidualSite, frozenset[fx.Node]]:
    """For each site whose branch feeds others (``feeds``), its branch region together with the
    branch regions of the sites it feeds (as ``find_sites`` accepted them: not those enclosing
    it): the whole of a joint computation, such as one attention call over two streams that
    returns each stream's part."""
    readers = _branch_readers(sites)
    joint = {}
    for site in sites:
        if site.feeds:
            partners = {
                other
                for user in site.feeds
                for other in readers.get(user, ())
                if site.add not in other.branch_region  # not a branch enclosing the site
            }
            regions = (other.branch_region for other in (site, *partners))
            joint[site] = frozenset(node for region in regions for node in region)
    return joint


def find_sites(run: CapturedRun) -> list[ResidualSite]:
    """Every residual add of the captured ``run`` in execution order.

    Shapes (``node.meta["tensor_meta"]``) are used when present to reject broadcasting adds;
    without them the structural rules alone decide. A weightless add nested in another
    residual's branch (ConvNeXt-V2's GRN) is not a site.
    """
    facts = GraphFacts(run)
    found = [_classify(facts, node) for node in facts.nodes if add_operands(node) is not None]
    parallel = {site.add for site in found if isinstance(site, _ParallelSum)}
    parallel.update(node for node in facts.nodes if stacked_terms(node) is not None)
    sites = _jointly_closed([site for site in found if isinstance(site, ResidualSite)])
    in_branches = {node for site in sites for node in site.branch_region}
    return [
        replace(site, parallel_sums=frozenset(parallel.intersection(site.branch_region)))
        for site in sites
        if not (site.weightless and site.add in in_branches)
    ]
