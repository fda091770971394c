"""The DistributedDataParallel scenarios of ``test_skipping.py`` (the symbolic pipeline).

Run by ``helpers.distributed.launch("skip_ddp_scenarios")``; ``run_rank`` returns the result
of each scenario. A small residual net is injected with ``skip_compute=True`` at a high
rate, so whole branches are skipped and their parameters get no gradient in many steps, then
trained for a few steps under DDP over gloo, with and without ``find_unused_parameters``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from droppath_inject import inject_droppath
from droppath_inject.skipping import SkippingDropPath
from helpers import synthetic_models as sm

STEPS = 6
BATCH = 2
MAX_DROP = 0.9

#: (name, mode, find_unused_parameters, seed the ranks differently). The scenario expected to
#: fail comes last: a failed DDP iteration leaves the process group in no state to go on.
SCENARIOS = (
    ("batch, find_unused_parameters=True", "batch", True, True),
    ("row, find_unused_parameters=True", "row", True, True),
    ("batch, find_unused_parameters=False", "batch", False, False),
)


def build(mode: str) -> nn.Module:
    """The same injected net on every rank: four pre-norm MLP residuals."""
    torch.manual_seed(0)
    model = sm.token_net([sm.PreNormResidual() for _ in range(4)])
    x = torch.randn(BATCH, sm.TOKENS, sm.DIM)
    inject_droppath(
        model, MAX_DROP, mode=mode, schedule="uniform", skip_compute=True, example_inputs=x
    )
    return model


def digest(model: nn.Module) -> str:
    """A hash of every parameter's bytes: equal on all ranks exactly when they are in sync."""
    sha = hashlib.sha256()
    for _, param in sorted(model.named_parameters()):
        sha.update(param.detach().contiguous().numpy().tobytes())
    return sha.hexdigest()


def run(mode: str, find_unused: bool, seed_by_rank: bool, rank: int) -> dict[str, Any]:
    """Train ``STEPS`` steps; record which branches ran, the first error, the parameters' hash."""
    model = build(mode)
    drops = [m for m in model.modules() if isinstance(m, SkippingDropPath)]
    calls: list[int] = []
    for index, drop in enumerate(drops):
        first = next(n for n in drop.branch.graph.nodes if n.op == "call_module")
        drop.branch.get_submodule(str(first.target)).register_forward_pre_hook(
            lambda _m, _a, i=index: calls.append(i)
        )
    before = digest(model)
    ddp = DistributedDataParallel(model, find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)
    data = torch.randn(STEPS, BATCH, sm.TOKENS, sm.DIM)
    result: dict[str, Any] = {"steps": 0, "error": None, "ran": []}
    for step in range(STEPS):
        torch.manual_seed(1000 * step + (rank if seed_by_rank else 0))
        calls.clear()
        try:
            optimizer.zero_grad()
            ddp(data[step]).square().mean().backward()
            optimizer.step()
        except RuntimeError as error:
            result["error"] = f"{type(error).__name__}: {error}"
            break
        finally:
            result["ran"].append(sorted(set(calls)))
        result["steps"] += 1
    result["changed"] = digest(model) != before
    result["digest"] = digest(model)
    result["branches"] = len(drops)
    return result


def run_rank(rank: int, world_size: int) -> dict[str, Any]:
    return {name: run(*config, rank) for name, *config in SCENARIOS}
