"""One keep decision per block, shared by every DropPath on the block's residual branches.

A ``LayerGate`` is a forward pre-hook on the block's module (a transformer layer, a timm
block): when the block is called in training at a rate above 0, it draws the decision once
(``(B,)`` uniforms on the input's device in row mode, one uniform on the CPU in batch mode,
a random permutation's first ``k`` indices on the input's device in fixed mode) and every
``BlockDropPath`` of the block multiplies its branch by that decision's mask. In eval, or
at rate 0, nothing is drawn, so the RNG stream (and so every dropout of the model) stays exactly
as without injection.

The gate is a plain object, not a module: ``state_dict()`` and ``model.modules()`` do not
change. It is reached from its hook and from its DropPaths, so ``torch.save`` and
``copy.deepcopy`` keep them sharing one gate. Under ``torch.utils.checkpoint`` the decision
stays the same on recompute: either the hook runs inside the checkpoint and redraws from the
restored RNG state, or it runs outside and the stored decision is read again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import DropPathInjectError
from .internals import tree_leaves
from .layers import DropPath, Mode, fixed_rows, fixed_scale

if TYPE_CHECKING:
    from .branch_rows import BranchRows


def _first_tensor(args: Any, kwargs: Any) -> Tensor | None:
    for leaf in tree_leaves((args, kwargs)):
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return leaf
    return None


class LayerGate:
    """The shared keep decision of one block (see the module docstring).

    ``scale`` is what the block's DropPaths multiply by: ``(B,)`` or ``(1,)`` float32 values,
    0 for dropped and ``1 / keep`` (or 1) for kept samples; None when nothing is dropped.
    ``members`` are the block's DropPaths, whose common rate the gate draws at. In fixed mode
    ``rows`` holds the kept samples' indices (``k`` of them, a static count), else None.
    ``batch`` and ``device`` are those of the batch the decision was drawn for. ``forced``, set
    by the check at injection, gives a ``(B,)`` keep mask for a batch size in place of a draw.
    """

    batch_dim: int = 0  # the dimension of the block's first tensor argument holding the samples

    def __init__(
        self, mode: Mode, skip_compute: bool = False, batch_dim: int = 0, lazy: bool = False
    ) -> None:
        self.mode = mode
        self.lazy = lazy  # draw when first read (``decision``), not in the pre-hook
        self.batch_dim = batch_dim
        self.skip_compute = skip_compute  # how the injection that made it was asked to run
        self.members: list[BlockDropPath] = []
        self.scale: Tensor | None = None
        self.rows: Tensor | None = None
        self.batch = 0
        self.device = torch.device("cpu")
        self.forced: Callable[[int], Tensor] | None = None
        self.pending = False  # a lazy gate's decision for this call is not drawn yet

    @property
    def drop_prob(self) -> float:
        """The block's rate: its DropPaths share it (``set_drop_rates`` sets them together)."""
        return max((m.drop_prob for m in self.members), default=0.0)

    def active(self) -> bool:
        """A decision is needed: some DropPath of the block trains at a rate above 0 (their
        own mode decides, as for a DropPath that draws for itself)."""
        return any(m.training and m.drop_prob > 0.0 for m in self.members)

    def decision(self) -> Tensor | None:
        """The scale of the call in flight, drawn now if the gate is lazy and has not yet."""
        if self.pending:
            self.pending = False
            self.draw()
        return self.scale

    def draw(self) -> None:
        """Draw a new decision for a batch of ``batch`` samples on ``device``."""
        keep = 1.0 - self.drop_prob
        scale_by_keep = all(m.scale_by_keep for m in self.members)
        batch, device = self.batch, self.device
        if self.forced is not None:
            self._force(self.forced(batch).to(device), scale_by_keep)
            return
        if self.mode == "fixed":
            self.rows = fixed_rows(batch, self.drop_prob, device)
            value = fixed_scale(batch, self.rows.shape[0], scale_by_keep)
            self.scale = torch.zeros(batch, device=device).index_fill_(0, self.rows, value)
            return
        # batch mode on the CPU: skipping can read it without a device sync
        uniform = torch.rand(batch, device=device) if self.mode == "row" else torch.rand(1)
        scale = (uniform < keep).float()
        self.scale = scale / keep if scale_by_keep and keep > 0.0 else scale

    def _force(self, keep_mask: Tensor, scale_by_keep: bool) -> None:
        """Take ``keep_mask`` as the decision, scaled as a draw keeping those rows would be."""
        kept = int(keep_mask.sum())
        if self.mode == "fixed":
            self.rows = keep_mask.nonzero().squeeze(1)
            value = fixed_scale(self.batch, kept, scale_by_keep)
        else:
            keep = 1.0 - self.drop_prob
            value = 1.0 / keep if scale_by_keep and keep > 0.0 else 1.0
        if self.mode == "batch":
            keep_mask = keep_mask[:1].cpu()
        self.scale = keep_mask.float() * value

    def __call__(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        self.scale = self.rows = None
        self.pending = False
        if not self.active():
            return
        reference = _first_tensor(args, kwargs)
        if reference is None:
            return
        self.batch, self.device = reference.shape[self.batch_dim], reference.device
        if self.lazy:
            self.pending = True
        else:
            self.draw()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        # a decision belongs to one forward, not to a checkpoint
        state["scale"] = state["rows"] = state["forced"] = None
        state["pending"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.batch, self.device, self.forced = 0, torch.device("cpu"), None
        self.lazy = self.pending = False
        vars(self).update(state)


class ResidualGate(LayerGate):
    """The shared decision of one residual's DropPaths under ``granularity="branch"``: the
    terms of a parallel sum (attention and MLP of a parallel block), or a branch that skips
    its dropped rows (its units need the decision before the branch runs). A pre-hook on the
    module owning the add, or on the one enclosing the whole branch, as a ``LayerGate`` is
    on its block."""


class BlockDropPath(DropPath):
    """A DropPath that follows its block's ``LayerGate`` instead of drawing its own decision."""

    gate: LayerGate  # a plain attribute (a LayerGate is no module), shared with the block
    branch_rows: BranchRows | None = None  # set where the branch runs on the kept rows only

    def __init__(self, gate: LayerGate, drop_prob: float = 0.0, mode: Mode = "row") -> None:
        super().__init__(drop_prob, mode)
        self.gate = gate
        gate.members.append(self)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        scale = self.gate.decision()
        if scale is None:
            return x
        if self.branch_rows is not None:
            placed = self.branch_rows.put_back(x)
            if placed is not None:
                return placed
        if scale.shape[0] not in (1, x.shape[self.batch_dim]):
            raise DropPathInjectError(
                f"a block's keep decision covers {scale.shape[0]} samples but its branch holds "
                f"{x.shape[self.batch_dim]} along dimension {self.batch_dim}: the block was "
                "called with a different batch than the example input showed"
            )
        shape = [1] * x.ndim
        shape[self.batch_dim] = scale.shape[0]
        return x * scale.to(device=x.device, dtype=x.dtype).view(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, decision=block"
