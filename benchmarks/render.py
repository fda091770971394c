"""Markdown: the run's environment, the targets, one table per figure, and what each contains."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .figures import COPY, INJECTED, NATIVE, PLAIN, SKIP, ModelResult, ScalingRow, scaling_ratio
from .timing import Stat

EVAL_TOLERANCE = 0.02  # "1.00 within noise": the median within 2 %, or 1.00 inside min–max
INJECTION_TARGET = 3.0  # inject_droppath(verify=True), in eval forwards of the same model
TRAIN_TARGET = 1.02
MEMORY_TARGET = 1.01
SCALING_TARGET = 1.2  # flat: per-node time of the deepest model at most 20 % above the shallowest


@dataclass(frozen=True)
class Environment:
    """Where and how the run happened, for the header."""

    date: str
    machine: str
    versions: str
    device: str
    threads: str
    inputs: str
    reps: str
    load_before: str
    load_after: str
    commit: str
    command: str
    smoke: bool = False


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ratio(stat: Stat | None) -> str:
    return "n/a" if stat is None else stat.format()


def _ms(values: Sequence[float]) -> str:
    return Stat.of(values).format(1, 1e3)


def _mib(values: Sequence[int]) -> str:
    return Stat.of([float(v) for v in values]).format(1, 1 / 2**20)


def _header(env: Environment) -> list[str]:
    rows = [
        ("date", env.date),
        ("command", f"`{env.command}`"),
        ("machine", env.machine),
        ("versions", env.versions),
        ("device", f"{env.device}, {env.threads}"),
        ("inputs", env.inputs),
        ("repetitions", f"{env.reps}, after a warm-up, variants interleaved"),
        ("load", f"load average {env.load_before} before, {env.load_after} after the run"),
        ("droppath_inject", env.commit),
    ]
    return _table(("run", ""), rows)


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _eval_control(m: ModelResult) -> Stat:
    """A deep copy of the original over the original: the spread of identical work."""
    return Stat.of(_per_rep(m.eval_times[COPY], m.eval_times[PLAIN]))


def _eval_in_noise(m: ModelResult) -> bool:
    """The median within 2 %, or 1.00 inside its min–max, or inside the control's min–max."""
    stat, control = _eval_ratio(m), _eval_control(m)
    return (
        abs(stat.median - 1) <= EVAL_TOLERANCE
        or stat.low <= 1 <= stat.high
        or control.low <= stat.median <= control.high
    )


def _eval_same_work(m: ModelResult) -> bool:
    plain, injected = m.eval_memory[PLAIN], m.eval_memory[INJECTED]
    return (plain.allocated, plain.allocations) == (injected.allocated, injected.allocations)


def _targets(models: Sequence[ModelResult], scaling: dict[str, list[ScalingRow]]) -> list[str]:
    rows = []
    for m in models:
        stat = Stat.of(_per_rep(m.injection.api_total, m.injection.forward))
        rows.append(("1. inject_droppath(verify=True), in eval forwards", m.spec.name,
                     f"<= {INJECTION_TARGET:.0f}", stat.format(1),
                     _verdict(stat.median <= INJECTION_TARGET)))  # fmt: skip
    for m in models:
        ratio = m.eval_memory[INJECTED].allocated / m.eval_memory[PLAIN].allocated
        measured = f"time {_eval_ratio(m).format()}; allocated bytes {ratio:.3f}"
        rows.append(("2. eval forward, injected / original", m.spec.name,
                     "1.00 within noise, no extra allocation", measured,
                     _verdict(_eval_in_noise(m) and _eval_same_work(m))))  # fmt: skip
    for m in models:
        train = m.train_ratio(INJECTED, NATIVE)
        if train is not None:
            rows.append(("3. train step, injected / timm native", m.spec.name,
                         f"<= {TRAIN_TARGET:.2f}", train.format(),
                         _verdict(train.median <= TRAIN_TARGET)))  # fmt: skip
    for m in models:
        memory = m.memory_ratio(INJECTED, NATIVE)
        if memory is not None:
            rows.append(("4. peak memory, injected / timm native", m.spec.name,
                         f"<= {MEMORY_TARGET:.2f}", memory.format(),
                         _verdict(memory.median <= MEMORY_TARGET)))  # fmt: skip
    for name, family in scaling.items():
        stat = scaling_ratio(family)
        label = f"{name} {family[0].depth} -> {family[-1].depth}"
        rows.append(("5. injection time per node, deepest / shallowest", label,
                     f"<= {SCALING_TARGET:.2f} (flat)", stat.format(),
                     _verdict(stat.median <= SCALING_TARGET)))  # fmt: skip
    return _table(("figure", "model", "target", "measured", "verdict"), rows)


IN_PLACE_ADD = (
    "Known cause of this pattern (one extra activation per residual block): torch.fx traces "
    "`out += identity` as an out-of-place add, since `fx.Proxy` has no `__iadd__`; "
    "`DropPathTracer` records `operator.iadd` instead since commit f598698. Check that the "
    "traced block (`print(block.code)`) still says `+=`."
)
SUPERLINEAR = {
    "vit": "Known causes, profiled on timm ViT depth 12 -> 96: (1) `torch.fx.Tracer.getattr` "
    "scans `root.named_parameters()` and `named_buffers()` on every access, which made the "
    "whole-model trace quadratic; `DropPathTracer.getattr` looks them up by identity since "
    "commit e1f166e. (2) Python's cyclic garbage collector: at e1f166e, one generation-2 "
    "collection during the depth-96 injection traverses every live object, the model and its "
    "graphs included (0.25 s of 2.10 s; 16 % of the injection time in collections, against "
    "4 % at depth 12), while the time outside collections stays flat per node (472 -> 491 "
    "us). `inject_droppath` pauses the collector for the whole call since commit f77a1ab "
    "(`gc.disable()`, restored after; pausing only the planning did not help).",
    "resnet": "Not reproduced on a quiet machine (ResNet-18 -> 152 at 0.86 to 0.96 per node, no "
    "generation-2 collection during injection), and ResNets read no parameter through "
    "`torch.fx.Tracer.getattr` (all sit in leaf modules): suspect load from other processes "
    "and rerun on an idle machine.",
}


def _gaps(models: Sequence[ModelResult], scaling: dict[str, list[ScalingRow]]) -> list[str]:
    """One paragraph per missed target, with its measured or profiled cause."""
    notes = []
    for m in models:
        plain, injected = m.eval_memory[PLAIN], m.eval_memory[INJECTED]
        if not _eval_same_work(m):
            extra = injected.allocations - plain.allocations
            mib = (injected.allocated - plain.allocated) / 2**20
            notes.append(f"- **{m.spec.name}, eval forward**: {extra:+d} allocations, "
                         f"{mib:+.1f} MiB per forward. {IN_PLACE_ADD}")  # fmt: skip
        elif not _eval_in_noise(m):
            notes.append(
                f"- **{m.spec.name}, eval forward**: time {_eval_ratio(m).format()} outside the "
                f"noise band (control {_eval_control(m).format()}) with identical allocations; "
                "the only extra work is one DropPath module call per site (it returns its "
                "input in eval). Rerun on an idle machine, then profile."
            )
    for m in models:
        stat = m.train_ratio(INJECTED, NATIVE)
        if stat is not None and stat.median > TRAIN_TARGET:
            control = m.train_ratio(NATIVE, PLAIN)
            allocated = m.memory_ratio(INJECTED, NATIVE, "allocated")
            notes.append(
                f"- **{m.spec.name}, train step**: injected / timm native {stat.format()}, with "
                f"allocated bytes {_ratio(allocated)} of timm's. Control: timm native / plain "
                f"is {_ratio(control)}, a spread between model objects that owes nothing to "
                "injected code; if it is as wide as the gap, rerun (more --reps, idle machine) "
                "before profiling."
            )
    for name, family in scaling.items():
        stat = scaling_ratio(family)
        cause = SUPERLINEAR.get(name, "not profiled.")
        if stat.median > SCALING_TARGET:
            notes.append(f"- **{name} scaling**: {cause}")
        elif stat.high > SCALING_TARGET:
            notes.append(f"- **{name} scaling** (met, but a repetition exceeded it): {cause}")
    return notes or ["- none: every target above is met, in every repetition of figure 5."]


def _per_rep(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def _injection_table(models: Sequence[ModelResult]) -> list[str]:
    rows = []
    for m in models:
        r = m.injection
        rows.append((
            m.spec.label, "×".join(map(str, m.input_shape)), str(r.sites), _ms(r.forward),
            Stat.of(_per_rep(r.injection, r.forward)).format(1),
            Stat.of(_per_rep(r.verification, r.forward)).format(),
            Stat.of(_per_rep(r.api_total, r.forward)).format(1), _ms(r.injection),
        ))  # fmt: skip
    header = ("model", "input", "sites", "eval forward ms", "injection / forward",
              "verification / forward", "inject_droppath(verify=True) / forward",
              "injection ms")  # fmt: skip
    return _table(header, rows)


def _eval_table(models: Sequence[ModelResult]) -> list[str]:
    rows = []
    for m in models:
        plain, injected = m.eval_memory[PLAIN], m.eval_memory[INJECTED]
        rows.append((
            m.spec.label, _ms(m.eval_times[PLAIN]), _ms(m.eval_times[INJECTED]),
            _eval_ratio(m).format(3), _eval_control(m).format(3), f"{plain.allocated / 2**20:.1f}",
            f"{injected.allocated / plain.allocated:.3f}",
            f"{plain.allocations} / {injected.allocations}",
        ))  # fmt: skip
    header = ("model", "original ms", "injected ms", "injected / original",
              "copy of the original / original (control)",
              "original allocates MiB", "allocated bytes, injected / original",
              "allocations, original / injected")  # fmt: skip
    return _table(header, rows)


def _eval_ratio(m: ModelResult) -> Stat:
    return Stat.of(_per_rep(m.eval_times[INJECTED], m.eval_times[PLAIN]))


def _train_table(models: Sequence[ModelResult]) -> list[str]:
    rows = []
    for m in models:
        native = _ms(m.train_times[NATIVE]) if NATIVE in m.train_times else "n/a (none)"
        rows.append((
            m.spec.label, _ms(m.train_times[PLAIN]), native,
            _ratio(m.train_ratio(NATIVE, PLAIN)), _ratio(m.train_ratio(INJECTED, PLAIN)),
            _ratio(m.train_ratio(INJECTED, NATIVE)), f"{m.skip_cut[0]}/{m.skip_cut[1]}",
            _ratio(m.train_ratio(SKIP, PLAIN)), _ratio(m.train_ratio(SKIP, NATIVE)),
        ))  # fmt: skip
    header = ("model", "plain ms", "timm native ms", "timm native / plain (control)",
              "injected / plain",
              "injected / timm native", "skip_compute: sites computing kept rows only",
              "skip_compute / plain", "skip_compute / timm native")  # fmt: skip
    return _table(header, rows)


def _memory_table(models: Sequence[ModelResult]) -> list[str]:
    rows = []
    for m in models:
        anchor = NATIVE if NATIVE in m.train_memory else PLAIN
        peaks = [use.peak for use in m.train_memory[anchor]]
        rows.append((
            m.spec.label, anchor.replace(NATIVE, "timm native"), _mib(peaks),
            _ratio(m.memory_ratio(INJECTED, PLAIN)), _ratio(m.memory_ratio(INJECTED, NATIVE)),
            _ratio(m.memory_ratio(SKIP, anchor)),
            _ratio(m.memory_ratio(INJECTED, anchor, "allocated")),
            _ratio(m.memory_ratio(INJECTED, anchor, "allocations")),
        ))  # fmt: skip
    header = ("model", "anchor", "anchor peak MiB", "peak, injected / plain",
              "peak, injected / timm native", "peak, skip_compute / anchor",
              "allocated bytes, injected / anchor", "allocations, injected / anchor")  # fmt: skip
    return _table(header, rows)


def _scaling_table(scaling: dict[str, list[ScalingRow]]) -> list[str]:
    rows = []
    for family in scaling.values():
        shallow = family[0].per_node
        for previous, row in zip([None, *family], family, strict=False):
            rows.append((
                row.label, str(row.nodes), Stat.of(row.seconds).format(2),
                Stat.of(row.per_node).format(0, 1e6),
                "" if previous is None else _marginal(previous, row).format(0, 1e6),
                Stat.of(_per_rep(row.per_node, shallow)).format(),
            ))  # fmt: skip
    header = ("model", "graph nodes", "injection s", "µs per node",
              "µs per added node (from the previous depth)", "per node / shallowest")  # fmt: skip
    return _table(header, rows)


def _marginal(previous: ScalingRow, row: ScalingRow) -> Stat:
    """Seconds per node added since the previous depth: grows with depth if quadratic."""
    added = row.nodes - previous.nodes
    return Stat.of([(b - a) / added for a, b in zip(previous.seconds, row.seconds, strict=True)])


METHOD = """\
## What each figure contains

Every ratio is computed per repetition between measurements taken side by side in the same
process, then summarised as median (min–max) over the repetitions. Variants are interleaved,
their order rotated each repetition (A B C, B C A, ...), so that drift from other load hits all
alike. Times are wall clock (`time.perf_counter`, CUDA synchronised where used); the models
have random weights, built under one seed; every variant of a model shares weights
(`load_state_dict`), input, labels and RNG seed.

1. **Injection and verification.** *forward*: one eval forward of the original model under
   `torch.no_grad()` (median of 3 calls, taken in each repetition just before the injection).
   *injection*: `inject_droppath(model, 0.1, example_inputs=x, verify=False)` on a fresh deep
   copy: one captured eval run on `x` (which also gives the reference outputs), residual
   analysis of the captured graph, attachment planning, hooks and slots.
   *verification*: what `verify=True` adds: one side-effect-free eval run of the injected model
   (`droppath_inject.verify.verify_eval`: `run_eval` and the bitwise `outputs_equal`, i.e.
   `torch.equal`) against the reference outputs. *inject_droppath(verify=True)*: the public call
   end to end on another fresh copy; it is close to injection + verification.
2. **Eval forward.** The original and the injected model in eval mode under `torch.no_grad()`,
   each timed over 3 back-to-back calls per repetition, after 3 warm-up rounds. The control,
   a deep copy of the original, does the very same work in another object: its spread is the
   noise. Within noise means: the median within 2 % of 1.00, or 1.00 inside the min–max, or
   the median inside the control's min–max. "No extra work" is also checked exactly: bytes
   and number of allocations of one eval forward (as in 4.).
3. **Train step.** `zero_grad(set_to_none=True)`, forward, cross-entropy against fixed random
   labels, backward, `SGD(lr=1e-3, momentum=0.9).step()`; each variant has its own optimizer
   and 10 untimed warm-up steps (over their first ten steps, identical copies of ConvNeXt
   differ by up to 10 %, over the next ten by 1 %).
   *plain*: the model without drop path (timm `drop_path_rate=0`). *injected*: the plain model
   after `inject_droppath(max_drop=0.1)` (linear schedule, row mode: timm's). *timm native*:
   timm's model built with `drop_path_rate=0.1`, same weights (torchvision ResNet has none, so
   only the plain anchor applies). *skip_compute*: `inject_droppath(max_drop=0.1,
   skip_compute=True)`, where dropped samples' branches are not computed, beyond the targets
   (branches holding a BatchNorm that trains fall back to the mask, so ResNets gain nothing);
   the skipping column counts the sites whose report says they skip in training
   (`benchmarks/sites.py`). Skipping at `max_drop=0.5`, both granularities and all modes, against
   the mask and the FLOP-ideal: `python -m benchmarks.skipping` (`benchmarks/SKIPPING.md`).
   *timm native / plain* is a control: the spread between two model objects that run no
   injected code. Each repetition seeds the RNG identically for every variant. The masks of
   `droppath_inject` and timm differ under one seed (`rand < keep` against `bernoulli_`), but
   their rates are the same.
4. **Peak memory.** The most bytes one train step (as in 3., after a warm-up step, so the
   momentum buffers already exist; gradients are freed before and allocated within it) holds
   at once beyond what was allocated before it. On the CPU: the running sum of the allocation
   and free events of torch's CPU allocator, recorded by `torch.profiler` with
   `profile_memory=True`; on CUDA: `torch.cuda.max_memory_allocated` after
   `reset_peak_memory_stats`. Up to 3 repetitions, each under its own seed.
5. **Scaling.** Injection (as in 1., `verify=False`) of models of growing depth on a batch of 2
   at a small image size; graph nodes from a plain `torch.fx.symbolic_trace` of the whole model
   (a size independent of the library; the captured graph has about as many nodes).
   It runs before figures 1 to 4: after training the four models, the same process injected up
   to a quarter slower at depth 96 (allocator state; no module survives them), which would
   blur the scaling. The garbage collector runs, untimed, before each timed injection (also in
   figure 1), so that one model's garbage is not collected during the next one's injection.
   Depths are interleaved within each repetition; the last column divides each model's seconds
   per node by the shallowest model's, per repetition. Flat means no super-linear analysis.
   A fixed cost per residual block that is higher per node than the cost of the model's stem
   and head also raises the ratio from shallow models on; the marginal column (seconds per node
   added since the previous depth) tells the two apart: it stays level for a linear cost and
   grows with depth for a quadratic one.
"""


def render(
    env: Environment, models: Sequence[ModelResult], scaling: dict[str, list[ScalingRow]]
) -> str:
    """The full markdown document."""
    lines = ["# Benchmarks", "", f"Regenerate with `{env.command}`.", ""]
    if env.smoke:
        lines += ["A smoke run: it checks that the benchmarks run, not the targets.", ""]
    lines += _header(env) + ["", "## Targets", ""] + _targets(models, scaling)
    if models:
        lines += ["", "## 1. Injection and verification, in eval forwards", ""]
        lines += _injection_table(models)
        lines += ["", "## 2. Eval forward, injected / original", ""] + _eval_table(models)
        lines += ["", "## 3. Train step time", ""] + _train_table(models)
        lines += ["", "## 4. Peak memory of a train step", ""] + _memory_table(models)
    if scaling:
        lines += ["", "## 5. Injection time against depth", ""] + _scaling_table(scaling)
    lines += ["", "## Gaps, near misses and their causes", ""] + _gaps(models, scaling)
    return "\n".join(lines) + "\n\n" + METHOD
