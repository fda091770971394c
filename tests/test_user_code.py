"""Attaching keeps what the user's block does in training, beyond its tensor ops.

Replacing a block by its symbolic trace used to lose these silently (eval outputs stayed
bit-identical, so verification could not tell): a custom autograd Function's backward, no-grad
and autocast regions, activation checkpointing, hooks on non-leaf submodules, Python side
effects, the block's class and methods. Each test compares train-mode behaviour with an
untouched copy of the same model.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import synthetic_models as sm
from helpers.injection_checks import assert_same_outputs, assert_same_training, seeded, tokens
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.resnet import BasicBlock

import droppath_inject.apply
import droppath_inject.verify
from droppath_inject import DropPath, VerificationError, inject_droppath

pytestmark = pytest.mark.usefixtures("single_thread")

DIM = sm.DIM


class DoubleGradient(torch.autograd.Function):
    """The identity forward, a doubled gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad * 2


class FunctionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc(DoubleGradient.apply(self.norm(x)))


class NoGradGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(DIM, DIM)
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            scale = self.gate(x).sigmoid()
        return x + self.fc(x) * scale


class FullPrecisionBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", enabled=False):
            h = self.fc(x.float())
        return x + h.to(x.dtype)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = sm.mlp()
        self.calls = 0
        self.f.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + checkpoint(self.f, x, use_reentrant=False)


class SideEffects(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = sm.mlp()
        self.calls = 0
        self.cache: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        h = self.f(x)
        self.cache = h
        return x + h


def net(block: type[nn.Module], depth: int = 3) -> nn.Module:
    return seeded(lambda: sm.token_net([block() for _ in range(depth)]))()


@pytest.mark.parametrize("block", [FunctionBlock, NoGradGate, Checkpointed, SideEffects])
def test_training_at_rate_zero_is_the_users_code(block: type[nn.Module]) -> None:
    """Outputs and gradients (None where the user's no_grad says so) equal an untouched copy."""
    model = net(block)
    untouched = copy.deepcopy(model)
    _, report = inject_droppath(model, 0.0, example_inputs=tokens(), return_report=True)
    assert len(report.injected) == 3
    assert_same_training(model, untouched, tokens())


def test_autograd_function_backward_is_kept() -> None:
    """The doubled gradient reaches the norm's parameters as the Function says."""
    model, untouched = net(FunctionBlock), net(FunctionBlock)
    inject_droppath(model, 0.0, example_inputs=tokens())
    for m in (model, untouched):
        m(tokens()[0]).sum().backward()
    weight = model.blocks[0].norm.weight.grad
    assert weight is not None and torch.equal(weight, untouched.blocks[0].norm.weight.grad)


def test_no_grad_region_stays_without_gradient() -> None:
    model = net(NoGradGate)
    inject_droppath(model, 0.2, example_inputs=tokens())
    model.train()(tokens()[0]).sum().backward()
    assert all(block.gate.weight.grad is None for block in model.blocks)
    assert all(block.fc.weight.grad is not None for block in model.blocks)


def test_autocast_disabled_region_stays_full_precision() -> None:
    model, untouched = net(FullPrecisionBranch), net(FullPrecisionBranch)
    inject_droppath(model, 0.0, example_inputs=tokens())
    dtypes: list[torch.dtype] = []
    model.blocks[0].fc.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
    outputs = []
    for m in (model, untouched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            outputs.append(m.train()(tokens()[0]))
    assert dtypes == [torch.float32]
    assert_same_outputs(outputs[1], outputs[0])


def test_checkpoint_recomputes_instead_of_storing() -> None:
    """The checkpointed branch runs again in backward, as in the original."""
    model = net(Checkpointed, depth=2)
    inject_droppath(model, 0.2, example_inputs=tokens())
    for block in model.blocks:
        block.calls = 0
    torch.manual_seed(0)
    model.train()(tokens()[0]).sum().backward()
    assert [block.calls for block in model.blocks] == [2, 2]


def test_python_side_effects_still_happen() -> None:
    model = net(SideEffects)
    inject_droppath(model, 0.2, example_inputs=tokens())
    before = [block.calls for block in model.blocks]
    model.train()(tokens()[0])
    assert [block.calls for block in model.blocks] == [n + 1 for n in before]
    assert all(isinstance(block.cache, Tensor) for block in model.blocks)


def test_failed_injection_leaves_real_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed verification restores the model; what the block cached is what it held before
    (a tensor from the user's own run), no Proxy and nothing from injection's runs."""
    model = net(SideEffects)
    with torch.no_grad():
        model(tokens()[0])
    cached = [block.cache for block in model.blocks]
    monkeypatch.setattr(droppath_inject.verify, "outputs_equal", lambda expected, actual: False)
    with pytest.raises(VerificationError):
        inject_droppath(model, 0.2, example_inputs=tokens())
    assert all(type(block.cache) is Tensor for block in model.blocks)
    assert all(b.cache is c for b, c in zip(model.blocks, cached, strict=True))
    assert not any(isinstance(m, DropPath) for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_hooks_on_non_leaf_submodules_fire_and_can_be_removed() -> None:
    model = net(SideEffects)
    calls: list[int] = []
    handle = model.blocks[1].f.register_forward_hook(lambda *_: calls.append(1))
    inject_droppath(model, 0.2, example_inputs=tokens())
    calls.clear()
    model.train()(tokens()[0])
    assert calls == [1]
    handle.remove()
    model(tokens()[0])
    assert calls == [1]


def test_block_under_two_names_gets_one_drop_path() -> None:
    """A block reachable as ``blocks.1`` and ``alias`` is one object: its hook serves both."""
    model = net(SideEffects)
    model.alias = model.blocks[1]
    _, report = inject_droppath(model, 0.2, example_inputs=tokens(), return_report=True)
    assert len(report.injected) == 3
    assert sum(isinstance(m, DropPath) for m in model.alias.modules()) == 1
    dropped = model.alias.f
    drop = next(m for m in model.alias.modules() if isinstance(m, DropPath))
    drop.drop_prob = 1.0
    model.train()
    out = model.alias(tokens()[0])
    assert torch.equal(out, tokens()[0])  # the branch of the aliased block is dropped
    assert dropped is model.blocks[1].f


def test_blocks_keep_their_class_and_methods() -> None:
    """torchvision's BasicBlock stays a BasicBlock (FSDP wrap policies, checkpoint check_fns)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BasicBlock(4, 4), BasicBlock(4, 4))
    inject_droppath(model, 0.1, example_inputs=torch.randn(2, 3, 8, 8))
    assert all(isinstance(model[i], BasicBlock) for i in (1, 2))
    assert type(model[1]).forward is BasicBlock.forward
