"""drop_rates: the built-in depth schedules, callables, and argument checks."""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from droppath_inject import drop_rates
from droppath_inject.schedule import SCHEDULES

rates_in_unit_interval = st.floats(0.0, 1.0, allow_nan=False)


def test_linear_matches_the_exact_formula_and_timm_linspace() -> None:
    rates = drop_rates(12, 0.3)
    exact = [float(Fraction(0.3) * i / 11) for i in range(12)]  # max_drop * i / (L - 1), exact
    assert rates == pytest.approx(exact, rel=1e-15, abs=0.0)
    # timm builds the same schedule with torch.linspace(0, drop_path_rate, depth)
    timm_rates = torch.linspace(0, 0.3, 12, dtype=torch.float64).tolist()
    assert rates == pytest.approx(timm_rates, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("num_blocks", "expected"), [(0, []), (1, [0.0]), (2, [0.0, 0.2])])
def test_linear_edge_cases(num_blocks: int, expected: list[float]) -> None:
    assert drop_rates(num_blocks, 0.2) == expected


@given(num_blocks=st.integers(0, 300), max_drop=rates_in_unit_interval)
def test_linear_rises_from_zero_to_exactly_max_drop(num_blocks: int, max_drop: float) -> None:
    rates = drop_rates(num_blocks, max_drop)
    assert len(rates) == num_blocks
    assert all(type(rate) is float for rate in rates)
    assert rates == sorted(rates)
    assert all(0.0 <= rate <= max_drop for rate in rates)
    if num_blocks >= 1:
        assert rates[0] == 0.0
    if num_blocks >= 2:
        assert rates[-1] == max_drop


@given(num_blocks=st.integers(0, 300), max_drop=rates_in_unit_interval)
def test_uniform_gives_every_block_max_drop(num_blocks: int, max_drop: float) -> None:
    assert drop_rates(num_blocks, max_drop, "uniform") == [max_drop] * num_blocks


def layerskip_rule(num_blocks: int, max_drop: float) -> list[float]:
    """LayerSkip (Elhoushi et al. 2024): block l of L gets max_drop * (e^(l ln 2 / (L - 1)) - 1)."""
    if num_blocks == 1:
        return [0.0]
    exponent = math.log(2) / (num_blocks - 1)
    return [max_drop * (math.exp(index * exponent) - 1) for index in range(num_blocks)]


@pytest.mark.parametrize("num_blocks", [2, 3, 8, 12, 32])
@pytest.mark.parametrize("max_drop", [0.1, 0.2, 0.5, 1.0])
def test_exponential_matches_layerskips_formula(num_blocks: int, max_drop: float) -> None:
    rates = drop_rates(num_blocks, max_drop, "exponential")
    assert rates == pytest.approx(layerskip_rule(num_blocks, max_drop), rel=1e-12, abs=1e-15)
    assert rates[0] == 0.0 and rates[-1] == max_drop  # both ends exact, not just close


def test_exponential_values_written_out() -> None:
    """Four blocks at 0.3: 0.3 * (2^(l/3) - 1), the middle rates below linear's 0.1 and 0.2."""
    rates = drop_rates(4, 0.3, "exponential")
    assert rates == pytest.approx([0.0, 0.0779763, 0.1762203, 0.3], abs=1e-7)
    assert all(e < lin for e, lin in zip(rates[1:-1], drop_rates(4, 0.3)[1:-1], strict=True))


@pytest.mark.parametrize(("num_blocks", "expected"), [(0, []), (1, [0.0])])
def test_exponential_edge_cases(num_blocks: int, expected: list[float]) -> None:
    assert drop_rates(num_blocks, 0.2, "exponential") == expected


@given(num_blocks=st.integers(0, 300), max_drop=rates_in_unit_interval)
def test_exponential_rises_from_zero_to_exactly_max_drop(num_blocks: int, max_drop: float) -> None:
    rates = drop_rates(num_blocks, max_drop, "exponential")
    assert len(rates) == num_blocks
    assert rates == sorted(rates)
    assert all(0.0 <= rate <= max_drop for rate in rates)
    if num_blocks >= 2:
        assert rates[0] == 0.0 and rates[-1] == max_drop


def test_the_command_line_offers_every_schedule() -> None:
    from droppath_inject.cli import build_parser

    parser = build_parser()
    for name in ("linear", "uniform", "exponential"):
        assert name in SCHEDULES
        assert parser.parse_args(["model.pt", "--schedule", name]).schedule == name


def test_callable_is_called_per_block_in_order_with_its_arguments() -> None:
    calls: list[tuple[int, int, float]] = []

    def square(block_index: int, num_blocks: int, max_drop: float) -> float:
        calls.append((block_index, num_blocks, max_drop))
        return max_drop * (block_index / (num_blocks - 1)) ** 2

    assert drop_rates(3, 0.4, square) == [0.0, 0.1, 0.4]
    assert calls == [(0, 3, 0.4), (1, 3, 0.4), (2, 3, 0.4)]


def test_callable_results_are_returned_as_floats() -> None:
    rates = drop_rates(2, 0.5, lambda i, n, m: Fraction(i, 4))
    assert rates == [0.0, 0.25]
    assert all(type(rate) is float for rate in rates)


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), "high", None])
def test_callable_rates_outside_zero_one_are_rejected_naming_block_and_value(bad: object) -> None:
    def schedule(block_index: int, num_blocks: int, max_drop: float) -> object:
        return bad if block_index == 2 else 0.0

    with pytest.raises(ValueError, match=rf"block 2\b.*{re.escape(repr(bad))}"):
        drop_rates(4, 0.1, schedule)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_max_drop_outside_zero_one_is_rejected_naming_the_value(bad: float) -> None:
    for schedule in SCHEDULES:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            drop_rates(3, bad, schedule)


def test_unknown_schedule_name_is_rejected_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="'cosine'") as raised:
        drop_rates(3, 0.1, "cosine")
    assert all(repr(name) in str(raised.value) for name in SCHEDULES)


def test_schedule_that_is_neither_name_nor_callable_is_rejected() -> None:
    with pytest.raises(TypeError, match="schedule"):
        drop_rates(3, 0.1, 0.5)  # type: ignore[arg-type]


def test_negative_num_blocks_is_rejected() -> None:
    with pytest.raises(ValueError, match="-1"):
        drop_rates(-1, 0.1)


@pytest.mark.parametrize("bad", [2.0, "3", True])
def test_num_blocks_that_is_not_an_int_is_rejected(bad: object) -> None:
    with pytest.raises(TypeError, match="num_blocks"):
        drop_rates(bad, 0.1)  # type: ignore[arg-type]
