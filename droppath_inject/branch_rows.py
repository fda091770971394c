"""Running a residual branch on its kept rows only, through its own module calls.

``branch_skip`` names a branch's *units*, its outermost module calls. Each gets an instance
``forward`` (a ``BranchUnit``, in front of the class's; hooks still run) that reads the
decision of the branch's gate (``BranchRows``):

- all rows kept, or eval, or rate 0: the unit runs as written;
- some rows dropped: the unit's per-sample arguments from outside the branch (the fork, an
  attention mask: first dimension the batch, not computed from the model's state alone) are
  gathered to the kept rows; arguments computed in the branch hold them already. The branch's
  DropPath (``BlockDropPath``) scales the kept rows and puts them back in place, zeros
  elsewhere (``BranchRows.put_back``). Gathered rows and zeros keep a channels_last layout;
- every row dropped: no unit runs. A unit returns an empty output like the one it gives for
  arguments shaped the same (learned once per shape from one row, in eval mode, without
  gradients; the check at injection learns the example's); the DropPath returns zeros
  connected to the units' parameters (``0 * p[0]``), the zero gradients the mask gives them.

In row and fixed modes a branch holding a training BatchNorm masks unless
``gather_batch_norm`` (its statistics would come from the kept rows). A Hugging Face cache
that the kept rows can fill is passed on; any other argument that cannot be split by rows
makes the decision run masked, if no unit has gathered yet, else raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DropPathInjectError, DropPathWarning
from .instance_forward import InstanceForward, previous_forward, shadow, unshadow
from .internals import batch_norms_in, tree_flatten, tree_map_tensors
from .layer_skip import zero_term
from .layers import Mode
from .python_state import python_state_kept, training_mode
from .row_caches import fillable_by_rows, is_cache, layer_index
from .row_split import Refused, gather_rows, is_plain, split_arguments, zero_rows_like


class BranchRows:
    """The kept rows of one branch for the decision in flight, shared by its units and its
    DropPaths. ``enabled`` off runs the same decisions masked (the check at injection)."""

    def __init__(
        self, gate: Any, units: Sequence[nn.Module], mode: Mode, gather_batch_norm: bool
    ) -> None:
        self.gate = gate
        self.units = list(units)
        self.batch_norms = batch_norms_in(units)
        self.mode = mode
        self.gather_batch_norm = gather_batch_norm
        self.enabled = True
        self.one_row_when_dropped = False  # its code fails on an empty batch: run one row
        self._decision: Tensor | None = None
        self._rows: Tensor | None = None
        self._gathering = False  # a unit has gathered rows for the decision in flight
        self.skipped_calls = 0  # training calls that ran no unit
        self.gathered_calls = 0  # training calls that ran the units on some rows
        self.masked_calls = 0  # training calls that ran masked instead (``last_refusal``)
        self.last_refusal = ""

    def reset_counts(self) -> None:
        self.skipped_calls = self.gathered_calls = self.masked_calls = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        state["_decision"] = state["_rows"] = None
        state["_gathering"] = False
        return state

    def rows(self) -> Tensor | None:
        """The kept rows' indices for the decision in flight; None: run every row."""
        scale = self.gate.decision()
        if scale is None or not self.enabled:
            return None
        if scale is not self._decision:
            self._decision, self._gathering = scale, False
            self._rows = self._decide(scale)
            if self.one_row_when_dropped and self._rows is not None and not self._rows.shape[0]:
                self._rows = torch.zeros(1, dtype=torch.long, device=self.gate.device)
        return self._rows

    def _decide(self, scale: Tensor) -> Tensor | None:
        gathered_norms = self.mode == "batch" or self.gather_batch_norm
        if not gathered_norms and any(m.training for m in self.batch_norms):
            return None
        batch = self.gate.batch
        if self.mode == "fixed":
            rows: Tensor | None = self.gate.rows
            assert rows is not None
            return None if rows.shape[0] == batch else rows
        if self.mode == "batch" or scale.shape[0] == 1:
            if bool(scale[0] > 0):
                return None
            return torch.empty(0, dtype=torch.long, device=self.gate.device)
        kept = scale.nonzero().squeeze(1)
        return None if kept.shape[0] == batch else kept

    def gathering(self) -> None:
        """A unit is about to run on the kept rows (count the call once)."""
        if not self._gathering:
            self._gathering = True
            assert self._rows is not None
            if self._rows.shape[0]:
                self.gathered_calls += 1
            else:
                self.skipped_calls += 1

    def refuse(self, unit: nn.Module, reason: str) -> None:
        """A unit cannot split its arguments: mask this decision, if nothing was gathered."""
        if self._gathering:
            raise DropPathInjectError(
                f"skip_compute: {type(unit).__name__} got an argument that cannot be split by "
                f"rows ({reason}) after the branch's first units ran on the kept rows; pass "
                "use_cache=False in training, or inject with skip_compute=False"
            )
        if not self.masked_calls:
            warnings.warn(
                f"a branch through {type(unit).__name__} runs masked, not on the kept rows "
                f"({reason})",
                DropPathWarning,
                stacklevel=4,
            )
        self.masked_calls += 1
        self.last_refusal = reason
        self._rows = None

    def put_back(self, x: Tensor) -> Tensor | None:
        """The DropPath's output for ``x``, the branch run on the kept rows: scaled kept rows in
        place, zeros elsewhere; None when ``x`` holds every row (the mask applies)."""
        rows = self._rows if self._gathering else None
        batch = self.gate.batch
        if rows is None or x.shape[0] != rows.shape[0] or x.shape[0] == batch:
            return None
        scale = self.gate.scale
        out = zero_rows_like(x, batch)
        if rows.shape[0]:
            kept_scale = scale.to(x.device).index_select(0, rows).to(x.dtype)
            kept = x * kept_scale.view(-1, *([1] * (x.ndim - 1)))
            return out.index_copy(0, rows, kept)
        zero = zero_term(self.units)
        return out if zero is None else out + zero.to(x.dtype)


def _without_caches(value: Any) -> Any:
    """``value`` with the caches among its arguments (or their elements) replaced by None,
    walking the containers ``row_split.split`` walks (a cache may be a pytree node)."""
    if is_cache(value):
        return None
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        return type(value)(_without_caches(v) for v in value)
    if isinstance(value, dict):
        return {k: _without_caches(v) for k, v in value.items()}
    return value


def _one_row(tensor: Tensor) -> Tensor:
    """A value of the branch holding no rows, as one row of zeros (for its shape only)."""
    if tensor.ndim and tensor.shape[0] == 0:
        return zero_rows_like(tensor, 1)
    return tensor


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What an empty call's output depends on: the arguments' structure, their shapes past the
    batch, dtypes and plain values."""
    leaves, spec = tree_flatten((args, kwargs))
    described = tuple(
        (tuple(v.shape[1:]), v.dtype, v.device)
        if isinstance(v, Tensor)
        else v
        if is_plain(v)
        else type(v)
        for v in leaves
    )
    return (str(spec), described)


class BranchUnit(InstanceForward):
    """The instance ``forward`` of one unit of a branch that runs on its kept rows."""

    def __init__(
        self,
        module: nn.Module,
        branch: BranchRows,
        previous: Callable[..., Any] | None,
        shared: frozenset[int | str],
    ) -> None:
        super().__init__(module, previous)
        self.branch = branch
        self.shared = shared  # argument positions and keywords holding the model's state
        self.layer_index = layer_index(module)
        self.empty: dict[tuple[Any, ...], Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        state["empty"] = {}
        return state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rows = self.branch.rows()
        if rows is None:
            return self.run(*args, **kwargs)
        if not rows.shape[0]:
            key = _signature(args, kwargs)
            if key not in self.empty:
                self.empty[key] = self._empty_output(args, kwargs)
            self.branch.gathering()
            return self.empty[key]
        try:
            inner_args, inner_kwargs = self._split(args, kwargs, rows)
        except Refused as refusal:
            self.branch.refuse(self.module, str(refusal))
            return self.run(*args, **kwargs)
        self.branch.gathering()
        return self.run(*inner_args, **inner_kwargs)

    def _split(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], rows: Tensor
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        batch = self.branch.gate.batch

        def take(value: Tensor) -> Tensor:
            # computed in the branch (kept rows already), broadcast, or no batch: as it is
            if value.ndim == 0 or value.shape[0] != batch:
                return value
            return gather_rows(value, rows)

        fillable = partial(fillable_by_rows, index=self.layer_index)
        return split_arguments(args, kwargs, self.shared, take, fillable)

    def _empty_output(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What the unit returns for no rows, learned once per argument shape: its output for
        one row (the first sample; zeros for values of the branch, which hold none), cut to
        none, computed in eval mode, without gradients, RNG draws or changes to its Python
        state (code reshaping with ``-1`` fails on an empty batch). A cache argument is left
        out (``None``): the one row is not written into it, and a skipped branch writes nothing,
        as a skipped layer does (only a cache that holds nothing for the layer yet is passed)."""
        gate = self.branch.gate
        first = torch.zeros(1, dtype=torch.long, device=gate.device)
        args, kwargs = _without_caches(args), _without_caches(kwargs)
        inner_args, inner_kwargs = tree_map_tensors(_one_row, self._split(args, kwargs, first))
        devices = [gate.device] if gate.device.type == "cuda" else []
        with (
            python_state_kept(self.module),
            training_mode(self.module, False),
            torch.no_grad(),
            torch.random.fork_rng(devices=devices),
        ):
            output = self.run(*inner_args, **inner_kwargs)
        return tree_map_tensors(lambda t: t[:0] if t.ndim and t.shape[0] == 1 else t, output)


def install(
    module: nn.Module, branch: BranchRows, shared: frozenset[int | str] = frozenset()
) -> BranchUnit:
    """Put a ``BranchUnit`` in front of ``module.forward``; ``uninstall`` takes it out."""
    unit = BranchUnit(module, branch, previous_forward(module), shared)
    shadow(module, unit)
    return unit


def uninstall(module: nn.Module) -> bool:
    """Remove a ``BranchUnit`` from ``module`` (restoring an earlier instance forward)."""
    return unshadow(module, BranchUnit)


def units_of(model: nn.Module) -> dict[str, BranchUnit]:
    """The branch units installed in ``model``, by module path."""
    return {
        path: vars(m)["forward"]
        for path, m in model.named_modules()
        if isinstance(vars(m).get("forward"), BranchUnit)
    }
