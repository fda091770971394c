"""The one multi-process launcher of the distributed tests: real gloo ranks on this CPU.

``launch(suite)`` starts ``world_size`` processes of this file, each of which joins a gloo
group on 127.0.0.1, imports the scenario module ``suite`` (``helpers.<suite>``) and saves what
its ``run_rank(rank, world_size)`` returns to ``rank{RANK}.pt``. A rank that does not finish
within ``timeout_s`` (a hung collective) fails the test instead of hanging CI.

    python tests/helpers/distributed.py SUITE RANK WORLD_SIZE PORT OUT_DIR
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

TESTS = Path(__file__).resolve().parent.parent


class LaunchError(AssertionError):
    """A rank failed or hung; the message holds the end of every rank's stderr."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def join_gloo(rank: int, world_size: int, port: int, timeout_s: int) -> None:
    """One CPU thread, then this rank's place in a gloo group on 127.0.0.1:``port``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def average_rank_gradients(
    model: nn.Module, rng_states: list[Tensor], rank_loss: Callable[[int], Tensor]
) -> None:
    """One data-parallel step replayed in one process: each rank's loss computed under that
    rank's RNG stream (``rng_states[rank]``, advanced in place) and backpropagated, the
    gradients averaged into ``.grad`` as DDP's all-reduce averages them."""
    total = [torch.zeros_like(p) for p in model.parameters()]
    for rank, state in enumerate(rng_states):
        torch.set_rng_state(state)
        rank_loss(rank).backward()
        rng_states[rank] = torch.get_rng_state()
        for summed, parameter in zip(total, model.parameters(), strict=True):
            summed += parameter.grad
            parameter.grad = None
    for summed, parameter in zip(total, model.parameters(), strict=True):
        parameter.grad = summed / len(rng_states)


def replayed_parameters(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    seeds: list[int],
    steps: int,
    rank_loss: Callable[[int, int], Tensor],
) -> dict[str, Tensor]:
    """The parameters after ``steps`` data-parallel steps replayed in one process: each rank's
    RNG stream seeded from ``seeds[rank]``, ``rank_loss(rank, step)`` per rank, gradients
    averaged (``average_rank_gradients``), one optimizer step."""
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    model.train()
    for step in range(steps):
        average_rank_gradients(model, states, lambda rank, step=step: rank_loss(rank, step))
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def launch(suite: str, world_size: int = 2, timeout_s: int = 300) -> list[dict[str, Any]]:
    """Run scenario module ``suite`` on ``world_size`` gloo ranks; each rank's results."""
    python_path = os.pathsep.join(
        p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p
    )  # the package under test stays first where PYTHONPATH named it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        processes = [
            subprocess.Popen(
                [sys.executable, __file__, suite, str(rank), str(world_size), str(port), out_dir],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for rank in range(world_size)
        ]
        errors = []
        try:
            for rank, process in enumerate(processes):
                _, stderr = process.communicate(timeout=timeout_s)
                if process.returncode != 0:
                    errors.append(
                        f"rank {rank} exited with {process.returncode}:\n{stderr[-4000:]}"
                    )
        except subprocess.TimeoutExpired as error:
            raise LaunchError(f"{suite}: the ranks did not finish within {timeout_s} s") from error
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
        if errors:
            raise LaunchError("\n".join(errors))
        return [
            torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False)
            for rank in range(world_size)
        ]


def main(suite: str, rank: int, world_size: int, port: int, out_dir: Path) -> None:
    module = importlib.import_module(f"helpers.{suite}")
    join_gloo(rank, world_size, port, timeout_s=getattr(module, "COLLECTIVE_TIMEOUT_S", 60))
    try:
        results = module.run_rank(rank, world_size)
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
