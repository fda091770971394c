"""Proving at injection that skipping computes what the mask does, as eval is proved.

With ``skip_compute=True`` each decision pattern below runs one training forward and
backward of the example input twice, with every branch masked and with the branches (or
layers) running on their kept rows, the decisions forced (``LayerGate.forced``) so that both
runs drop the same rows. Outputs and gradients (of the parameters and of floating-point
inputs) must agree within ``TOLERANCE`` times each tensor's largest magnitude (at least
``FLOOR`` of the largest of all): kernels may round a smaller batch differently. Patterns:
some rows dropped, some kept (the odd rows kept; row and fixed modes, batch of 2 or more),
and every row dropped. The runs keep every module in eval mode except the DropPaths (dropout
would draw differently for fewer rows, batch statistics differ by design), under a forked
RNG, and put the modules' Python attributes back. Where the runs differ, or skipping raises,
each branch or layer is tried alone, and those that fail mask, with the reason. Cost: 2
forwards and backwards per pattern (so 4, or 2 in batch mode, or for a batch of 1), and 1
more per branch or layer when something fails.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .block_gate import LayerGate
from .branch_drops import BranchDrops, Skipper
from .inputs import ExampleInputs
from .internals import forward_pre_hooks, tree_leaves, tree_map_tensors
from .layers import DropPath
from .python_state import python_state_kept, training_mode
from .report import SkipCheck

TOLERANCE = 1e-4
FLOOR = 1e-3


@dataclass(frozen=True)
class _Result:
    values: list[Tensor | None]  # float outputs, then gradients
    others: list[Any]  # non-float output leaves, compared exactly


def _gates(model: nn.Module) -> list[LayerGate]:
    return [
        hook
        for module in model.modules()
        for hook in forward_pre_hooks(module)
        if isinstance(hook, LayerGate)
    ]


@contextmanager
def _forced(gates: Sequence[LayerGate], keep: Callable[[int], Tensor]) -> Iterator[None]:
    for gate in gates:
        gate.forced = keep
    try:
        yield
    finally:
        for gate in gates:
            gate.forced = None


def _run(model: nn.Module, inputs: ExampleInputs) -> _Result:
    """One forward and backward with only the DropPaths training; outputs and gradients."""

    def leaf_input(tensor: Tensor) -> Tensor:
        if tensor.is_floating_point():
            return tensor.detach().clone().requires_grad_(True)
        return tensor

    args, kwargs = tree_map_tensors(leaf_input, (inputs.args, dict(inputs.kwargs)))
    wanted = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.requires_grad]
    wanted += [p for p in model.parameters() if p.requires_grad]
    with training_mode(model, False):
        for module in model.modules():
            if isinstance(module, DropPath):
                module.training = True
        torch.manual_seed(0)
        outputs = model(*args, **kwargs)
    leaves = tree_leaves(outputs)
    floats = [t for t in leaves if isinstance(t, Tensor) and t.is_floating_point()]
    others = [t for t in leaves if not (isinstance(t, Tensor) and t.is_floating_point())]
    loss = sum(
        ((t.float() * torch.linspace(-1.0, 1.0, t.numel()).view(t.shape).to(t.device)).sum())
        for t in floats
        if t.requires_grad
    )
    grads: Sequence[Tensor | None] = [None] * len(wanted)
    if isinstance(loss, Tensor):
        grads = torch.autograd.grad(loss, wanted, allow_unused=True)
    values: list[Tensor | None] = [t.detach() for t in floats]
    return _Result(values + list(grads), others)


def _difference(expected: _Result, actual: _Result) -> float:
    """The largest difference relative to each tensor's magnitude, floored at ``FLOOR`` of the
    largest magnitude of all (a gradient that is zero in exact arithmetic, a key projection's
    bias under softmax, holds rounding noise only); inf for different shapes."""
    scales = [float(a.abs().max()) for a in expected.values if a is not None and a.numel()]
    floor = FLOOR * max(scales, default=0.0)
    worst = 0.0
    for a, b in zip(expected.values, actual.values, strict=True):
        if a is None or b is None:
            a, b = (b, a) if a is None else (a, b)
            if a is not None and bool(a.abs().max() > 0):
                return float("inf")
            continue
        if a.shape != b.shape:
            return float("inf")
        if not a.numel():
            continue
        scale = max(float(a.abs().max()), floor)
        diff = float((a.float() - b.float()).abs().max())
        worst = max(worst, diff / scale if scale > 0 else diff)
    if any(not _equal(x, y) for x, y in zip(expected.others, actual.others, strict=True)):
        return float("inf")
    return worst


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return True


def _dropped(batch: int) -> Tensor:
    return torch.zeros(batch)


def _odd_rows_kept(batch: int) -> Tensor:
    return (torch.arange(batch) % 2 == 1).float()


def _patterns(batch: int, mode: str) -> list[Callable[[int], Tensor]]:
    if mode == "batch" or batch < 2:
        return [_dropped]
    return [_odd_rows_kept, _dropped]


def _compare(
    model: nn.Module, inputs: ExampleInputs, skippers: Sequence[Skipper], enabled: Sequence[Skipper]
) -> tuple[float, str]:
    """Masked vs skipping (the ``enabled`` ones) under one forced decision: the largest
    difference, or the exception skipping raised."""
    for skipper in skippers:
        skipper.switch.enabled = False
    expected = _run(model, inputs)
    for skipper in enabled:
        skipper.switch.enabled = True
    try:
        actual = _run(model, inputs)
    except Exception as error:  # any failure of the skipping run means: mask
        return float("inf"), f"{type(error).__name__}: {error}"[:300]
    finally:
        for skipper in skippers:
            skipper.switch.enabled = True
    return _difference(expected, actual), ""


def check_skipping(model: nn.Module, inputs: ExampleInputs, branches: BranchDrops) -> SkipCheck:
    """Run the check of the module docstring; what fails it masks after it."""
    skippers = branches.skippers()
    if not skippers:
        return SkipCheck(0, 0, 0, 0.0, TOLERANCE)
    gates = _gates(model)
    leaves = [t for t in tree_leaves((inputs.args, inputs.kwargs)) if isinstance(t, Tensor)]
    batch = leaves[0].shape[0] if leaves and leaves[0].ndim else 0
    forwards, worst = 0, 0.0
    failed: list[tuple[Skipper, str]] = []
    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with python_state_kept(model), torch.random.fork_rng(devices=devices):
        for keep in _patterns(batch, branches.mode):
            with _forced(gates, keep):
                difference, error = _compare(model, inputs, skippers, skippers)
                forwards += 2
                if difference <= TOLERANCE:
                    worst = max(worst, difference)
                    continue
                for skipper in list(skippers):
                    alone, error = _compare(model, inputs, skippers, [skipper])
                    forwards += 2
                    if alone > TOLERANCE and keep is _dropped and skipper.one_row is not None:
                        skipper.one_row(
                            "a fully dropped branch runs one row, its code fails on an empty "
                            f"batch ({error or f'differs by {alone:.2g}'})"
                        )
                        alone, error = _compare(model, inputs, skippers, [skipper])
                        forwards += 2
                    if alone <= TOLERANCE:
                        worst = max(worst, alone)
                        continue
                    reason = error or f"outputs or gradients differ by {alone:.2g}"
                    failed.append((skipper, f"skipping failed the check at injection ({reason})"))
                    skippers.remove(skipper)
    # after the runs: putting the modules' Python state back would reinstall what demote removes
    for skipper, reason in failed:
        skipper.demote(reason)
    for skipper in skippers:
        skipper.switch.reset_counts()
    return SkipCheck(len(skippers) + len(failed), len(failed), forwards, worst, TOLERANCE)
