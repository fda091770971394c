"""Training an injected model: autocast, channels_last and torch.compile.

References never come from droppath_inject: the original model (a deepcopy taken before
injection) under the same seed, the original with its residual branches zeroed by hand, eager
execution for compiled code, and sample statistics for the rate a compiled kernel applies.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers.small_models import BUILDERS, NUM_CLASSES
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock

from droppath_inject import DropPath, DropPathScheduler, inject_droppath, set_drop_rates

BATCH = 4
SIGMAS = 5.0  # statistical checks fail a correct implementation with probability below 1e-6


pytestmark = pytest.mark.usefixtures("single_thread")


def images(batch: int = BATCH, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def labels(batch: int = BATCH, seed: int = 2) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(NUM_CLASSES, (batch,), generator=generator)


def original_and_injected(name: str, max_drop: float) -> tuple[nn.Module, nn.Module]:
    """The model as built, and an injected deepcopy of it sharing nothing with it."""
    original = BUILDERS[name]()
    injected = inject_droppath(copy.deepcopy(original), max_drop, example_inputs=images(2))
    return original, injected


def drop_paths(model: nn.Module) -> list[DropPath]:
    return [m for m in model.modules() if isinstance(m, DropPath)]


@contextmanager
def recording_drop_paths(model: nn.Module) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """(input, output) of every DropPath call made while active, as they were then.

    Copies, because the model may add into them in place afterwards (torchvision's
    ``out += identity`` adds into the DropPath output, as it added into ``out``).
    """
    calls: list[tuple[Tensor, Tensor]] = []
    handles = [
        m.register_forward_hook(
            lambda _, args, out: calls.append((args[0].detach().clone(), out.detach().clone()))
        )
        for m in drop_paths(model)
    ]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def train_step(
    model: nn.Module, x: Tensor, seed: int = 3, dtype: torch.dtype | None = torch.bfloat16
) -> tuple[Tensor, list[Tensor]]:
    """Output, and gradients of the parameters then of the input, of one train step.

    The step runs under ``torch.manual_seed(seed)`` and autocast to ``dtype`` (None: off).
    """
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(x)
        loss = F.cross_entropy(out, labels().to(x.device))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and x.grad is not None
    return out, [*grads, x.grad]  # type: ignore[list-item]


def assert_same_grads(expected: list[Tensor], actual: list[Tensor]) -> None:
    """Bitwise equal, with the same dtype and the same strides (memory format)."""
    assert len(expected) == len(actual)
    for index, (a, b) in enumerate(zip(expected, actual, strict=True)):
        assert a.dtype == b.dtype and a.stride() == b.stride(), index
        assert torch.equal(a, b), index


def zero_branches(name: str, model: nn.Module) -> nn.Module:
    """``model`` computing what it would with every residual branch output replaced by zeros.

    By hand, from the architecture: a BasicBlock's branch ends in ``bn2``, whose output in train
    mode is ``weight * normalized + bias``; a ViT block with both branches zeroed is the identity.
    """
    if name == "resnet18":
        blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
        assert len(blocks) == 8
        with torch.no_grad():
            for block in blocks:
                block.bn2.weight.zero_()
                block.bn2.bias.zero_()
    else:
        model.blocks = nn.Sequential()
    return model


# --- mixed precision and memory format ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "memory_format"),
    [
        ("resnet18", torch.contiguous_format),
        ("resnet18", torch.channels_last),
        ("vit_tiny", torch.contiguous_format),
    ],
    ids=["resnet18", "resnet18-channels_last", "vit_tiny"],
)
def test_bf16_autocast_train_step_at_rate_zero_is_the_original(
    name: str, memory_format: torch.memory_format
) -> None:
    """Injected at 0.3, then set to 0: outputs and gradients bitwise the original's."""
    original, injected = original_and_injected(name, max_drop=0.3)
    rates = set_drop_rates(injected, 0.0)
    assert rates and rates == [0.0] * len(rates)
    x = images().to(memory_format=memory_format)
    for model in (original, injected):
        model.to(memory_format=memory_format)
    out_original, grads_original = train_step(original, x)
    out_injected, grads_injected = train_step(injected, x)
    assert out_injected.dtype == torch.bfloat16
    assert torch.equal(out_original, out_injected)
    assert_same_grads(grads_original, grads_injected)
    if memory_format == torch.channels_last:
        assert grads_injected[-1].is_contiguous(memory_format=torch.channels_last)
        assert injected.conv1.weight.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bf16_autocast_rate_one_zeroes_every_branch(name: str) -> None:
    """At rate 1 the model computes its original with the branches zeroed by hand, in bf16."""
    original, injected = original_and_injected(name, max_drop=0.3)
    set_drop_rates(injected, 1.0, schedule="uniform")
    reference = zero_branches(name, original)
    x = images()
    with recording_drop_paths(injected) as calls:
        out, _ = train_step(injected, x)
    expected, _ = train_step(reference, x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    assert len(calls) == len(drop_paths(injected)) > 0
    for branch, dropped in calls:
        assert branch.dtype == dropped.dtype == torch.bfloat16
        assert branch.ne(0).any() and not dropped.ne(0).any()


def test_bf16_channels_last_drop_keeps_dtype_layout_and_scales_kept_samples() -> None:
    """Rate 0.5 on every branch: each sample's branch is zeroed or scaled by 2, in bf16, NHWC."""
    _, injected = original_and_injected("resnet18", max_drop=0.5)
    set_drop_rates(injected, 0.5, schedule="uniform")
    injected.to(memory_format=torch.channels_last)
    x = images(16).to(memory_format=torch.channels_last)
    with recording_drop_paths(injected) as calls:
        injected.train()
        torch.manual_seed(4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = injected(x)
        out.float().sum().backward()
    kept_counts = []
    for branch, dropped in calls:
        assert branch.dtype == dropped.dtype == torch.bfloat16
        assert branch.is_contiguous(memory_format=torch.channels_last)
        assert dropped.is_contiguous(memory_format=torch.channels_last)
        kept = dropped.flatten(1).ne(0).any(1)
        assert not dropped[~kept].ne(0).any()
        # bf16 rounds 2 * branch exactly: the scale is a power of two
        assert torch.equal(dropped[kept], branch[kept] * 2)
        kept_counts.append(int(kept.sum()))
    total = len(calls) * x.shape[0]
    assert abs(sum(kept_counts) / total - 0.5) < SIGMAS * math.sqrt(0.25 / total)
    for conv in (m for m in injected.modules() if isinstance(m, nn.Conv2d)):
        assert conv.weight.grad is not None
        assert conv.weight.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_channels_last_train_step(dtype: torch.dtype) -> None:
    _, injected = original_and_injected("resnet18", max_drop=0.5)
    set_drop_rates(injected, 0.5, schedule="uniform")
    injected.cuda().to(memory_format=torch.channels_last)
    x = images(16).cuda().to(memory_format=torch.channels_last)
    with recording_drop_paths(injected) as calls:
        out, grads = train_step(injected, x, dtype=dtype)
    assert out.dtype == dtype
    assert all(torch.isfinite(g).all() for g in grads)
    kept = torch.cat([dropped.flatten(1).ne(0).any(1) for _, dropped in calls])
    assert kept.any() and not kept.all()
    for branch, dropped in calls:
        assert branch.dtype == dropped.dtype == dtype and dropped.device == x.device
        assert dropped.is_contiguous(memory_format=torch.channels_last)


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_graph_breaks_are_no_more_than_the_original(name: str, training: bool) -> None:
    original, injected = original_and_injected(name, max_drop=0.2)
    explained = {}
    for label, model in (("original", original), ("injected", injected)):
        torch._dynamo.reset()
        explained[label] = torch._dynamo.explain(model.train(training))(images())
    assert explained["injected"].graph_break_count <= explained["original"].graph_break_count
    assert explained["injected"].graph_count <= explained["original"].graph_count


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_rate_changes_while_training_compile_at_most_twice(name: str) -> None:
    """A warmup changes every rate each step: compiled steps stay bitwise eager, few compiles.

    The first compile specializes on the rates; the first change makes dynamo treat them as
    symbolic inputs (automatic dynamic), after which new rates need no recompile.
    """
    _, injected = original_and_injected(name, max_drop=0.5)
    scheduler = DropPathScheduler.linear_warmup(injected, 0.5, warmup_steps=4)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(injected, backend=counter, fullgraph=True)
    x = images()
    for step in range(6):
        expected, expected_grads = train_step(injected, x, seed=step)
        out, grads = train_step(compiled, x, seed=step)
        assert torch.equal(out, expected), step  # the compiled step used this step's rates
        assert_same_grads(expected_grads, grads)
        scheduler.step()
    assert max(d.drop_prob for d in drop_paths(injected)) == 0.5
    assert 1 <= counter.frame_count <= 2


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("skip_compute", [False, True], ids=["mask", "skip"])
@pytest.mark.parametrize("mode", ["row", "batch"])
def test_block_granularity_compiled_train_steps_are_the_eager_ones(
    mode: str, skip_compute: bool
) -> None:
    """One decision per block, masked or skipped: compiled steps equal eager ones bit for bit
    (row mode reads its kept rows by ``nonzero``, so dynamo breaks the graph there; compiled
    batch mode decides in ``torch.cond``, counted in ``conditional_calls``)."""
    original = BUILDERS["vit_tiny"]()
    injected = inject_droppath(
        copy.deepcopy(original), 0.5, mode=mode, granularity="block",  # type: ignore[arg-type]
        skip_compute=skip_compute, example_inputs=images(2),
    )  # fmt: skip
    compiled = torch.compile(injected, backend="aot_eager")
    skips = [vars(block)["forward"] for block in injected.blocks] if skip_compute else []
    x = images()
    steps_that_dropped = compiled_skips = 0
    for step in range(6):
        expected, expected_grads = train_step(injected, x, seed=step)
        before = sum(s.skipped_calls + s.gathered_calls + s.conditional_calls for s in skips)
        out, grads = train_step(compiled, x, seed=step)
        compiled_skips += (
            sum(s.skipped_calls + s.gathered_calls + s.conditional_calls for s in skips) - before
        )
        assert torch.equal(out, expected), step
        assert_same_grads(expected_grads, grads)
        steps_that_dropped += not torch.equal(expected, train_step(original, x, seed=step)[0])
    assert steps_that_dropped > 0
    assert compiled_skips > 0 if skip_compute else not skips  # compiled code skipped too


class Mlp(nn.Module):
    """``x + fc2(relu(fc1(x)))``: a residual block small enough for a quick inductor build."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_inductor_train_step_applies_the_current_rate() -> None:
    """Inductor's own RNG: the kept fraction follows each new rate; kept rows are scaled."""
    torch.manual_seed(0)
    model = nn.Sequential(Mlp())
    original = copy.deepcopy(model)
    inject_droppath(model, 0.2, schedule="uniform", example_inputs=torch.randn(2, 16))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model.train(), backend=counter, fullgraph=True)
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        branch = original[0](x) - x
    for rate in (0.2, 0.6, 0.4):
        set_drop_rates(model, rate, schedule="uniform")
        model.zero_grad(set_to_none=True)
        out = compiled(x)
        out.square().mean().backward()
        assert model[0].fc1.weight.grad is not None
        assert torch.isfinite(model[0].fc1.weight.grad).all()
        dropped = out.detach() - x
        kept = dropped.ne(0).any(1)
        keep = 1.0 - rate
        assert abs(kept.float().mean().item() - keep) < SIGMAS * math.sqrt(keep * rate / len(x))
        assert torch.equal(out[~kept].detach(), x[~kept])
        torch.testing.assert_close(dropped[kept], branch[kept] / keep, rtol=1e-4, atol=1e-5)
    assert 1 <= counter.frame_count <= 2
