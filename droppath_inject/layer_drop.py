"""Block granularity: one keep decision per block, and skipping whole dropped blocks.

With ``granularity="block"`` the residual branches of one block (those ``plan.py`` groups under
one block index: a transformer layer's attention and MLP) share one decision, drawn by a
``LayerGate`` pre-hook on the block's module (``block_gate``). With ``skip_compute=True`` too,
a block whose captured graph proves that its output is its first argument plus its branches
along an identity chain gets a ``LayerSkip`` instance forward (``layer_skip``), which does not
run a dropped block (batch mode) or runs it on the kept rows only (row mode). Blocks that cannot
share (no single module call, a drop path of another library) keep per-branch decisions;
blocks that cannot skip are masked. ``Report.layer_drop`` says which and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from .apply import Attacher
from .attach import AttachKind, Attachment
from .batch_dims import first_input_batch_dims
from .block_gate import BlockDropPath, LayerGate, ResidualGate
from .blocks import CONTAINERS
from .branch_rows import uninstall as uninstall_unit
from .granularity import BlockHandling, BlockLayerDrop, Granularity, LayerDropReport
from .graph_facts import unaliased
from .inputs import ExampleInputs, run_eval
from .internals import batch_norms_in, forward_pre_hooks, remove_forward_pre_hooks
from .layer_skip import LayerSkip, cond_refusal, install, uninstall
from .layers import DropPath, Mode
from .plan import Plan, PlannedSite
from .provenance import shared_arguments


def _layer_module(planned: PlannedSite, modules: dict[str, nn.Module]) -> str | None:
    """The module whose call is the site's block: its layer (as ``blocks`` groups), else the
    owner itself; None when the owner loops over a container itself (its iterations are blocks
    with no module of their own)."""
    if planned.layer is not None:
        return planned.layer
    owner = planned.site.owner
    return None if any(isinstance(m, CONTAINERS) for m in modules[owner].children()) else owner


@dataclass
class _Block:
    index: int
    module: str | None
    sites: list[PlannedSite] = field(default_factory=list)
    handling: BlockHandling = BlockHandling.SHARED
    reason: str = ""
    batch_norms: bool = False
    shared: frozenset[int | str] = frozenset()  # arguments holding the model's state
    batch_dim: int | None = 0  # where the block's first argument holds the samples
    cond_refusal: str | None = None  # batch mode: why torch.cond cannot hold it ('' if it can)


def _refuse_sharing(block: _Block, plan: Plan) -> str:
    if block.module is None:
        return "the block is an iteration of its owner's loop, not a module call of its own"
    if plan.run.call_counts[block.module] != 1:
        return f"{block.module} runs {plan.run.call_counts[block.module]} times per forward"
    if block.batch_dim is None:
        return (
            f"the batch dimension of {block.module}'s first argument is not known, so one "
            "decision per sample cannot be drawn for the block"
        )
    for planned in block.sites:
        attachment = planned.attachment
        if not isinstance(attachment, Attachment):
            return f"a branch got no DropPath ({attachment.reason})"
        existing = plan.run.modules[attachment.module]
        if attachment.kind is AttachKind.EXISTING and not (
            isinstance(existing, BlockDropPath) and not isinstance(existing.gate, ResidualGate)
        ):
            return f"{attachment.module} is an existing drop path with its own decisions"
    return ""


def _returning_other_tensors(plan: Plan) -> set[str]:
    """The modules some call of which returned tensors besides its first output."""
    return {
        output.call.path
        for node in plan.run.graph.nodes
        for output in node.meta.get("module_outputs", [])
        if output.leaf not in (None, 0)
    }


def _refuse_skipping(block: _Block, order: dict[fx.Node, int], returning_others: set[str]) -> str:
    """Why the graph does not prove ``output == input + branches`` along an identity chain, or
    why its rows cannot be gathered (skipping gathers the samples of dimension 0)."""
    assert block.module is not None
    if block.batch_dim != 0:
        return (
            f"the block's input holds the samples in dimension {block.batch_dim}, and skipping "
            "runs the kept samples of dimension 0"
        )
    sites = sorted((p.site for p in block.sites), key=lambda s: order[s.add])
    first = unaliased(sites[0].skip).meta.get("module_first_inputs", [])
    if not any(call.path == block.module for call in first):
        return "the first residual's skip is not the block's first argument"
    for before, after in zip(sites, sites[1:], strict=False):
        if unaliased(after.skip) is not before.add:
            return "a residual's skip is not the previous residual's sum (not one identity chain)"
    outputs = sites[-1].add.meta.get("module_outputs", [])
    if not any(o.call.path == block.module and o.leaf in (None, 0) for o in outputs):
        return "the block's output is not its last residual sum (a norm or activation follows)"
    if block.module in returning_others:
        return "the block returns other tensors besides its hidden state"
    return ""


class BlockDrops:
    """Gives an ``Attacher`` block-shared DropPaths, installing gates (and skips) per block."""

    def __init__(
        self,
        model: nn.Module,
        plan: Plan,
        inputs: ExampleInputs,
        mode: Mode,
        skip_compute: bool,
        gather_bn: bool,
    ) -> None:
        self.model = model
        self.mode: Mode = mode
        self.skip_compute = skip_compute
        self.gather_batch_norm = gather_bn
        self.blocks: dict[int, _Block] = {}
        for planned in plan.sites:
            module = _layer_module(planned, plan.run.modules)
            block = self.blocks.setdefault(planned.block_index, _Block(planned.block_index, module))
            if block.module != module:
                block.module = None
            block.sites.append(planned)
        batch_dims = first_input_batch_dims(plan.run.graph)
        for block in self.blocks.values():
            if block.module is not None:
                block.batch_dim = batch_dims.get(block.module)
        order = {node: i for i, node in enumerate(plan.run.graph.nodes)}
        returning_others = _returning_other_tensors(plan) if skip_compute else set()
        for block in self.blocks.values():
            if reason := _refuse_sharing(block, plan):
                block.handling, block.reason = BlockHandling.PER_BRANCH, reason
            elif skip_compute:
                if reason := _refuse_skipping(block, order, returning_others):
                    block.reason = f"masked: {reason}"
                else:
                    block.handling = BlockHandling.SKIPPED
                    assert block.module is not None
                    block.batch_norms = bool(batch_norms_in([plan.run.modules[block.module]]))
        skipping = {
            b.module: b
            for b in self.blocks.values()
            if b.handling is BlockHandling.SKIPPED and b.module is not None
        }
        modules = {path: model.get_submodule(path) for path in skipping}
        if mode != "batch" and skipping:  # row and fixed modes gather by rows
            for path, shared in shared_arguments(model, inputs, modules).items():
                skipping[path].shared = shared
        if mode == "batch" and skipping:  # compiled code decides in torch.cond where it can
            for path, call in run_eval(model, inputs, modules)[1].items():
                skipping[path].cond_refusal = cond_refusal(modules[path], call.args, call.kwargs)
        self._gates: dict[int, LayerGate] = {}
        self.skips: dict[int, LayerSkip] = {}  # the blocks skipped whole, by block index

    def __call__(
        self, attacher: Attacher, attachment: Attachment, rate: float, place: tuple[int, int]
    ) -> DropPath:
        block = self.blocks.get(place[0])
        if block is None or block.handling is BlockHandling.PER_BRANCH:
            return DropPath(rate, self.mode)
        gate = self._gates.get(block.index)
        if gate is None:
            gate = self._gate(attacher, block)
        return BlockDropPath(gate, rate, self.mode)

    def block_at(self, index: int) -> _Block:
        """The block of schedule index ``index``."""
        return self.blocks[index]

    def _gate(self, attacher: Attacher, block: _Block) -> LayerGate:
        assert block.module is not None
        module = self.model.get_submodule(block.module)
        gate = LayerGate(self.mode, self.skip_compute, block.batch_dim or 0)
        handle = module.register_forward_pre_hook(gate, with_kwargs=True)
        if block.handling is BlockHandling.SKIPPED:
            skip = install(module, gate, block.batch_norms, self.gather_batch_norm, block.shared)
            self.skips[block.index] = skip
            skip.conditional = block.cond_refusal == ""
            if block.cond_refusal:
                block.reason = f"compiled batch mode decides in Python: {block.cond_refusal}"
        self._gates[block.index] = gate

        def undo() -> None:
            handle.remove()
            uninstall(module)
            self._gates.pop(block.index, None)

        attacher.on_undo(undo)
        return gate

    def demote(self, index: int, reason: str) -> None:
        """Make a skipping block mask after all: the check at injection failed."""
        skip = self.skips.pop(index)
        uninstall(skip.module)
        block = self.blocks[index]
        block.handling, block.reason = BlockHandling.SHARED, f"masked: {reason}"

    def report(self) -> LayerDropReport:
        blocks = [
            BlockLayerDrop(b.index, b.module or "", len(b.sites), b.handling, b.reason)
            for b in sorted(self.blocks.values(), key=lambda b: b.index)
        ]
        return LayerDropReport(Granularity.BLOCK, self.skip_compute, blocks)


def gates_of(model: nn.Module) -> list[LayerGate]:
    """The block gates in ``model`` (not the gates of parallel sums under branch granularity)."""
    return [
        hook
        for module in model.modules()
        for hook in forward_pre_hooks(module)
        if isinstance(hook, LayerGate) and not isinstance(hook, ResidualGate)
    ]


def remove_layer_drop(model: nn.Module) -> int:
    """Take out every gate pre-hook and skipping forward; returns how many modules had one."""
    count = 0
    for module in model.modules():
        found = uninstall(module) | uninstall_unit(module)
        found |= remove_forward_pre_hooks(module, lambda hook: isinstance(hook, LayerGate)) > 0
        count += found
    return count


def skips_of(model: nn.Module) -> dict[str, LayerSkip]:
    """The skipping forwards installed in ``model``, by module path (counters for tests)."""
    found = {}
    for path, module in model.named_modules():
        skip = vars(module).get("forward")
        if isinstance(skip, LayerSkip):
            found[path] = skip
    return found
