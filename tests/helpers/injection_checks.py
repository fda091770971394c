"""Checks of a correct injection, shared by the synthetic and capture tests.

Every expectation comes from how a model is built (its blocks' ``BRANCHES``/``ADDS``, module
paths) or from the original model run with chosen modules zeroed, never from the package.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from droppath_inject import DropPath, Report, find_residuals, inject_droppath
from helpers import synthetic_models as sm

MAX_DROP = 0.2


@dataclass(frozen=True)
class Expected:
    """One residual block: its path, how many adds it owns, and the modules on its branches."""

    owner: str
    adds: int
    branches: tuple[str, ...]
    skip: str = "identity"


def expect(
    model: nn.Module, owners: Sequence[str], skips: dict[str, str] | None = None
) -> list[Expected]:
    """Expected blocks, in execution order, read from the blocks' own ``BRANCHES``/``ADDS``."""
    skips = skips or {}
    expected = []
    for owner in owners:
        block = model.get_submodule(owner)
        branches = tuple(f"{owner}.{name}" for name in type(block).BRANCHES)
        expected.append(Expected(owner, type(block).ADDS, branches, skips.get(owner, "identity")))
    return expected


def linear_rate(index: int, count: int, max_drop: float = MAX_DROP) -> float:
    """The linear schedule, written out independently of the package."""
    return 0.0 if count == 1 else max_drop * index / (count - 1)


def tensors(outputs: Any) -> list[Tensor]:
    """The tensors of a model output, flattened."""
    if isinstance(outputs, Tensor):
        return [outputs]
    return [t for item in outputs for t in tensors(item)]


def assert_same_outputs(expected: Any, actual: Any) -> None:
    """Bitwise equality of two model outputs."""
    expected, actual = tensors(expected), tensors(actual)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual, strict=True):
        assert e.dtype == a.dtype and torch.equal(e, a)


def eval_outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    """Outputs in eval mode, without gradients."""
    model.eval()
    with torch.no_grad():
        return model(*inputs)


@contextmanager
def zeroed(model: nn.Module, paths: Sequence[str]) -> Iterator[None]:
    """Replace the outputs of the modules at ``paths`` (every tensor in them) by zeros."""
    handles = [
        model.get_submodule(p).register_forward_hook(
            lambda m, a, out: pytree.tree_map_only(Tensor, torch.zeros_like, out)
        )
        for p in paths
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def drop_paths(module: nn.Module) -> list[DropPath]:
    """Every DropPath of the package in ``module``."""
    return [m for m in module.modules() if isinstance(m, DropPath)]


def own_drop_paths(model: nn.Module, owner: str) -> list[DropPath]:
    """The DropPath modules that are direct children of the block at ``owner``."""
    return [m for m in model.get_submodule(owner).children() if isinstance(m, DropPath)]


def dropping_only(model: nn.Module, layers: Sequence[DropPath]) -> nn.Module:
    """Eval mode everywhere except ``layers``, which drop every sample."""
    model.eval()
    for layer in layers:
        layer.train()
        layer.drop_prob = 1.0
    return model


def snapshot(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, Tensor], dict[str, int]]:
    """Module objects by path, state_dict tensors (cloned) and their storage pointers."""
    state = model.state_dict(keep_vars=True)
    return (
        dict(model.named_modules()),
        {k: v.detach().clone() for k, v in state.items()},
        {k: v.data_ptr() for k, v in state.items()},
    )


def assert_unchanged(model: nn.Module, before: tuple[dict, dict, dict]) -> None:
    """Same module objects at the same paths, same state_dict values and storage."""
    modules, values, pointers = before
    after_modules = dict(model.named_modules())
    assert after_modules.keys() == modules.keys()
    assert all(after_modules[k] is modules[k] for k in modules)
    state = model.state_dict(keep_vars=True)
    assert state.keys() == values.keys()
    assert all(torch.equal(state[k], values[k]) for k in values)
    assert all(state[k].data_ptr() == pointers[k] for k in values)
    assert not drop_paths(model)


def assert_report(report: Report, expected: Sequence[Expected], max_drop: float) -> None:
    """Sites, owners, block indices and rates of ``report`` against the ground truth."""
    count = len(expected)
    assert report.num_blocks == count
    want = [
        (e.owner, i, pytest.approx(linear_rate(i, count, max_drop)))
        for i, e in enumerate(expected)
        for _ in range(e.adds)
    ]
    assert [(s.owner, s.block_index, s.rate) for s in report.sites] == want
    skips = [e.skip for e in expected for _ in range(e.adds)]
    for site, skip in zip(report.sites, skips, strict=True):
        assert skip in site.skip, (site, skip)


def check_placement(
    model: nn.Module, original: nn.Module, inputs: tuple[Tensor, ...], expected: Sequence[Expected]
) -> None:
    """Dropping the DropPaths of a block equals zeroing its branch modules in the original."""
    groups = [([e], own_drop_paths(model, e.owner)) for e in expected]
    groups.append((list(expected), drop_paths(model)))
    for blocks, layers in groups:
        saved = [(layer, layer.drop_prob) for layer in layers]
        dropping_only(model, layers)
        with torch.no_grad():
            actual = model(*inputs)
        for layer, rate in saved:
            layer.drop_prob = rate
        model.eval()
        with zeroed(original, [p for e in blocks for p in e.branches]):
            reference = eval_outputs(original, inputs)
        assert_same_outputs(reference, actual)
        # the dropped output differs from the plain one, so the check can tell them apart
        assert not all(
            torch.equal(a, b)
            for a, b in zip(
                tensors(reference), tensors(eval_outputs(original, inputs)), strict=True
            )
        )


def train_step(model: nn.Module, inputs: tuple[Tensor, ...], seed: int = 0) -> tuple[Any, dict]:
    """Outputs and parameter gradients of one train-mode forward/backward under ``seed``."""
    model.train()
    model.zero_grad(set_to_none=True)
    inputs = tuple(x.clone().requires_grad_(x.is_floating_point()) for x in inputs)
    torch.manual_seed(seed)
    outputs = model(*inputs)
    weights = [torch.linspace(-1, 1, t.numel()).reshape(t.shape) for t in tensors(outputs)]
    sum(((t * w).sum() for t, w in zip(tensors(outputs), weights, strict=True)), start=0).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads.update({f"input{i}": x.grad for i, x in enumerate(inputs)})
    return outputs, grads


def assert_same_training(model: nn.Module, original: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    """Train-mode outputs and gradients bitwise equal under the same seed."""
    out_model, grads_model = train_step(model, inputs)
    out_original, grads_original = train_step(original, inputs)
    assert_same_outputs(out_original, out_model)
    assert grads_model.keys() == grads_original.keys()
    for name, grad in grads_original.items():
        other = grads_model[name]
        assert (grad is None) == (other is None), name
        assert grad is None or torch.equal(grad, other), name


def check_injection(
    factory: Callable[[], nn.Module],
    inputs: tuple[Tensor, ...],
    owners: Sequence[str],
    skips: dict[str, str] | None = None,
    *,
    max_drop: float = MAX_DROP,
) -> tuple[nn.Module, Report]:
    """Run every check of a correct injection on ``factory()``, whose blocks are ``owners``."""
    model = sm.randomize_norms(factory())
    expected = expect(model, owners, skips)
    original = copy.deepcopy(model)
    before = snapshot(model)
    reference = eval_outputs(original, inputs)

    dry = find_residuals(model, inputs, max_drop=max_drop)
    assert_unchanged(model, before)
    assert_report(dry, expected, max_drop)

    result, report = inject_droppath(model, max_drop, example_inputs=inputs, return_report=True)
    assert result is model and type(model) is type(original)
    assert all(m.training for m in model.modules())  # the mode the model was in
    assert_report(report, expected, max_drop)
    assert report.verification is not None and report.verification.passed

    # every module is the same object (a drop-path slot aside), and so is every tensor
    modules, _, pointers = before
    after = dict(model.named_modules())
    for path, module in modules.items():
        slot = type(module) is nn.Identity and "drop_path" in path
        assert (after[path] is module) != slot, path
    state = model.state_dict(keep_vars=True)
    assert state.keys() == pointers.keys()
    assert all(state[k].data_ptr() == pointers[k] for k in pointers)

    for index, e in enumerate(expected):
        layers = own_drop_paths(model, e.owner)
        assert len(layers) == e.adds, e.owner
        rate = linear_rate(index, len(expected), max_drop)
        assert all(layer.drop_prob == pytest.approx(rate) for layer in layers)
        assert all(layer.mode == "row" for layer in layers)
    assert len(drop_paths(model)) == sum(e.adds for e in expected)

    assert_same_outputs(reference, eval_outputs(model, inputs))
    check_placement(model, original, inputs, expected)

    at_zero = sm.randomize_norms(factory())
    untouched = copy.deepcopy(at_zero)
    inject_droppath(at_zero, 0.0, example_inputs=inputs)
    assert len(drop_paths(at_zero)) == sum(e.adds for e in expected)
    assert_same_training(at_zero, untouched, inputs)
    return model, report


def check_no_residual(factory: Callable[[], nn.Module], inputs: tuple[Tensor, ...]) -> None:
    """No site reported, nothing injected, nothing changed."""
    model = sm.randomize_norms(factory())
    original = copy.deepcopy(model)
    before = snapshot(model)
    report = find_residuals(model, inputs)
    assert report.sites == [] and report.num_blocks == 0
    _, report = inject_droppath(model, example_inputs=inputs, return_report=True)
    assert report.sites == [] and report.num_blocks == 0
    assert_unchanged(model, before)
    assert_same_outputs(eval_outputs(original, inputs), eval_outputs(model, inputs))


def seeded(build: Callable[[], nn.Module], seed: int = 0) -> Callable[[], nn.Module]:
    """A factory that builds the same weights every time."""

    def factory() -> nn.Module:
        torch.manual_seed(seed)
        return build()

    return factory


def images(channels: int = 3, size: int = 8, batch: int = 2) -> tuple[Tensor]:
    """A fixed random image batch."""
    return (torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1)),)


def tokens(batch: int = 2) -> tuple[Tensor]:
    """A fixed random batch of token sequences."""
    shape = (batch, sm.TOKENS, sm.DIM)
    return (torch.randn(shape, generator=torch.Generator().manual_seed(2)),)


def vectors(batch: int = 2) -> tuple[Tensor]:
    """A fixed random batch of feature vectors."""
    return (torch.randn(batch, sm.DIM, generator=torch.Generator().manual_seed(3)),)


class Wrap(nn.Module):
    """Puts a module one level down, so that its adds are not owned by the model itself."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Any:
        return self.inner(x)
