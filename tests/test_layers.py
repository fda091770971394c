"""DropPath and drop_path: behaviour checked against independent references and statistics.

Statistical checks allow SIGMAS standard errors computed from the sample size, so a correct
implementation fails one with probability below 1e-6, while a wrong scale, a per-element mask or
a per-row batch mode misses by far more. Seeds are fixed, so every run draws the same numbers.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from droppath_inject import DropPath, drop_path
from droppath_inject.layers import MODES

SIGMAS = 5.0


def standard_error(p: float, n: int) -> float:
    """Standard error of a Bernoulli(p) proportion over n draws."""
    return math.sqrt(p * (1.0 - p) / n)


def kept_samples(out: Tensor) -> Tensor:
    """Which samples (rows along dim 0) were kept, for inputs that hold no zeros."""
    return out.reshape(out.shape[0], -1).ne(0).any(dim=1)


class RecordOps(TorchDispatchMode):
    """Records every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


# --- identity ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("drop_prob", "training"), [(0.5, False), (1.0, False), (0.0, True)])
def test_identity_returns_the_input_itself_without_any_op(
    mode: str, drop_prob: float, training: bool
) -> None:
    x = torch.randn(4, 3, requires_grad=True)
    layer = DropPath(drop_prob, mode).train(training)
    with RecordOps() as recorded:
        from_module = layer(x)
        from_function = drop_path(x, drop_prob, training, mode)
    assert from_module is x
    assert from_function is x
    assert recorded.ops == []


# --- row mode: rate, scale, unbiasedness -----------------------------------------------------


@pytest.mark.parametrize("drop_prob", [0.1, 0.5, 0.9])
def test_row_mode_keeps_whole_samples_at_rate_one_minus_drop_prob(drop_prob: float) -> None:
    torch.manual_seed(0)
    n, keep = 20_000, 1.0 - drop_prob
    x = torch.rand(n, 3, 2, dtype=torch.float64) + 0.5
    out = drop_path(x, drop_prob, training=True)
    kept = kept_samples(out)
    expected = torch.where(kept[:, None, None], x / keep, torch.zeros_like(x))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0.0)
    assert abs(kept.double().mean().item() - keep) <= SIGMAS * standard_error(keep, n)


@pytest.mark.parametrize("drop_prob", [0.2, 0.7])
def test_row_mode_mean_over_many_draws_equals_the_input(drop_prob: float) -> None:
    torch.manual_seed(1)
    n, keep = 20_000, 1.0 - drop_prob
    sample = torch.randn(4, 3, dtype=torch.float64)
    out = drop_path(sample.expand(n, 4, 3), drop_prob, training=True)
    # each output is sample * Bernoulli(keep) / keep: mean sample, variance sample^2 (1-keep)/keep
    tolerance = SIGMAS * sample.abs() * math.sqrt((1.0 - keep) / keep / n)
    assert ((out.mean(dim=0) - sample).abs() <= tolerance).all()


def test_without_scale_by_keep_kept_samples_are_unchanged() -> None:
    torch.manual_seed(2)
    n, keep = 20_000, 0.6
    x = torch.rand(n, 5, dtype=torch.float64) + 0.5
    out = drop_path(x, 1.0 - keep, training=True, scale_by_keep=False)
    kept = kept_samples(out)
    assert torch.equal(out, torch.where(kept[:, None], x, torch.zeros_like(x)))
    assert abs(kept.double().mean().item() - keep) <= SIGMAS * standard_error(keep, n)


# --- batch mode --------------------------------------------------------------------------------


def test_batch_mode_keeps_or_drops_the_whole_batch_at_rate_drop_prob() -> None:
    torch.manual_seed(3)
    trials, drop_prob = 2_000, 0.3
    x = torch.rand(64, 5, dtype=torch.float64) + 0.5
    dropped = 0
    for _ in range(trials):
        out = drop_path(x, drop_prob, training=True, mode="batch")
        if out.eq(0).all():
            dropped += 1
        else:
            torch.testing.assert_close(out, x / (1.0 - drop_prob), rtol=1e-12, atol=0.0)
    assert abs(dropped / trials - drop_prob) <= SIGMAS * standard_error(drop_prob, trials)


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gradient_is_the_upstream_gradient_through_the_scaled_keep_mask(mode: str) -> None:
    torch.manual_seed(4)
    drop_prob = 0.4
    x = (torch.rand(64, 3, 5, dtype=torch.float64) + 0.5).requires_grad_()
    out = drop_path(x, drop_prob, training=True, mode=mode)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    kept = kept_samples(out.detach())
    if mode == "row":
        assert kept.any() and not kept.all()
    # fixed mode scales by the realised keep rate B / k (DINOv2's), the others by 1 / (1 - p)
    keep = kept.double().mean() if mode == "fixed" else 1.0 - drop_prob
    expected = torch.where(kept[:, None, None], upstream / keep, 0.0)
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scale_by_keep", [True, False])
def test_rate_one_gives_exact_zeros_and_zero_gradient_even_for_inf_and_nan(
    mode: str, scale_by_keep: bool
) -> None:
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[1.0, inf], [nan, -inf], [3.0, 4.0]], requires_grad=True)
    out = drop_path(x, 1.0, training=True, mode=mode, scale_by_keep=scale_by_keep)
    assert torch.equal(out, torch.zeros_like(x))
    out.backward(torch.full_like(out, 2.0))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_rate_one_still_gives_upstream_parameters_a_gradient() -> None:
    # distributed data parallel fails on parameters that get no gradient at all
    branch = nn.Linear(3, 3)
    DropPath(1.0).train()(branch(torch.randn(4, 3))).sum().backward()
    assert branch.weight.grad is not None
    assert torch.equal(branch.weight.grad, torch.zeros_like(branch.weight))


# --- ranks, dtypes, layouts, devices ---------------------------------------------------------


@settings(max_examples=60)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    mode=st.sampled_from(MODES),
    drop_prob=st.sampled_from([0.25, 0.5, 0.75]),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_rank_and_dtype_keeps_or_drops_each_sample_whole(
    shape: list[int], dtype: torch.dtype, mode: str, drop_prob: float, seed: int
) -> None:
    torch.manual_seed(seed)
    x = torch.rand(shape, dtype=dtype) + 0.5
    out = drop_path(x, drop_prob, training=True, mode=mode)
    assert out.shape == x.shape
    assert out.dtype == dtype  # a mask of another dtype would promote the result
    kept = kept_samples(out)
    if mode == "batch":
        assert kept.all() or not kept.any()
    keep = 1.0 - drop_prob
    if mode == "fixed":  # exactly max(1, round((1 - p) B)) samples kept, scaled by B / k
        assert int(kept.sum()) == max(1, round(keep * len(x)))
        keep = float(kept.double().mean())
    keep_shape = (-1,) + (1,) * (x.ndim - 1)
    expected = torch.where(kept.reshape(keep_shape), x.double() / keep, 0.0)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), expected, rtol=2 * eps, atol=0.0)


def test_zero_dim_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="0-d"):
        drop_path(torch.tensor(1.0), 0.5, training=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_the_branch_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    linear, layer = nn.Linear(8, 8), DropPath(0.5).train()
    x = torch.randn(32, 8)
    with torch.autocast("cpu", dtype=dtype):
        branch = linear(x)
        dropped_branch = layer(branch)
        dropped_input = layer(x)
    assert branch.dtype == dtype
    assert dropped_branch.dtype == dtype
    assert dropped_input.dtype == torch.float32


@pytest.mark.parametrize("drop_prob", [0.5, 1.0])
def test_channels_last_layout_and_values_are_preserved(drop_prob: float) -> None:
    x = torch.rand(8, 3, 4, 5) + 0.5
    torch.manual_seed(6)
    reference = drop_path(x, drop_prob, training=True)
    torch.manual_seed(6)
    out = drop_path(x.to(memory_format=torch.channels_last), drop_prob, training=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, reference)


def test_mask_is_made_on_the_input_device() -> None:
    # meta tensors do not mix with CPU tensors, so a mask made on the CPU would raise
    x = torch.empty(4, 3, device="meta")
    assert drop_path(x, 0.5, training=True).device == x.device
    assert drop_path(x, 1.0, training=True).device == x.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_keeps_device_and_dtype(dtype: torch.dtype) -> None:
    x = torch.rand(64, 4, 3, device="cuda", dtype=dtype) + 0.5
    out = drop_path(x, 0.5, training=True)
    assert out.device == x.device and out.dtype == dtype
    kept = kept_samples(out)
    assert kept.any() and not kept.all()


# --- seeding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_reproducible_under_manual_seed(mode: str) -> None:
    x = torch.rand(256, 4) + 0.5
    draws = []
    for seed in (123, 123, 124):
        torch.manual_seed(seed)
        draws.append(drop_path(x, 0.5, training=True, mode=mode))
    assert torch.equal(draws[0], draws[1])
    if mode == "row":  # 256 independent decisions: equal by chance with probability 2**-256
        assert not torch.equal(draws[0], draws[2])


# --- arguments and attributes ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), -float("inf")])
def test_drop_prob_outside_zero_one_is_rejected_naming_the_value(bad: float) -> None:
    named = re.escape(repr(bad))
    with pytest.raises(ValueError, match=named):
        DropPath(bad)
    for training in (True, False):
        with pytest.raises(ValueError, match=named):
            drop_path(torch.ones(2, 2), bad, training=training)
    layer = DropPath(0.1)
    layer.drop_prob = bad
    with pytest.raises(ValueError, match=named):
        layer(torch.ones(2, 2))


@pytest.mark.parametrize("bad", ["Row", "sample", "elementwise", ""])
def test_unknown_mode_is_rejected_naming_it(bad: str) -> None:
    named = re.escape(repr(bad))
    with pytest.raises(ValueError, match=named):
        DropPath(0.1, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=named):
        drop_path(torch.ones(2, 2), 0.1, training=True, mode=bad)  # type: ignore[arg-type]
    layer = DropPath(0.1)
    layer.mode = bad  # type: ignore[assignment]
    with pytest.raises(ValueError, match=named):
        layer(torch.ones(2, 2))


def test_drop_prob_is_a_plain_attribute_read_on_every_call() -> None:
    layer = DropPath(0.0).train()
    x = torch.rand(16, 3) + 0.5
    assert layer(x) is x
    layer.drop_prob = 1.0
    assert torch.equal(layer(x), torch.zeros_like(x))
    layer.drop_prob = 0.5
    torch.manual_seed(7)
    kept = kept_samples(layer(x))
    assert kept.any() and not kept.all()


def test_drop_path_adds_nothing_to_the_state_dict() -> None:
    # checkpoints of an injected model must load into the original architecture
    assert DropPath(0.3, "batch").state_dict() == {}


def test_extra_repr_shows_rate_and_mode() -> None:
    layer = DropPath(0.1, "batch")
    assert repr(layer) == "DropPath(drop_prob=0.1, mode='batch')"
    layer.drop_prob = 0.25
    assert repr(layer) == "DropPath(drop_prob=0.25, mode='batch')"
    assert repr(DropPath(0.5, scale_by_keep=False)) == (
        "DropPath(drop_prob=0.5, mode='row', scale_by_keep=False)"
    )


# --- torch.compile ---------------------------------------------------------------------------


class Residual(nn.Module):
    """`x + DropPath(linear(x))`, the shape of a residual block."""

    def __init__(self, drop_prob: float, mode: str) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.drop_path = DropPath(drop_prob, mode)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.linear(x))


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("mode", MODES)
def test_compiles_with_fullgraph_and_no_graph_breaks(mode: str) -> None:
    model = Residual(0.3, mode).train()
    x = torch.randn(16, 8)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    torch._dynamo.reset()

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(8)
    expected = model(x)
    torch.manual_seed(8)
    got = compiled(x)
    assert torch.equal(got, expected)
    got.sum().backward()
    assert model.linear.weight.grad is not None

    model.drop_path.drop_prob = 1.0  # a changed rate is picked up (by a recompile)
    assert torch.equal(compiled(x), x)
    model.eval()
    torch.testing.assert_close(compiled(x), x + model.linear(x), rtol=0.0, atol=0.0)
