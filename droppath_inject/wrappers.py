"""Models inside wrappers: ``torch.compile``, ``nn.DataParallel``, ``DistributedDataParallel``.

Injection works on the user's own module inside the wrapper (``_orig_mod``, ``.module``): its
capture and verification runs are plain eager runs of that module, and the wrapper, which
calls it, then runs the drop paths. A module compiled in place (``Module.compile()``) is run
without its compiled call meanwhile. An accelerate-prepared model is the model itself, or one
of these wrappers.

A compiled model keeps code that was compiled before the drop paths existed: Dynamo does not
guard on a module's hook dictionaries while they are empty (``skip_nnmodule_hook_guards``), so
hooks added after a compiled run are never called. The compiled code of the frames that can
hold the model is therefore forgotten after injection (and after ``remove_droppath``): the
``forward`` of every module inside and the resume functions Dynamo made of them at graph
breaks. They are compiled again on the next call. Code is shared by class, so another compiled
model of the same classes recompiles once too; ``torch.compiler.reset()`` would forget all.

A model sharded by FSDP2 (``fully_shard``) is the user's module itself, with its class
changed: it is injected like any other (on every rank, with the same example input, since its
runs gather parameters), though injecting before sharding is the order the docs recommend.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .internals import compiled_call, compiled_module_type, forget_compiled, set_compiled_call


def _parallel_types() -> tuple[type[nn.Module], ...]:
    parallel: tuple[type[nn.Module], ...] = (nn.DataParallel,)
    if torch.distributed.is_available():
        parallel += (nn.parallel.DistributedDataParallel,)
    return parallel


def _unwrap(model: nn.Module) -> tuple[nn.Module, list[object]]:
    """The user's module inside ``model``'s ``torch.compile``, DataParallel and DDP wrappers,
    and what each compiled wrapper calls."""
    compiled_type = compiled_module_type()
    parallel = _parallel_types()
    entries: list[object] = []
    module = model
    while True:
        if compiled_type is not None and isinstance(module, compiled_type):
            # forward, or _forward behind a lazy module's check
            entries += [vars(module)[n] for n in ("forward", "_forward") if n in vars(module)]
            module = module.get_submodule("_orig_mod")
        elif isinstance(module, parallel):
            module = module.get_submodule("module")
        else:
            return module, entries


@contextmanager
def inner_module(model: nn.Module, *, changes: bool = True) -> Iterator[nn.Module]:
    """The user's module inside ``model``'s wrappers, run eagerly in the block: modules compiled
    in place (``Module.compile()``) get their compiled call back after it. With ``changes``,
    the code compiled for the module is forgotten after the block, so that the next compiled
    call sees what the block did."""
    module, entries = _unwrap(model)
    in_place = [(m, call) for m in module.modules() if (call := compiled_call(m)) is not None]
    for m, _ in in_place:
        set_compiled_call(m, None)
    try:
        yield module
    finally:
        for m, call in in_place:
            set_compiled_call(m, call)
        entries += [call for _, call in in_place]
        if changes and entries:
            forget_compiled_code(module, entries)


def _code_of(function: object) -> types.CodeType | None:
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    return code if isinstance(code, types.CodeType) else None


def _frames(module: nn.Module, entries: list[object]) -> set[types.CodeType]:
    """The code of the frames Dynamo may have compiled for ``module``: what each compiled
    wrapper calls (``module.__call__`` or a small function around it, for a module of
    ``torch.nn`` itself) and what that wraps, and the ``forward`` of every module inside."""
    functions: list[object] = []
    for entry in entries:
        function: object | None = entry
        while function is not None:  # Dynamo's wrapper, then what it wraps
            functions.append(function)
            function = getattr(function, "__wrapped__", None)
    for submodule in module.modules():
        functions += [type(submodule).forward, submodule.forward]
    return {code for function in functions if (code := _code_of(function)) is not None}


def forget_compiled_code(module: nn.Module, entries: list[object]) -> None:
    """Drop Dynamo's compiled code for the frames ``module`` runs when called through the
    compiled ``entries``, with the resume functions made of them."""
    forget_compiled(_frames(module, entries))
