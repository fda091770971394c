"""Models inside wrappers: ``torch.compile`` (compiled and run before injection, or compiled
after it), ``nn.DataParallel``, ``DistributedDataParallel`` on a one-process gloo group, an
accelerate-prepared model and an FSDP2-sharded one.

The truth for "the drop paths run" is the model with its residual branches taken out, built
here from the library's own modules: at rate 1 in training every branch is dropped, so the
wrapper must compute exactly that. Eval outputs must stay those of the wrapper before
injection, bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from droppath_inject import DropPath, find_residuals, inject_droppath, remove_droppath

pytestmark = pytest.mark.usefixtures("single_thread", "fresh_dynamo")

BACKEND = "eager"  # Dynamo's capture without a code generator: the hooks question, quickly


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    def __init__(self, channels: int, graph_break: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.graph_break = graph_break

    def forward(self, x: Tensor) -> Tensor:
        if self.graph_break:
            torch._dynamo.graph_break()  # Dynamo resumes in a function of its own
        return x + self.conv(x)


class ConvNet(nn.Module):
    def __init__(self, graph_break: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*(Block(8, graph_break) for _ in range(3)))
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def convnet(graph_break: bool = False) -> tuple[nn.Module, nn.Module]:
    """A ConvNet, and the same model without its residual branches (every block an identity)."""
    torch.manual_seed(0)
    model = ConvNet(graph_break)
    branchless = copy.deepcopy(model)
    branchless.blocks = nn.Identity()
    return model, branchless


def sequential_convnet() -> tuple[nn.Module, nn.Module]:
    """The same as an ``nn.Sequential``: Dynamo compiles a small function around it instead of
    its ``forward`` (a module of ``torch.nn`` itself)."""
    model, _ = convnet()
    blocks = model.blocks
    assert isinstance(blocks, nn.Sequential)
    pool = (nn.AdaptiveAvgPool2d(1), nn.Flatten())
    sequential = nn.Sequential(model.stem, *blocks, *pool, model.head)
    return sequential, copy.deepcopy(nn.Sequential(model.stem, *pool, model.head))


def vit() -> tuple[nn.Module, nn.Module]:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=4
    )
    with torch.no_grad():  # layer norms start at 1 and 0: make them count
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    branchless = copy.deepcopy(model)
    branchless.blocks = nn.Identity()
    return model, branchless


MODELS = {"convnet": convnet, "sequential": sequential_convnet, "vit": vit}


def inputs(name: str) -> Tensor:
    return torch.randn(2, 3, 32 if name == "vit" else 16, 32 if name == "vit" else 16)


def drop_paths(model: nn.Module) -> int:
    return sum(isinstance(m, DropPath) for m in model.modules())


def inject_all(model: nn.Module, x: Tensor, **kwargs: Any) -> Any:
    """Every residual branch at rate 1: in training, all are dropped."""
    return inject_droppath(model, 1.0, schedule="uniform", example_inputs=x, **kwargs)


def check_drop_paths_run(wrapper: nn.Module, branchless: nn.Module, x: Tensor) -> None:
    with torch.no_grad():
        expected = branchless.eval()(x)
        actual = wrapper.train()(x)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_and_run_then_injected(name: str) -> None:
    model, branchless = MODELS[name]()
    x = inputs(name)
    compiled = torch.compile(model, backend=BACKEND)
    with torch.no_grad():
        reference = compiled.eval()(x)
        compiled.train()(x)  # compiled in both modes, before any hook exists
    assert inject_all(compiled, x) is compiled  # the user's wrapper comes back
    assert drop_paths(model) > 0
    check_drop_paths_run(compiled, branchless, x)
    with torch.no_grad():
        assert torch.equal(compiled.eval()(x), reference)


@pytest.mark.parametrize("name", ["convnet", "vit"])
def test_compiled_in_place_and_run_then_injected(name: str) -> None:
    """``Module.compile()`` compiles the model's own calls, no wrapper: the same two orders."""
    model, branchless = MODELS[name]()
    x = inputs(name)
    model.compile(backend=BACKEND)
    with torch.no_grad():
        reference = model.eval()(x)
        model.train()(x)
    assert inject_all(model, x) is model
    assert model._compiled_call_impl is not None  # still compiled
    check_drop_paths_run(model, branchless, x)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference)


def test_compiled_with_graph_breaks_then_injected() -> None:
    """The code after a graph break is a resume function of its own: forgotten too."""
    model, branchless = convnet(graph_break=True)
    x = inputs("convnet")
    compiled = torch.compile(model, backend=BACKEND)
    with torch.no_grad():
        reference = compiled.eval()(x)
        compiled.train()(x)
    inject_all(compiled, x)
    check_drop_paths_run(compiled, branchless, x)
    with torch.no_grad():
        assert torch.equal(compiled.eval()(x), reference)


@pytest.mark.parametrize("name", ["convnet", "vit"])
def test_injected_then_compiled(name: str) -> None:
    model, branchless = MODELS[name]()
    x = inputs(name)
    with torch.no_grad():
        reference = model.eval()(x)
    compiled = torch.compile(inject_all(model, x), backend=BACKEND)
    check_drop_paths_run(compiled, branchless, x)
    with torch.no_grad():
        assert torch.equal(compiled.eval()(x), reference)


def test_removed_from_a_compiled_model() -> None:
    """After ``remove_droppath`` the compiled wrapper no longer drops anything."""
    model, _ = convnet()
    x = inputs("convnet")
    with torch.no_grad():
        reference = model.eval()(x)
    compiled = torch.compile(model, backend=BACKEND)
    inject_all(compiled, x)
    with torch.no_grad():
        compiled.train()(x)
    assert remove_droppath(compiled) is compiled
    with torch.no_grad():
        assert torch.equal(compiled.train()(x), reference)


def test_find_residuals_on_a_compiled_and_run_model() -> None:
    model, _ = vit()
    x = inputs("vit")
    compiled = torch.compile(model, backend=BACKEND)
    with torch.no_grad():
        compiled.eval()(x)
    report = find_residuals(compiled, x)
    assert len(report.sites) == 2 * len(model.blocks)  # attention and MLP in each timm block


def test_data_parallel() -> None:
    model, branchless = convnet()
    x = inputs("convnet")
    wrapper = nn.DataParallel(model)
    assert inject_all(wrapper, x) is wrapper
    assert drop_paths(model) == 3
    check_drop_paths_run(wrapper, branchless, x)


@pytest.fixture
def process_group(tmp_path: Path) -> Iterator[None]:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.usefixtures("process_group")
def test_distributed_data_parallel_compiled() -> None:
    """DDP around the model, compiled and run, then injected: both wrappers come back."""
    model, branchless = convnet()
    x = inputs("convnet")
    ddp = nn.parallel.DistributedDataParallel(model)
    compiled = torch.compile(ddp, backend=BACKEND)
    with torch.no_grad():
        reference = compiled.eval()(x)
        compiled.train()(x)
    assert inject_all(compiled, x) is compiled
    assert drop_paths(model) == 3
    check_drop_paths_run(compiled, branchless, x)
    with torch.no_grad():
        assert torch.equal(compiled.eval()(x), reference)


@pytest.mark.usefixtures("process_group")
def test_fully_sharded_model() -> None:
    """FSDP2 keeps the user's module (its class changed): injected like any other."""
    from torch.distributed.fsdp import fully_shard

    model, branchless = convnet()
    x = inputs("convnet")
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    assert inject_all(model, x) is model
    assert drop_paths(model) == 3
    check_drop_paths_run(model, branchless, x)


def test_accelerate_prepared_model() -> None:
    accelerate = pytest.importorskip("accelerate")
    model, branchless = convnet()
    x = inputs("convnet")
    prepared = accelerate.Accelerator(cpu=True).prepare(model)
    assert inject_all(prepared, x) is prepared
    assert accelerate.utils.extract_model_from_parallel(prepared) is model
    assert drop_paths(model) == 3
    check_drop_paths_run(prepared, branchless, x)
