"""``skip_compute=True`` trains as the mask does on library models, and skips the compute.

Issue 20: on Hugging Face ViT, Llama, BERT, a PEFT-LoRA Llama, Qwen2-MoE, vit-pytorch's ViT,
torchvision's resnet50 and timm's convnext_tiny, under both granularities and the row, fixed and
batch modes, outputs and gradients (trainable parameters, float inputs) equal the mask's
(``skip_compute=False``, a deepcopy, the same seed before each forward), some rows are dropped
and some kept, and the report says every site skips. At rate 1, FLOPs inside the modules
computing the branches, taken from the libraries' own structure (``model.layers[i].self_attn``,
a Bottleneck's convolutions), are zero in training and not in eval.

Tolerance: a skipping branch runs on the kept rows only, so matmul and convolution kernels may
block fewer rows differently and fp32 sums round differently. Every tensor (outputs, parameter
gradients, input gradients) is compared with ``rtol=1e-5`` and ``atol=1e-5`` times the largest
magnitude of the reference tensor, at least 1 (a sum rounds like its largest terms; the loss is a
unit-variance random projection of the outputs, so values and gradients are O(1) to O(100), and a
gradient that is 0 in exact arithmetic, such as an attention key bias's, is rounding noise of
~1e-7). A wrong row, scale or decision differs by far more. A gradient the skipping model never
produced (its branch was not run at all) must be exactly zero in the mask.

BatchNorm in train mode normalises over the rows it sees, so skipping (kept rows) and masking
(all rows) differ by design unless ``gather_batch_norm`` is refused: the equivalence runs
BatchNorm in eval mode (sample-independent), and a separate test checks that the default
(``gather_batch_norm=False``) with BatchNorm training still equals the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from helpers import skip_models as sm
from helpers.skip_compare import (
    GRANULARITIES,
    MODES,
    assert_every_site_skips,
    compare_training,
    inject,
    site_skips,
    train,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from droppath_inject import Report

MODELS = tuple(sm.BUILDERS)
HEAVY = {"resnet50", "convnext_tiny"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread: None) -> None:
    """Small tensors: one intra-op thread is faster than contended ones on CI."""


def _model_params(names: tuple[str, ...]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


# --- 1. skip vs mask equivalence -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", _model_params(MODELS))
def test_skip_matches_mask(name: str, granularity: str, mode: str) -> None:
    case = sm.BUILDERS[name]()
    masked, _ = inject(case, False, mode=mode, granularity=granularity)
    skipping, report = inject(case, True, mode=mode, granularity=granularity)
    assert report.verification is not None and report.verification.passed
    assert_every_site_skips(report)
    seen = compare_training(masked, skipping, case.inputs, batch_norm_eval=case.batch_norm)
    assert seen["dropped"] > 0, "no branch was dropped under any seed: the comparison is vacuous"
    assert seen["kept"] > 0, "every branch of rate > 0 was dropped under every seed"


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_training_matches_mask(mode: str) -> None:
    """Without ``gather_batch_norm``, a branch whose BatchNorm trains sees the batch statistics
    the mask sees: outputs and gradients equal the mask's (statistics over all rows)."""
    case = sm.torchvision_resnet50()
    masked, _ = inject(case, False, mode=mode)
    skipping, report = inject(case, True, mode=mode)
    assert report.verification is not None and report.verification.passed
    seen = compare_training(masked, skipping, case.inputs, batch_norm_eval=False)
    assert seen["dropped"] > 0 and seen["kept"] > 0


# --- 2. at rate 1 no module computing a branch runs ----------------------------------------------


@contextmanager
def _calls(modules: list[nn.Module]) -> Iterator[list[int]]:
    """Forward calls of each of ``modules`` (pre-hooks), in the order given."""
    counts = [0] * len(modules)

    def counter(index: int) -> Callable[..., None]:
        def count(*_: Any) -> None:
            counts[index] += 1

        return count

    handles = [m.register_forward_pre_hook(counter(i)) for i, m in enumerate(modules)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _report_branch_modules(model: nn.Module, report: Report) -> list[nn.Module]:
    """The module each skipping site names as computing its branch (where it is one)."""
    modules = dict(model.named_modules())
    return [modules[s.branch] for s in report.sites if site_skips(s) and s.branch in modules]


def _flops_in(model: nn.Module, modules: list[nn.Module], inputs: Any) -> list[int]:
    """FLOPs (matmuls, convolutions, attention) that one forward computes inside each module:
    the counter's total between the module's pre-hook and its forward hook, summed over calls."""
    flops = [0] * len(modules)
    with FlopCounterMode(display=False) as counter:
        started: dict[int, list[int]] = {}

        def before(index: int) -> Callable[..., None]:
            return lambda *_: started.setdefault(index, []).append(counter.get_total_flops())

        def after(index: int) -> Callable[..., None]:
            def add(*_: Any) -> None:
                flops[index] += counter.get_total_flops() - started[index].pop()

            return add

        handles = [
            h
            for i, m in enumerate(modules)
            for h in (m.register_forward_pre_hook(before(i)), m.register_forward_hook(after(i)))
        ]
        try:
            sm.call(model, inputs)
        finally:
            for handle in handles:
                handle.remove()
    return flops


def _inside(modules: list[nn.Module]) -> list[nn.Module]:
    """The submodules of ``modules`` (without themselves): they run only if their forward does."""
    return [sub for m in modules for sub in m.modules() if sub is not m]


@pytest.mark.parametrize("mode", ("batch", "fixed"))
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", _model_params(MODELS))
def test_rate_one_runs_no_branch(name: str, granularity: str, mode: str) -> None:
    """At rate 1 (fixed keeps 0 rows of B) in train mode no attention, MLP or convolution of a
    branch computes: no FLOPs inside them, no call of their submodules; in eval all compute.

    The branch modules themselves are still called by their parent's code (their ``forward``
    does not run, so their own hooks fire with an empty batch): counted apart, and reported."""
    case = sm.BUILDERS[name]()
    model, report = inject(
        case, True, max_drop=1.0, schedule="uniform", mode=mode, granularity=granularity
    )
    assert all(s.rate == 1.0 for s in report.sites)
    assert_every_site_skips(report)
    library = case.branch_modules(model)
    branches = library + _report_branch_modules(model, report)
    with _calls(_inside(branches)) as counts:
        flops = _flops_in(train(model, case.batch_norm), branches, case.inputs)
    assert flops == [0] * len(flops)
    assert counts == [0] * len(counts)
    with _calls(branches) as counts, torch.no_grad():
        flops = _flops_in(model.eval(), library, case.inputs)
    assert all(f > 0 for f in flops), flops
    assert all(c > 0 for c in counts), counts
