"""Layer skipping on two real gloo processes: DDP without ``find_unused_parameters``, FSDP2.

The ranks are seeded differently, so they skip different layers: every rank still runs every
block's hooks (FSDP2 gathers) and gives every parameter a gradient (zero for a skipped block),
so no collective is missed. Parameters must agree across ranks and with a one-process replay.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import layer_drop_scenarios as scenarios
from helpers.distributed import LaunchError, launch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    try:
        return launch("layer_drop_scenarios", WORLD_SIZE, timeout_s=300)
    except LaunchError as error:
        pytest.fail(str(error))


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_in_sync_and_equal_to_one_process_replay(
    ranks: list[dict[str, Any]], wrapper: str, mode: str
) -> None:
    results = [r[scenarios.key((wrapper, mode))] for r in ranks]
    first = results[0]["parameters"]
    for other in results[1:]:
        assert other["parameters"].keys() == first.keys()
        assert all(torch.equal(other["parameters"][k], v) for k, v in first.items())
    expected = scenarios.reference_parameters(mode, WORLD_SIZE)
    assert first.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(first[name], value, rtol=1e-5, atol=1e-6, msg=name)
    initial = dict(scenarios.build(mode).named_parameters())
    assert not all(torch.equal(first[k], initial[k]) for k in first)
    # layers were really skipped (batch) or run on kept rows (row), differently on each rank
    counts = [r["skipped"] if mode == "batch" else r["gathered"] for r in results]
    assert all(sum(c) > 0 for c in counts) and counts[0] != counts[1]
    assert all(r["masked"] == 0 for r in results)


def test_fsdp2_unit_inside_a_skipped_block_raises_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in ranks:
        error = rank[scenarios.key(("fsdp2_nested", "batch"))]["error"]
        assert error.startswith("DropPathInjectError: skip_compute cannot skip")
        assert "fully_shard the whole block" in error
