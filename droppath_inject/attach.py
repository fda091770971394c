"""Where each residual branch gets its DropPath, found on a captured run, without rewriting code.

A branch value that is the output of a module call (possibly through ops that commute with a
per-sample scale: views and reshapes that keep the batch dimension first, dtype casts,
dropout, ReLU, multiplication or division by any tensor) gets its DropPath there:

- a drop path the model already has on the branch (timm, torchvision, Hugging Face, ours) is
  re-rated (or kept), never doubled;
- an ``nn.Identity`` drop-path slot (timm and Hugging Face at rate 0) is replaced by a DropPath;
- otherwise a forward hook on the module computing the branch applies a DropPath registered in
  the block that owns the add, so it shows in ``print(model)`` and ``model.modules()``.

A hook fires on every call of its module, and a drop path or slot acts on every call too, so a
module is used only if every one of its calls in the run is a residual branch it carries
(Hugging Face's PoolFormer also runs its drop-path class as the MLP's dropout: that one is not
re-rated); otherwise the next candidate on the branch's tail is tried, and a branch with none
is reported, not rewritten.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from torch import fx, nn

from .batch_dims import batch_dim_of, first_input_batch_dims
from .blocks import CONTAINERS
from .capture import CapturedRun, ModuleOutput
from .droppaths import is_drop_path_module, is_drop_path_slot
from .graph_facts import (
    add_operands,
    rejoins_add,
    stacked_terms,
    writes_back,
)
from .layers import DropPath
from .residuals import ResidualSite, joint_regions

_VIEW_METHODS = frozenset(
    {
        "view", "reshape", "flatten", "unflatten", "contiguous", "clone", "view_as",
        "reshape_as", "squeeze", "unsqueeze", "to", "float", "half", "bfloat16", "double",
        "type", "type_as", "relu", "relu_", "detach",
    }
)  # fmt: skip
_SCALE_METHODS = frozenset({"mul", "__mul__", "__rmul__", "mul_", "div", "__truediv__", "div_"})
_SCALE_FUNCTION_NAMES = frozenset({"mul", "div", "multiply", "divide", "true_divide"})
_VIEW_FUNCTION_NAMES = frozenset(
    {"reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "dropout", "relu", "leaky_relu",
     "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
)  # fmt: skip
_TRANSPOSES = frozenset({"transpose", "swapaxes", "swapdims", "transpose_"})
_MOVES = frozenset({"permute", "movedim", "moveaxis", "t", "mT", "__getitem__"})


class AttachKind(Enum):
    """How a site's DropPath is attached."""

    FORWARD_HOOK = "forward hook"
    SLOT = "drop-path slot"
    EXISTING = "existing drop path"


@dataclass(frozen=True)
class Attachment:
    """Where a site's DropPath goes.

    ``module`` is the hooked module, the slot, or the existing drop path; ``leaf`` is which
    tensor of the hooked module's output is the branch (None: the output itself); ``holder`` is
    the module that will own a hooked DropPath (the block owning the add, or its nearest
    ancestor that is not a container); ``batch_dim`` is where that output holds the samples. A
    branch that is a sum of parallel paths (attention and MLP of a parallel block) is attached
    on each term: ``parts`` are the other terms' attachments, whose DropPaths follow one
    decision with this one's.
    """

    kind: AttachKind
    module: str
    leaf: int | None = None
    holder: str = ""
    computed_by: str = ""
    batch_dim: int = 0  # the dimension of the module's output (leaf) that holds the samples
    parts: tuple[Attachment, ...] = ()

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module this attachment uses: its own and its parts'."""
        return (self.module, *(part.module for part in self.parts))


@dataclass(frozen=True)
class NoAttachment:
    """Why a site gets no DropPath; ``computed_by`` names the branch's module, if any."""

    reason: str
    computed_by: str = ""


def _keeps_batch_dim(node: fx.Node, source: fx.Node) -> bool:
    """Both values hold the batch in a known dimension (``batch_dims``), so a per-sample scale
    of ``source`` is a per-sample scale of ``node`` (a view, a transpose, a scale)."""
    return batch_dim_of(node) is not None and batch_dim_of(source) is not None


def _commuting_input(node: fx.Node, region: set[fx.Node]) -> fx.Node | None:
    """The branch input of an op that commutes with a per-sample scale, or None."""
    if node.op == "call_method":
        name = str(node.target)
        ok = name in _VIEW_METHODS or name in _TRANSPOSES or name in _MOVES
        scale = name in _SCALE_METHODS
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        ok = name in _VIEW_FUNCTION_NAMES or name in _TRANSPOSES or name in _MOVES
        scale = name in _SCALE_FUNCTION_NAMES
    else:
        return None
    inputs = [n for n in node.all_input_nodes if n in region]
    if not inputs:
        return None
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if scale:  # x * s commutes with a per-sample scale for any s; only x of x / s does
        if name.startswith(("div", "__truediv__", "true_divide", "divide")):
            inputs = [source] if source in inputs else []
        # of two factors computed in the branch, follow one that a module returned
        inputs.sort(key=lambda n: not n.meta.get("module_outputs"))
        return inputs[0] if inputs and _keeps_batch_dim(node, inputs[0]) else None
    if not ok or source is None or source not in region or len(inputs) != 1:
        return None
    return source if _keeps_batch_dim(node, source) else None


def _tensor_users(node: fx.Node) -> list[fx.Node]:
    """Users that read the value (metadata queries and dead values excluded)."""
    return [u for u in node.users if u.op == "output" or "tensor_meta" in u.meta and u.users]


def branch_tail(site: ResidualSite, start: fx.Node | None = None) -> list[fx.Node]:
    """The branch operand (or ``start``, a value in the branch) and the values it is a scaled
    view of, nearest the add first."""
    region = set(site.branch_region)
    tail = [site.branch if start is None else start]
    while (source := _commuting_input(tail[-1], region)) is not None:
        others = [u for u in _tensor_users(source) if u is not tail[-1]]
        if any(not (rejoins_add(u, site.add) or writes_back(u, site.add)) for u in others):
            break  # the value is read elsewhere in the branch too: scaling it would change that
        tail.append(source)
    return tail


class _Planner:
    """Attachment candidates per site, then one choice per site that respects shared modules."""

    def __init__(
        self, run: CapturedRun, joint: dict[ResidualSite, frozenset[fx.Node]] | None = None
    ) -> None:
        self.run = run
        self.joint = joint or {}
        self.data = run.data
        self.live = run.live
        self.inside = run.call_nodes
        self.input_batch_dims = first_input_batch_dims(run.graph)

    def _within(self, output: ModuleOutput, region: Collection[fx.Node]) -> bool:
        """Every data value the call computed that reaches the output lies in the branch region
        (dead ones, such as attention weights, an RNN's state or a cache write, do not count)."""
        inside = self.inside.get(output.call.key, set())
        return all(n in region for n in inside if n in self.data and n in self.live)

    def _carries(self, site: ResidualSite, output: ModuleOutput, region: set[fx.Node]) -> bool:
        """A hook on ``output`` acts on ``site``'s branch alone: the call lies in the branch, or
        the output is one leaf of a call that lies in the joint computation the branch is part
        of (one attention over two streams returning each stream's part: only this stream's
        leaf is dropped)."""
        if self._within(output, region):
            return True
        joint = self.joint.get(site)
        return output.leaf is not None and joint is not None and self._within(output, joint)

    def computed_by(self, tail: list[fx.Node], region: set[fx.Node]) -> str:
        """The largest module (not a drop path or identity) whose output is the branch."""
        best, size = "", -1
        for node in tail:
            for output in node.meta.get("module_outputs", []):
                path = output.call.path
                module = self.run.modules[path]
                if not path or isinstance(module, nn.Identity) or is_drop_path_module(module, path):
                    continue
                ops = len(self.inside.get(output.call.key, set()))
                if ops >= size and self._within(output, region):
                    best, size = path, ops
        return best

    def candidates(self, site: ResidualSite) -> list[Attachment] | NoAttachment:
        """Ways to attach, best first: a drop path already on the tail, a drop-path slot, then
        hooks on the modules returning the branch (those called once first, then outermost);
        a branch that is a sum of parallel paths with none of these is attached on its terms."""
        region = set(site.branch_region)
        tail = branch_tail(site)
        named = self.computed_by(tail, region)
        holder = self._holder(site.owner)
        found, unknown_batch = self._options(site, tail, region, holder, named)
        if found:
            return found
        if unknown_batch:
            return NoAttachment(
                "the batch dimension of the branch is not known where a DropPath could go "
                f"({', '.join(dict.fromkeys(unknown_batch))} returns it folded into another "
                "dimension or not at all): a per-sample decision there would not be per sample; "
                "if the example input holds no batch, pass one that does",
                named,
            )
        if holder is None:
            return NoAttachment(
                f"no module to hold a DropPath: {site.owner or 'the model'} is a container", named
            )
        if tail[-1] in site.parallel_sums:
            return self._on_terms(site, tail[-1], holder, named)
        return NoAttachment(
            "the branch value is not the output of a module call (it is computed by "
            f"{_op_name(site.branch)} in {site.owner or 'the model'}'s forward)",
            named,
        )

    def _options(
        self,
        site: ResidualSite,
        tail: list[fx.Node],
        region: set[fx.Node],
        holder: str | None,
        named: str,
    ) -> tuple[list[Attachment], list[str]]:
        """The attachments along ``tail``, best first, and the modules passed by because the
        batch dimension of their output is not known."""
        existing: list[Attachment] = []
        slots: list[Attachment] = []
        hooks: list[Attachment] = []
        unknown_batch: list[str] = []
        for node in tail:
            batch_dim = batch_dim_of(node)
            for output in reversed(node.meta.get("module_outputs", [])):  # outermost first
                path = output.call.path
                if not path or not self._carries(site, output, region):
                    continue
                if batch_dim is None:
                    unknown_batch.append(path)
                    continue
                module = self.run.modules[path]
                if is_drop_path_slot(module, path):
                    slots.append(Attachment(AttachKind.SLOT, path, None, "", named, batch_dim))
                elif is_drop_path_module(module, path):
                    existing.append(
                        Attachment(AttachKind.EXISTING, path, None, "", named, batch_dim)
                    )
                elif holder is not None:
                    hooks.append(
                        Attachment(
                            AttachKind.FORWARD_HOOK, path, output.leaf, holder, named, batch_dim
                        )
                    )
        hooks.sort(key=lambda a: self.run.call_counts[a.module] > 1)
        return existing + slots + hooks, unknown_batch

    def _terms(self, site: ResidualSite, node: fx.Node) -> list[list[fx.Node]]:
        """The tails of the terms of a parallel sum, nested parallel sums expanded."""
        tails = []
        for operand in add_operands(node) or stacked_terms(node) or ():
            tail = branch_tail(site, operand)
            if tail[-1] in site.parallel_sums:
                tails.extend(self._terms(site, tail[-1]))
            else:
                tails.append(tail)
        return tails

    def _on_terms(
        self, site: ResidualSite, node: fx.Node, holder: str, named: str
    ) -> list[Attachment] | NoAttachment:
        """One attachment per term of the parallel sum ``node``: a slot, a hook, or a DropPath
        of this package already there, each module called once first. A drop path of another
        library cannot share the decision: where every term has one (timm's parallel blocks),
        they are re-rated and keep their own decisions; elsewhere they are passed by. The terms
        must hold the samples in one dimension, since one decision covers them all."""
        region = set(site.branch_region)
        tails = self._terms(site, node)
        options = [self._options(site, tail, region, holder, named)[0] for tail in tails]
        foreign = [
            bool(o) and o[0].kind is AttachKind.EXISTING and not self._ours(o[0]) for o in options
        ]
        chosen: list[Attachment] = []
        for tail, option in zip(tails, options, strict=True):
            if not all(foreign):
                option = [a for a in option if a.kind is not AttachKind.EXISTING or self._ours(a)]
            option.sort(key=lambda a: self.run.call_counts[a.module] > 1)
            if not option:
                return NoAttachment(
                    "the branch is a sum of parallel paths, and one of them is not the output "
                    f"of a module call with a known batch dimension (it is computed by "
                    f"{_op_name(tail[-1])})",
                    named,
                )
            chosen.append(replace(option[0], holder=holder))
        if len({a.batch_dim for a in chosen}) > 1:
            return NoAttachment(
                "the branch is a sum of parallel paths that hold the samples in different "
                "dimensions: one decision cannot cover them",
                named,
            )
        if self.input_batch_dims.get(holder) != chosen[0].batch_dim:
            return NoAttachment(
                f"the shared decision of a parallel sum is drawn from {holder}'s first argument, "
                "which does not hold the samples where the sum's terms do",
                named,
            )
        first, *rest = chosen
        return [replace(first, parts=tuple(rest))]

    def _ours(self, attachment: Attachment) -> bool:
        return isinstance(self.run.modules[attachment.module], DropPath)

    def _holder(self, owner: str) -> str | None:
        path = owner
        while isinstance(self.run.modules[path], CONTAINERS):
            if not path:
                return None
            path = path.rpartition(".")[0]
        return path


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{getattr(node.target, '__name__', node.target)}()"


def _chosen(option: list[Attachment] | NoAttachment, index: int) -> Attachment | None:
    return option[index] if isinstance(option, list) and index < len(option) else None


def plan_attachments(
    run: CapturedRun, sites: Sequence[ResidualSite]
) -> list[Attachment | NoAttachment]:
    """One attachment (or the reason there is none) per site of ``run``, in order."""
    planner = _Planner(run, joint_regions(sites))
    options = [planner.candidates(site) for site in sites]
    # a module fewer sites could use than it has calls can never carry them all: drop it first
    listed: Counter[str] = Counter()
    for option in options:
        if isinstance(option, list):
            listed.update({m for a in option for m in a.modules})
    options = [
        [a for a in option if all(listed[m] >= run.call_counts[m] for m in a.modules)] or option
        if isinstance(option, list)
        else option
        for option in options
    ]
    choice = [0] * len(sites)
    while True:  # a module is used only if every one of its calls is a branch it carries
        used: Counter[str] = Counter()
        for option, index in zip(options, choice, strict=True):
            if (chosen := _chosen(option, index)) is not None:
                used.update(chosen.modules)
        shared = {path for path, count in used.items() if count < run.call_counts[path]}
        moved = False
        for position, option in enumerate(options):
            chosen = _chosen(option, choice[position])
            if chosen is not None and shared.intersection(chosen.modules):
                choice[position] += 1
                moved = True
        if not moved:
            break
    result: list[Attachment | NoAttachment] = []
    for option, index in zip(options, choice, strict=True):
        if isinstance(option, NoAttachment):
            result.append(option)
        elif index < len(option):
            result.append(option[index])
        else:
            modules = ", ".join(a.module for a in option)
            result.append(
                NoAttachment(
                    f"every module computing the branch ({modules}) is also called elsewhere, "
                    "where it is not a residual branch, and a hook would drop it there too",
                    option[0].computed_by,
                )
            )
    return result
