"""Sweep every model type in transformers: the invariants of an injection, per model type.

Each model type of ``CONFIG_MAPPING_NAMES`` with a base model class in ``MODEL_MAPPING_NAMES``
is built from a small config (``hf_build``: 2 layers per stack, tiny widths, dropout off,
random weights, constant-initialised parameters randomized), run on a dummy input for its
main modality (batch 5, no other dimension of that size), injected at ``max_drop=0.1`` and
checked (``hf_invariants``):

- eval outputs ``torch.equal`` (the package's verification and an independent comparison);
- at rate 0 (``set_drop_rates``), train-mode outputs and gradients ``torch.equal`` under one
  seed;
- blocks equal to the config's layers (encoder + decoder, and the sub-configs the input runs
  through), the same number of sites in every layer of a stack;
- every residual site found gets a DropPath, every decision is per sample over the batch
  dimension;
- no exception but the package's own, and a ``DropPathWarning`` whenever sites are missing.

Each model type runs in a process of its own under a time limit.

    python -m sweeps.hf_all [--only t5,llama] [--out docs/SWEEP_HF_ALL.md] [--jobs 1]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import multiprocessing
import os
import pickle
import random
import re
import resource
import signal
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from droppath_inject import DropPathWarning, SiteStatus, inject_droppath, set_drop_rates

from . import hf_build
from .hf_invariants import (
    Check,
    Verdict,
    describe,
    eval_output,
    is_package_error,
    row_decisions,
    same_outputs,
    same_training,
    sites_per_layer,
)
from .placement import our_drop_paths, randomize_constant_parameters

MAX_DROP = 0.1
TIMEOUT_S = 60.0
WALL_FACTOR = 3
WARM_UP = "llama"
NOT_REACHED = "not reached"
NO_CLASS = "no base model class in MODEL_MAPPING_NAMES"


class Outcome(Enum):
    """What became of one model type."""

    PASSED = "passed"  # built, ran, every invariant holds
    FAILED = "failed"  # built and ran, some invariant does not hold
    NOT_BUILT = "not built"  # no small config builds, or it runs on no dummy input
    NO_BASE_MODEL = "no base model"  # a config with no class in MODEL_MAPPING_NAMES
    TIMED_OUT = "timed out"
    CRASHED = "crashed"  # its process died without a result

    @property
    def built(self) -> bool:
        return self in (Outcome.PASSED, Outcome.FAILED)


@dataclass(frozen=True)
class TypeResult:
    """One model type's row: what was built, the layers and blocks, each check's verdict."""

    model_type: str
    outcome: Outcome
    model_class: str = ""
    reason: str = ""
    inputs: str = ""
    layers: tuple[int, ...] = ()
    blocks: int | None = None
    sites: dict[str, list[int]] = field(default_factory=dict)
    verdicts: tuple[Verdict, ...] = ()
    seconds: float = 0.0

    def verdict(self, check: Check) -> Verdict | None:
        return next((v for v in self.verdicts if v.check is check), None)

    @property
    def failures(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.passed is not True]


class NoRunnableInput(Exception):
    """The built model runs on none of the dummy inputs (the first one's error)."""


class _Raw(Exception):
    """An exception that is not the package's own, raised by injection or the injected model."""

    def __init__(self, error: BaseException, during: str) -> None:
        super().__init__(f"{describe(error)} ({during})")
        self.error = error


def _guarded(during: str, call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, its non-package exceptions wrapped as ``_Raw``."""
    try:
        return call(*args, **kwargs)
    except Exception as error:
        if is_package_error(error):
            raise
        raise _Raw(error, during) from error


def _prepare(model_type: str) -> tuple[Any, Any, hf_build.DummyInput, Any]:
    """Build ``model_type`` and find an input it runs on (raises when it does not)."""
    model, config = hf_build.build(model_type)
    randomize_constant_parameters(model)
    errors: list[str] = []
    for dummy in hf_build.candidates(model, config):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                output = eval_output(model, dummy.kwargs)
            return model, config, dummy, output
        except Exception as error:  # noqa: BLE001 - the next candidate may run
            errors.append(describe(error))
    raise NoRunnableInput(errors[0] if errors else "no dummy input for its forward arguments")


def sweep_type(model_type: str) -> TypeResult:
    """Build, inject and check one model type (in this process; see ``run`` for a pool)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    if hf_build.model_class(model_type) is None:
        return TypeResult(model_type, Outcome.NO_BASE_MODEL, reason=NO_CLASS)
    try:
        original, config, dummy, reference = _prepare(model_type)
    except Exception as error:  # noqa: BLE001 - an unbuildable model is a row, not a stop
        cls = hf_build.model_class(model_type)
        why = f"forward: {error}" if isinstance(error, NoRunnableInput) else describe(error)
        return TypeResult(model_type, Outcome.NOT_BUILT, cls.__name__ if cls else "", why)
    result = TypeResult(model_type, Outcome.FAILED, type(original).__name__, "",
                        dummy.describe(), hf_build.config_layers(config, dummy))  # fmt: skip
    result = _checked(result, original, dummy.kwargs, reference)
    passed = all(v.passed for v in result.verdicts)
    reason = "; ".join(
        f"{v.check.value}: {v.reason}" for v in result.failures if v.reason != NOT_REACHED
    )
    return replace(result, outcome=Outcome.PASSED if passed else Outcome.FAILED, reason=reason,
                   seconds=time.perf_counter() - start)  # fmt: skip


def _verdict(check: Check, holds: bool, reason: str) -> Verdict:
    """A verdict whose reason is kept only when the check fails."""
    return Verdict(check, holds, "" if holds else reason)


def _checked(result: TypeResult, original: Any, kwargs: dict, reference: Any) -> TypeResult:
    model = copy.deepcopy(original)
    verdicts: list[Verdict] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, report = _guarded(
                "injecting", inject_droppath, model, MAX_DROP, example_inputs=kwargs,
                return_report=True,
            )  # fmt: skip
        warned = any(issubclass(w.category, DropPathWarning) for w in caught)
        sites = sites_per_layer(report)
        result = replace(result, blocks=report.num_blocks, sites=sites)
        verified = report.verification is not None and report.verification.passed
        after = _guarded("eval after injection", eval_output, model, kwargs)
        equal = same_outputs(reference, after)
        why = f"package verification {verified}, outputs equal {equal}"
        verdicts.append(_verdict(Check.EVAL, verified and equal, why))
        verdicts.append(_train_at_zero(model, original, kwargs))
        layers = sum(result.layers)
        more = "more" if report.num_blocks > layers else "fewer"
        why = f"{more} blocks than layers: {report.num_blocks} blocks, {layers} in the config"
        if layers:
            verdicts.append(_verdict(Check.BLOCKS, report.num_blocks == layers, why))
        else:
            verdicts.append(Verdict(Check.BLOCKS, None, "the config names no layer count"))
        uneven = {stack: counts for stack, counts in sites.items() if len(set(counts)) > 1}
        why = "; ".join(f"{s}: {c}" for s, c in uneven.items()) or "no sites"
        verdicts.append(_verdict(Check.SAME_SITES, bool(sites) and not uneven, why))
        skipped = [s for s in report.sites if s.status is SiteStatus.SKIPPED]
        why = f"{len(skipped)} of {len(report.sites)} sites skipped" + "".join(
            f" ({s.branch}: {s.detail})" for s in skipped[:1]
        )
        verdicts.append(_verdict(Check.ATTACHED, not skipped, why))
        rows = "no DropPath"
        if sites:
            rows = _guarded("training at rates 1 and 0.5", row_decisions, model, kwargs,
                            hf_build.BATCH)  # fmt: skip
        verdicts.append(_verdict(Check.ROWS, not rows, rows))
        missing = not sites or bool(skipped) or report.num_blocks < layers
        why = f"{sum(map(len, sites.values()))} sites, {len(skipped)} skipped, no DropPathWarning"
        verdicts.append(_verdict(Check.NO_SILENT, warned or not missing, why))
        verdicts.append(Verdict(Check.NO_RAW, True))
    except _Raw as raw:
        verdicts.append(Verdict(Check.NO_RAW, False, str(raw)))
    except Exception as error:  # noqa: BLE001 - the package's own: reported, other checks open
        verdicts.append(Verdict(Check.NO_RAW, True))
        verdicts.append(Verdict(Check.EVAL, None, f"package refused: {describe(error)}"))
    done = {v.check for v in verdicts}
    verdicts += [Verdict(c, None, NOT_REACHED) for c in Check if c not in done]
    order = list(Check)
    return replace(result, verdicts=tuple(sorted(verdicts, key=lambda v: order.index(v.check))))


def _train_at_zero(injected: Any, original: Any, kwargs: dict) -> Verdict:
    """The injected model set to rate 0 (``set_drop_rates``) trains like the original: outputs
    and gradients bitwise equal under one seed."""
    at_zero = copy.deepcopy(injected)
    if our_drop_paths(at_zero):
        _guarded("setting rate 0", set_drop_rates, at_zero, 0.0)
    try:
        differs = _guarded("training at rate 0", same_training, at_zero, copy.deepcopy(original),
                           kwargs)  # fmt: skip
    except _Raw:
        try:  # the model itself may not train on this input
            same_training(copy.deepcopy(original), copy.deepcopy(original), kwargs)
        except Exception as error:  # noqa: BLE001 - then the check cannot be made
            why = f"the original does not train: {describe(error)}"
            return Verdict(Check.TRAIN_ZERO, None, why)
        raise
    if differs and same_training(copy.deepcopy(original), copy.deepcopy(original), kwargs):
        return Verdict(Check.TRAIN_ZERO, None, "the original is not deterministic in train mode")
    return _verdict(Check.TRAIN_ZERO, not differs, differs)


# --- running many model types, each in a process of its own -------------------------------


def _child(model_type: str, connection: Connection, cpu_seconds: float) -> None:
    torch.set_num_threads(1)
    limit = int(cpu_seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 5))  # SIGXCPU past the limit
    try:
        result = sweep_type(model_type)
    except BaseException as error:  # noqa: BLE001 - reported as a crash of this model type
        result = TypeResult(model_type, Outcome.CRASHED, reason=describe(error))
    connection.send(result)
    connection.close()


def _warm_up() -> None:
    """Sweep one model type here first: every forked process then starts with torch's kernels
    initialised and transformers' shared modules imported (about 4 s less per model type)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sweep_type(WARM_UP)


def _ended(model_type: str, exitcode: int | None, timeout: float) -> TypeResult:
    """The row of a process that ended without a result."""
    if exitcode == -signal.SIGXCPU:
        return TypeResult(model_type, Outcome.TIMED_OUT, reason=f"over {timeout:.0f} s of CPU")
    return TypeResult(model_type, Outcome.CRASHED, reason=f"exit code {exitcode}")


def run(
    model_types: list[str],
    jobs: int = 1,
    timeout: float = TIMEOUT_S,
    done: Callable[[list[TypeResult]], None] | None = None,
) -> list[TypeResult]:
    """Sweep ``model_types``, ``jobs`` processes at a time, each stopped after ``timeout`` s
    of CPU time (or ``WALL_FACTOR`` times that of wall time: a shared machine is slow, a hung
    model sleeps); ``done`` is called with the results so far after each one. Model types
    without a base model class are answered here, without a process."""
    context = multiprocessing.get_context("fork")
    results: dict[str, TypeResult] = {}
    pending = []
    for model_type in model_types:
        if hf_build.model_class(model_type) is None:
            results[model_type] = TypeResult(model_type, Outcome.NO_BASE_MODEL, reason=NO_CLASS)
        else:
            pending.append(model_type)
    if pending:
        _warm_up()
    running: dict[str, tuple[Any, Connection, float]] = {}
    while pending or running:
        while pending and len(running) < jobs:
            model_type = pending.pop(0)
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(model_type, send, timeout), daemon=True)
            process.start()
            send.close()
            running[model_type] = (process, receive, time.perf_counter())
        for model_type, (process, receive, started) in list(running.items()):
            result = None
            if receive.poll():
                try:
                    result = receive.recv()
                except EOFError:
                    process.join(5)
                    result = _ended(model_type, process.exitcode, timeout)
            elif not process.is_alive():
                result = _ended(model_type, process.exitcode, timeout)
            elif time.perf_counter() - started > WALL_FACTOR * timeout:
                process.kill()
                why = f"over {WALL_FACTOR * timeout:.0f} s of wall time"
                result = TypeResult(model_type, Outcome.TIMED_OUT, reason=why)
            if result is not None:
                process.join(5)
                receive.close()
                del running[model_type]
                results[model_type] = result
                print(_line(result), flush=True)
                if done is not None:
                    done([results[t] for t in model_types if t in results])
        time.sleep(0.05)
    return [results[t] for t in model_types]


def all_model_types() -> list[str]:
    """Every model type of transformers' config mapping."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


# --- the table ------------------------------------------------------------------------------


def _mark(verdict: Verdict | None) -> str:
    if verdict is None or verdict.passed is None:
        return "-"
    return "✓" if verdict.passed else "✗"


def _cell(text: str, limit: int = 300) -> str:
    return text.replace("|", "/").replace("\n", " ")[:limit]


def _sites(result: TypeResult) -> str:
    return " / ".join(",".join(map(str, counts)) for counts in result.sites.values())


def _line(result: TypeResult) -> str:
    built = "yes" if result.outcome.built else result.outcome.value
    layers = "+".join(map(str, result.layers)) if result.layers else "-"
    blocks = "-" if result.blocks is None else str(result.blocks)
    marks = " | ".join(_mark(result.verdict(check)) for check in Check)
    return (f"| {result.model_type} | {result.model_class} | {built} | {layers} | {blocks} "
            f"| {_sites(result)} | {marks} | {_cell(result.reason)} |")  # fmt: skip


def cause(verdict: Verdict) -> str:
    """A failing verdict's reason with paths and numbers blanked, so that model types failing
    the same way share it."""
    text = re.sub(r"[A-Za-z_]\w*(\.\w+)+", "<path>", verdict.reason)
    text = re.sub(r"\b(?<!<)[\w-]*(Model|Config|Layer|Block)\b", "<class>", text)
    text = re.sub(r"\d+", "#", text)
    return f"{verdict.check.value}: {text}"


def causes(results: list[TypeResult]) -> list[tuple[str, list[str]]]:
    """Each cause of a failed or open check among built model types, or of a model type not
    built, with the model types it hits, most frequent first."""
    hits: dict[str, list[str]] = {}
    for result in results:
        if result.outcome is Outcome.NO_BASE_MODEL:
            continue
        if not result.outcome.built:
            why = re.sub(r"\d+", "#", result.reason)[:120]
            hits.setdefault(f"{result.outcome.value}: {why}", []).append(result.model_type)
            continue
        for verdict in result.failures:
            if verdict.reason != NOT_REACHED:
                hits.setdefault(cause(verdict), []).append(result.model_type)
    return sorted(hits.items(), key=lambda item: (-len(item[1]), item[0]))


def table(results: list[TypeResult]) -> str:
    """The Markdown page: headline, failures by check, then one row per model type."""
    import transformers

    built = [r for r in results if r.outcome.built]
    passing = [r for r in built if r.outcome is Outcome.PASSED]
    with_class = [r for r in results if r.outcome is not Outcome.NO_BASE_MODEL]
    lines = [
        "# Every transformers model type: the invariants of an injection",
        "",
        f"**{len(passing)} of the {len(built)} model types that build pass every invariant** "
        f"({len(with_class)} model types with a base model class, {len(results)} configs; "
        f"transformers {transformers.__version__}, torch {torch.__version__}). "
        "Regenerate with `python -m sweeps.hf_all --out docs/SWEEP_HF_ALL.md`; "
        "how each check is made: `sweeps/hf_all.py`.",
        "",
        "| outcome | model types |",
        "|---|---|",
    ]
    lines += [f"| {o.value} | {n} |" for o, n in Counter(r.outcome for r in results).items()]
    lines += ["", "Failing checks among the model types that build (a type can fail several):",
              "", "| check | failing | not checked |", "|---|---|---|"]  # fmt: skip
    for check in Check:
        verdicts = [r.verdict(check) for r in built]
        failing = sum(v is not None and v.passed is False for v in verdicts)
        open_ = sum(v is None or v.passed is None for v in verdicts)
        lines.append(f"| {check.value} | {failing} | {open_} |")
    built_causes = [(c, t) for c, t in causes(results) if not c.startswith(("not built", "timed"))]
    lines += ["", "Causes among the model types that build (reasons with paths and numbers "
              "blanked; a type can have several):", "", "| cause | types | examples |",
              "|---|---|---|"]  # fmt: skip
    lines += [f"| {_cell(c)} | {len(t)} | {', '.join(t[:4])} |" for c, t in built_causes]
    unbuilt = [(c, t) for c, t in causes(results) if c.startswith(("not built", "timed"))]
    lines += ["", "Why the others do not build or run (the first ten causes):", "",
              "| cause | types | examples |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {_cell(c)} | {len(t)} | {', '.join(t[:4])} |" for c, t in unbuilt[:10]]
    header = " | ".join(check.value for check in Check)
    lines += ["", "✓ holds, ✗ does not, - not checked (the reason says why). Layers: the "
              "config's, per stack; sites per layer: per stack, in execution order.", "",
              f"| model type | class | built | layers | blocks | sites per layer | {header} "
              "| reason |",
              "|" + "---|" * (7 + len(Check))]  # fmt: skip
    ordered = sorted(results, key=lambda r: r.model_type.lower())
    lines += [_line(r) for r in ordered if r.outcome is not Outcome.NO_BASE_MODEL]
    configs = [r.model_type for r in ordered if r.outcome is Outcome.NO_BASE_MODEL]
    lines += ["", f"Configs with no base model class in `MODEL_MAPPING_NAMES` ({len(configs)}, "
              "sub-configs and pipelines, not swept): " + ", ".join(configs) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--jobs", type=int, default=1, help="processes at a time (default 1)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per model type")
    parser.add_argument("--save", type=Path, help="pickle the results here (after each type)")
    parser.add_argument("--shuffle", action="store_true", help="sweep in a seeded random order")
    parser.add_argument("--load", type=Path, nargs="+", help="write the table of saved results")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    types = args.only.split(",") if args.only else all_model_types()
    if args.shuffle:  # a partial sweep is then a fair sample of the whole
        random.Random(0).shuffle(types)
    start = time.perf_counter()

    def write(results: list[TypeResult], seconds: float | None = None) -> None:
        seconds = time.perf_counter() - start if seconds is None else seconds
        if args.save:
            args.save.write_bytes(pickle.dumps((results, len(types), seconds)))
        text = table(results) + f"\n{len(results)} of {len(types)} swept in {seconds:.0f} s.\n"
        if args.out:
            args.out.write_text(text)

    if args.load:  # later files override earlier ones, model type by model type
        merged: dict[str, TypeResult] = {}
        seconds = 0.0
        for path in args.load:
            results, _, spent = pickle.loads(path.read_bytes())
            merged.update((r.model_type, r) for r in results)
            seconds += spent
        types = types if args.only else [""] * len(types)
        args.save = None
        write(list(merged.values()), seconds)
        return
    results = run(types, args.jobs, args.timeout, write)
    write(results)
    if not args.out:
        print(table(results))


if __name__ == "__main__":  # as sweeps.hf_all: results are pickled with its classes
    importlib.import_module("sweeps.hf_all").main()
