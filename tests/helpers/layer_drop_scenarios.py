"""Layer skipping under DDP (no ``find_unused_parameters``) and FSDP2, for
``test_layer_drop_distributed.py``.

Run by ``helpers.distributed.launch("layer_drop_scenarios")``. Every rank builds the same small
Llama (seed 0), injects ``granularity="block", skip_compute=True``, wraps it, seeds its own RNG
(``BASE_SEED + rank``: the ranks decide differently) and trains ``STEPS`` AdamW steps on data
of its own. ``reference_parameters`` replays the same training in one process.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from droppath_inject import DropPathInjectError, inject_droppath
from droppath_inject.layer_drop import skips_of
from helpers import layer_drop_models as ldm
from helpers.distributed import replayed_parameters

COLLECTIVE_TIMEOUT_S = 60
STEPS = 4
BATCH = 4
LAYERS = 4
MAX_DROP = 0.5
LR = 1e-2
BASE_SEED = 4321

#: (wrapper, mode). The one expected to raise comes last.
SCENARIOS: tuple[tuple[str, str], ...] = (
    ("ddp", "batch"),
    ("ddp", "row"),
    ("fsdp2", "batch"),
    ("fsdp2", "row"),
    ("fsdp2_nested", "batch"),
)


def key(scenario: tuple[str, str]) -> str:
    return "/".join(scenario)


def build(mode: str) -> nn.Module:
    """The injected model every rank starts from."""
    model, inputs = ldm.build("llama", layers=LAYERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_droppath(
            model, MAX_DROP, schedule="uniform", mode=mode, granularity="block",
            skip_compute=True, example_inputs={**inputs, "use_cache": False},
        )  # fmt: skip
    return model


def batch(rank: int, step: int) -> Tensor:
    generator = torch.Generator().manual_seed(1000 + 100 * rank + step)
    return torch.randint(3, ldm.VOCAB, (BATCH, ldm.SEQUENCE), generator=generator)


def loss(model: nn.Module, ids: Tensor) -> Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def wrap(model: nn.Module, wrapper: str) -> nn.Module:
    if wrapper == "ddp":
        return DistributedDataParallel(model)  # find_unused_parameters=False
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        if wrapper == "fsdp2_nested":
            fully_shard(layer.mlp)  # a unit inside a block that skipping would leave ungathered
        fully_shard(layer)
    return fully_shard(model)


def full_parameters(model: nn.Module) -> dict[str, Tensor]:
    result = {}
    for name, parameter in model.named_parameters():
        full = getattr(parameter, "full_tensor", None)
        result[name] = (full() if full is not None else parameter).detach().clone()
    return result


def run_scenario(scenario: tuple[str, str], rank: int) -> dict[str, Any]:
    wrapper, mode = scenario
    model = build(mode)
    wrapped = wrap(model, wrapper)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    torch.manual_seed(BASE_SEED + rank)
    wrapped.train()
    for step in range(STEPS):
        loss(wrapped, batch(rank, step)).backward()
        optimizer.step()
        optimizer.zero_grad()
    skips = skips_of(model).values()
    return {
        "parameters": full_parameters(model),
        "skipped": [s.skipped_calls for s in skips],
        "gathered": [s.gathered_calls for s in skips],
        "masked": sum(s.masked_calls for s in skips),
    }


def run_rank(rank: int, world_size: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        try:
            results[key(scenario)] = run_scenario(scenario, rank)
        except DropPathInjectError as error:
            results[key(scenario)] = {"error": f"{type(error).__name__}: {error}"}
    return results


def reference_parameters(mode: str, world_size: int) -> dict[str, Tensor]:
    """The same training in one process: each rank's RNG stream replayed, gradients averaged."""
    model = build(mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    seeds = [BASE_SEED + rank for rank in range(world_size)]
    return replayed_parameters(
        model, optimizer, seeds, STEPS, lambda rank, step: loss(model, batch(rank, step))
    )
