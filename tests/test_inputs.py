"""Inferred example inputs (shapes from the model's configuration, token ids in range, where
the shape came from), meta-device models, and the symbolic path's skipped modules."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from droppath_inject import ExampleInputError, VerificationError, find_residuals, inject_droppath
from droppath_inject.inputs import InputOrigin, infer_example_inputs


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x)


class TokenModel(nn.Module):
    """An embedding, then a residual block."""

    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.block = Residual(8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.block(self.embed(ids))


class ConfiguredImages(nn.Module):
    """A head registered before the stem (so the first Linear is not the input layer) and a
    Hugging Face style config saying what it takes: 1 channel, 16 x 16."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
        self.config = SimpleNamespace(num_channels=1, image_size=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.block(y)
        return self.head(y.mean((2, 3)))


class ConfiguredTokens(nn.Module):
    """Token ids, known from ``config.vocab_size`` although a Linear is registered first."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.embed = nn.Embedding(30, 8)
        self.block = Residual(8)
        self.config = SimpleNamespace(vocab_size=30)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids)))


def test_token_ids_span_the_vocabulary() -> None:
    ids = infer_example_inputs(TokenModel(50)).args[0]
    assert ids.dtype == torch.long
    assert ids.min() >= 0 and ids.max() < 50
    assert len(ids.unique()) > 1  # not all zeros: ids across the vocabulary


def test_config_vocab_size_gives_token_ids() -> None:
    inputs = infer_example_inputs(ConfiguredTokens())
    ids = inputs.args[0]
    assert ids.dtype == torch.long and ids.max() < 30
    assert inputs.origin == InputOrigin("the model", (("config.vocab_size", 30),))
    report = find_residuals(ConfiguredTokens())
    assert len(report.sites) == 1


def test_config_num_channels_and_image_size_shape_the_image() -> None:
    inputs = infer_example_inputs(ConfiguredImages())
    assert inputs.args[0].shape == (2, 1, 16, 16)
    assert "config.num_channels=1" in inputs.origin.describe()
    assert len(find_residuals(ConfiguredImages()).sites) == 1


def test_hugging_face_num_channels() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    model = transformers.ViTModel(config)
    assert infer_example_inputs(model).args[0].shape == (2, 1, 32, 32)


class NeedsMore(nn.Module):
    """Its first Linear takes 48 features, but the model is fed 96 (two halves)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(48, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, :48], x[:, 48:]
        return a + self.fc(b)


def test_an_inferred_input_that_does_not_fit_says_where_its_shape_came_from() -> None:
    with pytest.raises(
        ExampleInputError,
        match=r"inferred from the first Linear layer "
        r"\(in_features=48\)",
    ):
        inject_droppath(NeedsMore())


def test_image_origin_names_the_setting() -> None:
    class Sized(nn.Module):
        image_size = 32

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, 1:-1, 1:-1] + self.conv(x)

    origin = infer_example_inputs(Sized()).origin
    assert origin.describe() == (
        "inferred from the first Conv2d layer (in_channels=3) and image_size=32"
    )


# --- meta device -------------------------------------------------------------------------------


def meta_resnet() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        return torchvision.models.resnet18()


def test_find_residuals_on_the_meta_device() -> None:
    model = meta_resnet()
    assert infer_example_inputs(model).args[0].is_meta
    report = find_residuals(model)
    assert len(report.sites) == 8


def test_inject_without_verify_on_the_meta_device() -> None:
    model = inject_droppath(meta_resnet(), verify=False)
    assert sum("drop_path" in name for name, _ in model.named_modules()) == 8


def test_verify_on_the_meta_device_says_how_to_fix_it() -> None:
    model = meta_resnet()
    with pytest.raises(VerificationError, match="pass verify=False, or load weights first"):
        inject_droppath(model)
    assert not any("drop_path" in name for name, _ in model.named_modules())  # restored


# --- no inferable input: find_residuals needs one too ---------------------------------------


class MatMul(nn.Module):
    """A weight no input can be inferred from (no conv, linear or embedding layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w


class MatMulBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = MatMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


class Containers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([MatMulBlock(), MatMulBlock()])
        self.heads = nn.ModuleDict({"a": MatMul()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if x.sum() > 0:  # data-dependent: the model itself is not traceable
            x = x * 2
        return self.heads["a"](x)


def test_find_residuals_without_an_inferable_input_says_to_pass_one() -> None:
    """With no input given or inferable, the dry run fails as injection does (the symbolic
    trace it fell back on is gone), naming the model and the argument to pass."""
    model = Containers()
    with pytest.raises(ExampleInputError) as raised:
        find_residuals(model)
    message = str(raised.value)
    assert "cannot infer an example input for Containers" in message
    assert "pass example_inputs=" in message


def test_containers_and_data_dependent_branches_run_when_captured() -> None:
    """Given an input, the run goes through the data-dependent ``if`` that stopped symbolic
    tracing: both residuals of the ModuleList's blocks are found, nothing is left untouched."""
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    report = find_residuals(Containers(), example_inputs=x)
    assert [s.owner for s in report.sites] == ["blocks.0", "blocks.1"]
    assert report.skipped == []
