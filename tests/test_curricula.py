"""Time curricula (Curriculum, the DropPathScheduler factories): rates at given steps, resume,
and argument errors.

Expected values are written out here from each curriculum's formula, and the per-block rates
from the depth rules in docs/DESIGN.md and the LayerSkip paper, never from the package's code.
"""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from torch import Tensor, nn

from droppath_inject import (
    Curriculum,
    CurriculumError,
    DropPath,
    DropPathScheduler,
    inject_droppath,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_BLOCKS = 5
DIM = 8


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.Linear(DIM, DIM))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


def injected() -> nn.Module:
    """Five residual MLP blocks in a row, injected at rate 0.1."""
    torch.manual_seed(0)
    model = nn.Sequential(*(Residual() for _ in range(NUM_BLOCKS)))
    inject_droppath(model, 0.1, example_inputs=torch.randn(2, DIM))
    return model


def block_rates(model: nn.Module) -> list[float]:
    """The rate of each block's DropPath, blocks in order (``"3.drop_path_injected"`` -> 3)."""
    found = {
        int(path.split(".")[0]): module.drop_prob
        for path, module in model.named_modules()
        if isinstance(module, DropPath)
    }
    assert sorted(found) == list(range(NUM_BLOCKS))
    return [found[i] for i in range(NUM_BLOCKS)]


def linear_depth(top: float) -> list[float]:
    """Block i of L at ``top * i / (L - 1)``."""
    return [top * i / (NUM_BLOCKS - 1) for i in range(NUM_BLOCKS)]


def assert_rates(scheduler: DropPathScheduler, model: nn.Module, top: float) -> None:
    assert scheduler.max_drop == pytest.approx(top, rel=1e-12, abs=1e-15)
    assert block_rates(model) == pytest.approx(linear_depth(top), rel=1e-12, abs=1e-15)


# --- values against the formulas --------------------------------------------------------------


def test_warmup_by_steps_is_linear_then_holds() -> None:
    model = injected()
    scheduler = DropPathScheduler.warmup(model, 0.3, steps=4)
    assert_rates(scheduler, model, 0.0)
    for step in range(1, 9):
        top = scheduler.step()
        assert top == pytest.approx(0.3 * min(step, 4) / 4, rel=1e-12, abs=0.0)
        assert_rates(scheduler, model, 0.3 * min(step, 4) / 4)
    assert scheduler.max_drop == 0.3 and block_rates(model)[-1] == 0.3  # exact at the top


def test_cosine_warmup_by_fraction_of_total_steps() -> None:
    model = injected()
    scheduler = DropPathScheduler.warmup(model, 0.2, fraction=0.25, total_steps=40, shape="cosine")
    for step in range(1, 15):  # warm-up is 0.25 * 40 = 10 steps
        scheduler.step()
        expected = 0.2 * (1 - math.cos(math.pi * step / 10)) / 2 if step < 10 else 0.2
        assert_rates(scheduler, model, expected)


def test_layerskip_curriculum_composes_time_and_depth() -> None:
    """LayerSkip: p(l, t) = max_drop * S(t) * D(l), S(t) = e^(t ln 2 / T) - 1 over training,
    D(l) = e^(l ln 2 / (L - 1)) - 1 over depth."""
    model = injected()
    total = 12
    scheduler = DropPathScheduler.warmup(
        model, 0.5, fraction=1.0, total_steps=total, shape="exponential", schedule="exponential"
    )
    for t in range(1, total + 3):
        scheduler.step()
        time_factor = math.exp(min(t, total) * math.log(2) / total) - 1
        depth = [math.exp(i * math.log(2) / (NUM_BLOCKS - 1)) - 1 for i in range(NUM_BLOCKS)]
        expected = [0.5 * time_factor * d for d in depth]
        assert block_rates(model) == pytest.approx(expected, rel=1e-12, abs=1e-15), t


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_anneal_by_steps_to_a_final_rate(shape: str) -> None:
    model = injected()
    scheduler = DropPathScheduler.anneal(model, 0.4, final_drop=0.1, steps=6, shape=shape)
    assert_rates(scheduler, model, 0.4)
    for step in range(1, 10):
        scheduler.step()
        progress = min(step, 6) / 6
        if shape == "linear":
            expected = 0.4 - 0.3 * progress
        else:
            expected = 0.1 + 0.3 * (1 + math.cos(math.pi * progress)) / 2
        assert_rates(scheduler, model, expected)
    assert scheduler.max_drop == 0.1


def test_anneal_over_the_whole_training_by_fraction() -> None:
    model = injected()
    scheduler = DropPathScheduler.anneal(model, 0.2, fraction=1.0, total_steps=8)
    values = [scheduler.step() for _ in range(8)]
    expected = [0.2 * (1 + math.cos(math.pi * s / 8)) / 2 for s in range(1, 9)]
    assert values == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert values[-1] == 0.0


@pytest.mark.parametrize(
    ("factory", "before", "after"),
    [(DropPathScheduler.early_drop, 0.3, 0.0), (DropPathScheduler.late_drop, 0.0, 0.3)],
)
def test_early_and_late_drop_switch_at_one_step(factory, before: float, after: float) -> None:
    """On before step 3 and off from it (early), or the reverse (late); by steps and fraction."""
    for kwargs in ({"steps": 3}, {"fraction": 0.3, "total_steps": 10}):
        model = injected()
        scheduler = factory(model, 0.3, **kwargs)
        values = [scheduler.max_drop] + [scheduler.step() for _ in range(6)]
        assert values == [before] * 3 + [after] * 4, kwargs
        assert_rates(scheduler, model, after)


def test_curriculum_holds_before_start_and_after_stop() -> None:
    ramp = Curriculum(0.1, 0.5, start=10, stop=20)
    expected = {0: 0.1, 10: 0.1, 11: 0.1 + 0.4 * 0.1, 15: 0.3, 19: 0.1 + 0.4 * 0.9, 20: 0.5}
    for step, rate in expected.items():
        assert ramp(step) == pytest.approx(rate, rel=1e-12), step
    assert ramp(10**6) == 0.5


def test_linear_warmup_is_the_linear_step_warmup() -> None:
    first, second = injected(), injected()
    old = DropPathScheduler.linear_warmup(first, 0.2, warmup_steps=5)
    new = DropPathScheduler.warmup(second, 0.2, steps=5)
    assert old.max_drop_at == new.max_drop_at
    assert [old.step() for _ in range(7)] == [new.step() for _ in range(7)]


# --- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda m: DropPathScheduler.warmup(m, 0.3, fraction=0.5, total_steps=20, shape="cosine"),
        lambda m: DropPathScheduler.anneal(m, 0.3, final_drop=0.05, steps=9),
        lambda m: DropPathScheduler.late_drop(m, 0.3, steps=6),
    ],
    ids=["warmup", "anneal", "late_drop"],
)
def test_resume_from_state_dict_continues_exactly(make) -> None:
    model, resumed_model = injected(), injected()
    scheduler = make(model)
    for _ in range(5):
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    resumed = make(resumed_model)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.count == 5 and resumed.max_drop == scheduler.max_drop
    assert block_rates(resumed_model) == block_rates(model)
    for _ in range(12):
        assert resumed.step() == scheduler.step()
        assert block_rates(resumed_model) == block_rates(model)


def test_set_step_jumps_to_any_step() -> None:
    model = injected()
    scheduler = DropPathScheduler.warmup(model, 0.2, steps=10)
    assert scheduler.set_step(7) == pytest.approx(0.14, rel=1e-12)
    assert scheduler.count == 7
    assert_rates(scheduler, model, 0.14)
    assert scheduler.set_step(2) == pytest.approx(0.04, rel=1e-12)


# --- fraction-based curricula without a length ------------------------------------------------


def test_fraction_curriculum_without_total_steps_needs_sizing_before_step_one() -> None:
    model = injected()
    scheduler = DropPathScheduler.warmup(model, 0.2, fraction=0.5)
    curriculum = scheduler.max_drop_at
    assert isinstance(curriculum, Curriculum) and curriculum.needs_total_steps
    assert_rates(scheduler, model, 0.0)  # step 0 is the start of training whatever its length
    before = block_rates(model)
    with pytest.raises(CurriculumError, match="total_steps=.*DropPathCallback"):
        scheduler.step()
    assert block_rates(model) == before and scheduler.count == 0  # nothing moved
    scheduler.max_drop_at = curriculum.sized(8)
    assert not scheduler.max_drop_at.needs_total_steps
    assert scheduler.step() == pytest.approx(0.2 * 1 / 4, rel=1e-12)


# --- bad arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, ValueError, "exactly one of steps=... and fraction=..."),
        ({"steps": 4, "fraction": 0.1}, ValueError, "exactly one of"),
        ({"steps": 0}, ValueError, "warmup steps must be >= 1, got 0"),
        ({"steps": 2.5}, TypeError, "warmup steps must be an int, got 2.5"),
        ({"steps": True}, TypeError, "warmup steps must be an int, got True"),
        ({"fraction": 0.0}, ValueError, r"warmup fraction must be in \(0, 1\], got 0.0"),
        ({"fraction": 1.5}, ValueError, r"warmup fraction must be a fraction .* got 1.5"),
        ({"fraction": float("nan")}, ValueError, "warmup fraction must be"),
        ({"fraction": "half"}, TypeError, "warmup fraction must be a number, got 'half'"),
        ({"steps": 4, "total_steps": 10}, ValueError, "total_steps sizes a curriculum by fraction"),
        ({"fraction": 0.1, "total_steps": 0}, ValueError, "total_steps must be >= 1, got 0"),
        ({"steps": 4, "shape": "step"}, ValueError, "unknown shape 'step'; choose one of"),
        ({"steps": 4, "max_drop": 1.5}, ValueError, r"max_drop must lie in \[0, 1\], got 1.5"),
        ({"steps": 4, "max_drop": "high"}, ValueError, "max_drop must be a number in"),
    ],
)
def test_warmup_rejects_bad_arguments_clearly(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    model = injected()
    before = block_rates(model)
    arguments: dict[str, object] = {"max_drop": 0.1, **kwargs}
    max_drop = arguments.pop("max_drop")
    with pytest.raises(error, match=message):
        DropPathScheduler.warmup(model, max_drop, **arguments)  # type: ignore[arg-type]
    assert block_rates(model) == before


def test_other_factories_reject_bad_arguments_clearly() -> None:
    model = injected()
    with pytest.raises(ValueError, match=re.escape("final_drop (0.3) must not exceed max_drop")):
        DropPathScheduler.anneal(model, 0.2, final_drop=0.3, steps=4)
    with pytest.raises(ValueError, match="early_drop: give exactly one"):
        DropPathScheduler.early_drop(model, 0.2)
    with pytest.raises(ValueError, match="late_drop steps must be >= 1"):
        DropPathScheduler.late_drop(model, 0.2, steps=-3)
    with pytest.raises(ValueError, match=r"max_drop must lie in \[0, 1\], got -0.1"):
        DropPathScheduler.early_drop(model, -0.1, steps=3)
    with pytest.raises(ValueError, match=r"final_drop must lie in \[0, 1\], got nan"):
        DropPathScheduler.anneal(model, 0.2, final_drop=float("nan"), steps=3)
    with pytest.raises(ValueError, match=r"initial_drop must lie in \[0, 1\]"):
        Curriculum(2.0, 0.1, start=0, stop=3)


def test_curriculum_rejects_bad_arguments_clearly() -> None:
    with pytest.raises(ValueError, match=re.escape("stop (2) must not come before start (5)")):
        Curriculum(0.0, 0.1, start=5, stop=2)
    with pytest.raises(ValueError, match="start must be a step >= 0, got -1"):
        Curriculum(0.0, 0.1, start=-1, stop=2)
    with pytest.raises(ValueError, match="stop must be a step >= 0, got inf"):
        Curriculum(0.0, 0.1, start=0, stop=math.inf)
    with pytest.raises(ValueError, match=r"stop must be a fraction of training in \[0, 1\]"):
        Curriculum(0.0, 0.1, start=0, stop=2, by_fraction=True)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        Curriculum(0.0, 0.1, start=0, stop=2)(-1)
    with pytest.raises(ValueError, match="total_steps sizes"):
        Curriculum(0.0, 0.1, start=0, stop=2).sized(10)
