"""``skip_compute`` models under re-injection, rate control, copies and DistributedDataParallel.

References and tolerances as in test_skipping.py.
"""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import skip_ddp_scenarios as scenarios
from helpers.distributed import launch
from helpers.skipping_checks import (
    MAX_DROP,
    SEEDS,
    branch_rows,
    branches,
    build,
    skipping_drops,
)
from torch import nn

from droppath_inject import (
    DropPath,
    SiteStatus,
    inject_droppath,
    remove_droppath,
    set_drop_rates,
)
from droppath_inject.branch_rows import units_of
from droppath_inject.report import SkipCompute

pytestmark = pytest.mark.usefixtures("single_thread")


# --- 6. re-injection, control, copies ----------------------------------------------------------


def test_second_injection_updates_rates() -> None:
    """Calling inject_droppath again updates the skipping DropPaths' rates, never nests."""
    model, x = build("layer_norm_mlp")
    inject_droppath(model, 0.2, skip_compute=True, example_inputs=x)
    count, units = len(skipping_drops(model)), len(units_of(model))
    _, report = inject_droppath(model, 0.4, skip_compute=True, example_inputs=x, return_report=True)
    assert len(report.sites) == count
    assert {s.status for s in report.sites} == {SiteStatus.RE_RATED}
    assert {s.skip_compute.how for s in report.sites if s.skip_compute} == {SkipCompute.KEPT_ROWS}
    assert len(skipping_drops(model)) == count
    assert len(units_of(model)) == units  # no unit wrapped twice
    assert max(d.drop_prob for d in skipping_drops(model).values()) == pytest.approx(0.4)


def test_set_drop_rates_and_remove_droppath() -> None:
    """The control functions see skipping DropPaths; removal gives back the original model."""
    original, x = build("layer_norm_mlp")
    model = inject_droppath(copy.deepcopy(original), 0.2, skip_compute=True, example_inputs=x)
    rates = set_drop_rates(model, 0.6)
    assert rates[-1] == pytest.approx(0.6)
    drops = skipping_drops(model)
    assert max(d.drop_prob for d in drops.values()) == pytest.approx(0.6)
    set_drop_rates(model, 1.0, schedule="uniform")
    with branch_rows(model) as seen:
        model.train()(x)
    assert seen and all(calls == [0] for calls in seen.values())
    remove_droppath(model)
    assert not any(isinstance(m, DropPath) for m in model.modules())
    assert not units_of(model)
    assert not any("forward" in vars(m) for m in model.modules())
    assert [type(b) for b in model.blocks] == [type(b) for b in original.blocks]
    model.eval()
    original.eval()
    assert torch.equal(model(x), original(x))
    assert list(model.state_dict()) == list(original.state_dict())


def _pickled(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled], ids=["deepcopy", "torch.save"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_copies_behave_alike(copier: Callable[[nn.Module], nn.Module], mode: str) -> None:
    """A copy computes the same outputs, and its branches use the copy's own parameters."""
    model, x = build("layer_norm_mlp")
    inject_droppath(model, MAX_DROP, mode=mode, skip_compute=True, example_inputs=x)
    copied = copier(model)
    for net in (model, copied):
        own = dict(net.named_modules())
        units = units_of(net)
        assert units and all(own[path] is unit.module for path, unit in units.items())
        for drop in skipping_drops(net).values():  # DropPaths and units share one decision
            assert drop.branch_rows is not None and drop.branch_rows.gate is drop.gate
            assert all(any(u is m for m in own.values()) for u in drop.branch_rows.units)
        assert set(map(id, branches(net).values())) == {id(u.branch) for u in units.values()}
    model.eval()
    copied.eval()
    assert torch.equal(model(x), copied(x))
    model.train()
    copied.train()
    for seed in SEEDS:
        torch.manual_seed(seed)
        expected = model(x)
        torch.manual_seed(seed)
        assert torch.equal(copied(x), expected)
    with torch.no_grad():  # changing the copy's weights changes what its branches compute
        for param in copied.parameters():
            param.mul_(0.5)
    copied.eval()
    model.eval()
    assert not torch.equal(model(x), copied(x))


# --- 5. DistributedDataParallel ----------------------------------------------------------------


@functools.cache
def _ddp_results() -> tuple[dict[str, Any], ...]:
    """Run ``helpers/skip_ddp_scenarios.py`` as two gloo ranks; each rank's results."""
    return tuple(launch("skip_ddp_scenarios", world_size=2, timeout_s=120))


@pytest.mark.slow
@pytest.mark.parametrize("mode", scenarios.MODES)
def test_ddp_without_find_unused_parameters(mode: str) -> None:
    """Dropped branches run none of their units, yet their parameters get zero gradients: DDP
    trains without ``find_unused_parameters``, the ranks (which drop different branches) stay
    in sync, and equal a one-process replay averaging each rank's gradients."""
    ranks = [r[mode] for r in _ddp_results()]
    for result in ranks:
        assert result["error"] is None
        assert result["steps"] == scenarios.STEPS
        rows = result["rows"]
        assert len(rows) == 4 and all(len(calls) <= scenarios.STEPS for calls in rows)
        # some branch dropped every row in some step on this rank (its unit did not run)
        assert any(len(calls) < scenarios.STEPS for calls in rows)
        if mode == "row":  # and some ran on the kept rows only
            assert any(0 < n < scenarios.BATCH for calls in rows for n in calls)
    assert ranks[0]["rows"] != ranks[1]["rows"]  # the ranks dropped differently
    first, second = ranks[0]["parameters"], ranks[1]["parameters"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    expected = scenarios.reference_parameters(mode, 2)
    initial = dict(scenarios.build(mode).named_parameters())
    assert not all(torch.equal(first[k], initial[k]) for k in first)
    for name, value in expected.items():
        torch.testing.assert_close(first[name], value, rtol=1e-5, atol=1e-6, msg=name)
