"""Layer drop: does skipping whole dropped layers save the work? Block granularity, train steps.

``python -m benchmarks.layer_drop [--write] [--smoke]`` times a train step (forward, backward,
AdamW step) of a small Llama (8 layers, hidden 256, sequence 128) and of timm's vit_small,
injected with ``granularity="block"`` from the same weights three ways: no drop path (rate 0),
the mask (``skip_compute=False``) and skipping (``skip_compute=True``), interleaved, each
triple under the same seed (mask and skip drop the same layers). The ideal ratio is the one of
the floating-point operations executed in those steps (``torch.utils.flop_counter``, same
seeds). ``--write`` replaces the layer-drop section of ``benchmarks/RESULTS.md`` only.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import timm
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from droppath_inject import BlockHandling, inject_droppath

from .timing import Stat

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- layer-drop:begin -->", "<!-- layer-drop:end -->"
VARIANTS = ("none", "mask", "skip")


@dataclass(frozen=True)
class Case:
    """One row: a model at a size, a drop mode and the largest rate (linear schedule)."""

    model: str
    mode: str
    max_drop: float
    batch: int
    size: int  # sequence length, or image side
    layers: int = 8
    width: int = 256


def _llama(case: Case) -> tuple[nn.Module, dict[str, Tensor]]:
    config = LlamaConfig(
        vocab_size=1024, hidden_size=case.width, intermediate_size=case.width * 8 // 3,
        num_hidden_layers=case.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=case.size, attention_dropout=0.0,
    )  # fmt: skip
    ids = torch.randint(0, 1024, (case.batch, case.size))
    return LlamaForCausalLM(config), {"input_ids": ids, "labels": ids, "use_cache": False}


def _vit(case: Case) -> tuple[nn.Module, dict[str, Tensor]]:
    model = timm.create_model(
        "vit_small_patch16_224", img_size=case.size, depth=case.layers, embed_dim=case.width
    )
    return model, {"x": torch.randn(case.batch, 3, case.size, case.size)}


BUILDERS = {"llama": _llama, "vit_small": _vit}
CASES = tuple(
    Case(model, mode, rate, *sizes)
    for model, sizes in (("llama", (4, 128, 8, 256)), ("vit_small", (8, 112, 12, 384)))
    for mode, rate in (("batch", 0.2), ("batch", 0.5), ("row", 0.5))
)
SMOKE_CASES = (
    Case("llama", "batch", 0.5, 2, 16, 4, 32),
    Case("vit_small", "row", 0.5, 2, 32, 4, 48),
)


def _loss(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    if "labels" in inputs:
        return model(**inputs).loss
    return model(inputs["x"]).float().square().mean()


def _train_step(model: nn.Module, inputs: dict[str, Tensor]) -> Callable[[int], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # every step does the same work
    model.train()

    def step(seed: int) -> None:
        torch.manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        _loss(model, inputs).backward()
        optimizer.step()

    return step


def _flops(step: Callable[[int], None], seed: int) -> int:
    with FlopCounterMode(display=False) as counter:
        step(seed)
    return int(counter.get_total_flops())


def _seconds(step: Callable[[int], None], seed: int, tries: int) -> float:
    """The fastest of ``tries`` runs of the same seeded step (the same work each time): other
    jobs on a shared CPU only ever add time."""
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        step(seed)
        best = min(best, time.perf_counter() - start)
    return best


@dataclass(frozen=True)
class Row:
    case: Case
    none_ms: Stat
    skip_over_mask: Stat  # per-step time ratios
    skip_over_none: Stat
    ideal: Stat  # per-step FLOP ratio, skip / no drop (the mask does all the FLOPs)
    share: float  # (1 - sum skip time / sum no-drop time) / (1 - sum skip FLOPs / sum none FLOPs)
    skipping: str  # blocks that skip / blocks


def measure(case: Case, reps: int, warmup: int, tries: int) -> Row:
    torch.manual_seed(0)
    base, inputs = BUILDERS[case.model](case)
    steps = {}
    for variant in VARIANTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, report = inject_droppath(
                copy.deepcopy(base), case.max_drop if variant != "none" else 0.0,
                mode=case.mode, granularity="block", skip_compute=variant == "skip",
                example_inputs=inputs, return_report=True,
            )  # fmt: skip
        steps[variant] = _train_step(model, inputs)
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
        order = VARIANTS[seed % 3 :] + VARIANTS[: seed % 3]
        for variant in order:
            times[variant].append(_seconds(steps[variant], seed, tries))
        for variant in flops:
            flops[variant].append(_flops(steps[variant], seed))
    per = [a / b for a, b in zip(times["skip"], times["mask"], strict=True)]
    per_none = [a / b for a, b in zip(times["skip"], times["none"], strict=True)]
    ideal = [a / b for a, b in zip(flops["skip"], flops["none"], strict=True)]
    ideal_saving = 1 - sum(flops["skip"]) / sum(flops["none"])
    saving = 1 - sum(times["skip"]) / sum(times["none"])
    share = saving / ideal_saving if ideal_saving > 0 else float("nan")
    none_ms = Stat.of([t * 1e3 for t in times["none"]])
    return Row(case, none_ms, Stat.of(per), Stat.of(per_none), Stat.of(ideal), share, skipping)


def render(
    rows: Sequence[Row], threads: int, reps: int, tries: int, load: tuple[float, float]
) -> str:
    """The RESULTS.md section; ``load`` is the 1-minute load average before and after."""
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
        f"torch {torch.__version__}. No GPU was lent to this run, so there are no GPU rows.",
        '- train step: forward, backward, AdamW; `inject_droppath(granularity="block")`, '
        f"linear schedule; {reps} seeded steps per variant after a warm-up, the three variants "
        "interleaved and under the same seed (mask and skip drop the same layers); each time is "
        f"the fastest of {tries} runs of that same seeded step (other jobs only add time).",
        "- *ideal*: executed FLOPs of the skipping step / the no-drop step "
        "(`torch.utils.flop_counter`, same seeds; the mask executes every FLOP); *share of "
        "ideal saving*: (1 - Σ skip time / Σ no-drop time) / (1 - Σ skip FLOPs / Σ no-drop "
        "FLOPs), target >= 0.9.",
        "",
        "| model | input | mode | max_drop | blocks skipping | no-drop step ms | ideal skip / "
        "no drop | measured skip / no drop | measured skip / mask | share of ideal saving |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row.case
        shape = (
            f"{c.batch}×{c.size} tokens, {c.layers} layers × {c.width}"
            if c.model == "llama"
            else f"{c.batch}×3×{c.size}×{c.size}, {c.layers} blocks × {c.width}"
        )
        lines.append(
            f"| {c.model} | {shape} | {c.mode} | {c.max_drop} | {row.skipping} | "
            f"{row.none_ms.format(1)} | {row.ideal.format()} | {row.skip_over_none.format()} | "
            f"{row.skip_over_mask.format()} | {row.share:.2f} |"
        )
    met = sum(row.share >= 0.9 for row in rows)
    spread = max((r.none_ms.high - r.none_ms.low) / r.none_ms.median for r in rows)
    lines += [
        "",
        f"{met} of {len(rows)} rows reach 0.9 of the ideal saving. Each mode skips every block "
        "the graph proves skippable; the time ratios scatter widely: the no-drop step, the same "
        f"work every time, varies by up to {spread:.0%} of its median between steps, and at "
        "`max_drop=0.2` the ideal saving is a few percent, within that noise. The FLOP count "
        "leaves out elementwise work and the AdamW step, which a skipped layer does not remove "
        "(every parameter still gets a gradient), so the ideal overstates the time that can be "
        "saved. What skipping "
        "costs beyond the skipped FLOPs: a zero-gradient term per skipped layer (and its zero "
        "gradients), and in row mode the gathers, the `index_copy` and smaller matmuls.",
    ]
    return "\n".join([*lines, END]) + "\n"


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
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--tries", type=int, default=3, help="runs per timed step; fastest kept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few seconds")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    parser.add_argument("--only", default="", help="run only the cases of this model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases, reps, warmup, tries = (
        (SMOKE_CASES, 2, 1, 1) if args.smoke else (CASES, args.reps, 2, args.tries)
    )
    cases = tuple(c for c in cases if not args.only or c.model == args.only)
    load_before = os.getloadavg()[0]
    rows = [measure(case, reps, warmup, tries) for case in cases]
    section = render(rows, args.threads, reps, tries, (load_before, os.getloadavg()[0]))
    print(section)
    if args.write and not args.smoke:
        write_section(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
