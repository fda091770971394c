"""Every private torch internal the package relies on, in one place.

Checked against torch 2.2 through 2.14 (the range ``pyproject.toml`` allows; CI runs 2.14.1).
Each helper says what it stands in for and what to look at when a torch release breaks it.
timm is used through its public API only (``timm.layers.get_notrace_modules``).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree

#: Base class of BatchNorm1d/2d/3d, InstanceNorm and SyncBatchNorm (no public name for it).
NORM_BASE: type[nn.Module] = nn.modules.batchnorm._NormBase

#: Base class of BatchNorm1d/2d/3d and SyncBatchNorm: the norms with batch statistics.
BATCH_NORM_BASE: type[nn.Module] = nn.modules.batchnorm._BatchNorm


def batch_norms_in(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The BatchNorm modules in ``modules`` and their submodules."""
    return [m for module in modules for m in module.modules() if isinstance(m, BATCH_NORM_BASE)]


#: The fused attention ``nn.MultiheadAttention`` calls in eval; a weight-bearing op.
NATIVE_MULTI_HEAD_ATTENTION: Callable[..., Any] = torch._native_multi_head_attention

#: Grouped matrix products (mixture-of-experts layers in transformers 5): weight-bearing ops.
#: ``torch._grouped_mm`` is private and, like ``F.grouped_mm``, absent before torch 2.8.
GROUPED_MATMULS: frozenset[Callable[..., Any]] = frozenset(
    f
    for f in (getattr(torch, "_grouped_mm", None), getattr(nn.functional, "grouped_mm", None))
    if f is not None
)


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of nested tuples, lists and dicts, as torch itself flattens them.

    ``torch.utils._pytree`` is private but is what ``torch.export`` and ``torch.compile`` use, so
    it knows every container torch registers (``torch.return_types``, Hugging Face
    ``ModelOutput`` once transformers registers it).
    """
    return _pytree.tree_leaves(tree)


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """``(leaves, spec)``; ``tree_unflatten(leaves, spec)`` rebuilds the tree."""
    return _pytree.tree_flatten(tree)


def tree_unflatten(leaves: list[Any], spec: Any) -> Any:
    """The tree ``spec`` describes, with ``leaves`` in place of the original ones."""
    return _pytree.tree_unflatten(leaves, spec)


def tree_map_tensors(function: Callable[[Tensor], Any], tree: Any) -> Any:
    """``tree`` with ``function`` applied to each tensor leaf."""
    return _pytree.tree_map_only(torch.Tensor, function, tree)


def version_counter(tensor: Tensor) -> int:
    """``tensor._version``: bumped by every in-place op on the tensor or a view of its storage.

    Not in torch's documented API, but stable since torch 1.x and used by autograd's own checks.
    """
    return int(tensor._version)


#: What ``nn.Module`` keeps of its own in ``__dict__`` besides hooks (each hook dict's name
#: contains "hook"): children, parameters, buffers, and which buffers are non-persistent.
_MODULE_STATE = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


@dataclass(frozen=True)
class TrackedCall:
    """One torch function call seen by a ``TorchFunctionMode``: its tensors in and out."""

    outputs: Any
    operands: list[Tensor]
    produced: list[Tensor]  # tensors in the outputs
    mutated: list[Tensor]  # operands the call changed in place


def call_tracked(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> TrackedCall:
    """Run ``func(*args, **kwargs)``, noting which tensors it read, returned and mutated."""
    operands = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
    versions = [version_counter(t) for t in operands]
    outputs = func(*args, **kwargs)
    produced = [t for t in tree_leaves(outputs) if isinstance(t, Tensor)]
    mutated = [t for t, v in zip(operands, versions, strict=True) if version_counter(t) != v]
    return TrackedCall(outputs, operands, produced, mutated)


def module_state(attributes: dict[str, Any]) -> dict[str, Any]:
    """The entries of a module's ``__dict__`` that make it an ``nn.Module``: children,
    parameters, buffers and every hook dict.

    An injected block (a GraphModule standing for a user's block) is given these entries of the
    block it replaces, so that both share children, storage and hooks; GraphModule's own
    pickling and copying rebuild them, so they are carried over explicitly too.
    """
    return {k: v for k, v in attributes.items() if k in _MODULE_STATE or "hook" in k}


def move_children_and_tensors(source: nn.Module, target: nn.Module, leave_out: set[str]) -> None:
    """Give ``target`` the children (but ``leave_out``), parameters and buffers of ``source``."""
    target._modules = {n: c for n, c in source._modules.items() if n not in leave_out}
    target._parameters = dict(source._parameters)
    target._buffers = dict(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)


def forward_pre_hooks(module: nn.Module) -> list[Any]:
    """The forward pre-hooks registered on ``module`` (``_forward_pre_hooks``), in call order."""
    return list(module._forward_pre_hooks.values())


def remove_forward_pre_hooks(module: nn.Module, predicate: Callable[[Any], bool]) -> int:
    """Remove the forward pre-hooks of ``module`` that ``predicate`` accepts; returns how many.

    As ``remove_forward_hooks``: the hook in ``_forward_pre_hooks`` and its key in
    ``_forward_pre_hooks_with_kwargs``.
    """
    keys = [key for key, hook in module._forward_pre_hooks.items() if predicate(hook)]
    for key in keys:
        del module._forward_pre_hooks[key]
        getattr(module, "_forward_pre_hooks_with_kwargs", {}).pop(key, None)
    return len(keys)


def remove_forward_hooks(module: nn.Module, predicate: Callable[[Any], bool]) -> int:
    """Remove the forward hooks of ``module`` that ``predicate`` accepts; returns how many.

    A ``RemovableHandle`` is the public way, but handles do not survive pickling or deepcopy of
    the model, so the hook dicts are edited the way ``RemovableHandle.remove`` does: the hook in
    ``_forward_hooks`` and its key in ``_forward_hooks_with_kwargs`` and
    ``_forward_hooks_always_called`` (the latter two since torch 2.0 and 2.1).
    """
    keys = [key for key, hook in module._forward_hooks.items() if predicate(hook)]
    for key in keys:
        del module._forward_hooks[key]
        getattr(module, "_forward_hooks_with_kwargs", {}).pop(key, None)
        getattr(module, "_forward_hooks_always_called", {}).pop(key, None)
    return len(keys)


def compiled_module_type() -> type[nn.Module] | None:
    """``torch.compile``'s wrapper of a module (``OptimizedModule``, no public name), or None in
    a build of torch without Dynamo. It holds the user's module as ``_orig_mod``."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:
        return None
    return OptimizedModule


def compiled_call(module: nn.Module) -> Callable[..., Any] | None:
    """What ``module.compile()`` (torch >= 2.2) runs in place of the module's call, or None."""
    call: Callable[..., Any] | None = getattr(module, "_compiled_call_impl", None)
    return call


def set_compiled_call(module: nn.Module, call: Callable[..., Any] | None) -> None:
    """Set the compiled call of ``module``; None runs its own code eagerly."""
    module._compiled_call_impl = call


def _resumes(code: types.CodeType) -> Iterator[types.CodeType]:
    """The resume functions Dynamo generated from ``code`` at graph breaks, and theirs."""
    from torch._dynamo.resume_execution import ContinueExecutionCache

    pending = [code]
    while pending:
        generated = ContinueExecutionCache.cache.get(pending.pop())
        for resume in (generated or {}).values():
            yield resume
            pending.append(resume)


def forget_compiled(codes: Iterable[types.CodeType]) -> None:
    """Drop Dynamo's compiled entries for ``codes`` and for the resume functions it generated
    from them (``ContinueExecutionCache``), so that their next call compiles again.

    ``torch._dynamo.eval_frame.remove_from_cache`` is the one scoped invalidation Dynamo has;
    where it is missing, ``torch.compiler.reset()`` forgets every compiled function instead.
    Checked on torch 2.14 only (``tests/test_wrappers.py`` fails if a release changes it).
    """
    try:
        from torch._dynamo.eval_frame import remove_from_cache
    except ImportError:
        torch.compiler.reset()
        return
    pending = set(codes)
    for code in list(pending):
        pending.update(_resumes(code))
    for code in pending:
        remove_from_cache(code)
