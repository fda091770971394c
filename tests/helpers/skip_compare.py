"""Injection, training and comparison for the skip_compute tests (tests/test_skip_*.py).

The reference is always the mask (``skip_compute=False``) on a deepcopy of the same model with the
same seed before each forward; what was dropped is read from the mask's DropPath outputs (rows
zeroed). Tolerances: see tests/test_skip_equivalence.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from droppath_inject import BlockHandling, DropPath, Report, Site, SiteStatus, inject_droppath
from helpers import skip_models as sm

MAX_DROP = 0.5
SEEDS = (0, 1, 2)
RTOL = 1e-5
ATOL = 1e-5  # times the reference tensor's largest magnitude, at least 1
MODES = ("row", "fixed", "batch")
GRANULARITIES = ("branch", "block")


# --- the one place that knows how the report says "this site skips" -----------------------------


def site_skips(site: Site) -> bool:
    """Whether the report says the site's dropped branch is skipped, not masked."""
    plan = site.skip_compute
    return plan is not None and not plan.how.name.startswith("MASKS")


def assert_every_site_skips(report: Report) -> None:
    """Every site of the report skips its dropped branch (none masks), or its layer skips."""
    blocks = report.layer_drop.blocks if report.layer_drop is not None else []
    skipped = {b.block_index for b in blocks if b.handling is BlockHandling.SKIPPED}
    masking = [
        (s.branch, s.skip_compute)
        for s in report.sites
        if not site_skips(s) and s.block_index not in skipped
    ]
    assert report.sites and not masking, masking


# --- running models ------------------------------------------------------------------------------


def inject(case: sm.Case, skip: bool, **kwargs: Any) -> tuple[nn.Module, Report]:
    model = copy.deepcopy(case.model)
    kwargs.setdefault("max_drop", MAX_DROP)
    _, report = inject_droppath(
        model, example_inputs=case.inputs, skip_compute=skip, return_report=True, **kwargs
    )
    return model, report


def train(model: nn.Module, batch_norm_eval: bool) -> nn.Module:
    model.train()
    if batch_norm_eval:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def _leaf_inputs(inputs: Any) -> tuple[Any, list[Tensor]]:
    """A copy of ``inputs`` whose float tensors require gradients, and those tensors."""
    leaves: list[Tensor] = []

    def leaf(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            leaves.append(value.detach().clone().requires_grad_())
            return leaves[-1]
        return value

    if isinstance(inputs, dict):
        return {k: leaf(v) for k, v in inputs.items()}, leaves
    if isinstance(inputs, tuple):
        return tuple(leaf(v) for v in inputs), leaves
    return leaf(inputs), leaves


def _loss(outputs: list[Tensor]) -> Tensor:
    """A fixed random projection of every output, so that each element's gradient differs."""
    total = torch.zeros(())
    for index, out in enumerate(outputs):
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + index))
        total = total + (out.float() * weight).sum()
    return total


def _step(
    model: nn.Module, inputs: Any, seed: int
) -> tuple[list[Tensor], dict[str, Tensor | None]]:
    """Outputs and gradients (trainable parameters, float inputs) of one seeded forward."""
    model.zero_grad(set_to_none=True)
    leaf_inputs, leaves = _leaf_inputs(inputs)
    torch.manual_seed(seed)
    outputs = sm.tensors_of(sm.call(model, leaf_inputs))
    _loss(outputs).backward()
    grads: dict[str, Tensor | None] = {
        name: p.grad for name, p in model.named_parameters() if p.requires_grad
    }
    grads.update({f"input {i}": leaf.grad for i, leaf in enumerate(leaves)})
    return [o.detach() for o in outputs], grads


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale, msg=what)


@contextmanager
def _drops_seen(model: nn.Module) -> Iterator[dict[str, int]]:
    """Rows the mask dropped and kept, over every call of a DropPath of rate > 0 in ``model``."""
    seen = {"dropped": 0, "kept": 0}

    def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        if module.drop_prob > 0 and isinstance(out, Tensor):
            zero = out.detach().flatten(1).eq(0).all(1)
            live = args[0].detach().flatten(1).ne(0).any(1)
            seen["dropped"] += int((zero & live).sum())
            seen["kept"] += int((~zero).sum())

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, DropPath)]
    assert handles, "the mask model holds no DropPath"
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def compare_training(
    masked: nn.Module, skipping: nn.Module, inputs: Any, batch_norm_eval: bool
) -> dict[str, int]:
    """Outputs and gradients of both models agree under every seed; returns the mask's drops."""
    train(masked, batch_norm_eval)
    train(skipping, batch_norm_eval)
    with _drops_seen(masked) as seen:
        for seed in SEEDS:
            expected_out, expected_grads = _step(masked, inputs, seed)
            actual_out, actual_grads = _step(skipping, inputs, seed)
            assert len(actual_out) == len(expected_out)
            for i, (a, e) in enumerate(zip(actual_out, expected_out, strict=True)):
                assert_close(a, e, f"output {i}, seed {seed}")
            assert actual_grads.keys() == expected_grads.keys()
            for name, expected in expected_grads.items():
                actual = actual_grads[name]
                assert expected is not None, f"{name}: the mask keeps every branch in the graph"
                if actual is None:  # the skipping model never ran it: the mask's must be 0
                    assert torch.count_nonzero(expected) == 0, f"{name}, seed {seed}"
                else:
                    assert_close(actual, expected, f"{name}, seed {seed}")
    return seen


def plan(report: Report) -> tuple[int, list[tuple[str, int, float, SiteStatus]]]:
    return report.num_blocks, [
        (s.branch, s.block_index, round(s.rate, 9), s.status) for s in report.sites
    ]
