"""Models of libraries written without torch.fx in mind: Hugging Face transformers, vit-pytorch.

Built from small configs with random weights, nothing downloaded. The truth for each model is
the library's own structure: layers x residual adds per layer from its config, and where the
library has its own drop path (``ConvNextDropPath``, ``SwinDropPath``, ...), the paths where it
puts one when built with ``drop_path_rate > 0``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from droppath_inject import AttachKind, DropPath, SiteStatus, inject_droppath

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

MAX_DROP = 0.2
VOCAB = 64


def images(size: int = 32) -> Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def token_ids() -> Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


@dataclass(frozen=True)
class Case:
    """How to build a model at a drop-path rate, its input, and its layers x adds per layer."""

    build: Callable[[float], nn.Module]
    inputs: Callable[[], Any]
    layers: int
    adds_per_layer: int
    has_drop_path: bool = False


def _model(config_class: str, model_class: str, **config: Any) -> Callable[[float], nn.Module]:
    def build(rate: float) -> nn.Module:
        torch.manual_seed(0)
        configuration = getattr(transformers, config_class)(**config)
        if hasattr(configuration, "drop_path_rate"):  # some default to 0.1
            configuration.drop_path_rate = rate
        return getattr(transformers, model_class)(configuration)

    return build


SMALL_VIT = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=3,
                 num_attention_heads=2, intermediate_size=32)  # fmt: skip
SMALL_TEXT = dict(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=32, vocab_size=VOCAB)  # fmt: skip

CASES: dict[str, Case] = {
    "ViT": Case(_model("ViTConfig", "ViTModel", **SMALL_VIT), images, 3, 2),
    "Dinov2": Case(_model("Dinov2Config", "Dinov2Model", **SMALL_VIT), images, 3, 2, True),
    "Beit": Case(_model("BeitConfig", "BeitModel", **SMALL_VIT), images, 3, 2, True),
    "Swin": Case(
        _model(
            "SwinConfig",
            "SwinModel",
            image_size=32,
            patch_size=4,
            embed_dim=8,
            depths=[1, 2],
            num_heads=[1, 2],
            window_size=4,
        ),  # fmt: skip
        images,
        3,
        2,
        True,
    ),
    "ConvNext": Case(
        _model(
            "ConvNextConfig", "ConvNextModel", depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 24, 32]
        ),  # fmt: skip
        images,
        5,
        1,
        True,
    ),
    "BERT": Case(_model("BertConfig", "BertModel", **SMALL_TEXT), token_ids, 3, 2),
    "GPT-2": Case(
        _model(
            "GPT2Config",
            "GPT2Model",
            n_embd=16,
            n_layer=3,
            n_head=2,
            vocab_size=VOCAB,
            bos_token_id=0,
            eos_token_id=0,
        ),  # fmt: skip
        token_ids,
        3,
        2,
    ),
    "Llama": Case(
        _model("LlamaConfig", "LlamaModel", num_key_value_heads=2, **SMALL_TEXT),
        token_ids,
        3,
        2,
    ),
}


def tensors(outputs: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, Tensor)]


def run(model: nn.Module, inputs: Any, train: bool, seed: int = 0) -> tuple[list[Tensor], dict]:
    """Outputs, and in train mode the parameter gradients of a fixed projection of them."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.set_grad_enabled(train):
        outputs = tensors(model(inputs))
    grads: dict[str, Tensor | None] = {}
    if train:
        loss = sum((t.float() * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum()
                   for t in outputs if t.is_floating_point())  # fmt: skip
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
    return outputs, grads


def assert_equal(expected: list[Tensor], actual: list[Tensor]) -> None:
    assert len(expected) == len(actual)
    assert all(
        e.dtype == a.dtype and torch.equal(e, a) for e, a in zip(expected, actual, strict=True)
    )


@pytest.mark.parametrize("name", CASES)
def test_hugging_face_models(name: str) -> None:
    """Every layer's residuals found and attached; eval bitwise, train at rate 0 bitwise."""
    case = CASES[name]
    model = case.build(0.0)
    untouched = copy.deepcopy(model)
    keys = model.state_dict().keys()
    classes = {path: type(m) for path, m in model.named_modules()}
    inputs = case.inputs()
    _, report = inject_droppath(model, MAX_DROP, example_inputs=inputs, return_report=True)
    assert len(report.sites) == case.layers * case.adds_per_layer
    assert report.num_blocks == case.layers
    assert all(s.status is SiteStatus.INJECTED for s in report.sites)
    assert report.verification is not None and report.verification.passed
    rates = sorted({s.rate for s in report.sites})
    assert rates == [pytest.approx(MAX_DROP * i / (case.layers - 1)) for i in range(case.layers)]
    assert model.state_dict().keys() == keys
    for path, cls in classes.items():  # every module keeps its class (drop-path slots aside)
        assert type(model.get_submodule(path)) is cls or cls is nn.Identity, path
    assert_equal(run(untouched, inputs, False)[0], run(model, inputs, False)[0])

    model.apply(lambda m: setattr(m, "drop_prob", 0.0) if isinstance(m, DropPath) else None)
    (out_a, grads_a), (out_b, grads_b) = run(untouched, inputs, True), run(model, inputs, True)
    assert_equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for key, grad in grads_a.items():
        other = grads_b[key]
        assert (grad is None) == (other is None) and (grad is None or torch.equal(grad, other)), key


def library_drop_paths(model: nn.Module) -> set[str]:
    """Paths of the library's own drop paths (``*DropPath``), not ours."""
    return {
        p
        for p, m in model.named_modules()
        if type(m).__name__.endswith("DropPath") and not isinstance(m, DropPath)
    }


#: Hugging Face's Swin drops only the attention residual; the Swin paper and timm drop both, and
#: so does this package: its MLP residuals get a hooked DropPath of their own.
HOOKED_BESIDE_THE_LIBRARY = {"Swin": "mlp"}


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.has_drop_path])
def test_placement_equals_hugging_face_drop_paths(name: str) -> None:
    """Built at rate 0, the DropPaths go exactly where the library puts its own at rate > 0;
    built at rate > 0, the library's own drop paths are re-rated, none doubled."""
    case = CASES[name]
    native = case.build(0.2)
    truth = {p for p in dict(native.named_modules()) if p.endswith("drop_path")}
    assert library_drop_paths(native) <= truth and library_drop_paths(native)

    plain = case.build(0.0)
    assert not library_drop_paths(plain)
    _, report = inject_droppath(plain, MAX_DROP, example_inputs=case.inputs(), return_report=True)
    extra = HOOKED_BESIDE_THE_LIBRARY.get(name)
    slots = {s.attached_to for s in report.sites if s.how is AttachKind.SLOT}
    hooked = {s.attached_to for s in report.sites if s.how is AttachKind.FORWARD_HOOK}
    assert slots == truth
    assert all(path.endswith(f".{extra}") for path in hooked) and bool(hooked) == bool(extra)

    _, report = inject_droppath(native, MAX_DROP, example_inputs=case.inputs(), return_report=True)
    library = library_drop_paths(native)
    re_rated = {s.attached_to for s in report.sites if s.status is SiteStatus.RE_RATED}
    assert re_rated == library
    assert all(s.previous_rate is not None for s in report.sites if s.attached_to in library)
    ours = {p for p, m in native.named_modules() if isinstance(m, DropPath)}
    assert not ours & library  # never doubled
    assert {p for p in ours if p.endswith("drop_path")} == truth - library  # the rate-0 slots
    by_block = {s.block_index: s.rate for s in report.sites}
    for site in report.sites:
        if site.attached_to in library:
            rate = native.get_submodule(site.attached_to).drop_prob
            assert rate == pytest.approx(by_block[site.block_index])


@pytest.mark.parametrize("kind", ["ViT", "SimpleViT"])
def test_vit_pytorch(kind: str) -> None:
    """lucidrains' loop over ``ModuleList`` layers: 2 x depth sites, depth rising rates."""
    vit_pytorch = pytest.importorskip("vit_pytorch")
    torch.manual_seed(0)
    depth = 4
    options = dict(image_size=32, patch_size=8, num_classes=10, dim=16, depth=depth, heads=2,
                   mlp_dim=32)  # fmt: skip
    model = getattr(vit_pytorch, kind)(**options)
    untouched = copy.deepcopy(model)
    _, report = inject_droppath(model, MAX_DROP, example_inputs=images(), return_report=True)
    assert len(report.sites) == 2 * depth and report.num_blocks == depth
    expected = [MAX_DROP * i / (depth - 1) for i in range(depth) for _ in range(2)]
    assert [s.rate for s in report.sites] == [pytest.approx(r) for r in expected]
    assert all(s.status is SiteStatus.INJECTED for s in report.sites)
    assert_equal(run(untouched, images(), False)[0], run(model, images(), False)[0])
    for m in model.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    (out_a, grads_a), (out_b, grads_b) = run(untouched, images(), True), run(model, images(), True)
    assert_equal(out_a, out_b)
    assert all(torch.equal(g, grads_b[k]) for k, g in grads_a.items() if g is not None)


def test_inferred_input_reads_the_hugging_face_config() -> None:
    """No example_inputs: a ViT built for 32 x 32 images is run on 32 x 32, not 224 x 224."""
    model = CASES["ViT"].build(0.0)
    _, report = inject_droppath(model, MAX_DROP, return_report=True)
    assert report.verification is not None and report.verification.passed
    assert report.verification.inputs == "(2, 3, 32, 32)"
    assert len(report.sites) == 6
