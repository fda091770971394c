"""Figure 6: does ``skip_compute`` save the work it drops? Train steps at max_drop 0.5.

``python -m benchmarks.skipping [--write] [--smoke]`` times a train step (forward, backward,
SGD step) of each model injected twice from the same weights, with the mask
(``skip_compute=False``) and with skipping (``skip_compute=True``), interleaved, each pair under
the same seed, so both drop the same branches. The ideal ratio is the one of the floating-point
operations actually executed in those steps (``torch.utils.flop_counter``): what skipping could
save if time followed FLOPs. Writes ``benchmarks/SKIPPING.md`` with ``--write``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from droppath_inject import inject_droppath
from droppath_inject.report import SkipCompute

from .models import MODELS
from .timing import Stat

#: The plans under which a dropped branch costs less than its mask.
SKIPPING = frozenset(
    {
        SkipCompute.SKIPS_LAYER,
        SkipCompute.KEPT_ROWS,
        SkipCompute.KEPT_ROWS_BATCH_NORM_GATHERED,
        SkipCompute.KEPT_ROWS_UNLESS_BATCH_NORM_TRAINS,
    }
)

MAX_DROP = 0.5  # the 2016 paper's setting
RESULTS = Path(__file__).with_name("SKIPPING.md")


@dataclass(frozen=True)
class Case:
    """One row: a model, a drop mode, and the input it is timed on."""

    model: str
    mode: Literal["row", "batch"]
    batch: int
    size: int


CASES = (Case("resnet50", "batch", 8, 112), Case("vit_small", "batch", 8, 112),
         Case("vit_small", "row", 8, 112))  # fmt: skip
SMOKE_CASES = (Case("resnet18", "batch", 2, 32),)


@dataclass(frozen=True)
class Row:
    case: Case
    mask_ms: Stat
    measured: Stat  # per-step time ratio, skip / mask
    ideal: Stat  # per-step FLOP ratio, skip / mask
    sites: str


def _train_step(model: nn.Module, x: Tensor, target: Tensor) -> Callable[[int], None]:
    """One forward + backward + SGD step under ``torch.manual_seed(seed)``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step does the same work
    model.train()

    def step(seed: int) -> None:
        torch.manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        optimizer.step()

    return step


def _flops(step: Callable[[int], None], seed: int) -> int:
    with FlopCounterMode(display=False) as counter:
        step(seed)
    return counter.get_total_flops()


def _seconds(step: Callable[[int], None], seed: int) -> float:
    start = time.perf_counter()
    step(seed)
    return time.perf_counter() - start


def measure(case: Case, reps: int, warmup: int) -> Row:
    torch.manual_seed(0)
    base = MODELS[case.model].build(case.size)
    x = torch.randn(case.batch, 3, case.size, case.size)
    target = torch.randint(0, 1000, (case.batch,))
    variants = {}
    for skip in (False, True):
        model, report = inject_droppath(
            copy.deepcopy(base), MAX_DROP, mode=case.mode, example_inputs=x,
            skip_compute=skip, return_report=True,
        )  # fmt: skip
        variants[skip] = _train_step(model, x, target)
    skipping = sum(
        s.skip_compute is not None and s.skip_compute.how in SKIPPING for s in report.sites
    )
    for seed in range(warmup):
        for step in variants.values():
            step(10_000 + seed)
    mask_times, ratios, ideal = [], [], []
    for seed in range(reps):
        mask_s = _seconds(variants[False], seed)
        skip_s = _seconds(variants[True], seed)
        mask_times.append(mask_s)
        ratios.append(skip_s / mask_s)
        ideal.append(_flops(variants[True], seed) / _flops(variants[False], seed))
    return Row(case, Stat.of([t * 1e3 for t in mask_times]), Stat.of(ratios), Stat.of(ideal),
               f"{skipping}/{len(report.sites)}")  # fmt: skip


def render(rows: Sequence[Row], threads: int, reps: int) -> str:
    lines = [
        "# Skipping the work of dropped branches",
        "",
        "Regenerate with `python -m benchmarks.skipping --write`.",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()},"
        f" {threads} torch thread(s); torch {torch.__version__}",
        f"- train step (forward, backward, SGD) at `max_drop={MAX_DROP}` (linear schedule), "
        f"{reps} seeded steps per variant after a warm-up, mask and skip interleaved and under "
        "the same seed (the same branches dropped).",
        "- *ideal*: executed FLOPs of the skipping step / the masking step, counted with "
        "`torch.utils.flop_counter` on the same seeds; *measured*: the time ratio. "
        "*share of ideal saving*: (1 - measured) / (1 - ideal).",
        "",
        "| model | mode | input | sites skipping | mask step ms | ideal skip / mask | "
        "measured skip / mask | share of ideal saving |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row.case
        saving = (1 - row.measured.median) / (1 - row.ideal.median) if row.ideal.median < 1 else 0
        lines.append(
            f"| {MODELS[c.model].label} | {c.mode} | {c.batch}×3×{c.size}×{c.size} | {row.sites} "
            f"| {row.mask_ms.format(1)} | {row.ideal.format()} | {row.measured.format()} "
            f"| {saving:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.skipping", description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="one tiny model, a few seconds")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.name}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases, reps, warmup = (SMOKE_CASES, 2, 1) if args.smoke else (CASES, args.reps, 3)
    rows = [measure(case, reps, warmup) for case in cases]
    table = render(rows, args.threads, reps)
    print(table)
    if args.write and not args.smoke:
        RESULTS.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
