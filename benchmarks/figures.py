"""The measurements: each figure is timed side by side with its anchor, in the same process.

1. injection and verification time, in eval forwards of the same model;
2. eval forward time, injected / original;
3. train step time, injected / plain (no drop path) and / timm's native drop path;
4. peak memory of a train step, in the same pairs;
5. injection time against depth, per graph node.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from droppath_inject import inject_droppath
from droppath_inject.inputs import ExampleInputs, run_eval
from droppath_inject.report import Report
from droppath_inject.verify import verify_eval

from .memory import MemoryUse, memory_use
from .models import ModelSpec, ScalingFamily
from .sites import skips
from .timing import Stat, interleaved, ratios, time_call

#: Variants: the plain model, it injected, timm's native drop path, skip_compute, and a deep
#: copy of the plain model (a control: the same work in another object).
PLAIN, INJECTED, NATIVE, SKIP, COPY = "plain", "injected", "native", "skip", "copy"
NUM_CLASSES = 1000
#: Untimed train steps of each variant before the timed ones.
TRAIN_WARMUP = 10
#: Batch of the scaling figure's example input (the library's inferred batch).
SCALING_BATCH = 2


@dataclass(frozen=True)
class Settings:
    """What every figure of one run shares."""

    image_size: int
    batch: int
    reps: int
    device: torch.device
    max_drop: float = 0.1
    seed: int = 0

    def input(self, batch: int | None = None, size: int | None = None) -> Tensor:
        """A seeded random image batch on the device."""
        size = size or self.image_size
        generator = torch.Generator().manual_seed(self.seed)
        shape = (batch or self.batch, 3, size, size)
        return torch.randn(shape, generator=generator).to(self.device)


@dataclass
class InjectionResult:
    """Figure 1, absolute seconds per repetition: forward anchor, injection, verification."""

    sites: int
    forward: list[float]
    injection: list[float]
    verification: list[float]
    api_total: list[float]


@dataclass
class ModelResult:
    """Figures 1 to 4 for one model."""

    spec: ModelSpec
    input_shape: tuple[int, ...]
    injection: InjectionResult
    eval_times: dict[str, list[float]]
    eval_memory: dict[str, MemoryUse]
    train_times: dict[str, list[float]]
    train_memory: dict[str, list[MemoryUse]]
    skip_cut: tuple[int, int]  # (sites whose dropped rows are not computed in train, all sites)

    def train_ratio(self, numerator: str, denominator: str) -> Stat | None:
        if numerator not in self.train_times or denominator not in self.train_times:
            return None
        return ratios(self.train_times[numerator], self.train_times[denominator])

    def memory_ratio(self, numerator: str, denominator: str, what: str = "peak") -> Stat | None:
        """Per-repetition ratio of a ``MemoryUse`` field of two train-step variants."""
        if numerator not in self.train_memory or denominator not in self.train_memory:
            return None
        values = {
            name: [getattr(use, what) for use in self.train_memory[name]]
            for name in (numerator, denominator)
        }
        return ratios(values[numerator], values[denominator])


@dataclass
class ScalingRow:
    """Figure 5, one depth: graph size and injection seconds per repetition."""

    label: str
    depth: int
    nodes: int
    seconds: list[float] = field(default_factory=list)

    @property
    def per_node(self) -> list[float]:
        return [s / self.nodes for s in self.seconds]


def _seeded(build: Callable[[], nn.Module], settings: Settings) -> nn.Module:
    torch.manual_seed(settings.seed)
    return build().to(settings.device).eval()


def _inject(model: nn.Module, x: Tensor, settings: Settings, **options: Any) -> nn.Module:
    return inject_droppath(model, settings.max_drop, example_inputs=x, **options)


def _verify(model: nn.Module, inputs: ExampleInputs, reference: object) -> None:
    """What ``inject_droppath(verify=True)`` adds: one eval run and a bitwise comparison."""
    if not verify_eval(model, inputs, reference).passed:
        raise AssertionError("eval outputs changed after injection")


def _forward(model: nn.Module, x: Tensor) -> Callable[[], object]:
    def forward() -> object:
        with torch.no_grad():
            return model(x)

    return forward


def measure_injection(base: nn.Module, x: Tensor, settings: Settings) -> InjectionResult:
    """Figure 1: per repetition, a forward anchor (median of 3), injection, verification.

    Injection is ``inject_droppath(verify=False)`` with ``example_inputs`` (one captured eval
    run, analysis, attaching); verification is the eval run of the injected model and the
    bitwise comparison; ``api_total`` is ``verify=True``, end to end.
    """
    device, inputs = settings.device, ExampleInputs.from_user(x)
    reference = run_eval(base, inputs)[0]
    _, report = inject_droppath(  # warm-up
        copy.deepcopy(base), settings.max_drop, example_inputs=x, return_report=True
    )
    forward = _forward(base, x)
    result = InjectionResult(len(report.injected), [], [], [], [])
    for _ in range(settings.reps):
        result.forward.append(statistics.median(time_call(forward, device) for _ in range(3)))
        model, other = copy.deepcopy(base), copy.deepcopy(base)
        inject = partial(_inject, model, x, settings, verify=False)
        result.injection.append(time_call(inject, device, collect=True))
        verify = partial(_verify, model, inputs, reference)
        result.verification.append(time_call(verify, device, collect=True))
        api_call = partial(_inject, other, x, settings)
        result.api_total.append(time_call(api_call, device, collect=True))
    return result


class TrainStep:
    """One SGD step (momentum 0.9) on cross-entropy against fixed random labels."""

    def __init__(self, model: nn.Module, x: Tensor, target: Tensor) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.x, self.target = x, target

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.zero_grad()
        F.cross_entropy(self.model(self.x), self.target).backward()
        self.optimizer.step()


def _train_variants(
    spec: ModelSpec, base: nn.Module, x: Tensor, settings: Settings
) -> tuple[dict[str, nn.Module], Report]:
    """The plain model, it injected (with and without skip_compute), timm's native model;
    the report of the skip_compute injection."""
    variants = {PLAIN: base}
    variants[INJECTED] = _inject(copy.deepcopy(base), x, settings)
    if spec.native:
        native = _seeded(lambda: spec.build(settings.image_size, settings.max_drop), settings)
        native.load_state_dict(base.state_dict())
        variants[NATIVE] = native
    variants[SKIP], report = inject_droppath(
        copy.deepcopy(base), settings.max_drop, example_inputs=x, skip_compute=True,
        return_report=True,
    )  # fmt: skip
    return variants, report


def _rows_skipped(report: Report) -> tuple[int, int]:
    """(sites that compute kept rows only in train mode, all sites)."""
    return sum(skips(site) for site in report.sites), len(report.sites)


def measure_model(spec: ModelSpec, settings: Settings) -> ModelResult:
    """Figures 1 to 4 for ``spec``: all variants share weights, input, labels and seeds."""
    base = _seeded(lambda: spec.build(settings.image_size), settings)
    x = settings.input()
    injection = measure_injection(base, x, settings)
    variants, skip_report = _train_variants(spec, base, x, settings)
    device, reps = settings.device, settings.reps

    evals = {name: _forward(variants[name].eval(), x) for name in (PLAIN, INJECTED)}
    evals[COPY] = _forward(copy.deepcopy(base).eval(), x)
    eval_times = interleaved(evals, reps, device, warmup=3, number=3)
    eval_memory = {name: memory_use(evals[name], device) for name in (PLAIN, INJECTED)}

    target = torch.randint(0, NUM_CLASSES, (settings.batch,), generator=torch.Generator())
    steps = {name: TrainStep(model, x, target.to(device)) for name, model in variants.items()}
    seed = settings.seed

    # Ten warm-up steps each: over its first ten steps, ConvNeXt's steps spread by +-10 %
    # between identical copies of one model, and by +-1 % over the next ten.
    def seeded(rep: int) -> None:
        torch.manual_seed(seed + rep)

    train_times = interleaved(steps, reps, device, warmup=TRAIN_WARMUP, before=seeded)
    train_memory: dict[str, list[MemoryUse]] = {name: [] for name in steps}
    for rep in range(min(reps, 3)):
        for name, step in steps.items():
            step.zero_grad()  # gradients are allocated inside the measured step
            torch.manual_seed(seed + rep)
            train_memory[name].append(memory_use(step, device))
    return ModelResult(
        spec,
        tuple(x.shape),
        injection,
        eval_times,
        eval_memory,
        train_times,
        train_memory,
        _rows_skipped(skip_report),
    )


def graph_nodes(model: nn.Module) -> int:
    """Nodes in a plain ``torch.fx.symbolic_trace`` of ``model`` (independent of the library)."""
    return len(fx.symbolic_trace(model).graph.nodes)


def measure_scaling(family: ScalingFamily, image_size: int, settings: Settings) -> list[ScalingRow]:
    """Figure 5: injection seconds of each depth, the depths interleaved in each repetition."""
    x = settings.input(SCALING_BATCH, image_size)
    models = {d: _seeded(partial(family.build, d, image_size), settings) for d in family.depths}
    rows = {
        d: ScalingRow(family.label.format(depth=d), d, graph_nodes(m)) for d, m in models.items()
    }
    _inject(copy.deepcopy(models[family.depths[0]]), x, settings, verify=False)  # warm-up
    depths = list(family.depths)
    for rep in range(settings.reps):
        shift = rep % len(depths)
        for d in depths[shift:] + depths[:shift]:
            model = copy.deepcopy(models[d])  # not timed
            inject = partial(_inject, model, x, settings, verify=False)
            rows[d].seconds.append(time_call(inject, settings.device, collect=True))
    return [rows[d] for d in depths]


def scaling_ratio(rows: list[ScalingRow]) -> Stat:
    """Seconds per node of the deepest model over the shallowest's, per repetition."""
    return ratios(rows[-1].per_node, rows[0].per_node)
