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
from helpers.distributed import launch
from helpers.skipping_checks import (
    MAX_DROP,
    SEEDS,
    branch_rows,
    build,
    skipping_drops,
    statuses,
)
from torch import nn

from droppath_inject import (
    DropPath,
    SiteStatus,
    inject_droppath,
    remove_droppath,
    set_drop_rates,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# --- 6. re-injection, control, copies ----------------------------------------------------------


def test_second_injection_updates_rates() -> None:
    """Calling inject_droppath again updates the skipping DropPaths' rates, never nests."""
    model, x = build("layer_norm_mlp")
    inject_droppath(model, 0.2, skip_compute=True, example_inputs=x)
    count = len(skipping_drops(model))
    _, report = inject_droppath(model, 0.4, skip_compute=True, example_inputs=x, return_report=True)
    assert len(report.sites) == count
    assert statuses(report) == {(SiteStatus.RE_RATED, None)}
    assert len(skipping_drops(model)) == count
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
    assert all(calls == [] for calls in seen.values())
    remove_droppath(model)
    assert not any(isinstance(m, DropPath) for m in model.modules())
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
        own = {id(p) for p in net.parameters()}
        drops = skipping_drops(net).values()
        assert drops and all(id(p) in own for d in drops for p in d.branch.parameters())
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
    return tuple(launch("skip_ddp_scenarios", world_size=2, timeout_s=90))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_ddp_with_find_unused_parameters(mode: str) -> None:
    """Skipped branches leave parameters unused; with find_unused_parameters DDP trains on."""
    ranks = [r[f"{mode}, find_unused_parameters=True"] for r in _ddp_results()]
    for result in ranks:
        assert result["error"] is None
        assert result["steps"] == 6 and result["changed"]
        # some step skipped a branch on this rank (its parameters got no gradient there)
        assert any(len(ran) < result["branches"] for ran in result["ran"])
    assert ranks[0]["ran"] != ranks[1]["ran"]  # the ranks skipped different branches
    assert ranks[0]["digest"] == ranks[1]["digest"]  # and still hold the same parameters


@pytest.mark.slow
def test_ddp_without_find_unused_parameters_fails() -> None:
    """Without find_unused_parameters, the step after a skipped branch raises DDP's error."""
    for result in _ddp_results():
        result = result["batch, find_unused_parameters=False"]
        assert len(result["ran"][0]) < result["branches"]  # step 0 skipped a branch
        assert result["steps"] == 1
        assert result["error"].startswith(
            "RuntimeError: Expected to have finished reduction in the prior iteration"
        )
        assert "find_unused_parameters=True" in result["error"]
