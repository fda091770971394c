"""``skip_compute=True`` on library models: the same plan as the mask, and the same training.

Issue 20: skipping is a way of attaching, so ``skip_compute=True`` must give the sites, blocks,
rates and ``existing=`` handling of ``skip_compute=False``, and train the same. The reference is
always the mask (``skip_compute=False``) on a deepcopy of the same model with the same seed
before each forward; what was dropped is read from the mask's DropPath outputs (rows zeroed),
what ran from forward pre-hooks on the library's own submodules (``model.layers[i].self_attn``,
a Bottleneck's ``conv1``), and rates from the libraries' own drop paths (timm ``drop_prob``).

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

import copy
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from helpers import skip_models as sm
from test_zoo import TIMM_DROP_PATH_RATE, ZOO, ZooModel, _schedule, _timm_drop_paths_in_call_order
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from droppath_inject import (
    BlockHandling,
    DropPath,
    DropPathWarning,
    Report,
    Site,
    SiteStatus,
    inject_droppath,
    remove_droppath,
)

MAX_DROP = 0.5
SEEDS = (0, 1, 2)
RTOL = 1e-5
ATOL = 1e-5  # times the reference tensor's largest magnitude, at least 1
MODES = ("row", "fixed", "batch")
GRANULARITIES = ("branch", "block")
MODELS = tuple(sm.BUILDERS)
HEAVY = {"resnet50", "convnext_tiny"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread: None) -> None:
    """Small tensors: one intra-op thread is faster than contended ones on CI."""


def _model_params(names: tuple[str, ...]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


# --- the one place that knows how the report says "this site skips" -----------------------------


def site_skips(site: Site) -> bool:
    """Whether the report says the site's dropped branch is skipped, not masked."""
    plan = site.skip_compute
    return plan is not None and not plan.how.name.startswith("MASKS")


def assert_skips_something(report: Report) -> None:
    layers = report.layer_drop
    skipped_layers = layers is not None and layers.count(BlockHandling.SKIPPED) > 0
    assert any(site_skips(s) for s in report.sites) or skipped_layers, [
        (s.branch, s.skip_compute) for s in report.sites
    ]


# --- running models ------------------------------------------------------------------------------


def _inject(case: sm.Case, skip: bool, **kwargs: Any) -> tuple[nn.Module, Report]:
    model = copy.deepcopy(case.model)
    kwargs.setdefault("max_drop", MAX_DROP)
    _, report = inject_droppath(
        model, example_inputs=case.inputs, skip_compute=skip, return_report=True, **kwargs
    )
    return model, report


def _train(model: nn.Module, batch_norm_eval: bool) -> nn.Module:
    model.train()
    if batch_norm_eval:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    return model


def _leaf_inputs(inputs: Any) -> tuple[Any, list[Tensor]]:
    """A copy of ``inputs`` whose float tensors require gradients, and those tensors."""
    leaves: list[Tensor] = []

    def leaf(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point():
            leaves.append(value.detach().clone().requires_grad_())
            return leaves[-1]
        return value

    if isinstance(inputs, dict):
        return {k: leaf(v) for k, v in inputs.items()}, leaves
    if isinstance(inputs, tuple):
        return tuple(leaf(v) for v in inputs), leaves
    return leaf(inputs), leaves


def _loss(outputs: list[Tensor]) -> Tensor:
    """A fixed random projection of every output, so that each element's gradient differs."""
    total = torch.zeros(())
    for index, out in enumerate(outputs):
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + index))
        total = total + (out.float() * weight).sum()
    return total


def _step(
    model: nn.Module, inputs: Any, seed: int
) -> tuple[list[Tensor], dict[str, Tensor | None]]:
    """Outputs and gradients (trainable parameters, float inputs) of one seeded forward."""
    model.zero_grad(set_to_none=True)
    leaf_inputs, leaves = _leaf_inputs(inputs)
    torch.manual_seed(seed)
    outputs = sm.tensors_of(sm.call(model, leaf_inputs))
    _loss(outputs).backward()
    grads: dict[str, Tensor | None] = {
        name: p.grad for name, p in model.named_parameters() if p.requires_grad
    }
    grads.update({f"input {i}": leaf.grad for i, leaf in enumerate(leaves)})
    return [o.detach() for o in outputs], grads


def assert_close(actual: Tensor, expected: Tensor, what: str) -> None:
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL * scale, msg=what)


@contextmanager
def _drops_seen(model: nn.Module) -> Iterator[dict[str, int]]:
    """Rows the mask dropped and kept, over every call of a DropPath of rate > 0 in ``model``."""
    seen = {"dropped": 0, "kept": 0}

    def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        if module.drop_prob > 0 and isinstance(out, Tensor):
            zero = out.detach().flatten(1).eq(0).all(1)
            live = args[0].detach().flatten(1).ne(0).any(1)
            seen["dropped"] += int((zero & live).sum())
            seen["kept"] += int((~zero).sum())

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, DropPath)]
    assert handles, "the mask model holds no DropPath"
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def compare_training(
    masked: nn.Module, skipping: nn.Module, inputs: Any, batch_norm_eval: bool
) -> dict[str, int]:
    """Outputs and gradients of both models agree under every seed; returns the mask's drops."""
    _train(masked, batch_norm_eval)
    _train(skipping, batch_norm_eval)
    with _drops_seen(masked) as seen:
        for seed in SEEDS:
            expected_out, expected_grads = _step(masked, inputs, seed)
            actual_out, actual_grads = _step(skipping, inputs, seed)
            assert len(actual_out) == len(expected_out)
            for i, (a, e) in enumerate(zip(actual_out, expected_out, strict=True)):
                assert_close(a, e, f"output {i}, seed {seed}")
            assert actual_grads.keys() == expected_grads.keys()
            for name, expected in expected_grads.items():
                actual = actual_grads[name]
                assert expected is not None, f"{name}: the mask keeps every branch in the graph"
                if actual is None:  # the skipping model never ran it: the mask's must be 0
                    assert torch.count_nonzero(expected) == 0, f"{name}, seed {seed}"
                else:
                    assert_close(actual, expected, f"{name}, seed {seed}")
    return seen


# --- 1. skip vs mask equivalence -----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", _model_params(MODELS))
def test_skip_matches_mask(name: str, granularity: str, mode: str) -> None:
    case = sm.BUILDERS[name]()
    masked, _ = _inject(case, False, mode=mode, granularity=granularity)
    skipping, report = _inject(case, True, mode=mode, granularity=granularity)
    assert report.verification is not None and report.verification.passed
    assert_skips_something(report)
    seen = compare_training(masked, skipping, case.inputs, batch_norm_eval=case.batch_norm)
    assert seen["dropped"] > 0, "no branch was dropped under any seed: the comparison is vacuous"
    assert seen["kept"] > 0, "every branch of rate > 0 was dropped under every seed"


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_training_matches_mask(mode: str) -> None:
    """Without ``gather_batch_norm``, a branch whose BatchNorm trains sees the batch statistics
    the mask sees: outputs and gradients equal the mask's (statistics over all rows)."""
    case = sm.torchvision_resnet50()
    masked, _ = _inject(case, False, mode=mode)
    skipping, report = _inject(case, True, mode=mode)
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
    model, report = _inject(
        case, True, max_drop=1.0, schedule="uniform", mode=mode, granularity=granularity
    )
    assert all(s.rate == 1.0 for s in report.sites)
    assert_skips_something(report)
    library = case.branch_modules(model)
    branches = library + _report_branch_modules(model, report)
    with _calls(_inside(branches)) as counts:
        flops = _flops_in(_train(model, case.batch_norm), branches, case.inputs)
    assert flops == [0] * len(flops)
    assert counts == [0] * len(counts)
    with _calls(branches) as counts, torch.no_grad():
        flops = _flops_in(model.eval(), library, case.inputs)
    assert all(f > 0 for f in flops), flops
    assert all(c > 0 for c in counts), counts


# --- 3. the same plan with and without skip_compute on the zoo -----------------------------------


def _plan(report: Report) -> tuple[int, list[tuple[str, int, float, SiteStatus]]]:
    return report.num_blocks, [
        (s.branch, s.block_index, round(s.rate, 9), s.status) for s in report.sites
    ]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.spec)
def test_zoo_plan_same_with_skip_compute(entry: ZooModel) -> None:
    """Sites, blocks, rates and statuses are planned before verification (which only masks a
    site it cannot prove), so both injections skip it here."""
    torch.manual_seed(0)
    case = sm.Case(entry.build(), torch.randn(2, *entry.input_size), lambda _: [])
    plans = []
    for skip in (False, True):
        _, report = _inject(
            case, skip, max_drop=TIMM_DROP_PATH_RATE, schedule=_schedule(entry), verify=False
        )
        plans.append(_plan(report))
    assert plans[1] == plans[0]


# --- 4. existing= under skip_compute -------------------------------------------------------------


def _timm_vit() -> tuple[nn.Module, Tensor, list[float]]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, drop_path_rate=0.1
    )
    x = torch.randn(2, 3, 32, 32)
    native = _timm_drop_paths_in_call_order(model, x)
    rates = [0.0 if m is None else m.drop_prob for m in native]
    assert any(rates), "timm built no DropPath"
    return model, x, rates


def _timm_slots(model: nn.Module) -> dict[str, tuple[type, float | None]]:
    return {
        name: (type(m), getattr(m, "drop_prob", None))
        for name, m in model.named_modules()
        if name.rpartition(".")[2].startswith("drop_path")
    }


@pytest.mark.parametrize("existing", ("keep", "rerate"))
def test_existing_respected_under_skip_compute(existing: str) -> None:
    model, x, timm_rates = _timm_vit()
    slots = _timm_slots(model)
    case = sm.Case(model, x, lambda _: [])
    masked, mask_report = _inject(case, False, max_drop=0.3, schedule="uniform", existing=existing)
    skipping, report = _inject(case, True, max_drop=0.3, schedule="uniform", existing=existing)
    assert _plan(report) == _plan(mask_report)
    foreign = [s for s, r in zip(report.sites, timm_rates, strict=True) if r > 0]
    assert len(report.sites) == len(timm_rates) and foreign
    if existing == "keep":
        assert all(s.status is SiteStatus.KEPT for s in foreign)
        assert [s.rate for s in foreign] == pytest.approx([r for r in timm_rates if r > 0])
    else:
        assert all(s.status is SiteStatus.RE_RATED for s in foreign)
        assert [s.rate for s in report.sites] == pytest.approx([0.3] * len(timm_rates))
    remove_droppath(skipping)
    assert _timm_slots(skipping) == slots


# --- 5. the issue's cases: no 0 sites, no raw errors ---------------------------------------------


def _x_transformers_decoder() -> sm.Case:
    x_transformers = pytest.importorskip("x_transformers")
    torch.manual_seed(0)
    model = x_transformers.Decoder(dim=sm.DIM, depth=sm.LAYERS, heads=sm.HEADS)
    return sm.Case(model, torch.randn(sm.BATCH, sm.TOKENS, sm.DIM), lambda _: [])


ISSUE_CASES: dict[str, Callable[[], sm.Case]] = {
    "hf_vit": sm.hf_vit,
    "hf_llama": sm.hf_llama,
    "vit_pytorch": sm.vit_pytorch_vit,
    "peft_lora_llama": sm.peft_lora_llama,
    "hf_bert": sm.hf_bert,
    "x_transformers_decoder": _x_transformers_decoder,
}


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", tuple(ISSUE_CASES))
def test_skip_compute_finds_the_sites_of_the_mask(name: str, granularity: str) -> None:
    """Were 0 sites (ViT, Llama, vit-pytorch, PEFT) or a raw RuntimeError (BERT, x-transformers)
    under branch granularity; block granularity must plan the same blocks too."""
    case = ISSUE_CASES[name]()
    _, mask_report = _inject(case, False, granularity=granularity)
    _, report = _inject(case, True, granularity=granularity)
    assert len(mask_report.sites) > 0
    assert _plan(report) == _plan(mask_report)


# --- 6. a site that cannot skip masks, says why, and warns ---------------------------------------


class _Conditioned(nn.Module):
    """``x + fc2(fc1(x) * self.t)``: a per-sample conditioning ``t`` that the parent sets on the
    block before each call (as FiLM / adaptive-norm code does) enters the branch between two
    module calls in plain Python: no module boundary can gather it to the kept rows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(sm.DIM, sm.DIM), nn.Linear(sm.DIM, sm.DIM)
        self.t: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.fc1(x) * self.t)


class _Plain(nn.Module):
    """``x + fc2(relu(fc1(x)))``: per-sample Python between module calls, on the branch's own
    values only (the kept rows already hold them)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(sm.DIM, sm.DIM), nn.Linear(sm.DIM, sm.DIM)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class _TimeConditioned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Plain(), _Conditioned(), _Plain()])

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        for block in self.blocks:
            block.t = t
            x = block(x)
        return x


def test_unsafe_site_masks_with_reason_and_warning() -> None:
    """Row mode: the conditioned site masks (the report says why, one warning counts it), the
    plain ones skip, and training still equals the mask's."""
    torch.manual_seed(0)
    model = _TimeConditioned()
    inputs = (torch.randn(sm.BATCH, sm.DIM), torch.rand(sm.BATCH, 1) + 0.5)
    case = sm.Case(model, inputs, lambda _: [])
    masked, _ = _inject(case, False, max_drop=0.5, schedule="uniform")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping, report = _inject(case, True, max_drop=0.5, schedule="uniform")
    assert [s.owner for s in report.sites] == ["blocks.0", "blocks.1", "blocks.2"]
    unsafe = report.sites[1]
    assert unsafe.status is SiteStatus.INJECTED and unsafe.skip_compute is not None
    assert not site_skips(unsafe) and unsafe.skip_compute.reason
    assert site_skips(report.sites[0]) and site_skips(report.sites[2])
    messages = [str(w.message) for w in caught if issubclass(w.category, DropPathWarning)]
    masking = [m for m in messages if "mask" in m.lower()]
    assert len(masking) == 1, messages
    assert re.search(r"(?<![\w.])1(?![\w.])", masking[0]), masking  # the count: one site
    seen = compare_training(masked, skipping, inputs, batch_norm_eval=False)
    assert seen["dropped"] > 0 and seen["kept"] > 0


class _PreActivated(nn.Module):
    """``x + fc(relu(x))``: an activation written inline on the fork before the branch's only
    module call; the call's argument holds the batch, so it can be gathered there."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(sm.DIM, sm.DIM)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc(torch.relu(x))


def test_inline_op_before_the_first_module_call_skips() -> None:
    """Row-wise Python on the fork before the first module call needs no gathering of its own:
    the module call's argument is gathered (the mask computes the op on all rows too)."""
    torch.manual_seed(0)
    model = nn.Sequential(_PreActivated(), _PreActivated())
    case = sm.Case(model, torch.randn(sm.BATCH, sm.DIM), lambda _: [])
    masked, _ = _inject(case, False, max_drop=0.5, schedule="uniform")
    skipping, report = _inject(case, True, max_drop=0.5, schedule="uniform")
    assert len(report.sites) == 2
    assert all(site_skips(s) for s in report.sites), [s.skip_compute for s in report.sites]
    seen = compare_training(masked, skipping, case.inputs, batch_norm_eval=False)
    assert seen["dropped"] > 0 and seen["kept"] > 0
