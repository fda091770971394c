"""DistributedDataParallel over skipping branches (``granularity="branch"``), for
``test_skipping_control.py``.

Run by ``helpers.distributed.launch("skip_ddp_scenarios")``; ``run_rank`` returns each
scenario's result. A small residual net is injected with ``skip_compute=True`` at a high rate,
so whole branches drop and their units do not run in many steps, then trained for a few steps
under DDP over gloo WITHOUT ``find_unused_parameters``: a dropped branch's parameters get zero
gradients, so every rank reduces every gradient. The ranks are seeded differently, so they
drop different branches. ``reference_parameters`` replays the same training in one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from droppath_inject import inject_droppath
from droppath_inject.branch_rows import units_of
from helpers import synthetic_models as sm
from helpers.distributed import replayed_parameters

STEPS = 6
BATCH = 4
MAX_DROP = 0.7
LR = 0.1
BASE_SEED = 100
MODES = ("batch", "row")


def build(mode: str) -> nn.Module:
    """The same injected net on every rank: four pre-norm MLP residuals."""
    torch.manual_seed(0)
    model = sm.token_net([sm.PreNormResidual() for _ in range(4)])
    x = torch.randn(BATCH, sm.TOKENS, sm.DIM)
    inject_droppath(
        model, MAX_DROP, mode=mode, schedule="uniform", skip_compute=True, example_inputs=x
    )
    return model


def data(rank: int, step: int) -> Tensor:
    generator = torch.Generator().manual_seed(1000 + 100 * rank + step)
    return torch.randn(BATCH, sm.TOKENS, sm.DIM, generator=generator)


def loss(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).square().mean()


def rows_seen(model: nn.Module) -> list[list[int]]:
    """Per branch, the rows its first linear layer computes on, one entry per call (a pre-hook
    on a module inside the branch's MLP unit: it does not run when the branch drops all)."""
    seen: list[list[int]] = []
    for path in units_of(model):
        mlp = model.get_submodule(path)
        if isinstance(mlp, nn.Sequential):
            calls: list[int] = []
            seen.append(calls)
            mlp[0].register_forward_pre_hook(
                lambda _m, args, calls=calls: calls.append(args[0].shape[0])
            )
    return seen


def run(mode: str, rank: int) -> dict[str, Any]:
    """Train ``STEPS`` steps under DDP; the rows each branch ran on, the first error, the
    parameters after."""
    model = build(mode)
    seen = rows_seen(model)
    ddp = DistributedDataParallel(model)  # find_unused_parameters=False
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    torch.manual_seed(BASE_SEED + rank)
    result: dict[str, Any] = {"steps": 0, "error": None}
    for step in range(STEPS):
        try:
            optimizer.zero_grad()
            loss(ddp, data(rank, step)).backward()
            optimizer.step()
        except RuntimeError as error:
            result["error"] = f"{type(error).__name__}: {error}"
            break
        result["steps"] += 1
    result["rows"] = seen
    result["parameters"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return result


def run_rank(rank: int, world_size: int) -> dict[str, Any]:
    return {mode: run(mode, rank) for mode in MODES}


def reference_parameters(mode: str, world_size: int) -> dict[str, Tensor]:
    """The same training in one process: each rank's RNG stream replayed, gradients averaged."""
    model = build(mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    seeds = [BASE_SEED + rank for rank in range(world_size)]
    return replayed_parameters(
        model, optimizer, seeds, STEPS, lambda rank, step: loss(model, data(rank, step))
    )
