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
from dataclasses import dataclass
from enum import Enum

from torch import fx, nn

from .blocks import CONTAINERS
from .capture import CapturedRun, ModuleOutput
from .droppaths import is_drop_path_module, is_drop_path_slot
from .graph_facts import data_derived, live_nodes, rejoins_add, writes_back
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


class AttachKind(Enum):
    """How a site's DropPath is attached."""

    FORWARD_HOOK = "forward hook"
    SLOT = "drop-path slot"
    EXISTING = "existing drop path"
    REWRITTEN = "rewritten block"  # skip_compute: the block replaced by its injected trace


@dataclass(frozen=True)
class Attachment:
    """Where a site's DropPath goes.

    ``module`` is the hooked module, the slot, or the existing drop path; ``leaf`` is which
    tensor of the hooked module's output is the branch (None: the output itself); ``holder`` is
    the module that will own a hooked DropPath (the block owning the add, or its nearest
    ancestor that is not a container).
    """

    kind: AttachKind
    module: str
    leaf: int | None = None
    holder: str = ""
    computed_by: str = ""


@dataclass(frozen=True)
class NoAttachment:
    """Why a site gets no DropPath; ``computed_by`` names the branch's module, if any."""

    reason: str
    computed_by: str = ""


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None else None


def _keeps_batch_dim(node: fx.Node, source: fx.Node) -> bool:
    """``node`` keeps ``source``'s first dimension as its first (so a per-sample mask commutes)."""
    out, into = _shape(node), _shape(source)
    if not out or not into or out[0] != into[0]:
        return False
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    ndim = len(into)
    dims = [a for a in node.args[1:] if isinstance(a, int)]
    if name == "permute":
        order = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], tuple) else dims
        return bool(order) and order[0] % ndim == 0
    if name in _TRANSPOSES:
        return all(d % ndim != 0 for d in dims)
    if name == "__getitem__":
        index = node.args[1] if len(node.args) > 1 else None
        first = index[0] if isinstance(index, tuple) and index else index
        return first == slice(None) or first is Ellipsis and len(out) == ndim
    return name not in ("t", "T", "mT", "movedim", "moveaxis")


def _commuting_input(node: fx.Node, region: set[fx.Node]) -> fx.Node | None:
    """The branch input of an op that commutes with a per-sample scale, or None."""
    if node.op == "call_method":
        name = str(node.target)
        ok = name in _VIEW_METHODS or name in _TRANSPOSES or name in ("permute", "__getitem__")
        scale = name in _SCALE_METHODS
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        ok = name in _VIEW_FUNCTION_NAMES or name in ("permute", "transpose")
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


def branch_tail(site: ResidualSite) -> list[fx.Node]:
    """The branch operand and the values it is a scaled view of, nearest the add first."""
    region = set(site.branch_region)
    tail = [site.branch]
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
        self.data = data_derived(run.graph)
        self.live = live_nodes(run.graph)
        self.inside = run.nodes_in_call()

    def _within(self, output: ModuleOutput, region: Collection[fx.Node]) -> bool:
        """Every data value the call computed that reaches the output lies in the branch region
        (dead ones, such as attention weights, an RNN's state or a cache write, do not count)."""
        inside = self.inside.get(output.call.key, [])
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
                ops = len(self.inside.get(output.call.key, []))
                if ops >= size and self._within(output, region):
                    best, size = path, ops
        return best

    def candidates(self, site: ResidualSite) -> list[Attachment] | NoAttachment:
        """Ways to attach, best first: a drop path already on the tail, a drop-path slot, then
        hooks on the modules returning the branch (those called once first, then outermost)."""
        region = set(site.branch_region)
        tail = branch_tail(site)
        named = self.computed_by(tail, region)
        holder = self._holder(site.owner)
        existing: list[Attachment] = []
        slots: list[Attachment] = []
        hooks: list[Attachment] = []
        for node in tail:
            for output in reversed(node.meta.get("module_outputs", [])):  # outermost first
                path = output.call.path
                if not path or not self._carries(site, output, region):
                    continue
                module = self.run.modules[path]
                if is_drop_path_slot(module, path):
                    slots.append(Attachment(AttachKind.SLOT, path, computed_by=named))
                elif is_drop_path_module(module, path):
                    existing.append(Attachment(AttachKind.EXISTING, path, computed_by=named))
                elif holder is not None:
                    hooks.append(
                        Attachment(AttachKind.FORWARD_HOOK, path, output.leaf, holder, named)
                    )
        hooks.sort(key=lambda a: self.run.call_counts[a.module] > 1)
        found = existing + slots + hooks
        if found:
            return found
        if holder is None:
            return NoAttachment(
                f"no module to hold a DropPath: {site.owner or 'the model'} is a container", named
            )
        return NoAttachment(
            "the branch value is not the output of a module call (it is computed by "
            f"{_op_name(site.branch)} in {site.owner or 'the model'}'s forward)",
            named,
        )

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
            listed.update({a.module for a in option})
    options = [
        [a for a in option if listed[a.module] >= run.call_counts[a.module]] or option
        if isinstance(option, list)
        else option
        for option in options
    ]
    choice = [0] * len(sites)
    while True:  # a module is used only if every one of its calls is a branch it carries
        used: Counter[str] = Counter()
        for option, index in zip(options, choice, strict=True):
            if (chosen := _chosen(option, index)) is not None:
                used[chosen.module] += 1
        shared = {path for path, count in used.items() if count < run.call_counts[path]}
        moved = False
        for position, option in enumerate(options):
            chosen = _chosen(option, choice[position])
            if chosen is not None and chosen.module in shared:
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
