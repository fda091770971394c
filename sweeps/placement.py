"""Comparing this package's placement with a library's own, on shared weights.

A library built with ``drop_path_rate > 0`` puts its drop paths exactly on the residual
branches it chose (at rate 0 it leaves ``nn.Identity`` slots named ``drop_path*``). Forcing
every one of them to output zeros, and every DropPath of this package to drop (rate 1 in train
mode, exact zeros), must give the same outputs, bit for bit, when both sit on the same branches.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from droppath_inject import DropPath

_DROP_PATH_NAME = re.compile(r"drop_?path|stochastic_?depth", re.IGNORECASE)


class _Zeros(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


def _rate(module: nn.Module) -> float:
    return float(getattr(module, "drop_prob", getattr(module, "p", 0.0)) or 0.0)


def library_drop_paths(model: nn.Module, dropping_only: bool = False) -> list[str]:
    """Paths of the library's drop paths and rate-0 slots (not this package's DropPath);
    with ``dropping_only``, the drop paths whose rate is above 0."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, DropPath):
            continue
        slot = type(module) is nn.Identity and _DROP_PATH_NAME.search(path.rpartition(".")[2])
        drop = _DROP_PATH_NAME.search(type(module).__name__) and not slot
        if (drop and (not dropping_only or _rate(module) > 0)) or (slot and not dropping_only):
            found.append(path)
    return found


def our_drop_paths(model: nn.Module, dropping_only: bool = False) -> list[str]:
    """Paths of this package's DropPaths (with ``dropping_only``, those whose rate is above 0)."""
    return [
        p
        for p, m in model.named_modules()
        if isinstance(m, DropPath) and (not dropping_only or m.drop_prob > 0)
    ]


def calls_of(model: nn.Module, paths: list[str], x: Tensor) -> int:
    """How many times the modules at ``paths`` run in one eval forward."""
    calls: list[int] = []
    handles = [
        model.get_submodule(p).register_forward_hook(lambda *_: calls.append(1)) for p in paths
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return len(calls)


@contextmanager
def library_branches_zeroed(model: nn.Module, paths: list[str]) -> Iterator[None]:
    """Every library drop path (and slot) replaced by a module returning zeros."""
    saved = []
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        saved.append((parent, name, getattr(parent, name)))
        setattr(parent, name, _Zeros())
    try:
        yield
    finally:
        for parent, name, module in saved:
            setattr(parent, name, module)


@contextmanager
def our_branches_dropped(model: nn.Module, paths: list[str]) -> Iterator[None]:
    """Eval mode everywhere, but the DropPaths at ``paths`` drop every sample."""
    drops = [model.get_submodule(p) for p in paths]
    saved = [(m, m.drop_prob) for m in drops]
    model.eval()
    for drop in drops:
        drop.drop_prob = 1.0
        drop.train()
    try:
        yield
    finally:
        for drop, rate in saved:
            drop.drop_prob = rate
        model.eval()


def same_placement(ours: nn.Module, native: nn.Module, x: Tensor, dropping_only: bool) -> bool:
    """Whether zeroing the library's branches equals dropping ours (shared weights); with
    ``dropping_only``, only the branches whose rate is above 0 on either side."""
    with torch.no_grad():
        with library_branches_zeroed(native, library_drop_paths(native, dropping_only)):
            expected = native.eval()(x)
        with our_branches_dropped(ours, our_drop_paths(ours, dropping_only)):
            actual = ours(x)
    return _equal(expected, actual)


def _equal(a: object, b: object) -> bool:
    left = [t for t in pytree.tree_leaves(a) if isinstance(t, Tensor)]
    right = [t for t in pytree.tree_leaves(b) if isinstance(t, Tensor)]
    return len(left) == len(right) and all(map(torch.equal, left, right))


def randomize_constant_parameters(model: nn.Module, seed: int = 2) -> None:
    """Undo zero-inits and constant inits (last norms, layer scales near 1e-5, gammas), which
    would let a misplaced branch hide behind a zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.flatten()
            constant = flat.numel() > 1 and bool((flat == flat[0]).all())
            if parameter.ndim <= 1 and (constant or name.endswith("weight")):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif constant:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
