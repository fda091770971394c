"""The scenarios of the distributed training checks in ``test_distributed.py``.

Run by ``helpers.distributed.launch("droppath_scenarios")``: every rank builds the same model
(seed 0), injects DropPath, wraps it (DistributedDataParallel, or FSDP2's ``fully_shard``),
seeds its own RNG (``BASE_SEED + rank``, or ``BASE_SEED`` on every rank) and trains ``STEPS``
SGD steps on data of its own, raising the rates each step. The parameters it ends with and the
keep decision of every DropPath call are returned by ``run_rank``.

``reference_parameters`` replays the same training in one process, for comparison.
"""

from __future__ import annotations

import traceback
from functools import partial
from typing import Any

import timm
import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from droppath_inject import DropPath, DropPathScheduler, inject_droppath
from helpers.distributed import average_rank_gradients

STEPS = 3
BATCH = 4
NUM_CLASSES = 10
MAX_DROP = 0.6
LR = 0.1
BASE_SEED = 1234

#: (wrapper, model, seeding). FSDP2 comes last: a failure there must not cut the DDP runs short.
SCENARIOS: tuple[tuple[str, str, str], ...] = (
    ("ddp", "resnet18", "per_rank"),
    ("ddp", "resnet18", "same"),
    ("ddp", "vit_tiny", "per_rank"),
    ("ddp", "vit_tiny", "same"),
    ("fsdp2", "vit_tiny", "per_rank"),
    ("fsdp2", "resnet18", "per_rank"),
)


def key(scenario: tuple[str, str, str]) -> str:
    return "/".join(scenario)


def build(name: str) -> nn.Module:
    """The model every rank starts from: built under seed 0, then injected."""
    torch.manual_seed(0)
    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    else:
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=NUM_CLASSES)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return inject_droppath(model, MAX_DROP, example_inputs=x)


def batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    """This rank's data at ``step``: different on every rank, from a generator of its own."""
    generator = torch.Generator().manual_seed(1000 + 100 * rank + step)
    x = torch.randn(BATCH, 3, 32, 32, generator=generator)
    return x, torch.randint(NUM_CLASSES, (BATCH,), generator=generator)


def seed(rank: int, seeding: str) -> int:
    return BASE_SEED + rank if seeding == "per_rank" else BASE_SEED


def rate_at(step: int) -> float:
    """The largest rate at each step: rising to MAX_DROP, so rates change during training."""
    return MAX_DROP * (step + 1) / STEPS


def record_keep_decisions(model: nn.Module) -> list[Tensor]:
    """Register hooks appending, for every DropPath call, which samples kept their branch."""
    decisions: list[Tensor] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        decisions.append(out.detach().flatten(1).ne(0).any(1))

    for module in model.modules():
        if isinstance(module, DropPath):
            module.register_forward_hook(hook)
    return decisions


def train(model: nn.Module, wrapped: nn.Module, rank: int) -> None:
    """STEPS steps of SGD on ``wrapped``, the rates of ``model`` set by a scheduler."""
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    scheduler = DropPathScheduler(model, rate_at)
    wrapped.train()
    for step in range(STEPS):
        x, y = batch(rank, step)
        F.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def full_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter, whole (FSDP2 shards are gathered), by name."""
    result = {}
    for name, parameter in model.named_parameters():
        full = getattr(parameter, "full_tensor", None)
        result[name] = (full() if full is not None else parameter).detach().clone()
    return result


def run_scenario(scenario: tuple[str, str, str], rank: int) -> dict[str, Any]:
    wrapper, name, seeding = scenario
    model = build(name)
    decisions = record_keep_decisions(model)
    if wrapper == "ddp":
        wrapped: nn.Module = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        blocks = model.blocks if name == "vit_tiny" else [model.layer1, model.layer2, model.layer3]
        for block in blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    torch.manual_seed(seed(rank, seeding))
    train(model, wrapped, rank)
    return {"parameters": full_parameters(model), "decisions": decisions}


def rank_loss(model: nn.Module, rank: int, step: int) -> Tensor:
    """The loss ``rank`` computes at ``step``."""
    x, y = batch(rank, step)
    return F.cross_entropy(model(x), y)


def reference_parameters(scenario: tuple[str, str, str], world_size: int) -> dict[str, Tensor]:
    """The same training in one process: each rank's RNG stream replayed, gradients averaged."""
    _, name, seeding = scenario
    model = build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = DropPathScheduler(model, rate_at)
    states = []
    for rank in range(world_size):
        torch.manual_seed(seed(rank, seeding))
        states.append(torch.get_rng_state())
    model.train()
    for step in range(STEPS):
        average_rank_gradients(model, states, partial(rank_loss, model, step=step))
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run_rank(rank: int, world_size: int) -> dict[str, Any]:
    """Every scenario on this rank; FSDP2's failure on gloo is recorded, ending the run."""
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        try:
            results[key(scenario)] = run_scenario(scenario, rank)
        except Exception as error:
            if scenario[0] != "fsdp2":
                raise
            traceback.print_exc()
            results[key(scenario)] = {"error": f"{type(error).__name__}: {error}"}
            break  # a failed collective leaves the group unusable
    return results
