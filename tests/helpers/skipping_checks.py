"""Models, expectations and comparisons shared by the skip_compute tests (see test_skipping.py
for the tolerances and why they hold)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from droppath_inject import DropPath, Report, SiteStatus, inject_droppath
from droppath_inject.block_gate import BlockDropPath
from droppath_inject.branch_rows import BranchRows, units_of
from droppath_inject.report import SkipCompute, SkipPlan
from helpers import synthetic_models as sm

SEEDS = (0, 1, 2)
MAX_DROP = 0.5
RTOL = ATOL = 1e-5
#: bf16 keeps 8 significant bits (relative rounding 2**-8 ~ 4e-3 per op); the two
#: implementations scale kept branches in different dtypes under autocast.
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}

Work = Literal["rows", "blocks", "all"]
"""What a branch computes on: the kept rows only, the whole batch or nothing (one decision for
the batch), or every row whatever its decision (the mask)."""


# --- models ------------------------------------------------------------------------------------


def gn_branch(c: int = sm.CHANNELS) -> nn.Sequential:
    """conv-GroupNorm-relu-conv-GroupNorm: sample-independent normalisation."""
    return nn.Sequential(
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.GroupNorm(2, c),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, bias=False),
        nn.GroupNorm(2, c),
    )


def layer_norm_net() -> tuple[nn.Module, Tensor]:
    """Pre-norm MLP residuals, a transformer block and a projection residual on tokens."""
    torch.manual_seed(0)
    blocks = [sm.PreNormResidual(), sm.PreNormPair(), sm.TransformerBlock(), sm.PreNormResidual()]
    return sm.randomize_norms(sm.token_net(blocks)), torch.randn(6, sm.TOKENS, sm.DIM)


def group_norm_net() -> tuple[nn.Module, Tensor]:
    """GroupNorm conv residuals, with a conv stem and head (no BatchNorm anywhere)."""
    torch.manual_seed(0)
    blocks = [sm.PlainResidual(gn_branch()) for _ in range(4)]
    net = sm.Net(nn.Conv2d(3, sm.CHANNELS, 3, padding=1), blocks, nn.Conv2d(sm.CHANNELS, 3, 1))
    return net, torch.randn(6, 3, 8, 8)


def batch_norm_net() -> tuple[nn.Module, Tensor]:
    """torchvision-style BasicBlocks (BatchNorm in every branch)."""
    torch.manual_seed(0)
    net = sm.conv_net([sm.BasicBlock(), sm.BasicBlock(), sm.BasicBlock()])
    return sm.randomize_norms(net), torch.randn(6, 3, 8, 8)


def vit() -> tuple[nn.Module, Tensor]:
    """timm ViT-Tiny at 32x32: LayerNorm and attention branches."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10)
    return model, torch.randn(4, 3, 32, 32)


def resnet18() -> tuple[nn.Module, Tensor]:
    """torchvision ResNet-18 at 32x32: BatchNorm branches."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10), torch.randn(4, 3, 32, 32)


BUILDERS: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "vit_tiny": vit,
    "resnet18": resnet18,
    "layer_norm_mlp": layer_norm_net,
    "group_norm_conv": group_norm_net,
}
#: How a branch of each model runs in row mode (in batch mode every branch runs whole or not).
ROW_WORK: dict[str, Work] = {
    "vit_tiny": "rows",
    "resnet18": "all",  # BatchNorm trains in every branch: masked unless gather_batch_norm
    "layer_norm_mlp": "rows",
    "group_norm_conv": "rows",
}


@functools.cache
def _built(name: str) -> tuple[nn.Module, Tensor]:
    return BUILDERS[name]()


def build(name: str) -> tuple[nn.Module, Tensor]:
    """A fresh copy of a model (built once per session) and its input."""
    model, x = _built(name)
    return copy.deepcopy(model), x


# --- helpers -----------------------------------------------------------------------------------


def injected_pair(
    model: nn.Module, inputs: Any, mode: str, max_drop: float = MAX_DROP, **kwargs: Any
) -> tuple[nn.Module, nn.Module, Report]:
    """Two copies of ``model`` in train mode: masking DropPaths, and skipping ones."""
    masked, skipping = copy.deepcopy(model), copy.deepcopy(model)
    inject_droppath(masked, max_drop, mode=mode, example_inputs=inputs, **kwargs)
    _, report = inject_droppath(
        skipping,
        max_drop,
        mode=mode,
        example_inputs=inputs,
        skip_compute=True,
        return_report=True,
        **kwargs,
    )
    assert report.verification is not None and report.verification.passed
    return masked.train(), skipping.train(), report


def call(model: nn.Module, inputs: Any) -> Tensor:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def statuses(report: Report) -> set[tuple[SiteStatus, SkipPlan | None]]:
    return {(site.status, site.skip_compute) for site in report.sites}


def injected(how: SkipCompute, reason: str = "") -> tuple[SiteStatus, SkipPlan]:
    return SiteStatus.INJECTED, SkipPlan(how, reason)


def skipping_drops(model: nn.Module) -> dict[str, BlockDropPath]:
    """The DropPaths whose branches run on the kept rows, by path (in module order)."""
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, BlockDropPath) and m.branch_rows is not None
    }


def branches(model: nn.Module) -> dict[str, BranchRows]:
    """Each skipping branch, by the path of its (first) DropPath; every installed unit's
    branch is one of them."""
    found: dict[str, BranchRows] = {}
    for path, drop in skipping_drops(model).items():
        assert drop.branch_rows is not None
        if all(drop.branch_rows is not b for b in found.values()):
            found[path] = drop.branch_rows
    assert all(any(unit.branch is b for b in found.values()) for unit in units_of(model).values())
    return found


def branch_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters of every skipping branch's units."""
    return {id(p) for b in branches(model).values() for unit in b.units for p in unit.parameters()}


class _RowsSeen(TorchFunctionMode):
    """Records, for each torch function given a watched parameter, the rows of its first
    tensor argument that is not a parameter (the data the parameter is applied to)."""

    def __init__(self, owners: dict[int, str]) -> None:
        super().__init__()
        self.owners = owners
        self.rows: dict[str, list[int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        leaves = [*args, *kwargs.values()]
        owner = next(
            (self.owners[id(a)] for a in leaves if isinstance(a, Tensor) and id(a) in self.owners),
            None,
        )
        data = next(
            (a for a in leaves if isinstance(a, Tensor) and not isinstance(a, nn.Parameter)), None
        )
        if owner is not None and data is not None and data.ndim and torch.is_grad_enabled():
            self.rows.setdefault(owner, []).append(data.shape[0])
        return func(*args, **kwargs)


@contextmanager
def branch_rows(model: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Rows each skipping branch computes on, one entry per forward run inside the block: the
    most rows any op applying one of the branch's parameters saw in that forward (every such op
    must see the same number), 0 when none ran. Read off the torch functions that receive the
    branch's parameters, not the package's counters. Forwards without gradients are not
    counted (the package learns an empty branch's output shapes under ``no_grad``)."""
    owners = {
        id(p): path
        for path, b in branches(model).items()
        for unit in b.units
        for p in unit.parameters()
    }
    assert owners, "no skipping branch found"
    seen: dict[str, list[int]] = {path: [] for path in set(owners.values())}
    original = model.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        with _RowsSeen(owners) as mode:
            out = original(*args, **kwargs)
        for path, calls in seen.items():
            rows = mode.rows.get(path, [])
            assert len(set(rows)) <= 1, (path, rows)
            calls.append(rows[0] if rows else 0)
        return out

    model.forward = counted  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del model.forward


@contextmanager
def kept_rows(model: nn.Module) -> Iterator[dict[str, list[int]]]:
    """Rows each masking DropPath keeps (its nonzero output rows), one entry per call."""
    kept: dict[str, list[int]] = {}
    handles = []
    for path, drop in model.named_modules():
        if isinstance(drop, DropPath):
            calls = kept.setdefault(path, [])
            handles.append(
                drop.register_forward_hook(
                    lambda _m, _a, out, calls=calls: calls.append(
                        int(out.flatten(1).ne(0).any(1).sum())
                    )
                )
            )
    assert kept, "no DropPath found"
    try:
        yield kept
    finally:
        for handle in handles:
            handle.remove()


def expected_rows(kept: list[int], batch: int, work: Work) -> list[int]:
    """Rows a branch should compute on, given the rows its mask keeps in each call."""
    if work == "all":
        return [batch] * len(kept)
    if work == "blocks":
        assert set(kept) <= {0, batch}, kept
    return list(kept)


def loss_of(out: Tensor) -> Tensor:
    """A loss whose gradient differs per element (a fixed random projection of the output)."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(123))
    return (out.float() * weight).sum()


def compare_training(
    masked: nn.Module,
    skipping: nn.Module,
    inputs: Any,
    seeds: tuple[int, ...] = SEEDS,
    bitwise: bool = False,
    bitwise_grads: bool | None = None,
    **tolerance: float,
) -> dict[str, float]:
    """Forward and backward both models under each seed; outputs and gradients must match.

    Every parameter gets a gradient on both sides (a dropped branch's are zeros, as the mask
    gives: DDP needs no ``find_unused_parameters``). Gradient tolerances are relative to each
    gradient's largest element. ``bitwise_grads`` (default: ``bitwise``) can relax the gradients
    alone. Returns the largest absolute differences seen, and how many
    branch parameters got an all-zero gradient (their branch dropped every row).
    """
    tolerance = tolerance or {"rtol": RTOL, "atol": ATOL}
    bitwise_grads = bitwise if bitwise_grads is None else bitwise_grads
    worst = {"output": 0.0, "grad": 0.0, "zero_grads": 0}
    in_branches = branch_parameters(skipping)
    for seed in seeds:
        outputs = []
        for model in (masked, skipping):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            out = call(model, inputs)
            loss_of(out).backward()
            outputs.append(out)
        expected, actual = outputs
        assert actual.dtype == expected.dtype
        worst["output"] = max(worst["output"], (expected - actual).abs().max().item())
        if bitwise:
            assert torch.equal(expected, actual), f"seed {seed}"
        else:
            torch.testing.assert_close(actual, expected, **tolerance, msg=f"seed {seed}")
        grads = dict(masked.named_parameters())
        for name, param in skipping.named_parameters():
            reference = grads[name].grad
            assert reference is not None, name  # the mask keeps every branch in the graph
            assert param.grad is not None, name
            if id(param) in in_branches and not torch.count_nonzero(param.grad):
                worst["zero_grads"] += 1
            worst["grad"] = max(worst["grad"], (reference - param.grad).abs().max().item())
            if bitwise_grads:
                assert torch.equal(param.grad, reference), f"{name}, seed {seed}"
            else:  # a sum over rows rounds like its largest terms: scale atol by the largest
                scale = max(1.0, reference.abs().max().item())
                atol = tolerance["atol"] * scale
                torch.testing.assert_close(
                    param.grad, reference, rtol=tolerance["rtol"], atol=atol, msg=name
                )
    return worst


def check_work(
    masked: nn.Module,
    skipping: nn.Module,
    inputs: Any,
    work: Work,
    seeds: tuple[int, ...] = SEEDS,
) -> dict[str, list[int]]:
    """Each skipping branch computes on the rows ``work`` says; returns the kept rows per
    DropPath of the mask version (one entry per call)."""
    batch = first_tensor(inputs if isinstance(inputs, tuple) else (inputs,)).shape[0]
    with kept_rows(masked) as kept, branch_rows(skipping) as seen:
        for seed in seeds:
            torch.manual_seed(seed)
            call(masked, inputs)
            torch.manual_seed(seed)
            call(skipping, inputs)
    # the same DropPaths at the same paths (hooked modules, drop-path slots) in both versions
    assert set(seen) <= set(kept)
    for path, rows in seen.items():
        assert rows == expected_rows(kept[path], batch, work), path
    return kept


def first_tensor(args: tuple[Any, ...]) -> Tensor:
    return next(a for a in args if isinstance(a, Tensor))


def partially_kept(kept: dict[str, list[int]], batch: int) -> bool:
    """Whether some call kept some rows but not all (so that gathering was exercised)."""
    return any(0 < k < batch for rows in kept.values() for k in rows)


def dropped_some(kept: dict[str, list[int]], batch: int) -> bool:
    """Whether some call dropped some rows."""
    return any(k < batch for rows in kept.values() for k in rows)
