"""Injection runs the user's forward (capture, verification); the Python attributes that forward
changes come back as they were: after a success, a failed verification and a Ctrl-C."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import droppath_inject.verify
from droppath_inject import DropPath, VerificationError, inject_droppath

pytestmark = pytest.mark.usefixtures("single_thread")


class Stateful(nn.Module):
    """A residual block that counts its calls, caches its branch, logs into a list and a dict,
    and can be told to raise KeyboardInterrupt (a Ctrl-C arriving while it runs)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.calls = 0
        self.history: list[int] = []
        self.seen: dict[str, int] = {}
        self.interrupt = False

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.history.append(self.calls)
        self.seen["batch"] = x.shape[0]
        h = self.f(x)
        self.last = h  # not set before the first call
        if self.interrupt:
            raise KeyboardInterrupt
        return x + h


class Net(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Stateful(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def model_and_state() -> tuple[Net, Tensor, list[dict[str, Any]]]:
    """A model that has run once already (the first block's cache is set), its input, and a
    deep copy of each block's plain attributes."""
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 8)
    with torch.no_grad():
        model.blocks[0](x)
    return model, x, [attributes(block) for block in model.blocks]


def attributes(block: nn.Module) -> dict[str, Any]:
    names = ("calls", "history", "seen", "interrupt", "last")
    return {n: copy.deepcopy(vars(block)[n]) for n in names if n in vars(block)}


def assert_unchanged(model: Net, before: list[dict[str, Any]]) -> None:
    after = [attributes(block) for block in model.blocks]
    assert [d.keys() for d in after] == [d.keys() for d in before]  # no cache added
    for now, then in zip(after, before, strict=True):
        for name, value in then.items():
            if isinstance(value, Tensor):
                assert torch.equal(now[name], value), name
            else:
                assert now[name] == value, name


def test_after_a_successful_injection() -> None:
    model, x, before = model_and_state()
    lists = [block.history for block in model.blocks]
    inject_droppath(model, 0.2, example_inputs=x)
    assert sum(isinstance(m, DropPath) for m in model.modules()) == 3
    assert_unchanged(model, before)
    assert all(b.history is same for b, same in zip(model.blocks, lists, strict=True))
    model.train()(x)  # the user's own runs still count
    assert [block.calls for block in model.blocks] == [d["calls"] + 1 for d in before]


def test_after_a_failed_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, before = model_and_state()
    monkeypatch.setattr(droppath_inject.verify, "outputs_equal", lambda expected, actual: False)
    with pytest.raises(VerificationError):
        inject_droppath(model, 0.2, example_inputs=x)
    assert not any(isinstance(m, DropPath) for m in model.modules())
    assert_unchanged(model, before)


def test_after_a_keyboard_interrupt_during_capture() -> None:
    """Ctrl-C in the last block: the blocks before it have already run (and changed)."""
    model, x, before = model_and_state()
    model.blocks[-1].interrupt = True
    before[-1]["interrupt"] = True
    with pytest.raises(KeyboardInterrupt):
        inject_droppath(model, 0.2, example_inputs=x)
    assert not any(isinstance(m, DropPath) for m in model.modules())
    assert_unchanged(model, before)
