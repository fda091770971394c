"""inject_droppath and find_residuals at the API surface: inputs, errors, the report."""

from __future__ import annotations

import json
import math
import types

import pytest
import timm
import torch
from torch import Tensor, nn

import droppath_inject
from droppath_inject import (
    DropPathInjectError,
    ExampleInputError,
    VerificationError,
    find_residuals,
    inject_droppath,
)
from droppath_inject.inputs import infer_example_inputs


class _Residual(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


class _Net(nn.Module):
    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.blocks = nn.Sequential(*(_Residual() for _ in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x))


class _Irreproducible(nn.Module):
    """A block whose eval output changes on every call: a counter added to it, kept in an
    object (injection puts a module's attributes back after each run, not the state of the
    objects they hold)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.clock = types.SimpleNamespace(calls=0)

    def forward(self, x: Tensor) -> Tensor:
        self.clock.calls += 1
        return x + self.conv(x) + self.clock.calls


def test_inferred_input_follows_timm_img_size() -> None:
    """timm keeps pretrained_cfg at 224 when built for 64: the patch embedding decides."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    inputs = infer_example_inputs(model)
    assert inputs is not None and inputs.args[0].shape == (2, 3, 64, 64)
    _, report = inject_droppath(model, return_report=True)
    assert report.verification is not None and report.verification.passed


def test_inferred_input_uses_first_conv_channels() -> None:
    inputs = infer_example_inputs(_Net())
    assert inputs is not None and inputs.args[0].shape == (2, 3, 224, 224)


def test_irreproducible_model_is_named_as_the_cause() -> None:
    model = nn.Sequential(_Irreproducible())
    before = {name: m for name, m in model.named_modules()}
    with pytest.raises(VerificationError, match="different eval outputs on two runs"):
        inject_droppath(model)
    assert {name: m for name, m in model.named_modules()} == before


def test_example_input_that_does_not_fit_is_an_input_error() -> None:
    with pytest.raises(ExampleInputError, match=r"\(2, 5, 8, 8\)"):
        inject_droppath(_Net(), example_inputs=torch.randn(2, 5, 8, 8))


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_max_drop_outside_unit_interval_is_rejected(value: float) -> None:
    with pytest.raises(ValueError, match="max_drop"):
        inject_droppath(_Net(), value)


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="'column'"):
        inject_droppath(_Net(), mode="column")  # type: ignore[arg-type]


def test_report_renders_sites_and_serialises() -> None:
    model = _Net()
    x = torch.randn(2, 3, 8, 8)
    _, report = inject_droppath(model, 0.2, example_inputs=x, return_report=True)
    table = report.table()
    assert "3 residual sites in 3 blocks" in table
    for index, rate in enumerate([0.0, 0.1, 0.2]):
        assert f"blocks.{index}" in table and f"{rate:.4f}" in table
    assert "bit-identical on input (2, 3, 8, 8) (512 elements)" in table
    data = json.loads(json.dumps(report.to_dict()))
    assert [s["rate"] for s in data["sites"]] == pytest.approx([0.0, 0.1, 0.2])
    assert data["verification"]["passed"] is True
    assert data["version"] == droppath_inject.__version__
    assert data["parameters"] == {
        "max_drop": 0.2,
        "schedule": "linear",
        "mode": "row",
        "existing": "rerate",
        "skip_compute": False,
        "gather_batch_norm": False,
        "granularity": "branch",
    }


def test_report_names_a_callable_schedule_and_the_dry_run_arguments() -> None:
    def halves(index: int, num_blocks: int, max_drop: float) -> float:
        return max_drop / 2

    report = find_residuals(_Net(), torch.randn(2, 3, 8, 8), max_drop=0.4, schedule=halves)
    parameters = report.to_dict()["parameters"]
    assert parameters["schedule"].endswith("halves") and parameters["max_drop"] == 0.4
    assert [s.rate for s in report.sites] == pytest.approx([0.2, 0.2, 0.2])


def test_find_residuals_is_a_dry_run() -> None:
    model = _Net()
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = find_residuals(model, torch.randn(2, 3, 8, 8), max_drop=0.3)
    assert [s.rate for s in report.sites] == pytest.approx([0.0, 0.15, 0.3])
    assert dict(model.named_modules()) == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert report.verification is None


@pytest.mark.parametrize("first", [False, True], ids=["attached first", "skip_compute first"])
def test_second_call_cannot_switch_skip_compute(first: bool) -> None:
    """Re-rating keeps what the first call placed; a different skip_compute raises, untouched."""
    model = _Net()
    x = torch.randn(2, 3, 8, 8)
    inject_droppath(model, 0.2, example_inputs=x, skip_compute=first)
    modules = dict(model.named_modules())
    with pytest.raises(DropPathInjectError, match=f"skip_compute={first}.*remove_droppath"):
        inject_droppath(model, 0.3, example_inputs=x, skip_compute=not first)
    assert dict(model.named_modules()) == modules


def test_negative_zero_max_drop_reads_as_zero() -> None:
    _, report = inject_droppath(
        _Net(), -0.0, example_inputs=torch.randn(2, 3, 8, 8), return_report=True
    )
    assert "-0.0" not in report.table()
    rates = [site["rate"] for site in json.loads(json.dumps(report.to_dict()))["sites"]]
    assert rates == [0.0] * 3 and all(math.copysign(1.0, r) == 1.0 for r in rates)


class _SumOfChildren(nn.Module):
    """Adds every child's output to its input: a DropPath registered here changes the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for child in self.children():
            out = out + child(x)
        return out


def test_failed_verification_names_the_first_breaking_attachment_and_restores() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _SumOfChildren(), _SumOfChildren())
    modules_before = [name for name, _ in model.named_modules()]
    x = torch.randn(2, 4)
    expected = model.eval()(x)
    with pytest.raises(VerificationError, match=r"after attaching a DropPath to 1\.fc;.*restored"):
        inject_droppath(model, 0.2, example_inputs=x)
    assert [name for name, _ in model.named_modules()] == modules_before
    assert torch.equal(model(x), expected)
