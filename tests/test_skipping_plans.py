"""``skip_compute`` plans: BatchNorm, sample independence, what keeps the mask, and the report.

References and tolerances as in test_skipping.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import synthetic_models as sm
from helpers.skipping_checks import (
    SEEDS,
    Work,
    batch_norm_net,
    build,
    check_work,
    compare_training,
    injected,
    injected_pair,
    partially_kept,
    skipping_drops,
    statuses,
)
from torch import Tensor, nn

from droppath_inject import (
    DropPath,
    SiteStatus,
    inject_droppath,
)
from droppath_inject.skipping import SkipCompute, SkipPlan

pytestmark = pytest.mark.usefixtures("single_thread")


# --- 4. BatchNorm ------------------------------------------------------------------------------


def test_gather_batch_norm_opt_in() -> None:
    """Opted in, BatchNorm branches run on kept rows: batch statistics change, eval does not."""
    model, x = batch_norm_net()
    masked, skipping, _ = injected_pair(model, x, "row", 0.5, gather_batch_norm=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), skipping.eval()(x))
    skipping.train()
    kept = check_work(masked, skipping, x, "rows")
    assert partially_kept(kept, x.shape[0])
    differences = []
    for seed in SEEDS:  # normalised over the kept rows, not the whole batch
        torch.manual_seed(seed)
        expected = masked(x)
        torch.manual_seed(seed)
        differences.append((skipping(x) - expected).abs().max().item())
    assert max(differences) > 1e-2, differences
    running = [
        torch.allclose(a, b)
        for (name, a), (_, b) in zip(masked.named_buffers(), skipping.named_buffers(), strict=True)
        if "running" in name
    ]
    assert running and not all(running)  # running statistics follow the kept rows too


def test_gather_batch_norm_report() -> None:
    """The report says what the opt-in does: kept rows only."""
    model, x = batch_norm_net()
    _, _, report = injected_pair(model, x, "row", gather_batch_norm=True)
    assert statuses(report) == {injected(SkipCompute.KEPT_ROWS_BATCH_NORM_GATHERED)}


def test_frozen_batch_norm_gathers_without_opt_in() -> None:
    """BatchNorm in eval mode while the model trains is per-sample: rows are gathered."""
    model, x = batch_norm_net()
    masked, skipping, report = injected_pair(model, x, "row")
    assert statuses(report) == {injected(SkipCompute.KEPT_ROWS_UNLESS_BATCH_NORM_TRAINS)}
    check_work(masked, skipping, x, "all", seeds=(0,))
    for net in (masked, skipping):
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
    kept = check_work(masked, skipping, x, "rows")
    assert partially_kept(kept, x.shape[0])
    compare_training(masked, skipping, x)


# --- sample independence -----------------------------------------------------------------------


class BatchCentered(nn.Module):
    """``x + mlp(x - x.mean(0))``: the branch mixes samples, like BatchNorm does."""

    BRANCHES = ("mlp",)

    def __init__(self) -> None:
        super().__init__()
        self.mlp = sm.mlp()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x - x.mean(0))


def test_batch_mixing_branch_is_not_gathered() -> None:
    """A branch that reduces over the batch must keep the mask (or be refused), not gather."""
    torch.manual_seed(0)
    model, x = sm.token_net([BatchCentered(), BatchCentered()]), torch.randn(6, sm.TOKENS, sm.DIM)
    masked, skipping, _ = injected_pair(model, x, "row", 0.9)
    compare_training(masked, skipping, x)


class SizeFromSkip(nn.Module):
    """``x.reshape(b, -1) + f(x.reshape(b, -1))``: the branch reads a size the skip reads too."""

    def __init__(self) -> None:
        super().__init__()
        self.f = sm.mlp(sm.TOKENS * sm.DIM, 2 * sm.DIM)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return (x.reshape(b, -1) + self.f(x.reshape(b, -1))).reshape(x.shape)


INTO_SKIP = "in-place add into the skip"


class InplaceSkipResidual(sm.PlainResidual):
    """``x.clone().add_(f(x))``: the add writes into the skip, which the branch must not touch."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clone().add_(self.f(x))


@pytest.mark.parametrize(
    ("block", "mode", "status", "work"),
    [
        (lambda: sm.InplaceBranchResidual(sm.mlp()), "row", SkipPlan(SkipCompute.KEPT_ROWS),
         "rows"),
        (lambda: sm.InplaceBranchResidual(sm.mlp()), "batch",
         SkipPlan(SkipCompute.SKIPS_DROPPED_BLOCKS), "blocks"),
        (lambda: InplaceSkipResidual(sm.mlp()), "row", SkipPlan(SkipCompute.MASKS, INTO_SKIP),
         "all"),
        (lambda: InplaceSkipResidual(sm.mlp()), "batch", SkipPlan(SkipCompute.MASKS, INTO_SKIP),
         "all"),
        (SizeFromSkip, "row",
         SkipPlan(SkipCompute.MASKS_IN_ROW_MODE, "the branch reads sizes computed outside it"),
         "all"),
        (SizeFromSkip, "batch", SkipPlan(SkipCompute.SKIPS_DROPPED_BLOCKS), "blocks"),
    ],
    ids=["inplace-branch-row", "inplace-branch-batch", "inplace-skip-row", "inplace-skip-batch",
         "sizes-row", "sizes-batch"],
)  # fmt: skip
def test_cut_plan_fallbacks(
    block: Callable[[], nn.Module], mode: str, status: SkipPlan, work: Work
) -> None:
    """The report says how each branch runs; where the mask is kept, it says why.

    An in-place add into the branch's own result is cut like a plain add (nothing else reads
    that result); one into the skip keeps the mask, since later readers of the skip see the sum.
    """
    torch.manual_seed(0)
    model = sm.Net(nn.Linear(sm.DIM, sm.DIM), [block(), block()], nn.Identity())
    x = torch.randn(6, sm.TOKENS, sm.DIM)
    masked, skipping, report = injected_pair(model, x, mode, schedule="uniform")
    assert statuses(report) == {(SiteStatus.INJECTED, status)}
    if skipping_drops(skipping):
        check_work(masked, skipping, x, work)
    compare_training(masked, skipping, x, bitwise=work != "rows")


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_nested_residual_blocks_keep_their_drop_paths(mode: str) -> None:
    """Blocks nested in an outer block's branch still run their own DropPath."""
    torch.manual_seed(0)
    model, x = sm.conv_net([sm.NestedResidual()]), torch.randn(6, 3, 8, 8)
    inject_droppath(model, 1e-6, mode=mode, schedule="uniform", skip_compute=True, example_inputs=x)
    drops = {path: m for path, m in model.named_modules() if isinstance(m, DropPath)}
    assert len(drops) == 3
    called: list[str] = []
    for path, drop in drops.items():
        drop.register_forward_hook(lambda _m, _a, _o, path=path: called.append(path))
    torch.manual_seed(0)
    model.train()(x)
    assert sorted(called) == sorted(drops)


def test_report_injected_lists_skipping_sites() -> None:
    """``Report.injected`` lists the sites that got a skipping DropPath."""
    model, x = build("layer_norm_mlp")
    _, _, report = injected_pair(model, x, "row")
    assert len(report.injected) == len(report.sites) > 0
