"""Fixed-count rows (``mode="fixed"``, DINOv2's ``drop_add_residual_stochastic_depth``) and
skipping without graph breaks under torch.compile.

Truth comes from outside the package: the formula ``k = max(1, round((1 - p) B))`` written
here, the un-injected model (a deepcopy) under the same seed, masking (``skip_compute=False``)
for skipping, eager execution for compiled code, and dynamo's own graph-break count.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import timm
import torch
from helpers.layer_drop_models import randomize_constants
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaModel

from droppath_inject import DropPath, drop_path, inject_droppath, set_drop_rates
from droppath_inject.layer_drop import skips_of

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("single_thread")

BATCH = 8
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # kernels on k rows may round differently from B rows


def expected_kept(batch: int, drop_prob: float) -> int:
    return max(1, round((1.0 - drop_prob) * batch))


def kept_rows(out: Tensor) -> Tensor:
    return out.flatten(1).ne(0).any(1)


# --- the draw ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "drop_prob"),
    [(8, 0.5), (8, 0.1), (4, 0.9), (10, 0.25), (3, 0.5), (1, 0.7), (64, 0.3)],
)
def test_exactly_k_rows_kept_and_scaled_by_batch_over_k(batch: int, drop_prob: float) -> None:
    k = expected_kept(batch, drop_prob)
    x = torch.rand(batch, 3, 5, dtype=torch.float64) + 0.5
    for seed in range(5):
        torch.manual_seed(seed)
        out = drop_path(x, drop_prob, training=True, mode="fixed")
        kept = kept_rows(out)
        assert int(kept.sum()) == k
        torch.testing.assert_close(out[kept], x[kept] * (batch / k), rtol=1e-15, atol=0.0)
        assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))


def test_each_row_is_kept_with_frequency_k_over_b() -> None:
    """Uniform without replacement: every row kept k/B of the time (a draw biased to some rows,
    such as the first k, or with replacement, fails the 6-sigma bound)."""
    batch, drop_prob, draws = 8, 0.5, 3000
    k = expected_kept(batch, drop_prob)
    layer = DropPath(drop_prob, mode="fixed").train()
    torch.manual_seed(0)
    counts = torch.zeros(batch)
    for _ in range(draws):
        counts += kept_rows(layer(torch.ones(batch, 2))).float()
    frequency = counts / draws
    p = k / batch
    sigma = (p * (1 - p) / draws) ** 0.5
    assert (frequency - p).abs().max() < 6 * sigma, frequency


def test_rate_zero_is_the_input_itself_and_eval_is_identity() -> None:
    x = torch.randn(BATCH, 4)
    assert drop_path(x, 0.0, training=True, mode="fixed") is x
    assert torch.equal(DropPath(0.5, mode="fixed").eval()(x), x)
    assert torch.equal(drop_path(x, 1.0, training=True, mode="fixed"), torch.zeros_like(x))


# --- models ------------------------------------------------------------------------------------


def vit(depth: int = 4) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=depth, num_classes=10)
    images = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return randomize_constants(model), (images,), {}


def llama(layers: int = 4) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    ids = torch.randint(3, 64, (BATCH, 12), generator=torch.Generator().manual_seed(1))
    return randomize_constants(LlamaModel(config)), (), {"input_ids": ids}


MODELS = {"vit": vit, "llama": llama}


def example(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return (args[0][:2],) if args else {k: v[:2] for k, v in kwargs.items()}


def inject(model: nn.Module, args: Any, kwargs: Any, mode: str, skip: bool) -> nn.Module:
    return inject_droppath(
        model, 0.5, mode=mode, granularity="block", skip_compute=skip,  # type: ignore[arg-type]
        example_inputs=example(args, kwargs),
    )  # fmt: skip


def hidden(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.last_hidden_state


def train_step(model: nn.Module, args: Any, kwargs: Any, seed: int) -> tuple[Tensor, dict]:
    """Output and gradients (input images, or the embedding table for token ids)."""
    model.train().zero_grad(set_to_none=True)
    args = tuple(a.clone().requires_grad_() for a in args)
    torch.manual_seed(seed)
    out = hidden(model(*args, **kwargs))
    out.square().mean().backward()
    grads = {
        n.removeprefix("_orig_mod."): p.grad
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    if args:
        grads["input"] = args[0].grad
    return out.detach(), grads


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fixed_rate_zero_trains_bit_identical_to_no_drop_path(name: str) -> None:
    original, args, kwargs = MODELS[name]()
    injected = inject(copy.deepcopy(original), args, kwargs, "fixed", skip=True)
    set_drop_rates(injected, 0.0)
    expected, expected_grads = train_step(original, args, kwargs, seed=3)
    out, grads = train_step(injected, args, kwargs, seed=3)
    assert torch.equal(out, expected)
    assert grads.keys() == expected_grads.keys()
    assert all(torch.equal(grads[n], expected_grads[n]) for n in grads)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fixed_skip_equals_mask_on_the_same_rows(name: str) -> None:
    """Same seed, same k rows: skipping runs each block on those rows only, masking on all."""
    original, args, kwargs = MODELS[name]()
    masked = inject(copy.deepcopy(original), args, kwargs, "fixed", skip=False)
    skipping = inject(copy.deepcopy(original), args, kwargs, "fixed", skip=True)
    skips = skips_of(skipping)
    assert len(skips) == 4
    with torch.no_grad():
        plain = hidden(original.eval()(*args, **kwargs))
    for seed in range(3):
        expected, expected_grads = train_step(masked, args, kwargs, seed)
        out, grads = train_step(skipping, args, kwargs, seed)
        torch.testing.assert_close(out, expected, **TOLERANCE)
        assert grads.keys() == expected_grads.keys()
        for key in grads:
            torch.testing.assert_close(grads[key], expected_grads[key], **TOLERANCE)
        assert not torch.allclose(out, plain, **TOLERANCE)  # the draw dropped something
    # the linear schedule leaves the first block at rate 0; every other one ran on k rows
    assert [s.gathered_calls for s in skips.values()] == [0, 3, 3, 3]
    assert not any(s.masked_calls for s in skips.values())


def test_branch_granularity_skips_on_exactly_k_rows_and_equals_the_mask() -> None:
    """Branch granularity in fixed mode: each branch of timm's blocks (its units run on the
    kept rows) sees the k rows its rate gives (hooks count them), and matches the mask under
    the same seed."""
    original, args, kwargs = vit()
    small = example(args, kwargs)
    masked = inject_droppath(copy.deepcopy(original), 0.5, mode="fixed", example_inputs=small)
    skipping = inject_droppath(
        copy.deepcopy(original), 0.5, mode="fixed", skip_compute=True, example_inputs=small
    )
    seen: dict[str, list[int]] = {}
    for index, block in enumerate(skipping.blocks):
        for part in ("attn", "mlp"):  # their first linear layers, inside the units
            rows = seen.setdefault(f"{index}.{part}", [])
            first = block.attn.qkv if part == "attn" else block.mlp.fc1
            first.register_forward_pre_hook(
                lambda _, inputs, rows=rows: rows.append(len(inputs[0]))
            )
    rates = [0.5 * i / 3 for i in range(4)]  # the linear schedule over timm's 4 blocks
    for seed in range(2):
        expected, expected_grads = train_step(masked, args, kwargs, seed)
        out, grads = train_step(skipping, args, kwargs, seed)
        torch.testing.assert_close(out, expected, **TOLERANCE)
        for key in expected_grads:
            torch.testing.assert_close(grads[key], expected_grads[key], **TOLERANCE)
    for index, rate in enumerate(rates):
        for part in ("attn", "mlp"):
            assert seen[f"{index}.{part}"] == [expected_kept(BATCH, rate)] * 2, (index, part)


# --- torch.compile -----------------------------------------------------------------------------


def graph_breaks(model: nn.Module, args: Any, kwargs: Any) -> int:
    torch._dynamo.reset()
    count: int = torch._dynamo.explain(model.train())(*args, **kwargs).graph_break_count
    torch._dynamo.reset()
    return count


COMPILED = [("vit", "fixed"), ("vit", "batch"), ("llama", "fixed")]


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("name", "mode"), COMPILED)
def test_skipping_compiles_to_one_graph_equal_to_eager(name: str, mode: str) -> None:
    """No graph break (fullgraph=True compiles), and compiled train steps are the eager ones
    under the same seeds: outputs bit for bit, gradients too where the un-injected model's are."""
    original, args, kwargs = MODELS[name]()
    assert graph_breaks(original, args, kwargs) == 0
    injected = inject(original, args, kwargs, mode, skip=True)
    assert graph_breaks(injected, args, kwargs) == 0
    compiled = torch.compile(injected, fullgraph=True, backend="aot_eager")
    for seed in range(4):
        expected, expected_grads = train_step(injected, args, kwargs, seed)
        out, grads = train_step(compiled, args, kwargs, seed)
        assert torch.equal(out, expected), seed
        for key, grad in expected_grads.items():
            if name == "vit":
                assert torch.equal(grads[key], grad), (seed, key)
            else:  # the un-injected Llama's own compiled gradients differ by ~1.5e-8 already
                torch.testing.assert_close(grads[key], grad, rtol=1e-5, atol=1e-7)
    skips = skips_of(injected).values()
    assert sum(s.conditional_calls if mode == "batch" else s.gathered_calls for s in skips)


class Counted(nn.Module):
    """A residual block whose MLP a hook counts: a Python side effect torch.cond refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        self.calls = 0
        self.mlp.register_forward_pre_hook(self.count)

    def count(self, *_: object) -> None:
        self.calls += 1

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(x)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_a_block_torch_cond_cannot_hold_decides_in_python_instead_of_raising() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[Counted() for _ in range(3)])
    x = torch.randn(4, 8)
    model, report = inject_droppath(
        model, 0.5, mode="batch", granularity="block", skip_compute=True,
        example_inputs=x[:2], return_report=True,
    )  # fmt: skip
    assert report.layer_drop is not None
    assert all("decides in Python" in b.reason for b in report.layer_drop.blocks)
    compiled = torch.compile(model, backend="aot_eager")
    for seed in range(3):
        expected, _ = train_step(model, (x,), {}, seed)
        out, _ = train_step(compiled, (x,), {}, seed)
        assert torch.equal(out, expected)
