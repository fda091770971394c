"""``skip_compute=True`` plans what ``skip_compute=False`` plans, and says where it masks.

Issue 20: skipping is a way of attaching. On every zoo model (tests/test_zoo.py) the sites,
blocks, rates and statuses are those of the mask; timm's own drop paths are kept or re-rated as
``existing=`` says, with timm's ``drop_prob`` as the truth, and ``remove_droppath`` gives them
back; the models where the symbolic path found 0 sites or raised a raw ``RuntimeError`` get the
mask's sites; a site whose branch a per-sample value enters inline masks, says why, and one
``DropPathWarning`` counts it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest
import torch
from helpers import skip_models as sm
from helpers.skip_compare import (
    GRANULARITIES,
    compare_training,
    inject,
    plan,
    site_skips,
)
from test_zoo import TIMM_DROP_PATH_RATE, ZOO, ZooModel, _schedule, _timm_drop_paths_in_call_order
from torch import Tensor, nn

from droppath_inject import DropPathWarning, SiteStatus, remove_droppath


@pytest.fixture(scope="module", autouse=True)
def _one_thread(single_thread: None) -> None:
    """Small tensors: one intra-op thread is faster than contended ones on CI."""


@pytest.mark.slow
@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.spec)
def test_zoo_plan_same_with_skip_compute(entry: ZooModel) -> None:
    """Sites, blocks, rates and statuses are planned before verification (which only masks a
    site it cannot prove), so both injections skip it here."""
    torch.manual_seed(0)
    case = sm.Case(entry.build(), torch.randn(2, *entry.input_size), lambda _: [])
    plans = []
    for skip in (False, True):
        _, report = inject(
            case, skip, max_drop=TIMM_DROP_PATH_RATE, schedule=_schedule(entry), verify=False
        )
        plans.append(plan(report))
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
    masked, mask_report = inject(case, False, max_drop=0.3, schedule="uniform", existing=existing)
    skipping, report = inject(case, True, max_drop=0.3, schedule="uniform", existing=existing)
    assert plan(report) == plan(mask_report)
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
    _, mask_report = inject(case, False, granularity=granularity)
    _, report = inject(case, True, granularity=granularity)
    assert len(mask_report.sites) > 0
    assert plan(report) == plan(mask_report)


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
    masked, _ = inject(case, False, max_drop=0.5, schedule="uniform")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping, report = inject(case, True, max_drop=0.5, schedule="uniform")
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
    masked, _ = inject(case, False, max_drop=0.5, schedule="uniform")
    skipping, report = inject(case, True, max_drop=0.5, schedule="uniform")
    assert len(report.sites) == 2
    assert all(site_skips(s) for s in report.sites), [s.skip_compute for s in report.sites]
    seen = compare_training(masked, skipping, case.inputs, batch_norm_eval=False)
    assert seen["dropped"] > 0 and seen["kept"] > 0
