"""Rate control during training (set_drop_rates, DropPathScheduler) and remove_droppath.

Expected rates are computed here from the depth rule in docs/DESIGN.md and from the order in which
the *original* model runs its residual blocks (forward hooks), never from droppath_inject's
own schedule code. Removal is checked against the module objects recorded before injection.
"""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from helpers.small_models import NUM_CLASSES, build_resnet18, build_vit_tiny
from torch import Tensor, fx, nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock

from droppath_inject import (
    DropPath,
    DropPathInjectError,
    DropPathScheduler,
    inject_droppath,
    remove_droppath,
    set_drop_rates,
)

pytestmark = pytest.mark.usefixtures("single_thread")


#: How to build each model, and the class of its residual blocks (the ground truth for sites).
MODELS: dict[str, tuple[Callable[[], nn.Module], type[nn.Module]]] = {
    "resnet18": (build_resnet18, BasicBlock),
    "vit_tiny": (build_vit_tiny, timm.models.vision_transformer.Block),
}
#: Residual adds per block: BasicBlock has one, a ViT block two (attention and MLP).
SITES_PER_BLOCK = {"resnet18": 1, "vit_tiny": 2}


def images(batch: int = 4, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def execution_order(model: nn.Module, block_type: type[nn.Module]) -> list[str]:
    """Paths of the ``block_type`` modules in the order one eval forward calls them."""
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda *_, path=path: order.append(path))
        for path, module in model.named_modules()
        if isinstance(module, block_type)
    ]
    with torch.no_grad():
        model.eval()(images(2))
    for handle in handles:
        handle.remove()
    return order


def injected(name: str, max_drop: float = 0.1) -> tuple[nn.Module, list[str]]:
    """A freshly built model, injected in place, and its residual blocks in execution order."""
    build, block_type = MODELS[name]
    model = build()
    order = execution_order(model, block_type)
    inject_droppath(model, max_drop, example_inputs=images(2))
    return model, order


def rates_by_block(model: nn.Module) -> dict[str, list[float]]:
    """Rates of the DropPath modules found under each block, by the block's path."""
    rates: dict[str, list[float]] = {}
    for path, module in model.named_modules():
        if isinstance(module, DropPath):
            rates.setdefault(path.rpartition(".")[0], []).append(module.drop_prob)
    return rates


def linear_rule(num_blocks: int, max_drop: float) -> list[float]:
    """docs/DESIGN.md: block i of L gets ``max_drop * i / (L - 1)``; L == 1 gives 0."""
    return [max_drop * i / (num_blocks - 1) if num_blocks > 1 else 0.0 for i in range(num_blocks)]


def assert_block_rates(
    model: nn.Module, order: list[str], expected: list[float], sites_per_block: int
) -> None:
    """Every block carries ``sites_per_block`` DropPaths at the rate of its execution index."""
    found = rates_by_block(model)
    assert sorted(found) == sorted(order)
    for path, rate in zip(order, expected, strict=True):
        assert found[path] == pytest.approx([rate] * sites_per_block, rel=1e-12, abs=0.0), path


def train_steps(model: nn.Module, steps: int = 2, seed: int = 0) -> None:
    """A few SGD steps in train mode, so that weights and BatchNorm statistics move."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    torch.manual_seed(seed)
    for step in range(steps):
        x = images(seed=10 + step)
        target = torch.arange(len(x)) % NUM_CLASSES
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()


def eval_output(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model.eval()(images(seed=7))


# --- set_drop_rates ----------------------------------------------------------------------------


@pytest.mark.parametrize("max_drop", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_set_drop_rates_follows_the_linear_rule_in_execution_order(
    name: str, max_drop: float
) -> None:
    model, order = injected(name, max_drop=0.1)
    expected = linear_rule(len(order), max_drop)
    returned = set_drop_rates(model, max_drop)
    assert returned == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert returned[0] == 0.0 and returned[-1] == max_drop  # the ends are exact
    assert_block_rates(model, order, expected, SITES_PER_BLOCK[name])


def test_set_drop_rates_uniform_and_callable_schedules() -> None:
    model, order = injected("resnet18")
    assert set_drop_rates(model, 0.3, schedule="uniform") == [0.3] * len(order)
    assert_block_rates(model, order, [0.3] * len(order), 1)

    calls: list[tuple[int, int, float]] = []

    def every_other(index: int, num_blocks: int, max_drop: float) -> float:
        calls.append((index, num_blocks, max_drop))
        return max_drop if index % 2 else 0.0

    expected = [0.25 if i % 2 else 0.0 for i in range(len(order))]
    assert set_drop_rates(model, 0.25, schedule=every_other) == expected
    assert calls == [(i, len(order), 0.25) for i in range(len(order))]
    assert_block_rates(model, order, expected, 1)


def exponential_rule(num_blocks: int, max_drop: float) -> list[float]:
    """LayerSkip: block l of L gets ``max_drop * (e^(l ln 2 / (L - 1)) - 1)``; L == 1 gives 0."""
    if num_blocks == 1:
        return [0.0]
    exponent = math.log(2) / (num_blocks - 1)
    return [max_drop * (math.exp(index * exponent) - 1) for index in range(num_blocks)]


def test_inject_and_set_drop_rates_follow_the_exponential_rule() -> None:
    build, block_type = MODELS["vit_tiny"]
    model = build()
    order = execution_order(model, block_type)
    inject_droppath(model, 0.2, schedule="exponential", example_inputs=images(2))
    assert_block_rates(model, order, exponential_rule(len(order), 0.2), 2)
    returned = set_drop_rates(model, 0.5, schedule="exponential")
    assert returned == pytest.approx(exponential_rule(len(order), 0.5), rel=1e-12, abs=1e-15)
    assert_block_rates(model, order, returned, 2)


@pytest.mark.parametrize(
    ("max_drop", "schedule"),
    [(1.5, "linear"), (-0.1, "linear"), (float("nan"), "uniform"), (0.2, "cosine"), (0.2, "bad")],
)
def test_set_drop_rates_rejects_bad_arguments_and_changes_nothing(
    max_drop: float, schedule: str
) -> None:
    model, _ = injected("vit_tiny", max_drop=0.2)
    before = rates_by_block(model)
    schedules: dict[str, object] = {
        "linear": "linear",
        "uniform": "uniform",
        "cosine": "cosine",  # an unknown name
        "bad": lambda i, n, m: 2.0 if i == n - 1 else m,  # a rate outside [0, 1] at the end
    }
    with pytest.raises(ValueError):
        set_drop_rates(model, max_drop, schedule=schedules[schedule])  # type: ignore[arg-type]
    assert rates_by_block(model) == before


def test_set_drop_rates_refuses_separately_injected_parts_of_different_depth() -> None:
    """Two inject_droppath calls, 8 and 2 blocks: one schedule cannot index both; each part can."""
    model = nn.ModuleDict({"a": build_resnet18(), "b": build_resnet18()})
    inject_droppath(model["a"], 0.1, example_inputs=images(2))
    features = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(3))
    inject_droppath(model["b"].layer1, 0.1, example_inputs=features)
    before = rates_by_block(model)
    with pytest.raises(DropPathInjectError, match="separate inject_droppath calls") as error:
        set_drop_rates(model, 0.3)
    assert "8 blocks from a.layer1.0" in str(error.value)
    assert "2 blocks from b.layer1.0" in str(error.value)
    assert rates_by_block(model) == before
    assert set_drop_rates(model["a"], 0.3) == pytest.approx(linear_rule(8, 0.3), rel=1e-12)
    assert set_drop_rates(model["b"], 0.3) == [0.0, 0.3]
    assert rates_by_block(model)["b.layer1.1"] == [0.3]


def test_control_needs_an_injected_model() -> None:
    model = build_resnet18()
    with pytest.raises(DropPathInjectError, match="inject_droppath"):
        set_drop_rates(model, 0.1)
    with pytest.raises(DropPathInjectError, match="inject_droppath"):
        remove_droppath(model)
    with pytest.raises(DropPathInjectError, match="inject_droppath"):
        DropPathScheduler.linear_warmup(model, 0.1, warmup_steps=3)


# --- DropPathScheduler -------------------------------------------------------------------------


def test_linear_warmup_rates_at_every_step() -> None:
    model, order = injected("resnet18")
    scheduler = DropPathScheduler.linear_warmup(model, 0.2, warmup_steps=4)
    assert_block_rates(model, order, [0.0] * len(order), 1)  # step 0: no drop at all
    for step in range(1, 8):
        top = 0.2 * min(step, 4) / 4
        assert scheduler.step() == pytest.approx(top, rel=1e-12, abs=0.0)
        assert_block_rates(model, order, linear_rule(len(order), top), 1)
    assert max(max(r) for r in rates_by_block(model).values()) == 0.2


def test_scheduler_by_epoch_with_a_custom_rule() -> None:
    """Cosine annealing of a uniform rate, stepped once per epoch."""
    model, order = injected("vit_tiny")

    def cosine(epoch: int) -> float:
        return 0.3 * (1 + math.cos(math.pi * min(epoch, 10) / 10)) / 2

    scheduler = DropPathScheduler(model, cosine, schedule="uniform")
    assert_block_rates(model, order, [0.3] * len(order), 2)
    for epoch in range(1, 12):
        assert scheduler.step() == cosine(epoch)
        assert_block_rates(model, order, [cosine(epoch)] * len(order), 2)
    assert all(r == [0.0, 0.0] for r in rates_by_block(model).values())


def test_scheduler_resumes_from_a_checkpoint() -> None:
    """state_dict survives a weights_only round trip and restores the rates of its step."""
    model, order = injected("resnet18")
    scheduler = DropPathScheduler.linear_warmup(model, 0.4, warmup_steps=6)
    for _ in range(3):
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed_model, _ = injected("resnet18", max_drop=0.05)
    resumed = DropPathScheduler.linear_warmup(resumed_model, 0.4, warmup_steps=6)
    resumed.load_state_dict(state)
    assert rates_by_block(resumed_model) == rates_by_block(model)
    assert_block_rates(resumed_model, order, linear_rule(len(order), 0.4 * 3 / 6), 1)
    for _ in range(4):
        assert resumed.step() == scheduler.step()
        assert rates_by_block(resumed_model) == rates_by_block(model)
    assert_block_rates(resumed_model, order, linear_rule(len(order), 0.4), 1)


def test_warmup_needs_at_least_one_step() -> None:
    model, _ = injected("resnet18")
    with pytest.raises(ValueError, match="warmup_steps"):
        DropPathScheduler.linear_warmup(model, 0.1, warmup_steps=0)


# --- remove_droppath ---------------------------------------------------------------------------


def assert_no_trace_of_the_package(model: nn.Module) -> None:
    for path, module in model.named_modules():
        assert not type(module).__module__.startswith("droppath_inject"), path
        assert not isinstance(module, fx.GraphModule), path
        assert not hasattr(module, "droppath_info"), path


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_remove_puts_back_the_very_same_modules(name: str, training: bool) -> None:
    build, _ = MODELS[name]
    model = build()
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    inject_droppath(model, 0.2, example_inputs=images(2))
    assert any(isinstance(m, DropPath) for m in model.modules())
    train_steps(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    expected = eval_output(model)

    assert remove_droppath(model.train(training)) is model
    after = dict(model.named_modules())
    assert after.keys() == modules.keys()
    for path, module in modules.items():
        assert after[path] is module, path
        assert module.training == training, path
    assert_no_trace_of_the_package(model)
    assert all(p is parameters[n] for n, p in model.named_parameters())
    assert dict(model.named_parameters()).keys() == parameters.keys()
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[key], value) for key, value in state.items())
    assert torch.equal(eval_output(model), expected)


def test_remove_keeps_dtype_and_buffers_changed_after_injection() -> None:
    """``.double()`` after injection swaps BatchNorm buffers for new tensors: removal keeps them."""
    model = build_resnet18()
    inject_droppath(model, 0.2, example_inputs=images(2))
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    model.double()
    doubled = [b for b in model.buffers() if b.is_floating_point()]
    assert buffers and not any(a is b for a, b in zip(buffers, doubled, strict=True))
    with torch.no_grad():
        expected = model.eval()(images(seed=7).double())
    remove_droppath(model)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float64 or not value.is_floating_point(), key
    with torch.no_grad():
        assert torch.equal(model(images(seed=7).double()), expected)


def _pickled_copy(model: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.load"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_remove_after_deepcopy_or_reload(name: str, how: str) -> None:
    build, _ = MODELS[name]
    model = build()
    classes = {path: type(m) for path, m in model.named_modules()}
    inject_droppath(model, 0.2, example_inputs=images(2))
    train_steps(model)
    expected = eval_output(model)
    state = model.state_dict()

    duplicate = copy.deepcopy(model) if how == "deepcopy" else _pickled_copy(model)
    own_parameters = {id(p) for p in duplicate.parameters()}
    remove_droppath(duplicate)
    assert {path: type(m) for path, m in duplicate.named_modules()} == classes
    assert_no_trace_of_the_package(duplicate)
    # the restored blocks hold the duplicate's parameters, not the source model's
    assert {id(p) for p in duplicate.parameters()} == own_parameters
    assert own_parameters.isdisjoint(id(p) for p in model.parameters())
    restored = duplicate.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[key], value) for key, value in state.items())
    assert torch.equal(eval_output(duplicate), expected)
    assert any(isinstance(m, DropPath) for m in model.modules())  # the source is still injected


#: Loads each (model, inputs) pair of files with droppath_inject made unimportable, and checks
#: the eval output; exits 0 and prints "same" per model only if every output is bitwise equal.
WITHOUT_PACKAGE = textwrap.dedent(
    """
    import sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "droppath_inject":
                raise ModuleNotFoundError(f"{name} is blocked", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    import torch

    torch.set_num_threads(1)
    for model_file, io_file in zip(sys.argv[1::2], sys.argv[2::2]):
        model = torch.load(model_file, weights_only=False)
        data = torch.load(io_file, weights_only=True)
        with torch.no_grad():
            out = model.eval()(data["x"])
        print("same" if torch.equal(out, data["expected"]) else "different")
    assert not any(n.partition(".")[0] == "droppath_inject" for n in sys.modules)
    """
)


def _run_without_package(files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PACKAGE, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_removed_model_loads_in_a_process_that_cannot_import_the_package(tmp_path: Path) -> None:
    files: list[Path] = []
    injected_files: list[Path] = []
    for name, (build, _) in sorted(MODELS.items()):
        model = build()
        inject_droppath(model, 0.2, example_inputs=images(2))
        train_steps(model)
        injected_files.append(tmp_path / f"{name}_injected.pt")
        torch.save(model, injected_files[-1])
        remove_droppath(model)
        x = images(seed=7)
        files += [tmp_path / f"{name}.pt", tmp_path / f"{name}_io.pt"]
        torch.save(model, files[-2])
        torch.save({"x": x, "expected": eval_output(model)}, files[-1])

    result = _run_without_package(files)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["same"] * len(MODELS)

    # the control: the same process cannot load an injected model, so the blocker works
    control = _run_without_package([injected_files[0], files[1]])
    assert control.returncode != 0
    assert "droppath_inject" in control.stderr and "blocked" in control.stderr
