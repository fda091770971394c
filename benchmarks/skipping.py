"""Skipping the work of dropped branches and layers (issue 20): train steps at max_drop 0.5.

``python -m benchmarks.skipping [--write] [--smoke] [--only MODEL] [--record-symbolic]`` times a
train step (forward, backward, SGD at lr 0) of timm's vit_small, torchvision's resnet50 and small
Hugging Face Llama, BERT and PEFT-LoRA Llama models three ways, from the same weights: not
injected (no drop path), injected with the mask (``skip_compute=False``) and injected with
skipping (``skip_compute=True``), in each granularity (``branch``, ``block``) and mode (``batch``,
``fixed``, ``row``). The three steps of one seed run back to back in a rotated order under that
seed, so mask and skip drop the same branches. The ideal ratio is the one of the floating-point
operations the steps execute (``torch.utils.flop_counter``); each model's half-batch reference
is how much of the ideal saving its own un-injected step gets on half the batch. Graph breaks
come from ``torch._dynamo.explain`` on a smaller configuration of each model.

``--record-symbolic`` stores the branch-granularity skip rows of this run as the symbolic
path's baseline (``skipping_symbolic.json``), for code where ``skip_compute=True`` under branch
granularity still runs that path; later runs print them beside their own. ``--write`` writes
``benchmarks/SKIPPING.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torchvision
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import Bottleneck, ResNet
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from droppath_inject import BlockHandling, inject_droppath
from droppath_inject.granularity import GranularityName
from droppath_inject.layers import Mode
from droppath_inject.report import Report

from .cli import _commit
from .layer_drop import Share, _share_parameters
from .sites import skips
from .timing import Stat, keep_freed_memory, time_call

MAX_DROP = 0.5  # the 2016 paper's setting
TARGET = 0.9  # the share of the ideal saving batch and fixed modes must reach
MODES: tuple[Mode, ...] = ("batch", "fixed", "row")
GRANULARITIES: tuple[GranularityName, ...] = ("branch", "block")
CPU = torch.device("cpu")
RESULTS = Path(__file__).with_name("SKIPPING.md")
SYMBOLIC = Path(__file__).with_name("skipping_symbolic.json")
Size = Literal["full", "small", "smoke"]


@dataclass(frozen=True)
class Skipping:
    """How many sites (and, under block granularity, blocks) skip their dropped work."""

    sites: int
    of_sites: int
    blocks: int | None = None
    of_blocks: int | None = None

    @classmethod
    def of(cls, report: Report) -> Skipping:
        sites = sum(skips(site) for site in report.sites)
        if report.layer_drop is None:
            return cls(sites, len(report.sites))
        blocks = report.layer_drop.blocks
        skipped = sum(block.handling is BlockHandling.SKIPPED for block in blocks)
        return cls(sites, len(report.sites), skipped, len(blocks))


@dataclass(frozen=True)
class Workload:
    """A model with random weights, the keyword inputs of its step and its loss."""

    model: nn.Module
    inputs: dict[str, Any]
    loss: Callable[[Any], Tensor]
    shape: str

    def half(self) -> dict[str, Any]:
        """The inputs cut to the first half of the batch."""
        batch = next(v for v in self.inputs.values() if isinstance(v, Tensor)).shape[0]
        return {
            key: value[: batch // 2] if isinstance(value, Tensor) else value
            for key, value in self.inputs.items()
        }


def _square(output: Tensor) -> Tensor:
    return output.float().square().mean()


def _image(model: nn.Module, batch: int, side: int) -> Workload:
    x = torch.randn(batch, 3, side, side)
    return Workload(model, {"x": x}, _square, f"{batch}×3×{side}×{side}")


def _vit_at(side: int, size: Size) -> Workload:
    """vit_small on ``side``-pixel images; the smaller sizes cut its depth and input alike."""
    if size == "full":
        return _image(timm.create_model("vit_small_patch16_224", img_size=side), 8, side)
    depth, width, small_side = (2, 384, 96) if size == "small" else (2, 48, 32)
    model = timm.create_model(
        "vit_small_patch16_224", img_size=small_side, depth=depth, embed_dim=width, num_heads=6
    )
    return _image(model, 8 if size == "small" else 4, small_side)


def _resnet(size: Size) -> Workload:
    if size == "full":
        return _image(torchvision.models.resnet50(), 8, 64)
    return _image(ResNet(Bottleneck, [1, 1, 1, 1]), 4, 32)  # resnet50's block, one per stage


def _hf_size(size: Size) -> tuple[int, int]:
    """Width and layers: BERT-small's published 4 × 512 (heads of 64), or a tiny pair."""
    return (512, 4) if size == "full" else (64, 2)


def _llama_config(size: Size) -> LlamaConfig:
    width, layers = _hf_size(size)
    return LlamaConfig(
        vocab_size=1024, hidden_size=width, intermediate_size=width * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=width // 64,
        num_key_value_heads=width // 64,
        max_position_embeddings=128, attention_dropout=0.0,
    )  # fmt: skip


def _tokens(size: Size) -> tuple[Tensor, str]:
    batch, length = (8, 128) if size == "full" else (4, 16)
    return torch.randint(0, 1024, (batch, length)), f"{batch}×{length} tokens"


def _causal_lm(model: nn.Module, size: Size, layers: int, width: int) -> Workload:
    ids, shape = _tokens(size)
    inputs = {"input_ids": ids, "labels": ids, "use_cache": False}
    return Workload(model, inputs, lambda out: out.loss, f"{shape}, {layers} layers × {width}")


def _llama(size: Size) -> Workload:
    config = _llama_config(size)
    model = LlamaForCausalLM(config)
    return _causal_lm(model, size, config.num_hidden_layers, config.hidden_size)


def _lora_llama(size: Size) -> Workload:
    config = _llama_config(size)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(LlamaForCausalLM(config), lora)
    return _causal_lm(model, size, config.num_hidden_layers, config.hidden_size)


def _bert(size: Size) -> Workload:
    width, layers = _hf_size(size)
    config = BertConfig(
        vocab_size=1024, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=width // 64,
        intermediate_size=width * 4, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    ids, shape = _tokens(size)
    return Workload(
        BertModel(config),
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        lambda out: _square(out.last_hidden_state),
        f"{shape}, {layers} layers × {width}",
    )


@dataclass(frozen=True)
class Bench:
    """A benchmarked model: its label and how to build it at each size."""

    name: str
    label: str
    build: Callable[[Size], Workload]


BENCHES = {
    bench.name: bench
    for bench in (
        Bench("vit_small_224", "timm vit_small_patch16_224", partial(_vit_at, 224)),
        Bench("vit_small", "timm vit_small_patch16_224", partial(_vit_at, 96)),
        Bench("resnet50", "torchvision resnet50", _resnet),
        Bench("llama", "HF LlamaForCausalLM", _llama),
        Bench("bert", "HF BertModel", _bert),
        Bench("lora_llama", "PEFT LoRA (q_proj, v_proj) on HF LlamaForCausalLM", _lora_llama),
    )
}
SMOKE_BENCHES = ("vit_small",)


def _train_step(
    model: nn.Module, work: Workload, inputs: Mapping[str, Any]
) -> Callable[[int], None]:
    """One forward, backward and SGD step (lr 0: every step does the same work) under a seed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.0)
    model.train()

    def step(seed: int) -> None:
        torch.manual_seed(seed)
        optimizer.zero_grad(set_to_none=True)
        work.loss(model(**inputs)).backward()
        optimizer.step()

    return step


def _inject(
    work: Workload, granularity: GranularityName, mode: Mode, skip: bool
) -> tuple[nn.Module, Report]:
    with warnings.catch_warnings():  # a shortfall shows in the report's counts
        warnings.simplefilter("ignore")
        model, report = inject_droppath(
            copy.deepcopy(work.model), MAX_DROP, mode=mode, granularity=granularity,
            skip_compute=skip, example_inputs=work.inputs, return_report=True,
        )  # fmt: skip
    _share_parameters(model, work.model)
    return model, report


def _flops(step: Callable[[int], None], seed: int) -> int:
    with FlopCounterMode(display=False) as counter:
        step(seed)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class Timing:
    """``reps`` seeds after ``warmup`` untimed rounds; each step's time is the fastest of
    ``tries`` rounds under its seed (the same work each time: other jobs only add time)."""

    reps: int
    warmup: int = 1
    tries: int = 2


def _round(steps: Mapping[str, Callable[[int], None]], seed: int, shift: int) -> dict[str, float]:
    """Seconds of each step under ``seed``, run back to back in an order rotated by ``shift``."""
    names = list(steps)
    shift %= len(names)
    gc.collect()  # garbage of earlier rounds is not collected, and paid for, inside a step
    return {
        name: time_call(partial(steps[name], seed), CPU) for name in names[shift:] + names[:shift]
    }


def _timed(steps: Mapping[str, Callable[[int], None]], timing: Timing) -> dict[str, list[float]]:
    for seed in range(timing.warmup):
        for step in steps.values():
            step(10_000 + seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for seed in range(timing.reps):
        rounds = [_round(steps, seed, seed + t) for t in range(timing.tries)]
        for name in steps:
            times[name].append(min(r[name] for r in rounds))
    return times


def _ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


@dataclass(frozen=True)
class Row:
    """One model, granularity and mode: the measured and ideal ratios, or why there are none."""

    model: str
    shape: str
    granularity: GranularityName
    mode: Mode
    skipping: Skipping | None = None
    none_ms: Stat | None = None
    mask_over_none: Stat | None = None
    skip_over_mask: Stat | None = None
    skip_over_none: Stat | None = None
    ideal: Stat | None = None  # executed FLOPs, skip / mask
    share: Share | None = None  # of the ideal saving against the mask
    graph_breaks: str = "not counted"
    error: str = ""


def measure(
    bench: Bench, work: Workload, granularity: GranularityName, mode: Mode, timing: Timing
) -> Row:
    """The row of one granularity and mode; an injection that raises is reported, not fatal."""
    row = Row(bench.name, work.shape, granularity, mode)
    steps = {"none": _train_step(work.model, work, work.inputs)}
    try:
        for variant in ("mask", "skip"):
            model, report = _inject(work, granularity, mode, skip=variant == "skip")
            steps[variant] = _train_step(model, work, work.inputs)
    except Exception as error:  # noqa: BLE001 - the table says which error, the run goes on
        return Row(bench.name, work.shape, granularity, mode, error=type(error).__name__)
    times = _timed(steps, timing)
    mask_flops = _flops(steps["mask"], 0)  # the mask executes every FLOP under any seed
    ideal = [_flops(steps["skip"], seed) / mask_flops for seed in range(timing.reps)]
    skip_over_mask = _ratios(times["skip"], times["mask"])
    return Row(
        row.model, row.shape, granularity, mode, Skipping.of(report),
        Stat.of([t * 1e3 for t in times["none"]]),
        Stat.of(_ratios(times["mask"], times["none"])), Stat.of(skip_over_mask),
        Stat.of(_ratios(times["skip"], times["none"])), Stat.of(ideal),
        Share.of(skip_over_mask, ideal),
    )  # fmt: skip


def half_batch(work: Workload, timing: Timing) -> Share:
    """The share of the ideal saving (FLOPs of half / whole batch) the un-injected model gets
    on the first half of its batch: how well its kernels scale down with rows on this
    machine, the most row mode, which runs kept rows only, can hope for."""
    steps = {
        "whole": _train_step(work.model, work, work.inputs),
        "half": _train_step(work.model, work, work.half()),
    }
    times = _timed(steps, timing)
    ideal = _flops(steps["half"], 0) / _flops(steps["whole"], 0)
    return Share.of(_ratios(times["half"], times["whole"]), [ideal] * timing.reps)


def graph_breaks(bench: Bench, size: Size, granularity: GranularityName, mode: Mode) -> str:
    """Graph breaks of the skipping model's training forward, from ``torch._dynamo.explain``
    on the model at ``size``; the error's type where that fails."""
    torch.manual_seed(0)
    work = bench.build(size)
    try:
        model, _ = _inject(work, granularity, mode, skip=True)
        model.train()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(**work.inputs)
        return str(explained.graph_break_count)
    except Exception as error:  # noqa: BLE001 - the table says which error, the run goes on
        return type(error).__name__
    finally:
        torch._dynamo.reset()


@dataclass(frozen=True)
class Symbolic:
    """Branch-granularity skip rows measured while that ran the symbolic-trace path."""

    date: str
    commit: str
    rows: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path = SYMBOLIC) -> Symbolic | None:
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    @classmethod
    def record(cls, rows: Sequence[Row], date: str, commit: str, path: Path = SYMBOLIC) -> None:
        kept = [
            {
                "model": row.model,
                "shape": row.shape,
                "mode": row.mode,
                "sites": f"{row.skipping.sites}/{row.skipping.of_sites}",
                "none_ms": asdict(row.none_ms),
                "mask_over_none": asdict(row.mask_over_none),
                "skip_over_mask": asdict(row.skip_over_mask),
                "skip_over_none": asdict(row.skip_over_none),
                "ideal": asdict(row.ideal),
                "share": asdict(row.share),
            }
            for row in rows
            if row.granularity == "branch"
            and row.skipping is not None
            and row.skipping.of_sites  # it injected something
            and row.none_ms
            and row.mask_over_none
            and row.skip_over_mask
            and row.skip_over_none
            and row.ideal
            and row.share
        ]
        path.write_text(json.dumps(asdict(cls(date, commit, kept)), indent=1) + "\n")

    def find(self, row: Row) -> dict[str, Any] | None:
        """The stored row of the same model, input and mode."""
        key = (row.model, row.shape, row.mode)
        return next((r for r in self.rows if (r["model"], r["shape"], r["mode"]) == key), None)


def _stat(data: Mapping[str, float]) -> Stat:
    return Stat(data["median"], data["low"], data["high"])


def _target(row: Row, reference: Share | None) -> str:
    """Whether the row reaches its target: ``TARGET`` of the ideal saving in batch and fixed
    modes, at least the model's half-batch reference in row mode."""
    if row.share is None or math.isnan(row.share.value):
        return "no saving to make"
    if row.mode != "row":
        return "yes" if row.share.value >= TARGET else "no"
    if reference is None:
        return "no reference"
    return "yes" if row.share.value >= reference.value else "no"


def _cells(
    row: Row, reference: Share | None, symbolic: Symbolic | None, tolerance: float
) -> list[str]:
    head = [BENCHES[row.model].label, row.shape, row.mode]
    if row.error or row.skipping is None:
        return [*head, f"injection failed: {row.error}", *["—"] * 8, row.graph_breaks]
    assert row.none_ms and row.mask_over_none and row.skip_over_mask and row.ideal and row.share
    skipping = row.skipping
    counts = f"{skipping.sites}/{skipping.of_sites}"
    if skipping.blocks is not None:
        counts += f" sites, {skipping.blocks}/{skipping.of_blocks} blocks"
    cells = [
        *head, counts, row.none_ms.format(1), row.mask_over_none.format(), row.ideal.format(),
        row.skip_over_mask.format(), _share(row.share), _target(row, reference),
        _share(reference), row.graph_breaks,
    ]  # fmt: skip
    if row.granularity == "branch":
        cells.append(_versus_symbolic(row, symbolic, tolerance))
    return cells


def _share(share: Share | None) -> str:
    """The share with its interval; a dash where there was no saving to share."""
    return "—" if share is None or math.isnan(share.value) else share.format()


def drift(rows: Sequence[Row], symbolic: Symbolic) -> float | None:
    """How far a control moved between the symbolic run and this one: the largest change of
    the median mask / no drop ratio (mask and plain model alike in both runs, up to the
    DropPath's own multiply) over the rows both runs have."""
    changes = [
        abs(row.mask_over_none.median - _stat(old["mask_over_none"]).median)
        for row in rows
        if row.mask_over_none is not None
        and (old := symbolic.find(row)) is not None
        and "mask_over_none" in old
    ]
    return max(changes) if changes else None


def _versus_symbolic(row: Row, symbolic: Symbolic | None, tolerance: float) -> str:
    """The symbolic run's median skip / no drop against this run's; slower only by more than
    ``tolerance``, the drift of the control between the runs."""
    old = None if symbolic is None else symbolic.find(row)
    if old is None or row.skip_over_none is None:
        return "—"
    before, now = _stat(old["skip_over_none"]).median, row.skip_over_none.median
    verdict = "not slower" if now <= before + tolerance else f"slower by {now - before:.2f}"
    return f"{before:.2f} → {now:.2f}: {verdict}"


COLUMNS = (
    "model", "input", "mode", "skipping", "no-drop step ms", "mask / no drop",
    "ideal skip / mask (FLOPs)", "measured skip / mask", "share of ideal saving", "target met",
    "half-batch reference", "graph breaks (skip, small config)",
)  # fmt: skip


def _table(
    rows: Sequence[Row],
    references: Mapping[str, Share],
    symbolic: Symbolic | None,
    tolerance: float = 0.0,
) -> list[str]:
    columns = list(COLUMNS)
    if rows and rows[0].granularity == "branch":
        columns.append("skip / no drop, symbolic path → now")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = _cells(row, references.get(row.model), symbolic, tolerance)
        cells += ["—"] * (len(columns) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _symbolic_table(symbolic: Symbolic) -> list[str]:
    lines = [
        f"## Today's symbolic path (branch granularity, `skip_compute=True`), measured "
        f"{symbolic.date} at {symbolic.commit}",
        "",
        "Kept from the run that recorded them (`--record-symbolic`): that path is being retired, "
        "so these rows cannot be rerun. Where it injected nothing (the Hugging Face models: 0 "
        "sites) there is nothing to compare. Compare across runs through *skip / no drop*: both "
        "runs divide by the same un-injected model's step timed beside it.",
        "",
        "| model | input | mode | sites skipping | no-drop step ms | ideal skip / mask | "
        "measured skip / mask | skip / no drop | share of ideal saving |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in symbolic.rows:
        lines.append(
            f"| {BENCHES[r['model']].label} | {r['shape']} | {r['mode']} | {r['sites']} | "
            f"{_stat(r['none_ms']).format(1)} | {_stat(r['ideal']).format()} | "
            f"{_stat(r['skip_over_mask']).format()} | {_stat(r['skip_over_none']).format()} | "
            f"{_share(Share(**r['share']))} |"
        )
    return lines


@dataclass(frozen=True)
class Run:
    """What the header says about a run."""

    date: str
    commit: str
    threads: int
    timing: Timing
    seconds: float
    load: tuple[float, float]
    kept_memory: bool
    symbolic: bool  # this run's branch-granularity skip rows are the symbolic path's


def render(
    rows: Sequence[Row], references: Mapping[str, Share], symbolic: Symbolic | None, run: Run
) -> str:
    lines = [
        "# Skipping the work of dropped branches and layers",
        "",
        "Regenerate with `python -m benchmarks.skipping --write` "
        f"({run.seconds / 60:.0f} minutes for this run).",
        "",
        f"- date: {run.date}; {run.commit}; CPU only ({platform.machine()}, {os.cpu_count()} "
        f"cores shared with other jobs, 1-minute load average {run.load[0]:.2f} before and "
        f"{run.load[1]:.2f} after), `torch.set_num_threads({run.threads})`, torch "
        f"{torch.__version__}; glibc `malloc` "
        + ("told to keep freed memory." if run.kept_memory else "as it comes.")
        + " No GPU was lent to this run, so there are no GPU rows.",
        f"- train step: forward, backward, SGD (lr 0) at `max_drop={MAX_DROP}`, linear schedule, "
        "random weights, dropout 0; three variants from the same weights (the same parameter "
        "tensors): *no drop* (not injected), *mask* (`skip_compute=False`), *skip* "
        f"(`skip_compute=True`). {run.timing.reps} seeds after a warm-up; the three steps of a "
        "seed run back to back in a rotated order under that seed, so mask and skip drop the "
        f"same branches; each step's time is the fastest of {run.timing.tries} such rounds. "
        "Ratios are per seed: median (min–max).",
        "- *ideal*: FLOPs executed by the skip step / the mask step, `torch.utils.flop_counter`, "
        "same seeds (matmuls and convolutions; the mask executes all of them under any seed). "
        "*share of ideal saving*: (1 - mean measured skip / mask) / (1 - mean ideal), with a "
        "95 % bootstrap interval over the seeds. *target*: share ≥ "
        f"{TARGET} in batch and fixed modes; in row mode ≥ the model's *half-batch reference*: "
        "the share of the ideal saving its un-injected step gets on the first half of the batch "
        "(time(B/2) / time(B) against the FLOP ratio, 0.5), timed the same way: how well its "
        "kernels scale down with rows on this machine.",
        "- inputs: vit_small at its own 224×224 and at 96×96 (the size the symbolic path was "
        "recorded at; 37 tokens: matmuls of k × 37 rows, where this CPU's kernels lose "
        "efficiency as k falls); the Hugging Face models at BERT-small's published 4 layers × "
        "512 (heads of 64); resnet50 at 64×64.",
        "- *skipping*: sites whose report says they skip (`Site.skip_compute`), and under block "
        "granularity blocks that skip. *graph breaks*: `torch._dynamo.explain` of the skip "
        "model's training forward on a smaller configuration (vit_small depth 2 at 8×3×96×96, "
        "ResNet with resnet50's bottleneck once per stage at 4×3×32×32, the Hugging Face models "
        "2 layers × 64 at 4×16 tokens); an error's type where explain fails.",
        "- *target met* is read from the share alone; with "
        f"{run.timing.reps} seeds its interval is wide (batch mode drops few layers per seed), "
        "so a *no* close to the line is not a verdict.",
        "",
    ]
    symbolic_column, tolerance = None, 0.0
    if run.symbolic:
        lines += [
            "This run's `branch` rows with `skip_compute=True` are the symbolic-trace path itself "
            "(recorded below for later runs to compare with).",
            "",
        ]
    elif symbolic is not None:
        symbolic_column, tolerance = symbolic, drift(rows, symbolic) or 0.0
        lines += [
            "*symbolic path → now*: the median skip / no drop of the stored symbolic-path run "
            "(below) and of this one. Runs differ in load: *slower* only by more than "
            f"{tolerance:.2f}, the largest change of the median *mask / no drop* (the same "
            "work in both runs) between them.",
            "",
        ]
    for granularity in GRANULARITIES:
        chosen = [row for row in rows if row.granularity == granularity]
        if chosen:
            lines += [
                f"## Granularity `{granularity}`",
                "",
                *_table(chosen, references, symbolic_column, tolerance),
                "",
            ]
    if symbolic is not None:
        lines += [*_symbolic_table(symbolic), ""]
    return "\n".join(lines)


def _progress(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.skipping", description=__doc__)
    parser.add_argument("--reps", type=int, default=6, help="seeded steps per variant")
    parser.add_argument("--tries", type=int, default=2, help="rounds per seed; fastest kept")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default="", help=f"comma-separated, of {list(BENCHES)}")
    parser.add_argument("--smoke", action="store_true", help="one tiny model, a few seconds")
    parser.add_argument("--write", action="store_true", help=f"write {RESULTS.name}")
    parser.add_argument(
        "--record-symbolic", action="store_true",
        help=f"store the branch-granularity skip rows in {SYMBOLIC.name} (symbolic-path code only)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    kept_memory = keep_freed_memory()
    names = [n for n in args.only.split(",") if n] or list(SMOKE_BENCHES if args.smoke else BENCHES)
    size: Size = "smoke" if args.smoke else "full"
    timing = Timing(2, 1, 1) if args.smoke else Timing(args.reps, 1, args.tries)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows, references = [], {}
    for name in names:
        torch.manual_seed(0)
        work = BENCHES[name].build(size)
        references[name] = half_batch(work, timing)
        for granularity, mode in itertools.product(GRANULARITIES, MODES):
            _progress(f"{name} {granularity} {mode}", start)
            rows.append(measure(BENCHES[name], work, granularity, mode, timing))
    _progress("graph breaks", start)  # after all timing: dynamo's state stays out of it
    # the smoke run counts them in fixed mode only (the mode meant to compile whole), for time
    explained: Size = "smoke" if args.smoke else "small"
    rows = [
        replace(row, graph_breaks=graph_breaks(bench, explained, row.granularity, row.mode))
        if not args.smoke or row.mode == "fixed"
        else row
        for row in rows
        for bench in [BENCHES[row.model]]
    ]
    date = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    commit = _commit()
    if args.record_symbolic and not args.smoke:
        Symbolic.record(rows, date, commit)
    load = (load_before, os.getloadavg()[0])
    seconds = time.perf_counter() - start
    run = Run(date, commit, args.threads, timing, seconds, load, kept_memory, args.record_symbolic)
    text = render(rows, references, Symbolic.load(), run)
    print(text)
    if args.write and not args.smoke:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
