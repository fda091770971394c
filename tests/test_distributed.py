"""Distributed training of injected models: DDP and FSDP2 over gloo, two real CPU processes.

``helpers/droppath_scenarios.py`` runs as two ranks (``helpers.distributed.launch``); each
returns its final parameters and every keep decision its DropPath modules made. References:
the other rank, and the same training replayed in this process with each rank's seed and data
and averaged gradients.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import droppath_scenarios as ddp_worker
from helpers.distributed import LaunchError, launch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

WORLD_SIZE = 2
TIMEOUT_S = 300  # a hung collective fails the test instead of hanging CI


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    """Run ``helpers/droppath_scenarios.py`` as two gloo ranks; each rank's results."""
    try:
        return launch("droppath_scenarios", WORLD_SIZE, TIMEOUT_S)
    except LaunchError as error:
        pytest.fail(str(error))


def scenario_results(
    ranks: list[dict[str, Any]], scenario: tuple[str, str, str]
) -> list[dict[str, Any]]:
    results = [rank[ddp_worker.key(scenario)] for rank in ranks]
    if "error" in results[0]:
        pytest.skip(f"{scenario[0]} failed on CPU with gloo: {results[0]['error']}")
    return results


def assert_in_sync_and_trained(results: list[dict[str, Any]], name: str) -> None:
    """Every rank ends with bitwise the same parameters, and they moved from the start."""
    first = results[0]["parameters"]
    for other in results[1:]:
        assert other["parameters"].keys() == first.keys()
        for key, value in first.items():
            assert torch.equal(other["parameters"][key], value), key
    initial = dict(ddp_worker.build(name).named_parameters())
    assert first.keys() == initial.keys()
    assert not all(torch.equal(first[k], initial[k]) for k in first)


def assert_matches_reference(results: list[dict[str, Any]], scenario: tuple[str, str, str]) -> None:
    """Same as one process replaying each rank's seed and data and averaging gradients."""
    expected = ddp_worker.reference_parameters(scenario, WORLD_SIZE)
    actual = results[0]["parameters"]
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=key)


def keep_decisions(result: dict[str, Any]) -> torch.Tensor:
    return torch.cat(result["decisions"])


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_ddp_keeps_parameters_in_sync_and_averages_gradients(
    ranks: list[dict[str, Any]], name: str
) -> None:
    scenario = ("ddp", name, "per_rank")
    results = scenario_results(ranks, scenario)
    assert_in_sync_and_trained(results, name)
    assert_matches_reference(results, scenario)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny"])
def test_ddp_ranks_draw_their_own_masks_when_seeded_per_rank(
    ranks: list[dict[str, Any]], name: str
) -> None:
    """Seeded ``BASE + rank``: different keep decisions; one seed on every rank: identical ones."""
    per_rank = [keep_decisions(r) for r in scenario_results(ranks, ("ddp", name, "per_rank"))]
    same = [keep_decisions(r) for r in scenario_results(ranks, ("ddp", name, "same"))]
    assert per_rank[0].shape == per_rank[1].shape == same[0].shape
    assert not per_rank[0].all() and not per_rank[1].all()  # branches were dropped
    assert not torch.equal(per_rank[0], per_rank[1])
    # the data differ between ranks (ddp_worker.batch), the decisions do not: they follow the seed
    assert torch.equal(same[0], same[1])
    assert not same[0].all()
    assert_matches_reference(scenario_results(ranks, ("ddp", name, "same")), ("ddp", name, "same"))


@pytest.mark.parametrize("name", ["vit_tiny", "resnet18"])
def test_fsdp2_fully_shard_trains_on_cpu(ranks: list[dict[str, Any]], name: str) -> None:
    """FSDP2 (``fully_shard``) over gloo: blocks sharded, rates raised each step, as with DDP."""
    scenario = ("fsdp2", name, "per_rank")
    results = scenario_results(ranks, scenario)
    assert_in_sync_and_trained(results, name)
    assert_matches_reference(results, scenario)
    assert not torch.equal(keep_decisions(results[0]), keep_decisions(results[1]))
