"""Saving and loading injected models: torch.save in a fresh process, deepcopy, state_dict.

References: the model before saving (its eval outputs written to a file), a freshly built
un-injected model of the same architecture, and identities of parameter objects.
"""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers.small_models import BUILDERS, NUM_CLASSES
from torch import Tensor, nn
from torch.nn import functional as F

from droppath_inject import DropPath, inject_droppath, set_drop_rates
from droppath_inject.apply import BranchHook

pytestmark = pytest.mark.usefixtures("single_thread")


#: Class names of the model and of the blocks that own residual adds (from the architectures).
CLASS_NAMES = {"resnet18": ("ResNet", "BasicBlock"), "vit_tiny": ("VisionTransformer", "Block")}


def images(batch: int = 4, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trained_injected(name: str, max_drop: float = 0.2, steps: int = 2) -> nn.Module:
    """A model injected at ``max_drop``, then trained for ``steps`` SGD steps."""
    model = inject_droppath(BUILDERS[name](), max_drop, example_inputs=images(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    torch.manual_seed(0)
    for step in range(steps):
        x = images(seed=10 + step)
        F.cross_entropy(model(x), torch.arange(len(x)) % NUM_CLASSES).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def eval_output(model: nn.Module, seed: int = 7) -> Tensor:
    with torch.no_grad():
        return model.eval()(images(seed=seed))


def train_output(model: nn.Module, seed: int = 3) -> Tensor:
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.train()(images(seed=8))


def drop_rates_of(model: nn.Module) -> dict[str, tuple[float, str]]:
    return {p: (m.drop_prob, m.mode) for p, m in model.named_modules() if isinstance(m, DropPath)}


# --- torch.save / torch.load -------------------------------------------------------------------


#: Loads each saved model in a new interpreter and reports what it finds, as JSON: eval outputs
#: against the saved ones, its DropPaths, its block classes, and whether the blocks still share
#: their weights with the original blocks that remove_droppath puts back (trained there).
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch.nn import functional as F
    from droppath_inject import DropPath, remove_droppath, set_drop_rates

    torch.set_num_threads(1)
    report = {}
    for name, model_file, io_file in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
        model = torch.load(model_file, weights_only=False)
        data = torch.load(io_file, weights_only=True)
        with torch.no_grad():
            same_output = torch.equal(model.eval()(data["x"]), data["expected"])
        drops = {p: [m.drop_prob, m.mode] for p, m in model.named_modules()
                 if isinstance(m, DropPath)}
        owners = {p.rpartition(".")[0] for p in drops}
        entry = {
            "same_output": same_output,
            "model_class": type(model).__name__,
            "block_classes": sorted({type(model.get_submodule(p)).__name__ for p in owners}),
            "drops": drops,
            "rates": set_drop_rates(model, 0.5),
        }
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        F.cross_entropy(model(data["x"]), torch.zeros(len(data["x"]), dtype=torch.long)).backward()
        optimizer.step()
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        remove_droppath(model)
        restored = model.state_dict()
        entry["removed_keeps_trained_weights"] = restored.keys() == trained.keys() and all(
            torch.equal(restored[k], v) for k, v in trained.items()
        )
        entry["drop_paths_after_removal"] = sum(isinstance(m, DropPath) for m in model.modules())
        report[name] = entry
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_torch_save_then_load_in_a_fresh_process(tmp_path: Path) -> None:
    arguments: list[str] = []
    expected: dict[str, dict[str, list]] = {}
    for name in sorted(BUILDERS):
        model = trained_injected(name)
        model_file, io_file = tmp_path / f"{name}.pt", tmp_path / f"{name}_io.pt"
        torch.save(model, model_file)
        x = images(seed=7)
        torch.save({"x": x, "expected": eval_output(model)}, io_file)
        arguments += [name, str(model_file), str(io_file)]
        expected[name] = {p: list(v) for p, v in drop_rates_of(model).items()}

    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, *arguments],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sorted(report) == sorted(BUILDERS)
    for name, entry in report.items():
        model_class, block_class = CLASS_NAMES[name]
        assert entry["same_output"], name
        assert entry["model_class"] == model_class
        assert entry["block_classes"] == [block_class]
        assert entry["drops"] == expected[name] and entry["drops"]
        assert entry["rates"][-1] == 0.5 and entry["rates"][0] == 0.0
        assert entry["removed_keeps_trained_weights"], name
        assert entry["drop_paths_after_removal"] == 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_pickled_model_keeps_its_structure(name: str) -> None:
    """In-process round trip: same modules, rates, and hooks on the loaded model's DropPaths."""
    model = trained_injected(name, steps=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [(p, type(m).__name__) for p, m in loaded.named_modules()] == [
        (p, type(m).__name__) for p, m in model.named_modules()
    ]
    assert drop_rates_of(loaded) == drop_rates_of(model)
    assert torch.equal(eval_output(loaded), eval_output(model))
    # every hook survived and drives a DropPath of the loaded model, not of the saved one
    own = {id(m) for m in loaded.modules()}
    hooks = [h for m in loaded.modules() for h in m._forward_hooks.values()]
    assert len(hooks) == len([h for m in model.modules() for h in m._forward_hooks.values()])
    assert all(isinstance(h, BranchHook) and id(h.drop_path) in own for h in hooks)


# --- deepcopy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_deepcopy_computes_the_same_and_shares_nothing(name: str) -> None:
    model = trained_injected(name, steps=1)
    duplicate = copy.deepcopy(model)
    assert torch.equal(eval_output(duplicate), eval_output(model))
    assert torch.equal(train_output(duplicate), train_output(model))
    assert drop_rates_of(duplicate) == drop_rates_of(model)

    pointers = {p.data_ptr() for p in model.parameters()}
    assert pointers.isdisjoint(p.data_ptr() for p in duplicate.parameters())
    source_modules = {id(m) for m in model.modules()}
    assert source_modules.isdisjoint(id(m) for m in duplicate.modules())
    hooks = [h for m in duplicate.modules() for h in m._forward_hooks.values()]
    copied = {id(m) for m in duplicate.modules()}
    assert all(id(h.drop_path) in copied for h in hooks)  # hooks drive the copy's DropPaths

    expected, state = eval_output(model), copy.deepcopy(model.state_dict())
    with torch.no_grad():
        next(duplicate.parameters()).add_(1.0)
    set_drop_rates(duplicate, 0.9)
    duplicate.train()(images()).sum().backward()
    assert torch.equal(eval_output(model), expected)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(eval_output(duplicate), expected)
    assert max(rate for rate, _ in drop_rates_of(model).values()) == 0.2


# --- state_dict --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_trained_state_dict_loads_strictly_into_the_plain_architecture(name: str) -> None:
    """Trained at max_drop 0.2, saved weights-only, loaded into a freshly built model."""
    injected = trained_injected(name, max_drop=0.2, steps=2)
    fresh = BUILDERS[name]()
    assert not torch.equal(eval_output(fresh), eval_output(injected))  # training changed it
    assert list(injected.state_dict()) == list(fresh.state_dict())
    assert [n for n, _ in injected.named_parameters()] == [n for n, _ in fresh.named_parameters()]

    buffer = io.BytesIO()
    torch.save(injected.state_dict(), buffer)
    buffer.seek(0)
    result = fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any(isinstance(m, DropPath) for m in fresh.modules())
    assert torch.equal(eval_output(fresh), eval_output(injected))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_plain_checkpoint_loads_strictly_into_the_injected_model(name: str) -> None:
    """Resuming: a checkpoint of the plain architecture loads into an injected model."""
    plain = BUILDERS[name]()
    with torch.no_grad():
        for parameter in plain.parameters():
            parameter.mul_(0.5)
    injected = inject_droppath(BUILDERS[name](), 0.2, example_inputs=images(2))
    injected.load_state_dict(plain.state_dict(), strict=True)
    assert torch.equal(eval_output(injected), eval_output(plain))
