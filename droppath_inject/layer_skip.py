"""Not running a dropped block: an instance-level ``forward`` in front of the block's own.

``module.forward`` is shadowed on the instance by a ``LayerSkip`` (``vars(module)["forward"]``):
``nn.Module.__call__`` still runs every hook (the block's ``LayerGate`` draws the decision,
FSDP2 gathers the parameters), then the ``LayerSkip``, which calls the class's ``forward``
(the user's code, unchanged; a ``forward`` already set on the instance is called instead and
put back on removal) unless the decision says otherwise:

- batch mode, block dropped: the block's first positional argument (the hidden state) is
  returned, in the output structure the block was seen to return (a tensor, or a tuple whose
  first element is the hidden state and whose others are None);
- row mode: the block runs on the kept rows only (every per-sample tensor argument gathered,
  positional and keyword; ``shared`` names those the example run computed from the model's
  state alone, never gathered), and the kept rows of its output replace those of the input in a
  new tensor. A Hugging Face ``DynamicCache`` that holds nothing yet for the block's layer, in
  a forward that records gradients (a training step while ``config.use_cache`` is on, as the
  models have it by default), is passed on as it is: the kept rows fill it. Any other cache
  runs the block masked.

The class, ``state_dict()`` keys and hooks stay; ``torch.save`` and ``copy.deepcopy`` carry the
wrapper (a module-level class). A skipped block's parameters get zero gradients through a
``0 * p[0]`` term, exactly what the mask gives them, so DDP needs no ``find_unused_parameters``
and every rank reduces every gradient even when ranks decide differently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .block_gate import LayerGate
from .errors import DropPathInjectError, DropPathWarning
from .instance_forward import InstanceForward, previous_forward, shadow, unshadow
from .internals import tree_leaves
from .row_caches import fillable_by_rows, layer_index
from .row_split import Refused, gather_rows, is_plain, split_arguments


def _per_sample(value: Tensor, rows: Tensor, batch: int) -> Tensor:
    """A block argument's kept rows: tensors with the batch first are gathered, broadcast ones
    (first dimension 1) and ones without the batch size kept; a layout that is unclear (the
    batch size elsewhere too) refuses."""
    if value.ndim == 0 or (value.shape[0] == 1 and batch > 1):
        return value
    if value.shape[0] != batch:
        if value.ndim == 1 or batch not in value.shape:
            return value  # no batch dimension: a position index, a (T, T) mask
        raise Refused(f"a tensor of shape {tuple(value.shape)} has the batch size elsewhere")
    if batch in value.shape[1:] or value.ndim == 1:
        raise Refused(f"a tensor of shape {tuple(value.shape)} is ambiguous")
    return value.index_select(0, rows)


def _traceable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``torch.cond`` may take a call with these arguments: tensors and plain values
    only (a cache the block writes to is a side effect a branch may not have)."""
    return all(isinstance(leaf, Tensor) or is_plain(leaf) for leaf in tree_leaves((args, kwargs)))


def _hidden_state(output: Any) -> Tensor:
    """The hidden state a block returns: its output, or the first element of a tuple of them."""
    return output if isinstance(output, Tensor) else output[0]


def zero_term(modules: Iterable[nn.Module]) -> Tensor | None:
    """``0 * sum(p[0])`` over the trainable parameters: zero gradients, as the mask gives."""
    if not torch.is_grad_enabled():
        return None
    firsts = [
        p.reshape(-1)[:1]
        for module in modules
        for p in module.parameters()
        if p.requires_grad and p.numel()
    ]
    if not firsts:
        return None
    return torch.cat([f.to(firsts[0].dtype) for f in firsts]).sum() * 0.0


def _fsdp_inner(module: nn.Module) -> str | None:
    """A submodule sharded by FSDP2 on its own, which a skipped block would leave ungathered."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - builds without distributed
        return None
    for path, sub in module.named_modules():
        if path and isinstance(sub, FSDPModule):
            return path
    return None


class LayerSkip(InstanceForward):
    """The instance ``forward`` of a block that may be skipped (see the module docstring).

    ``structure`` is the output seen on the last full call: None (a tensor), or the length of
    a tuple whose first element is the hidden state. Until one is seen, calls run masked.
    ``gather_batch_norm`` lets row mode gather blocks holding training BatchNorms.
    """

    def __init__(
        self,
        module: nn.Module,
        gate: LayerGate,
        previous: Callable[..., Any] | None,
        batch_norms: bool,
        gather_batch_norm: bool,
        shared: frozenset[int | str] = frozenset(),
    ) -> None:
        super().__init__(module, previous)
        self.gate = gate
        self.batch_norms = batch_norms
        self.gather_batch_norm = gather_batch_norm
        self.shared = shared  # positions and keywords of arguments never gathered by rows
        self.layer_index = layer_index(module)  # where its attention writes to a cache
        self.structure: int | None | bool = False  # False: not seen yet
        self.skipped_calls = 0  # training calls that did not run the block
        self.gathered_calls = 0  # training calls that ran it on some rows only
        self.masked_calls = 0  # training calls that had to run masked (``last_refusal``)
        self.conditional = False  # compiled batch mode decides in torch.cond (``cond_refusal``)
        self.conditional_calls = 0  # compiled batch-mode calls deciding inside torch.cond
        self.last_refusal = ""
        self.enabled = True  # off: the same decisions run masked (the check at injection)

    def reset_counts(self) -> None:
        self.skipped_calls = self.gathered_calls = self.masked_calls = 0
        self.conditional_calls = 0

    def _full(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        output = self.run(*args, **kwargs)
        if isinstance(output, Tensor):
            self.structure = None
        elif (
            isinstance(output, tuple)
            and output
            and isinstance(output[0], Tensor)
            and all(o is None for o in output[1:])
        ):
            self.structure = len(output)
        else:
            self.structure = True  # anything else is never skipped
        return output

    def _wrap(self, hidden: Tensor) -> Any:
        if self.structure is None:
            return hidden
        assert isinstance(self.structure, int)
        return (hidden,) + (None,) * (self.structure - 1)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        scale = self.gate.scale  # None unless the block's DropPaths train at a rate above 0
        if not self.enabled or scale is None or not args:
            return self._full(args, kwargs)
        self._check_wrappers()
        hidden = args[0]
        if self.structure is True or self.structure is False or not isinstance(hidden, Tensor):
            return self._full(args, kwargs)
        if self.gate.mode == "fixed":
            return self._fixed(hidden, args, kwargs)
        if self.gate.mode == "batch" or scale.shape[0] == 1:
            if self.conditional and torch.compiler.is_compiling() and _traceable(args, kwargs):
                self.conditional_calls += 1
                return self._wrap(self._conditional(hidden, scale, args, kwargs))
            if bool(scale[0] > 0):
                return self._full(args, kwargs)
            return self._wrap(self._skipped(hidden))
        return self._rows(hidden, scale, args, kwargs)

    def _check_wrappers(self) -> None:
        """Raise where skipping would leave ranks in different collectives. Checked on every
        training call, skipped or not, so that every rank raises at the same call."""
        inner = _fsdp_inner(self.module)
        if inner is not None:
            raise DropPathInjectError(
                f"skip_compute cannot skip {type(self.module).__name__}: its submodule {inner} "
                "is sharded by fully_shard on its own and would not be gathered on this rank "
                "while others gather it; fully_shard the whole block, or pass skip_compute=False"
            )

    def _skipped(self, hidden: Tensor) -> Tensor:
        self.skipped_calls += 1
        return self._dropped(hidden)

    def _dropped(self, hidden: Tensor) -> Tensor:
        zero = zero_term([self.module])
        return hidden.clone() if zero is None else hidden + zero.to(hidden.dtype)

    def _conditional(
        self, hidden: Tensor, scale: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Tensor:
        """Batch mode under torch.compile: ``torch.cond`` on the decision, no graph break.

        Both branches return the hidden state (same shape and dtype: the block is residual);
        the other arguments are closed over, which dynamo lifts into the branches."""

        def kept(inner: Tensor) -> Tensor:
            return _hidden_state(self.run(inner, *args[1:], **kwargs))

        result: Tensor = torch.cond(scale[0] > 0, kept, self._dropped, (hidden,))
        return result

    def _fixed(self, hidden: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Fixed-count rows: ``k`` is known from the batch size and rate before the draw, so
        the gathered shapes are static and nothing reads the decision back to the host."""
        rows = self.gate.rows
        assert rows is not None
        if rows.shape[0] == hidden.shape[0]:
            return self._full(args, kwargs)
        if rows.shape[0] == 0:
            return self._wrap(self._skipped(hidden))
        return self._on_rows(hidden, rows, args, kwargs)

    def _refuse(self, reason: str) -> None:
        """Count a call that runs masked instead of on the kept rows; warn on the first."""
        if not self.masked_calls:
            warnings.warn(
                f"{type(self.module).__name__} runs masked, not on the kept rows ({reason})",
                DropPathWarning,
                stacklevel=4,
            )
        self.masked_calls += 1
        self.last_refusal = reason

    def _rows(
        self, hidden: Tensor, scale: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        batch = hidden.shape[0]
        kept = scale.nonzero().squeeze(1)
        if kept.numel() == batch:
            return self._full(args, kwargs)
        if kept.numel() == 0:
            return self._wrap(self._skipped(hidden))
        return self._on_rows(hidden, kept, args, kwargs)

    def _on_rows(
        self, hidden: Tensor, kept: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run the block on the ``kept`` rows and put them back into a copy of ``hidden``."""
        scale = self.gate.scale
        assert scale is not None
        batch = hidden.shape[0]
        if self.batch_norms and not self.gather_batch_norm:
            self._refuse("training BatchNorm: batch statistics would change")
            return self._full(args, kwargs)
        fillable = partial(fillable_by_rows, index=self.layer_index)
        take = partial(_per_sample, rows=kept, batch=batch)
        try:
            rest, inner_kwargs = split_arguments(args, kwargs, {0, *self.shared}, take, fillable)
        except Refused as refusal:
            self._refuse(str(refusal))
            return self._full(args, kwargs)
        self.gathered_calls += 1
        self.gate.scale = scale.index_select(0, kept)  # what the block's DropPaths now see
        output = self.run(gather_rows(hidden, kept), *rest[1:], **inner_kwargs)
        kept_out = output if isinstance(output, Tensor) else output[0]
        dtype = torch.promote_types(hidden.dtype, kept_out.dtype)
        # out of place: a new tensor, the input itself is left as it was
        return self._wrap(hidden.to(dtype).index_copy(0, kept, kept_out.to(dtype)))


def cond_refusal(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """Why ``torch.cond`` cannot hold a training call of ``module`` like this one ('' if it can).

    A branch of ``torch.cond`` may have no Python side effects (a hook counting calls, a
    context variable set by a wrapped ``forward``), and dynamo raises rather than breaking the
    graph when it meets one, so each block is traced once at injection: ``torch.cond`` run
    eagerly on the example call, in training mode and with the RNG state restored after.
    """
    hidden = args[0] if args else None
    if not isinstance(hidden, Tensor) or not _traceable(args, dict(kwargs)):
        return "the call has arguments torch.cond cannot take"

    def kept(inner: Tensor) -> Tensor:
        return _hidden_state(module.forward(inner, *args[1:], **kwargs))

    modes = [(m, m.training) for m in module.modules()]
    module.train()
    devices = [hidden.device] if hidden.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.cond(torch.ones((), dtype=torch.bool), kept, torch.clone, (hidden,))
    except Exception as error:  # dynamo's refusals have several types; any means "no"
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return f"{type(error).__name__}: {' '.join(lines)[:300]}"
    finally:
        for sub, training in modes:
            sub.training = training
    return ""


def install(
    module: nn.Module,
    gate: LayerGate,
    batch_norms: bool,
    gather_batch_norm: bool,
    shared: frozenset[int | str] = frozenset(),
) -> LayerSkip:
    """Shadow ``module.forward`` with a ``LayerSkip``; ``uninstall`` puts it back."""
    skip = LayerSkip(module, gate, previous_forward(module), batch_norms, gather_batch_norm, shared)
    shadow(module, skip)
    return skip


def uninstall(module: nn.Module) -> bool:
    """Remove a ``LayerSkip`` from ``module`` (restoring an earlier instance forward)."""
    return unshadow(module, LayerSkip)
