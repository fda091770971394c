"""Layer drop: does skipping whole dropped layers save the work? Block granularity, train steps.

``python -m benchmarks.layer_drop [--write] [--smoke]`` (about 20 minutes on one core) times a
train step (forward, backward, fused AdamW) of a small Llama (8 layers, hidden 256, sequence
128) and of timm's vit_small, injected with ``granularity="block"`` from the same weights three
ways: no drop path (rate 0), the mask (``skip_compute=False``) and skipping
(``skip_compute=True``), round by round under the same seed (mask and skip drop the same
layers). The ideal ratio is the one of the floating-point operations executed in those steps
(``torch.utils.flop_counter``, same seeds); the share of the ideal saving comes with a
bootstrap interval over the seeded steps. ``malloc`` keeps freed memory during the run
(``timing.keep_freed_memory``), so that page faults on fresh activations, which cost more for
some tensor sizes than others, stay out of the ratios. ``--write`` replaces the layer-drop
section of ``benchmarks/RESULTS.md`` only.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from droppath_inject import BlockHandling, inject_droppath

from .timing import Stat, interleaved, keep_freed_memory

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- layer-drop:begin -->", "<!-- layer-drop:end -->"
VARIANTS = ("none", "mask", "skip")
CPU = torch.device("cpu")
TARGET = 0.9  # the share of the ideal saving to reach


@dataclass(frozen=True)
class Case:
    """One row: a model at a size, a drop mode and the largest rate (linear schedule)."""

    model: str
    mode: Literal["row", "batch"]
    max_drop: float
    batch: int
    size: int  # sequence length, or image side
    layers: int = 8
    width: int = 256


def _llama(case: Case) -> tuple[nn.Module, dict[str, Any]]:
    config = LlamaConfig(
        vocab_size=1024, hidden_size=case.width, intermediate_size=case.width * 8 // 3,
        num_hidden_layers=case.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=case.size, attention_dropout=0.0,
    )  # fmt: skip
    ids = torch.randint(0, 1024, (case.batch, case.size))
    return LlamaForCausalLM(config), {"input_ids": ids, "labels": ids, "use_cache": False}


def _vit(case: Case) -> tuple[nn.Module, dict[str, Any]]:
    model = timm.create_model(
        "vit_small_patch16_224", img_size=case.size, depth=case.layers, embed_dim=case.width
    )
    return model, {"x": torch.randn(case.batch, 3, case.size, case.size)}


BUILDERS = {"llama": _llama, "vit_small": _vit}
MODES: tuple[tuple[Literal["row", "batch"], float], ...] = (
    ("batch", 0.2),
    ("batch", 0.5),
    ("row", 0.5),
)
CASES = tuple(
    Case(model, mode, rate, *sizes)
    for model, sizes in (("llama", (4, 128, 8, 256)), ("vit_small", (8, 112, 12, 384)))
    for mode, rate in MODES
)
SMOKE_CASES = (
    Case("llama", "batch", 0.5, 2, 16, 4, 32),
    Case("vit_small", "row", 0.5, 2, 32, 4, 48),
)


def _loss(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    if "labels" in inputs:
        return model(**inputs).loss
    return model(inputs["x"]).float().square().mean()


def _share_parameters(model: nn.Module, base: nn.Module) -> None:
    """Make ``model`` (an injected copy of ``base``) hold ``base``'s parameter objects, so that
    every variant reads the same memory: copies land at different addresses, and that alone
    made the same step differ by up to 4 % between copies."""
    originals = dict(base.named_parameters(remove_duplicate=False))
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, parameter in list(module._parameters.items()):
            if parameter is not None:
                module._parameters[name] = originals[f"{module_name}.{name}".lstrip(".")]


def _train_step(
    model: nn.Module, inputs: dict[str, Any], optimizer: torch.optim.Optimizer
) -> Callable[[int], None]:
    model.train()

    def step(seed: int) -> None:
        torch.manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        _loss(model, inputs).backward()
        optimizer.step()

    return step


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # lr 0: every step does the same work. fused: the fastest AdamW on CPU (the default
    # for-loop one takes 105 ms of vit_small's 800 ms step here, none of which skipping removes).
    return torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)


def _flops(step: Callable[[int], None], seed: int) -> int:
    with FlopCounterMode(display=False) as counter:
        step(seed)
    return int(counter.get_total_flops())


def _fastest(steps: dict[str, Callable[[int], None]], seed: int, tries: int) -> dict[str, float]:
    """Seconds of each variant's step under ``seed`` (the same work each time): the fastest of
    ``tries`` rounds, each round running every variant once in an order rotated by seed and
    round, so that a slow spell of the shared CPU hits all variants alike and the minimum
    discards it."""
    names = list(steps)
    shift = seed % len(names)
    seeded = {name: partial(steps[name], seed) for name in names[shift:] + names[:shift]}
    times = interleaved(seeded, tries, CPU, warmup=0, collect=True)
    return {name: min(times[name]) for name in names}


@dataclass(frozen=True)
class Share:
    """The share of the ideal saving that was measured, with a 95 % bootstrap interval.

    ``(1 - mean measured ratio) / (1 - mean FLOP ratio)`` over the seeded steps: per-step
    ratios, not sums of times, because each ratio pairs steps timed seconds apart while the
    machine's speed drifts by more than 10 % over a run. The interval resamples the steps.
    """

    value: float
    low: float
    high: float

    @staticmethod
    def _of(measured: Sequence[float], ideal: Sequence[float]) -> float:
        ideal_saving = 1 - statistics.fmean(ideal)
        return (1 - statistics.fmean(measured)) / ideal_saving if ideal_saving > 0 else math.nan

    @classmethod
    def of(cls, measured: Sequence[float], ideal: Sequence[float], resamples: int = 2000) -> Share:
        draw = random.Random(0)
        indices = range(len(measured))
        shares = []
        for _ in range(resamples):
            picked = draw.choices(indices, k=len(measured))
            shares.append(cls._of([measured[i] for i in picked], [ideal[i] for i in picked]))
        value = cls._of(measured, ideal)
        finite = sorted(x for x in shares if math.isfinite(x))
        if not finite:
            return cls(value, math.nan, math.nan)
        return cls(value, finite[int(0.025 * len(finite))], finite[int(0.975 * len(finite)) - 1])

    def format(self) -> str:
        return f"{self.value:.2f} ({self.low:.2f}–{self.high:.2f})"


@dataclass(frozen=True)
class Row:
    case: Case
    none_ms: Stat
    skip_over_mask: Stat  # per-step time ratios
    skip_over_none: Stat
    ideal: Stat  # per-step FLOP ratio, skip / no drop (the mask does all the FLOPs)
    share_of_none: Share  # of the saving against no drop path
    share_of_mask: Share  # of the saving against the mask
    skipping: str  # blocks that skip / blocks
    nothing_skipped: list[float]  # skip / no-drop time ratios of the steps that skipped nothing


def measure(case: Case, reps: int, warmup: int, tries: int) -> Row:
    torch.manual_seed(0)
    base, inputs = BUILDERS[case.model](case)
    optimizer = _optimizer(base)
    steps = {}
    for variant in VARIANTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, report = inject_droppath(
                copy.deepcopy(base), case.max_drop if variant != "none" else 0.0,
                mode=case.mode, granularity="block", skip_compute=variant == "skip",
                example_inputs=inputs, return_report=True,
            )  # fmt: skip
        _share_parameters(model, base)
        steps[variant] = _train_step(model, inputs, optimizer)
        if variant == "skip":
            assert report.layer_drop is not None
            blocks = report.layer_drop.blocks
            skipping = f"{sum(b.handling is BlockHandling.SKIPPED for b in blocks)}/{len(blocks)}"
    for seed in range(warmup):
        for step in steps.values():
            step(10_000 + seed)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    flops: dict[str, list[int]] = {"none": [], "skip": []}
    for seed in range(reps):
        for variant, seconds in _fastest(steps, seed, tries).items():
            times[variant].append(seconds)
        for variant in flops:
            flops[variant].append(_flops(steps[variant], seed))
    per = [a / b for a, b in zip(times["skip"], times["mask"], strict=True)]
    per_none = [a / b for a, b in zip(times["skip"], times["none"], strict=True)]
    ideal = [a / b for a, b in zip(flops["skip"], flops["none"], strict=True)]
    none_ms = Stat.of([t * 1e3 for t in times["none"]])
    return Row(
        case, none_ms, Stat.of(per), Stat.of(per_none), Stat.of(ideal),
        Share.of(per_none, ideal), Share.of(per, ideal), skipping,
        [r for r, i in zip(per_none, ideal, strict=True) if i == 1.0],
    )  # fmt: skip


@dataclass(frozen=True)
class HalfBatch:
    """The model's own step (no injection) on half the batch against the whole batch: how
    closely time follows the number of rows on this machine at this size, with no drop path
    involved. Row mode runs kept layers on fewer rows, so this is the saving it can hope for."""

    case: Case
    full_ms: Stat
    half_ms: Stat
    ideal: float  # FLOP ratio, half / whole batch
    share: Share


def measure_half_batch(case: Case, reps: int, warmup: int, tries: int) -> HalfBatch:
    torch.manual_seed(0)
    model, inputs = BUILDERS[case.model](case)
    half = {k: v[: case.batch // 2] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    optimizer = _optimizer(model)
    steps = {
        "full": _train_step(model, inputs, optimizer),
        "half": _train_step(model, half, optimizer),
    }
    for seed in range(warmup):
        for step in steps.values():
            step(10_000 + seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for seed in range(reps):
        for name, seconds in _fastest(steps, seed, tries).items():
            times[name].append(seconds)
    ideal = _flops(steps["half"], 0) / _flops(steps["full"], 0)  # no drop: the same every seed
    per = [a / b for a, b in zip(times["half"], times["full"], strict=True)]
    return HalfBatch(
        case,
        Stat.of([t * 1e3 for t in times["full"]]),
        Stat.of([t * 1e3 for t in times["half"]]),
        ideal,
        Share.of(per, [ideal] * len(per)),
    )


def _shape(case: Case) -> str:
    if case.model == "llama":
        return f"{case.batch}×{case.size} tokens, {case.layers} layers × {case.width}"
    return f"{case.batch}×3×{case.size}×{case.size}, {case.layers} blocks × {case.width}"


def _nothing_skipped(ratios: Sequence[float]) -> str:
    if not ratios:
        return "none such"
    return f"{statistics.fmean(ratios):.3f} (mean of {len(ratios)})"


def render(
    rows: Sequence[Row],
    halves: Sequence[HalfBatch],
    threads: int,
    reps: int,
    tries: int,
    load: tuple[float, float],
    kept_memory: bool,
) -> str:
    """The RESULTS.md section; ``load`` is the 1-minute load average before and after,
    ``kept_memory`` whether ``malloc`` was told to keep freed memory."""
    cpu = platform.processor() or platform.machine()
    lines = [
        BEGIN,
        "## 6. Layer drop: train step, block granularity, skip / mask / no drop path",
        "",
        "Regenerate with `python -m benchmarks.layer_drop --write` (only this section).",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; CPU only ({cpu}, "
        f"{os.cpu_count()} cores, 1-minute load average {load[0]:.2f} before the run and "
        f"{load[1]:.2f} after), `torch.set_num_threads({threads})`; "
        f"torch {torch.__version__}; "
        + (
            "glibc `malloc` told to keep freed memory (`benchmarks.timing.keep_freed_memory`: "
            "no page faults on fresh activations)"
            if kept_memory
            else "the C library's default `malloc`"
        )
        + ". No GPU was lent to this run, so there are no GPU rows.",
        "- train step: forward, backward, AdamW (`fused=True`); "
        '`inject_droppath(granularity="block")`, linear schedule; '
        f"{reps} seeded steps per variant after a warm-up, all three variants under the same "
        "seed (mask and skip drop the same layers); each time is the fastest of "
        f"{tries} rounds that run the three variants' step in turn, in a rotated order "
        "(other jobs only add time, and a slow spell hits every variant).",
        "- *ideal*: executed FLOPs of the skipping step / the no-drop step "
        "(`torch.utils.flop_counter`, same seeds; the mask executes every FLOP). *Share of the "
        "ideal saving*: (1 - mean measured ratio) / (1 - mean FLOP ratio) over the seeded "
        "steps, against no drop path and against the mask, with a 95 % bootstrap interval over "
        "the steps; target >= 0.9. Per-step ratios, not sums of times: each ratio pairs steps "
        "timed seconds apart, while the machine's speed drifts over a run.",
        "",
        "| model | input | mode | max_drop | blocks skipping | no-drop step ms | ideal skip / "
        "no drop | measured skip / no drop | measured skip / mask | share of ideal saving, "
        "vs no drop | vs mask | skip / no drop, steps that skipped nothing |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row.case
        lines.append(
            f"| {c.model} | {_shape(c)} | {c.mode} | {c.max_drop} | {row.skipping} | "
            f"{row.none_ms.format(1)} | {row.ideal.format()} | {row.skip_over_none.format()} | "
            f"{row.skip_over_mask.format()} | {row.share_of_none.format()} | "
            f"{row.share_of_mask.format()} | {_nothing_skipped(row.nothing_skipped)} |"
        )
    shares = [row.share_of_none for row in rows]
    met = sum(share.value >= TARGET for share in shares)
    above = sum(share.low >= TARGET for share in shares)
    below = sum(share.high < TARGET for share in shares)
    spread = max((r.none_ms.high - r.none_ms.low) / r.none_ms.median for r in rows)
    lines += [
        "",
        f"Against no drop path, {met} of {len(rows)} rows reach {TARGET} of the ideal saving; "
        f"{above} lie at or above it and {below} below it with 95 % confidence, and the "
        f"intervals of the other {len(rows) - above - below} contain it. The no-drop step, the "
        f"same work every time, varies by up to {spread:.0%} of its median between steps, so "
        "where the ideal saving is a few percent (`max_drop=0.2`) the interval is wide. Each "
        "mode skips every block the graph proves skippable. The FLOP count leaves out "
        "elementwise work and the AdamW step, which a skipped layer does not remove (every "
        "parameter still gets a gradient), so the ideal overstates the time that can be saved; "
        "fused AdamW keeps that part small. Nor does it see what any drop path costs on a kept "
        "layer, mask and skip alike: drawing the decision and scaling each branch by 1 / keep "
        "(the last column: steps whose seeds dropped no layer), which weighs most where little "
        "is skipped. What skipping costs beyond that: a zero-gradient term per skipped layer "
        "(and its zero gradients), and in row mode the gathers, the `index_copy` and smaller "
        "matmuls.",
    ]
    if halves:
        lines += ["", *_render_halves(rows, halves)]
    return "\n".join([*lines, END]) + "\n"


def _render_halves(rows: Sequence[Row], halves: Sequence[HalfBatch]) -> list[str]:
    """The half-batch reference table, and each row-mode share beside its model's."""
    lines = [
        "How far time follows the number of rows here, with no drop path at all: the model's own "
        "train step (not injected) on the first half of the batch against the whole batch, timed "
        "the same way over the same seeds. A row-mode layer runs on its kept rows only, so this "
        "share is about the most row mode can reach on this machine at these sizes: smaller "
        "matmuls use the CPU less well, and a layer's fixed cost per call stays.",
        "",
        "| model | input | whole-batch step ms | half-batch step ms | ideal half / whole | "
        "share of ideal saving |",
        "|---|---|---|---|---|---|",
    ]
    for half in halves:
        lines.append(
            f"| {half.case.model} | {_shape(half.case)} | {half.full_ms.format(1)} | "
            f"{half.half_ms.format(1)} | {half.ideal:.2f} | {half.share.format()} |"
        )
    compared = [
        f"{row.case.model} at max_drop {row.case.max_drop} {row.share_of_none.format()} against "
        f"{half.share.format()} on half the batch"
        for half in halves
        for row in rows
        if row.case.mode == "row" and row.case.model == half.case.model
    ]
    if compared:
        lines += ["", "Row mode's share of the ideal saving: " + "; ".join(compared) + "."]
    return lines


def write_section(section: str, path: Path = RESULTS) -> None:
    """Replace the layer-drop section of ``path`` (or append it), leaving the rest as it is."""
    text = path.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.layer_drop", description=__doc__)
    parser.add_argument("--reps", type=int, default=20, help="seeded steps per variant")
    parser.add_argument(
        "--tries", type=int, default=3, help="rounds per seed, each variant once; fastest kept"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few seconds")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    parser.add_argument("--only", default="", help="run only the cases of this model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kept_memory = keep_freed_memory()
    cases, reps, warmup, tries = (
        (SMOKE_CASES, 2, 1, 1) if args.smoke else (CASES, args.reps, 3, args.tries)
    )
    cases = tuple(c for c in cases if not args.only or c.model == args.only)
    load_before = os.getloadavg()[0]
    rows = [measure(case, reps, warmup, tries) for case in cases]
    halves = [measure_half_batch(c, reps, warmup, tries) for c in cases if c.mode == "row"]
    load = (load_before, os.getloadavg()[0])
    section = render(rows, halves, args.threads, reps, tries, load, kept_memory)
    print(section)
    if args.write and not args.smoke:
        write_section(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
