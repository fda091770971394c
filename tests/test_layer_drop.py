"""Block granularity: one decision per block, skipping whole blocks, eval and generate kept."""

from __future__ import annotations

import copy
import io
import math
import pickle
import warnings
from typing import Any

import pytest
import torch
from helpers import layer_drop_models as ldm
from helpers import synthetic_models as sm
from test_skipping import SharedBiasNet
from torch import Tensor, nn

from droppath_inject import (
    DropPathInjectError,
    DropPathScheduler,
    DropPathWarning,
    inject_droppath,
    remove_droppath,
    set_drop_rates,
)
from droppath_inject.block_gate import BlockDropPath, LayerGate, ResidualGate
from droppath_inject.branch_rows import units_of
from droppath_inject.granularity import BlockHandling, Granularity
from droppath_inject.layer_drop import skips_of

pytestmark = pytest.mark.usefixtures("single_thread")


def inject(model: nn.Module, inputs: Any, **options: Any) -> tuple[nn.Module, Any]:
    options = {"max_drop": 0.5, "schedule": "uniform", "granularity": "block", **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inject_droppath(model, example_inputs=inputs, return_report=True, **options)


def gates(model: nn.Module) -> dict[str, LayerGate]:
    return {
        path: hook
        for path, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, LayerGate)
    }


def train_step(model: nn.Module, inputs: Any, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = ldm.call(model, inputs)
    (out.float().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def binomial_bound(n: int, p: float, sigmas: float = 5.0) -> float:
    return sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_one_decision_per_block_shared_by_its_branches() -> None:
    model, inputs = ldm.build("llama", layers=4)
    model, report = inject(model, inputs, max_drop=0.4)
    layers = model.model.layers
    # ground truth from the config and the module structure: one gate per decoder layer,
    # carrying the layer's two branches (self_attn and mlp)
    assert report.layer_drop.granularity is Granularity.BLOCK
    assert [b.module for b in report.layer_drop.blocks] == [
        f"model.layers.{i}" for i in range(model.config.num_hidden_layers)
    ]
    found = gates(model)
    assert sorted(found) == [f"model.layers.{i}" for i in range(len(layers))]
    assert all(len(g.members) == 2 for g in found.values())
    zeroed: dict[int, list[Tensor]] = {}
    handles = []
    for index, layer in enumerate(layers):
        for drop in layer.modules():
            if isinstance(drop, BlockDropPath):

                def hook(m: nn.Module, a: Any, out: Tensor, index: int = index) -> None:
                    dropped = (out.detach().flatten(1) == 0).all(1) & (a[0].flatten(1) != 0).any(1)
                    zeroed.setdefault(index, []).append(dropped)

                handles.append(drop.register_forward_hook(hook))
    model.train()
    steps, batch = 40, ldm.BATCH
    drops = {i: 0 for i in range(len(layers))}
    with torch.no_grad():
        for step in range(steps):
            zeroed.clear()
            torch.manual_seed(step)
            ldm.call(model, ldm.tokens())
            for index, (attn, mlp) in zeroed.items():
                assert torch.equal(attn, mlp)  # every branch of a dropped block is zeroed
                drops[index] += int(attn.sum())
    for h in handles:
        h.remove()
    rates = [g.drop_prob for g in found.values()]
    n = steps * batch
    for index, rate in enumerate(rates):
        assert abs(drops[index] - n * rate) <= binomial_bound(n, rate), (index, drops, rates)


@pytest.mark.parametrize("family", ["llama", "hf_vit", "timm_vit"])
@pytest.mark.parametrize("skip_compute", [False, True])
def test_rate_zero_training_is_the_original(family: str, skip_compute: bool) -> None:
    model, inputs = ldm.build(family)
    original = copy.deepcopy(model)
    model, _ = inject(model, inputs, max_drop=0.0, skip_compute=skip_compute)
    out, grads = train_step(model, inputs, 3)
    expected, expected_grads = train_step(original, inputs, 3)
    assert torch.equal(out, expected)
    assert grads.keys() == expected_grads.keys()
    assert all(torch.equal(grads[k], expected_grads[k]) for k in grads)


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("family", list(ldm.FAMILIES))
def test_skip_matches_mask(family: str, mode: str) -> None:
    model, inputs = ldm.build(family)  # Hugging Face's default use_cache: a cache each forward
    masked, _ = inject(copy.deepcopy(model), inputs, mode=mode)
    skipping, report = inject(copy.deepcopy(model), inputs, mode=mode, skip_compute=True)
    proven = ldm.FAMILIES[family][2]
    handled = {b.handling for b in report.layer_drop.blocks}
    assert handled == ({BlockHandling.SKIPPED} if proven else {BlockHandling.SHARED})
    # a layer that cannot skip whole (post-norm BERT, timm's ResNet blocks) skips its branches
    assert all(
        b.reason.startswith("its branches skip on their own (the layer as a whole cannot: ")
        for b in report.layer_drop.blocks
        if not proven
    )
    units = units_of(skipping)
    assert bool(units) == (not proven)
    assert [type(m) for m in skipping.modules()] == [type(m) for m in masked.modules()]
    assert skipping.state_dict().keys() == model.state_dict().keys()
    for seed in range(4):
        out, grads = train_step(skipping, inputs, seed)
        expected, expected_grads = train_step(masked, inputs, seed)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert grads.keys() == expected_grads.keys()  # zero gradients for skipped blocks too
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-6)
    skips = skips_of(skipping).values()
    assert len(skips) == (ldm.LAYERS if proven else 0)
    assert all(s.masked_calls == 0 for s in skips)
    assert not proven or mode == "row" or sum(s.skipped_calls for s in skips) > 0
    rows = {id(u.branch): u.branch for u in units.values()}.values()
    assert all(b.masked_calls == 0 for b in rows)
    if rows and mode == "batch":
        assert sum(b.skipped_calls for b in rows) > 0
    if rows and mode == "row" and family != "timm_resnet":  # BatchNorm trains there: masked
        assert sum(b.gathered_calls for b in rows) > 0


@pytest.mark.parametrize(("bias", "batch"), [("parameter", 2), ("table", 2), ("expanded", 3)])
def test_row_mode_gathers_per_sample_arguments_not_the_models_state(bias: str, batch: int) -> None:
    """A bias argument of shape (heads, N, N) with heads == batch comes from the parameters
    (as it is, or looked up in a table): never gathered. Expanded to the batch, it is."""
    torch.manual_seed(0)
    model = SharedBiasNet(heads=2, bias=bias)
    x = torch.randn(batch, sm.TOKENS, sm.DIM)
    masked, _ = inject(copy.deepcopy(model), x, mode="row")
    skipping, report = inject(copy.deepcopy(model), x, mode="row", skip_compute=True)
    assert {b.handling for b in report.layer_drop.blocks} == {BlockHandling.SKIPPED}
    for seed in range(6):
        out, grads = train_step(skipping, x, seed)
        expected, expected_grads = train_step(masked, x, seed)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert grads.keys() == expected_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-6)
    skips = skips_of(skipping).values()
    assert all(s.masked_calls == 0 for s in skips) and sum(s.gathered_calls for s in skips) > 0


@pytest.mark.parametrize("use_cache", [True, False])
def test_row_mode_runs_only_kept_rows(use_cache: bool) -> None:
    model, inputs = ldm.build("llama")
    model, _ = inject(model, inputs, mode="row", skip_compute=True)
    inputs = {**inputs, "use_cache": use_cache}
    seen: list[int] = []
    model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    for seed in range(6):
        seen.clear()
        train_step(model, inputs, seed)
        gate = gates(model)["model.layers.1"]
        assert gate.scale is not None
        assert seen == [int((gate.scale > 0).sum())] or seen == [] and not (gate.scale > 0).any()
    skips = skips_of(model).values()
    assert all(s.masked_calls == 0 for s in skips) and sum(s.gathered_calls for s in skips) > 0


def test_a_training_cache_holds_the_rows_each_layer_ran_on() -> None:
    model, inputs = ldm.build("llama", layers=4)
    model, _ = inject(model, inputs, mode="row", skip_compute=True)
    model.train()
    kept: dict[int, int] = {}
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_hook(
            lambda m, a, o, index=index: kept.__setitem__(index, o[0].shape[0])
        )
    torch.manual_seed(0)
    cache = model(**inputs).past_key_values
    assert kept and any(rows < ldm.BATCH for rows in kept.values())  # some layer ran on fewer
    for index, layer in enumerate(cache.layers):
        assert (layer.keys.shape[0] if layer.is_initialized else None) == kept.get(index)


def test_a_cache_that_holds_keys_or_feeds_no_gradients_runs_masked() -> None:
    model, inputs = ldm.build("llama")
    model, _ = inject(model, inputs, mode="row", skip_compute=True)
    with torch.no_grad():
        past = model.eval()(**inputs).past_key_values  # every layer holds all 8 rows
    model.train()
    with pytest.warns(DropPathWarning, match="holds this layer's keys already.*use_cache=False"):
        torch.manual_seed(0)
        out = model(input_ids=ldm.tokens()["input_ids"], cache=past)
    assert out.logits.shape[0] == ldm.BATCH
    assert all(layer.keys.shape[:3:2] == (ldm.BATCH, 2 * ldm.SEQUENCE) for layer in past.layers)
    skips = skips_of(model).values()
    assert all(s.masked_calls == 1 and "DynamicCache" in s.last_refusal for s in skips)
    with torch.no_grad():  # a training-mode forward without gradients, as generate() runs
        torch.manual_seed(1)
        model(**inputs)
    assert all(s.masked_calls == 2 for s in skips)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eval_and_greedy_generate_are_token_identical(family: str) -> None:
    model, inputs = ldm.build(family)
    original = copy.deepcopy(model).eval()
    model, _ = inject(model, inputs, skip_compute=True)
    model.train()  # a training step in between must leave generation untouched
    train_step(model, inputs, 0)
    model.eval()
    prompt = inputs["input_ids"][:2]
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = original.generate(prompt, **options)
        produced = model.generate(prompt, **options)
        assert torch.equal(ldm.call(model, inputs), ldm.call(original, inputs))
    assert expected.shape[1] == prompt.shape[1] + 5
    assert torch.equal(produced, expected)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_share_one_gate_per_block_and_train_alike(how: str) -> None:
    model, inputs = ldm.build("gpt2")
    model, _ = inject(model, inputs, skip_compute=True, mode="batch")
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    found = gates(copied)
    assert len(found) == len(skips_of(copied)) == ldm.LAYERS
    for path, gate in found.items():
        assert all(vars(m)["gate"] is gate for m in gate.members)
        assert skips_of(copied)[path].gate is gate
        assert skips_of(copied)[path].module is copied.get_submodule(path)
    out, grads = train_step(copied, inputs, 5)
    expected, expected_grads = train_step(model, inputs, 5)
    assert torch.equal(out, expected)
    assert all(torch.equal(grads[k], expected_grads[k]) for k in grads)


def test_rates_scheduler_and_removal() -> None:
    model, inputs = ldm.build("llama")
    original = copy.deepcopy(model)
    model, _ = inject(model, inputs, skip_compute=True, schedule="linear")
    rates = set_drop_rates(model, 0.3)
    assert [g.drop_prob for g in gates(model).values()] == pytest.approx(rates)
    scheduler = DropPathScheduler.linear_warmup(model, 0.6, warmup_steps=2)
    scheduler.step()
    assert max(g.drop_prob for g in gates(model).values()) == pytest.approx(0.3)
    remove_droppath(model)
    assert not gates(model) and not skips_of(model)
    assert "forward" not in vars(model.model.layers[0])
    assert not any(isinstance(m, BlockDropPath) for m in model.modules())
    out, grads = train_step(model, inputs, 1)
    expected, expected_grads = train_step(original, inputs, 1)
    assert torch.equal(out, expected)
    assert b"droppath_inject" not in pickle.dumps(model)  # no trace of the package is left


def test_gradient_checkpointing_recomputes_the_same_decision() -> None:
    model, inputs = ldm.build("llama")
    inputs = {**inputs, "use_cache": False}
    model, _ = inject(model, inputs, skip_compute=True, mode="row")
    checkpointed = copy.deepcopy(model)
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)
    enable = enable or checkpointed.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    for seed in range(3):
        out, grads = train_step(checkpointed, inputs, seed)
        expected, expected_grads = train_step(model, inputs, seed)
        assert torch.equal(out, expected)
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-6, atol=1e-9)


def test_timm_checkpoint_around_blocks() -> None:
    model, inputs = ldm.build("timm_vit")
    model, _ = inject(model, inputs, skip_compute=True, mode="batch")
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    for seed in range(3):
        out, grads = train_step(checkpointed, inputs, seed)
        expected, expected_grads = train_step(model, inputs, seed)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert all(torch.equal(grads[k], expected_grads[k]) for k in grads)


def test_report_says_granularity_and_branch_default_is_unchanged() -> None:
    model, inputs = ldm.build("timm_vit")
    _, report = inject(copy.deepcopy(model), inputs, skip_compute=True)
    data = report.to_dict()["layer_drop"]
    assert data["granularity"] == "block" and data["skip_compute"] is True
    assert {b["handling"] for b in data["blocks"]} == {"skips compute"}
    assert "granularity block" in str(report)
    _, default = inject(copy.deepcopy(model), inputs, granularity="branch")
    assert default.layer_drop is None and not gates(model)
    branches, report = inject(copy.deepcopy(model), inputs, granularity="branch", skip_compute=True)
    # one decision per branch: a ResidualGate on each block, no layer's gate
    assert report.layer_drop is None
    found = gates(branches)
    assert found and all(isinstance(g, ResidualGate) for g in found.values())
    units = units_of(branches)  # timm's Block: x + ls1(attn(norm1(x))), x + ls2(mlp(norm2(x)))
    expected = ("norm1", "attn", "ls1", "norm2", "mlp", "ls2")
    assert list(units) == [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for n in expected]
    with pytest.raises(ValueError, match="granularity"):
        inject(copy.deepcopy(model), inputs, granularity="layer")


def test_second_call_re_rates_and_cannot_switch() -> None:
    model, inputs = ldm.build("gpt2")
    model, _ = inject(model, inputs, skip_compute=True, schedule="linear", max_drop=0.3)
    model, report = inject(model, inputs, skip_compute=True, schedule="linear", max_drop=0.6)
    assert {s.status.value for s in report.sites} == {"re-rated"}
    assert len(gates(model)) == len(skips_of(model)) == ldm.LAYERS
    assert max(g.drop_prob for g in gates(model).values()) == pytest.approx(0.6)
    for options in ({"skip_compute": False}, {"granularity": "branch"}):
        with pytest.raises(DropPathInjectError, match="remove_droppath"):
            inject(model, inputs, **{"skip_compute": True, **options})


@pytest.mark.parametrize("mode", ["row", "batch"])
@pytest.mark.parametrize("family", ["llama", "timm_vit"])
def test_skip_matches_mask_under_bf16_autocast(family: str, mode: str) -> None:
    model, inputs = ldm.build(family)
    if family == "llama":
        inputs = {**inputs, "use_cache": False}
    results = []
    for skip in (False, True):
        injected, _ = inject(copy.deepcopy(model), inputs, mode=mode, skip_compute=skip)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(train_step(injected, inputs, 3))
    (expected, expected_grads), (out, grads) = results
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-6)
