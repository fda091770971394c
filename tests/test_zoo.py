"""The model zoo: real torchvision and timm architectures (random weights, small inputs).

Ground truth never comes from droppath_inject: residual counts come from module attributes
(BasicBlock/Bottleneck counts, ``use_res_connect``), from the calls torchvision's own
``StochasticDepth`` receives, from timm's own ``DropPath`` placement when built with
``drop_path_rate > 0``, or are 0 for architectures without residuals.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import timm
import torch
import torchvision
from timm.layers import DropPath as TimmDropPath
from torch import Tensor, nn
from torchvision.models import regnet, resnet
from torchvision.ops import StochasticDepth

from droppath_inject import DropPath, Report, SiteStatus, inject_droppath

pytestmark = pytest.mark.slow

TIMM_DROP_PATH_RATE = 0.1


@dataclass(frozen=True)
class ZooModel:
    """A zoo entry: how to build it, its smallest comfortable input, its ground truth."""

    spec: str
    build: Callable[..., nn.Module]
    input_size: tuple[int, ...]
    expected_sites: Callable[[nn.Module, Tensor], int] | None = None
    timm_schedule: str | None = None  # "linear" / "uniform" when timm's rates follow that rule
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_timm(self) -> bool:
        return self.spec.startswith("timm:")


def _count(cls: type) -> Callable[[nn.Module, Tensor], int]:
    return lambda model, _: sum(isinstance(m, cls) for m in model.modules())


def _count_res_connect(model: nn.Module, _: Tensor) -> int:
    return sum(bool(getattr(m, "use_res_connect", False)) for m in model.modules())


def _calls_of(cls: type) -> Callable[[nn.Module, Tensor], int]:
    """Number of times modules of ``cls`` run in one forward: where the model applies them."""

    def count(model: nn.Module, x: Tensor) -> int:
        calls = []
        handles = [
            m.register_forward_hook(lambda *_: calls.append(1))
            for m in model.modules()
            if isinstance(m, cls)
        ]
        with torch.no_grad():
            model.eval()(x)
        for handle in handles:
            handle.remove()
        return len(calls)

    return count


def _none(model: nn.Module, _: Tensor) -> int:
    return 0


def _tv(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, **kwargs)


def _timm(name: str, **kwargs: Any) -> Callable[..., nn.Module]:
    return lambda drop_path_rate=0.0: timm.create_model(
        name, pretrained=False, drop_path_rate=drop_path_rate, **kwargs
    )


ZOO = [
    ZooModel("torchvision:resnet18", _tv("resnet18"), (3, 64, 64), _count(resnet.BasicBlock)),
    ZooModel("torchvision:resnet50", _tv("resnet50"), (3, 64, 64), _count(resnet.Bottleneck)),
    ZooModel(
        "torchvision:resnext50_32x4d",
        _tv("resnext50_32x4d"),
        (3, 64, 64),
        _count(resnet.Bottleneck),
    ),
    ZooModel(
        "torchvision:regnet_y_400mf",
        _tv("regnet_y_400mf"),
        (3, 64, 64),
        _count(regnet.ResBottleneckBlock),
    ),
    ZooModel("torchvision:mobilenet_v2", _tv("mobilenet_v2"), (3, 64, 64), _count_res_connect),
    ZooModel(
        "torchvision:mobilenet_v3_small", _tv("mobilenet_v3_small"), (3, 64, 64), _count_res_connect
    ),
    ZooModel(
        "torchvision:efficientnet_b0",
        _tv("efficientnet_b0"),
        (3, 64, 64),
        _calls_of(StochasticDepth),
    ),
    ZooModel(
        "torchvision:convnext_tiny", _tv("convnext_tiny"), (3, 64, 64), _calls_of(StochasticDepth)
    ),
    ZooModel("torchvision:swin_t", _tv("swin_t"), (3, 64, 64), _calls_of(StochasticDepth)),
    ZooModel(
        "torchvision:vit_b_16",
        _tv("vit_b_16", image_size=32),
        (3, 32, 32),
        lambda m, _: 2 * len(m.encoder.layers),
    ),
    ZooModel("torchvision:densenet121", _tv("densenet121"), (3, 64, 64), _none),
    ZooModel("torchvision:googlenet", _tv("googlenet", init_weights=True), (3, 64, 64), _none),
    ZooModel(
        "torchvision:inception_v3",
        _tv("inception_v3", init_weights=True, aux_logits=False),
        (3, 96, 96),
        _none,
    ),
    ZooModel("torchvision:shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), (3, 64, 64), _none),
    ZooModel("torchvision:squeezenet1_0", _tv("squeezenet1_0"), (3, 64, 64), _none),
    ZooModel("torchvision:vgg11", _tv("vgg11"), (3, 32, 32), _none),
    # timm's ResNet leaves rate-0 blocks without any drop-path stand-in: count its blocks.
    ZooModel(
        "timm:resnet18",
        _timm("resnet18"),
        (3, 64, 64),
        _count(timm.models.resnet.BasicBlock),
        timm_schedule="linear",
    ),
    ZooModel(
        "timm:resnet50",
        _timm("resnet50"),
        (3, 64, 64),
        _count(timm.models.resnet.Bottleneck),
        timm_schedule="linear",
    ),
    ZooModel(
        "timm:vit_tiny_patch16_224",
        _timm("vit_tiny_patch16_224", img_size=32),
        (3, 32, 32),
        timm_schedule="linear",
    ),
    ZooModel(
        "timm:deit_small_patch16_224",
        _timm("deit_small_patch16_224", img_size=32),
        (3, 32, 32),
        timm_schedule="linear",
    ),
    ZooModel(
        "timm:swin_tiny_patch4_window7_224",
        _timm("swin_tiny_patch4_window7_224"),
        (3, 224, 224),
        timm_schedule="linear",
    ),
    ZooModel("timm:convnext_atto", _timm("convnext_atto"), (3, 64, 64), timm_schedule="linear"),
    ZooModel("timm:efficientnet_b0", _timm("efficientnet_b0"), (3, 64, 64)),
    ZooModel("timm:mobilenetv3_small_100", _timm("mobilenetv3_small_100"), (3, 64, 64)),
    ZooModel("timm:regnety_002", _timm("regnety_002"), (3, 64, 64), timm_schedule="linear"),
    ZooModel(
        "timm:mixer_s16_224",
        _timm("mixer_s16_224", img_size=64),
        (3, 64, 64),
        timm_schedule="uniform",
    ),
    ZooModel("timm:poolformer_s12", _timm("poolformer_s12"), (3, 64, 64), timm_schedule="linear"),
]


@dataclass
class Injected:
    """One zoo model before and after injection, with the timm-native twin where there is one."""

    entry: ZooModel
    original: nn.Module
    model: nn.Module
    report: Report
    keys_before: list[str]
    x: Tensor
    native: nn.Module | None


def _schedule(entry: ZooModel) -> str:
    return entry.timm_schedule or ("uniform" if entry.is_timm else "linear")


def _randomize_norm_weights(model: nn.Module) -> None:
    """Undo timm's zero-inits (last norms, heads), which would make a drop look like no change."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and name.endswith("weight") or "gamma" in name:
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
            elif name.endswith("weight") and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


@pytest.fixture(scope="module", params=ZOO, ids=lambda e: e.spec)
def injected(request: pytest.FixtureRequest) -> Injected:
    entry: ZooModel = request.param
    torch.manual_seed(0)
    native = None
    if entry.is_timm:
        native = entry.build(drop_path_rate=TIMM_DROP_PATH_RATE)
        _randomize_norm_weights(native)
        model = entry.build()
        model.load_state_dict(native.state_dict())  # shared weights for the placement check
    else:
        model = entry.build()
    x = torch.randn(2, *entry.input_size, generator=torch.Generator().manual_seed(1))
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    model, report = inject_droppath(
        model,
        TIMM_DROP_PATH_RATE,
        schedule=_schedule(entry),
        example_inputs=x,
        return_report=True,
    )
    return Injected(entry, original, model, report, keys, x, native)


def _timm_drop_paths_in_call_order(native: nn.Module, x: Tensor) -> list[TimmDropPath | None]:
    """timm's own placement: the DropPath module (or its Identity stand-in at rate 0) per site.

    A site is recorded each time a timm ``DropPath`` runs; modules named like a drop path but
    holding ``nn.Identity`` (timm's choice at rate 0) are recorded as None.
    """
    calls: list[TimmDropPath | None] = []
    handles = []
    for name, module in native.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, TimmDropPath) or (
            isinstance(module, nn.Identity) and leaf.startswith("drop_path")
        ):
            record = module if isinstance(module, TimmDropPath) else None
            handles.append(module.register_forward_hook(lambda *_, r=record: calls.append(r)))
    with torch.no_grad():
        native.eval()(x)
    for handle in handles:
        handle.remove()
    return calls


def test_site_count_matches_ground_truth(injected: Injected) -> None:
    entry = injected.entry
    if entry.expected_sites is not None:
        expected = entry.expected_sites(copy.deepcopy(injected.original), injected.x)
    else:
        sites = _timm_drop_paths_in_call_order(injected.native, injected.x)
        assert any(s is not None for s in sites), "the timm model built no DropPath at all"
        expected = len(sites)
    assert len(injected.report.sites) == expected
    assert injected.report.skipped == [] or expected == 0


def test_rates_match_timm(injected: Injected) -> None:
    """Where timm's rule is ours, each of timm's drop paths has our rate for that site."""
    entry = injected.entry
    if entry.timm_schedule is None:
        pytest.skip("timm has no native rates for this model, or not the linear/uniform rule")
    native = _timm_drop_paths_in_call_order(injected.native, injected.x)
    native_rates = [m.drop_prob for m in native if m is not None]
    ours = [site.rate for site in injected.report.sites]
    assert [r for r in ours if r > 0] == pytest.approx(native_rates, abs=1e-6)
    assert len(ours) - len(native_rates) == sum(r == 0 for r in ours)


def test_eval_outputs_bit_identical(injected: Injected) -> None:
    assert injected.report.verification is not None and injected.report.verification.passed
    with torch.no_grad():
        expected = injected.original.eval()(injected.x)
        actual = injected.model.eval()(injected.x)
    assert torch.equal(expected, actual)


def test_state_dict_keys_unchanged(injected: Injected) -> None:
    assert list(injected.model.state_dict()) == injected.keys_before
    assert type(injected.model) is type(injected.original)


def test_drop_path_on_every_new_site(injected: Injected) -> None:
    """Each module a site reports as carrying its new DropPath holds exactly one of them."""
    carriers = {s.attached_to for s in injected.report.sites if s.status is SiteStatus.INJECTED}
    drop_paths = [m for m in injected.model.modules() if isinstance(m, DropPath)]
    assert len(drop_paths) == len(carriers)


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output]
    return [t for item in output for t in _tensors(item)]


def _train_step(
    model: nn.Module, x: Tensor
) -> tuple[list[Tensor], list[Tensor | None], list[Tensor]]:
    model.train()
    torch.manual_seed(123)
    outputs = _tensors(model(x))
    sum(o.float().sum() for o in outputs).backward()
    grads = [p.grad for p in model.parameters()]
    return outputs, grads, [b.clone() for b in model.buffers()]


def _rate_zero(model: nn.Module) -> nn.Module:
    """Every drop path of ``model`` (ours, timm's, torchvision's) at rate 0."""
    for module in model.modules():
        if isinstance(module, (DropPath, TimmDropPath)):
            module.drop_prob = 0.0
        elif isinstance(module, StochasticDepth):
            module.p = 0.0
    return model


def test_train_mode_at_rate_zero_matches_original(injected: Injected) -> None:
    """The original at rate 0 (its own drop paths too, which injection re-rated)."""
    model = _rate_zero(copy.deepcopy(injected.model))
    original = _rate_zero(copy.deepcopy(injected.original))
    out_a, grads_a, buffers_a = _train_step(original, injected.x)
    out_b, grads_b, buffers_b = _train_step(model, injected.x)
    assert len(out_a) == len(out_b) and all(map(torch.equal, out_a, out_b))
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert all(map(torch.equal, buffers_a, buffers_b))


def _calls(model: nn.Module, modules: list[nn.Module], x: Tensor) -> int:
    """How many times ``modules`` run in one eval forward (a shared drop path runs twice)."""
    calls: list[int] = []
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in modules]
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return len(calls)


def _force_drop(model: nn.Module, drop_paths: list[nn.Module]) -> None:
    """Eval everywhere, but ``drop_paths`` in train mode at rate 1.0."""
    model.eval()
    for module in drop_paths:
        module.drop_prob = 1.0
        module.train()


def test_placement_matches_timm_native(injected: Injected) -> None:
    """Dropping every branch of rate > 0 gives timm's own output, on shared weights."""
    if not injected.entry.is_timm:
        pytest.skip("placement is compared against timm's native drop_path_rate models")
    ours, native = copy.deepcopy(injected.model), copy.deepcopy(injected.native)
    native_calls = [m for m in _timm_drop_paths_in_call_order(native, injected.x) if m is not None]
    ours_drop = [m for m in ours.modules() if isinstance(m, DropPath) and m.drop_prob > 0]
    assert _calls(ours, ours_drop, injected.x) == len(native_calls) > 0  # as many dropped sites
    _force_drop(native, native_calls)
    _force_drop(ours, ours_drop)
    with torch.no_grad():
        expected, actual = native(injected.x), ours(injected.x)
        untouched = injected.original.eval()(injected.x)
    assert torch.equal(expected, actual)
    assert not torch.equal(actual, untouched), "forcing the drops changed nothing"
