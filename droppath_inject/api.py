"""The public entry points: ``find_residuals`` (a dry run) and ``inject_droppath``.

A thin façade over the stages: capture one eval run (``capture``), find the residual sites
(``residuals``), group them into blocks (``blocks``), schedule rates (``schedule``), plan and
apply attachments (``attach``, ``apply``), verify (``verify``). ``skip_compute=True`` is a way
of attaching (``branch_drops``, ``layer_drop``), checked once more (``skip_verify``).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, overload

from torch import nn

from .apply import Attacher, attach_all
from .branch_drops import BranchDrops
from .errors import DropPathWarning
from .granularity import Granularity, GranularityName
from .inputs import resolve_inputs
from .layer_drop import BlockDrops
from .layers import Mode, check_mode
from .plan import attachments_of, dry_sites, make_plan
from .reinjection import check_repeat_call
from .report import Parameters, Report
from .schedule import Schedule, drop_rates, schedule_name
from .skip_verify import check_skipping
from .verify import verify_attached
from .wrappers import inner_module

Existing = Literal["rerate", "keep"]
_EXISTING: tuple[str, ...] = ("rerate", "keep")


def _check_arguments(max_drop: float, schedule: Schedule, mode: str, existing: str) -> None:
    drop_rates(0, max_drop, schedule)
    check_mode(mode)
    if existing not in _EXISTING:
        raise ValueError(f"existing must be one of {_EXISTING}, got {existing!r}")


@contextmanager
def _garbage_collection_paused() -> Iterator[None]:
    """Injection allocates many small objects (graph nodes); a full collection in the middle
    rescans them all, which made injection time grow faster than the model's depth."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def find_residuals(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    max_drop: float = 0.1,
    schedule: Schedule = "linear",
    existing: Existing = "rerate",
) -> Report:
    """Dry run: the residual sites, their blocks and the rates ``inject_droppath`` would give.

    The model runs once in eval mode on ``example_inputs`` (inferred when omitted, where
    possible) and is not changed: the same capture and plan as ``inject_droppath``.

    Args:
        model: the model to analyse.
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword ones.
        max_drop: the largest rate of the schedule.
        schedule: ``"linear"``, ``"uniform"``, ``"exponential"`` (LayerSkip) or a callable
            ``(index, num_blocks, max_drop)``; see ``drop_rates``.
        existing: how ``inject_droppath`` would treat drop paths already in the model.

    Returns:
        The ``Report``; ``verification`` is None.

    Raises:
        ExampleInputError: no input could be inferred, or the model failed on it.

    Example:
        >>> import torchvision
        >>> report = find_residuals(torchvision.models.resnet18())
        >>> len(report.sites), report.num_blocks
        (8, 8)
    """
    _check_arguments(max_drop, schedule, "row", existing)
    with inner_module(model, changes=False) as module:
        inputs = resolve_inputs(module, example_inputs, required=True)
        assert inputs is not None
        with _garbage_collection_paused():
            plan = make_plan(module, inputs)
        rates = drop_rates(plan.num_blocks, max_drop, schedule)
        sites = dry_sites(plan, rates, keep_existing=existing == "keep")
        report = Report(sites, [], plan.num_blocks)
    report.parameters = Parameters(max_drop, schedule_name(schedule), "row", existing)
    return report


@overload
def inject_droppath(
    model: nn.Module,
    max_drop: float = ...,
    *,
    schedule: Schedule = ...,
    mode: Mode = ...,
    example_inputs: Any = ...,
    verify: bool = ...,
    existing: Existing = ...,
    skip_compute: bool = ...,
    gather_batch_norm: bool = ...,
    granularity: GranularityName = ...,
    return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def inject_droppath(
    model: nn.Module,
    max_drop: float = ...,
    *,
    schedule: Schedule = ...,
    mode: Mode = ...,
    example_inputs: Any = ...,
    verify: bool = ...,
    existing: Existing = ...,
    skip_compute: bool = ...,
    gather_batch_norm: bool = ...,
    granularity: GranularityName = ...,
    return_report: Literal[True],
) -> tuple[nn.Module, Report]: ...


def inject_droppath(
    model: nn.Module,
    max_drop: float = 0.1,
    *,
    schedule: Schedule = "linear",
    mode: Mode = "row",
    example_inputs: Any = None,
    verify: bool = True,
    existing: Existing = "rerate",
    skip_compute: bool = False,
    gather_batch_norm: bool = False,
    granularity: GranularityName = "branch",
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, Report]:
    """Put DropPath on every residual branch of ``model``, in place, and return the model.

    A model inside ``torch.compile``, ``nn.DataParallel`` or ``DistributedDataParallel`` is
    changed inside, and the wrapper is returned: it then runs the drop paths (a compiled one
    compiles again on its next call).

    The model runs once in eval mode on ``example_inputs`` (inferred when omitted, where
    possible), which shows every residual add its own Python computes, however it is written.
    Block ``i`` of ``L`` in execution order gets ``schedule``'s rate (linear: ``max_drop * i /
    (L - 1)``; exponential: ``max_drop * (e^(i ln 2 / (L - 1)) - 1)``); the adds of one layer
    share it. Each DropPath is attached, not traced in: a
    forward hook on the module computing the branch, or the ``nn.Identity`` drop-path slot
    timm and Hugging Face leave at rate 0. Blocks keep their class, code, hooks and
    ``state_dict()`` keys. Drop paths already on a branch (timm, torchvision, Hugging Face,
    an earlier call) are re-rated to the schedule (``existing="keep"`` leaves foreign ones).

    Args:
        model: the model, changed in place, or a wrapper holding it.
        max_drop: the rate of the deepest block (linear schedule).
        schedule: ``"linear"``, ``"uniform"``, ``"exponential"`` (LayerSkip) or a callable
            ``(index, num_blocks, max_drop)``; see ``drop_rates``.
        mode: ``"row"`` (one decision per sample), ``"batch"`` (one for the whole batch) or
            ``"fixed"`` (exactly ``max(1, round((1 - p) * B))`` samples kept, scaled by B / k).
        example_inputs: a tensor, a tuple of positional arguments or a dict of keyword ones.
        verify: check that eval outputs stay bit-identical (else the model is restored).
        existing: ``"rerate"`` or ``"keep"`` the rates of drop paths the model already has.
        skip_compute: a dropped branch (or, with ``granularity="block"``, layer) is computed
            on the kept samples only, and not at all when every sample drops it, where the
            captured run shows how (``branch_skip``, ``layer_drop``); other sites mask, and the
            report says why. Checked at injection under forced decisions (``skip_verify``).
        gather_batch_norm: with ``skip_compute`` in row mode, accept BatchNorm statistics of
            the kept samples only.
        granularity: ``"branch"`` (one decision per residual branch) or ``"block"`` (the
            branches of one block share one decision, as LayerDrop drops whole layers; with
            ``skip_compute`` a dropped block is not run, on the captured path, see
            ``droppath_inject.layer_drop``).
        return_report: also return the ``Report``.

    Returns:
        The model, or ``(model, report)`` with ``return_report=True``.

    Raises:
        ExampleInputError: no input could be inferred, or the model failed on it.
        VerificationError: eval outputs changed; the model was restored.

    Warns:
        DropPathWarning: no residual site was found, or some got no DropPath.

    Example:
        >>> import torchvision
        >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
        >>> sum(type(m).__name__ == "DropPath" for m in model.modules())
        8
    """
    _check_arguments(max_drop, schedule, mode, existing)
    by_block = Granularity.parse(granularity) is Granularity.BLOCK
    with inner_module(model) as module, _garbage_collection_paused():
        check_repeat_call(module, by_block, skip_compute)
        how = _How(mode, existing, by_block, skip_compute, gather_batch_norm)
        report = _inject(module, max_drop, schedule, example_inputs, verify, how)
    report.parameters = Parameters(
        max_drop,
        schedule_name(schedule),
        mode,
        existing,
        skip_compute,
        gather_batch_norm,
        Granularity.parse(granularity).value,
    )
    _warn_if_little_happened(module, report)
    return (model, report) if return_report else model


@dataclass(frozen=True)
class _How:
    """How the DropPaths are attached: the call's arguments besides the schedule."""

    mode: Mode
    existing: str
    by_block: bool
    skip_compute: bool
    gather_batch_norm: bool


def _inject(
    model: nn.Module,
    max_drop: float,
    schedule: Schedule,
    example_inputs: Any,
    verify: bool,
    how: _How,
) -> Report:
    """Capture, plan, attach, verify; every change is undone if any step fails."""
    inputs = resolve_inputs(model, example_inputs, required=True)
    assert inputs is not None
    plan = make_plan(model, inputs)
    rates = drop_rates(plan.num_blocks, max_drop, schedule)
    mode = how.mode
    blocks = (
        BlockDrops(model, plan, inputs, mode, how.skip_compute, how.gather_batch_norm)
        if how.by_block
        else None
    )
    branches = (
        BranchDrops(model, plan, inputs, mode, how.gather_batch_norm, blocks)
        if how.skip_compute
        else None
    )
    attacher = Attacher(
        model,
        mode,
        rerate_existing=how.existing == "rerate",
        make_drop=branches or blocks,
        replaces_existing=None if branches is None else branches.replaces_existing,
    )
    try:
        sites = attach_all(plan, rates, attacher)
        report = Report(sites, [], plan.num_blocks)
        if verify:
            report.verification = verify_attached(model, plan, rates, attacher, inputs)
        if branches is not None:
            if verify:
                report.skip_check = check_skipping(model, inputs, branches)
            report.sites = branches.annotate(sites, attachments_of(plan))
        report.layer_drop = None if blocks is None else blocks.report()
    except BaseException:
        attacher.undo()
        raise
    return report


def _warn_if_little_happened(model: nn.Module, report: Report) -> None:
    """Say so when nothing was found, or some sites or modules got no DropPath."""
    shortfall = report.shortfall(type(model).__name__)
    if shortfall is not None:
        warnings.warn(shortfall, DropPathWarning, stacklevel=3)
