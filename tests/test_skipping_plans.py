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
from test_skipping import RelBiasMaskedNet, key_padding_mask
from torch import Tensor, nn

from droppath_inject import DropPath, SiteStatus, inject_droppath
from droppath_inject.branch_rows import units_of
from droppath_inject.report import SkipCompute

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
    """A branch that reduces over the batch must keep the mask, not gather: ``x - x.mean(0)``
    is computed in the block's own forward, where no module call can gather its rows."""
    torch.manual_seed(0)
    model, x = sm.token_net([BatchCentered(), BatchCentered()]), torch.randn(6, sm.TOKENS, sm.DIM)
    masked, skipping, report = injected_pair(model, x, "row", 0.9)
    assert {s.skip_compute.how for s in report.sites if s.skip_compute} == {SkipCompute.MASKS}
    assert all("inline" in s.skip_compute.reason for s in report.sites if s.skip_compute)
    assert not skipping_drops(skipping)
    compare_training(masked, skipping, x, bitwise=True)


class SizeFromSkip(nn.Module):
    """``x.reshape(b, -1) + f(x.reshape(b, -1))``: the branch reads a size the skip reads too."""

    def __init__(self) -> None:
        super().__init__()
        self.f = sm.mlp(sm.TOKENS * sm.DIM, 2 * sm.DIM)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        return (x.reshape(b, -1) + self.f(x.reshape(b, -1))).reshape(x.shape)


class InplaceSkipResidual(sm.PlainResidual):
    """``x.clone().add_(f(x))``: the add writes into (a copy of) the skip."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clone().add_(self.f(x))


INLINE = "enters the branch inline"


@pytest.mark.parametrize(
    ("block", "mode", "how", "reason", "work"),
    [
        (lambda: sm.InplaceBranchResidual(sm.mlp()), "row", SkipCompute.KEPT_ROWS, "", "rows"),
        (lambda: sm.InplaceBranchResidual(sm.mlp()), "batch", SkipCompute.KEPT_ROWS, "",
         "blocks"),
        (lambda: InplaceSkipResidual(sm.mlp()), "row", SkipCompute.KEPT_ROWS, "", "rows"),
        (lambda: InplaceSkipResidual(sm.mlp()), "batch", SkipCompute.KEPT_ROWS, "", "blocks"),
        (SizeFromSkip, "row", SkipCompute.MASKS, INLINE, "all"),
        (SizeFromSkip, "batch", SkipCompute.KEPT_ROWS, "", "blocks"),
    ],
    ids=["inplace-branch-row", "inplace-branch-batch", "inplace-skip-row", "inplace-skip-batch",
         "sizes-row", "sizes-batch"],
)  # fmt: skip
def test_cut_plan_fallbacks(
    block: Callable[[], nn.Module], mode: str, how: SkipCompute, reason: str, work: Work
) -> None:
    """The report says how each branch runs; where the mask is kept, it says why.

    An in-place add into the branch's own result, or into a copy of the skip, runs on the
    DropPath's output, whose rows are all in place: the branch skips. A branch reading a size
    of the skip inline (``x.reshape(b, -1)``) would meet the kept rows with all of them in row
    mode; batch mode gathers no rows, so it skips dropped branches there."""
    torch.manual_seed(0)
    model = sm.Net(nn.Linear(sm.DIM, sm.DIM), [block(), block()], nn.Identity())
    x = torch.randn(6, sm.TOKENS, sm.DIM)
    masked, skipping, report = injected_pair(model, x, mode, schedule="uniform")
    assert {s.status for s in report.sites} == {SiteStatus.INJECTED}
    plans = [s.skip_compute for s in report.sites]
    assert all(p is not None and p.how is how and reason in p.reason for p in plans), plans
    assert bool(skipping_drops(skipping)) == (how is not SkipCompute.MASKS)
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


def test_a_drop_path_inside_a_unit_masks_and_says_why() -> None:
    """The key mask is reshaped inside the attention, so the DropPath goes on ``attn.proj``,
    inside the branch's unit ``attn``: a fully dropped branch would not call it. The plan masks
    that site with the reason, and the check at injection needs no extra forwards."""
    torch.manual_seed(0)
    model = RelBiasMaskedNet()
    inputs = (torch.randn(6, sm.TOKENS, sm.DIM), key_padding_mask(6))
    _, skipping, report = injected_pair(model, inputs, "row")
    attn = [s for s in report.sites if ".attn" in s.attached_to]
    mlps = [s for s in report.sites if s not in attn]
    assert [s.attached_to for s in attn] == [f"blocks.{i}.attn.proj" for i in range(3)]
    for site in attn:
        assert site.skip_compute is not None and site.skip_compute.how is SkipCompute.MASKS
        owner = site.attached_to.removesuffix(".proj")
        assert f"called inside {owner}," in site.skip_compute.reason
    assert mlps and all(
        s.skip_compute is not None and s.skip_compute.how is SkipCompute.KEPT_ROWS for s in mlps
    )
    assert report.skip_check is not None
    assert report.skip_check.demoted == 0 and report.skip_check.forwards == 4
    assert not any(".attn" in path for path in units_of(skipping))


def test_report_injected_lists_skipping_sites() -> None:
    """``Report.injected`` lists the sites that got a skipping DropPath."""
    model, x = build("layer_norm_mlp")
    _, _, report = injected_pair(model, x, "row")
    assert len(report.injected) == len(report.sites) > 0
