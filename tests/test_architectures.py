"""Residuals as current architectures build them: PEFT adapters, parallel blocks, experts.

Truths come from the libraries: the configs' layer counts, PEFT's tuner-layer classes and
``merge_and_unload`` (an adapter folded into its weight is the same model), and what a layer
computes (a layer whose every branch is dropped returns its input).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from droppath_inject import inject_droppath, remove_droppath
from droppath_inject.apply import BranchHook
from droppath_inject.granularity import BlockHandling
from droppath_inject.layers import DropPath

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("single_thread")

PREFIX = "base_model.model."
IDS = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(0))


def _inject(model: nn.Module, **options: Any) -> Any:
    options = {"max_drop": 0.2, "example_inputs": (IDS,), **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inject_droppath(model, return_report=True, **options)[1]


def _llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaModel(config).eval()
    for name, parameter in model.named_parameters():
        if "norm" in name:  # RMSNorm weights start at 1
            parameter.data.uniform_(0.5, 1.5)
    return model


ADAPTERS: dict[str, Callable[[], Any]] = {
    "lora": lambda: peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "dora": lambda: peft.LoraConfig(
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], use_dora=True
    ),
    "loha": lambda: peft.LoHaConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "lokr": lambda: peft.LoKrConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "ia3": lambda: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
}


def _peft(model: nn.Module, adapter: str = "lora") -> nn.Module:
    wrapped = peft.get_peft_model(model, ADAPTERS[adapter]())
    generator = torch.Generator().manual_seed(1)
    for parameter in wrapped.parameters():
        if parameter.requires_grad:  # adapters start as the identity (LoRA's B is zero)
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + 0.1)
    return wrapped.eval()


def _tuner_layers(model: nn.Module) -> list[str]:
    base = peft.tuners.tuners_utils.BaseTunerLayer
    return [path for path, module in model.named_modules() if isinstance(module, base)]


def _drop_paths(model: nn.Module, prefix: str = "") -> dict[str, float]:
    return {
        path.removeprefix(prefix): module.drop_prob
        for path, module in model.named_modules()
        if isinstance(module, DropPath)
    }


def _hooked(model: nn.Module, prefix: str = "") -> set[str]:
    return {
        path.removeprefix(prefix)
        for path, module in model.named_modules()
        if any(isinstance(hook, BranchHook) for hook in module._forward_hooks.values())
    }


def _train_run(model: nn.Module, seed: int = 3) -> tuple[Tensor, list[Tensor | None]]:
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(IDS).last_hidden_state
    if out.requires_grad:  # a merged PEFT model has no trainable parameter
        out.square().sum().backward()
    grads = [p.grad for _, p in sorted(model.named_parameters()) if p.requires_grad]
    return out.detach(), grads


@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_peft_model_gets_its_base_models_sites(adapter: str) -> None:
    base = _llama(layers=3)
    base_report = _inject(base)
    wrapped = _peft(_llama(layers=3), adapter)
    reference = _peft(_llama(layers=3), adapter)
    report = _inject(wrapped)
    config = wrapped.get_base_model().config
    assert len(report.sites) == 2 * config.num_hidden_layers == len(base_report.sites)
    assert [(s.owner.removeprefix(PREFIX), s.block_index, s.rate) for s in report.sites] == [
        (s.owner, s.block_index, s.rate) for s in base_report.sites
    ]
    tuners = _tuner_layers(wrapped)
    assert tuners  # the adapters are there
    for site in report.sites:
        for path in (site.owner, site.branch, site.skip, site.attached_to, *site.shared_with):
            assert not any(path == t or path.startswith(t + ".") for t in tuners), path
    assert _drop_paths(wrapped, PREFIX) == _drop_paths(base)
    assert _hooked(wrapped, PREFIX) == _hooked(base)
    # eval is unchanged with non-zero adapters, and training at rate 0 too (outputs, gradients)
    with torch.no_grad():
        assert torch.equal(wrapped(IDS).last_hidden_state, reference(IDS).last_hidden_state)
    _inject(wrapped, max_drop=0.0)
    out, grads = _train_run(wrapped)
    expected, expected_grads = _train_run(reference)
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))


def test_injecting_before_or_after_get_peft_model_gives_the_same_drop_paths() -> None:
    before = _llama()
    _inject(before)
    before = _peft(before)
    after = _peft(_llama())
    _inject(after)
    assert _drop_paths(before) == _drop_paths(after)
    assert _hooked(before) == _hooked(after)
    # and they drop the same: same seed, same training outputs
    assert torch.equal(_train_run(before)[0], _train_run(after)[0])


def test_merge_and_unload_keeps_the_drop_paths_and_what_training_does() -> None:
    wrapped = _peft(_llama())
    _inject(wrapped, max_drop=0.5, schedule="uniform")
    out, _ = _train_run(wrapped)
    with torch.no_grad():
        unmerged_eval = wrapped.eval()(IDS).last_hidden_state
    merged = wrapped.merge_and_unload()
    assert not _tuner_layers(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(IDS).last_hidden_state, unmerged_eval)
    # folding an adapter into its weight changes nothing, so neither does stochastic depth
    torch.testing.assert_close(_train_run(merged)[0], out)
    _inject(merged, max_drop=1.0, schedule="uniform")
    with torch.no_grad():
        merged.train()
        dropped = merged(IDS).last_hidden_state
        assert torch.equal(dropped, merged.norm(merged.embed_tokens(IDS)))
    remove_droppath(wrapped)
    assert not _drop_paths(wrapped) and not _hooked(wrapped)


def test_remove_droppath_on_a_peft_model() -> None:
    wrapped = _peft(_llama())
    reference = _peft(_llama())
    _inject(wrapped, max_drop=0.5)
    assert len(_drop_paths(wrapped)) == 2 * wrapped.get_base_model().config.num_hidden_layers
    remove_droppath(wrapped)
    assert not _drop_paths(wrapped) and not _hooked(wrapped)
    assert torch.equal(_train_run(wrapped)[0], _train_run(reference)[0])


def test_peft_model_skips_layers_where_its_base_does() -> None:
    base_report = _inject(_llama(), granularity="block", skip_compute=True)
    wrapped = _peft(_llama())
    report = _inject(wrapped, granularity="block", skip_compute=True)
    layers = wrapped.get_base_model().config.num_hidden_layers
    assert base_report.layer_drop.count(BlockHandling.SKIPPED) == layers
    assert [b.handling for b in report.layer_drop.blocks] == [BlockHandling.SKIPPED] * layers


def _neox(parallel: bool) -> nn.Module:
    config = transformers.GPTNeoXConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, use_parallel_residual=parallel,
    )  # fmt: skip
    return transformers.GPTNeoXModel(config)


def _falcon() -> nn.Module:
    config = transformers.FalconConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        parallel_attn=True, new_decoder_architecture=False,
    )  # fmt: skip
    return transformers.FalconModel(config)


def _phi() -> nn.Module:
    config = transformers.PhiConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4,
    )  # fmt: skip
    return transformers.PhiModel(config)


def _gptj() -> nn.Module:
    config = transformers.GPTJConfig(vocab_size=100, n_embd=32, n_layer=3, n_head=4, rotary_dim=4)
    return transformers.GPTJModel(config)


PARALLEL = {"gpt_neox": lambda: _neox(True), "falcon": _falcon, "phi": _phi, "gptj": _gptj}


def _layers(model: nn.Module) -> nn.ModuleList:
    return next(m for m in model.children() if isinstance(m, nn.ModuleList))


def _layer_calls(model: nn.Module, ids: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per layer: its input, its output in this (training) call, and its output in eval."""
    calls: list[tuple[nn.Module, Any, Any, Tensor]] = []

    def record(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        calls.append((module, args, kwargs, hidden.detach()))

    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in _layers(model)]
    with torch.no_grad():
        model(ids, use_cache=False)  # each layer is called again below
    for handle in handles:
        handle.remove()
    found = []
    for module, args, kwargs, out in calls:
        inputs = args[0] if args else kwargs["hidden_states"]
        module.eval()
        with torch.no_grad():
            reference = module(*args, **kwargs)
        module.train()
        reference = reference[0] if isinstance(reference, tuple) else reference
        found.append((inputs.detach(), out, reference))
    return found


@pytest.mark.parametrize("name", list(PARALLEL))
def test_parallel_block_is_one_residual_dropped_whole(name: str) -> None:
    torch.manual_seed(0)
    model = PARALLEL[name]().eval()
    layers = model.config.num_hidden_layers
    report = _inject(model, max_drop=1.0, schedule="uniform")
    assert len(report.sites) == layers
    assert sorted(s.block_index for s in report.sites) == list(range(layers))
    model.train()
    for inputs, out, _ in _layer_calls(model, IDS):
        assert torch.equal(out, inputs)  # attention and MLP both dropped
    _inject(model, max_drop=0.5, schedule="uniform")
    ids = torch.randint(0, 100, (8, 5), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    outcomes = set()
    for inputs, out, reference in _layer_calls(model, ids):
        for row in range(ids.shape[0]):
            change, full = out[row] - inputs[row], reference[row] - inputs[row]
            dropped = bool(change.abs().max() == 0)
            kept = torch.allclose(change, 2 * full, atol=1e-5, rtol=1e-4)
            assert dropped != kept, f"sample {row}: one of attention and MLP dropped alone"
            outcomes.add(dropped)
    assert outcomes == {True, False}


def test_sequential_gpt_neox_keeps_two_residuals_per_layer() -> None:
    model = _neox(False).eval()
    report = _inject(model)
    assert len(report.sites) == 2 * model.config.num_hidden_layers
    assert all(s.attached_to and not s.shared_with for s in report.sites)


def test_mixture_of_experts_is_one_branch_of_its_layer() -> None:
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
    )  # fmt: skip
    model = transformers.Qwen2MoeModel(config).eval()
    report = _inject(model)
    assert len(report.sites) == 2 * config.num_hidden_layers
    for index, layer in enumerate(model.layers):
        moe = layer.mlp
        assert moe.shared_expert is not None
        inside = [m for m in moe.modules() if m is not moe]
        assert not any(isinstance(m, DropPath) for m in inside)
        assert not any(isinstance(h, BranchHook) for m in inside for h in m._forward_hooks.values())
        assert sum(s.block_index == index for s in report.sites) == 2


def test_parallel_block_skips_whole_under_block_granularity() -> None:
    torch.manual_seed(0)
    model = _neox(True).eval()
    report = _inject(
        model, max_drop=1.0, schedule="uniform", granularity="block", skip_compute=True
    )
    layers = model.config.num_hidden_layers
    assert [b.handling for b in report.layer_drop.blocks] == [BlockHandling.SKIPPED] * layers
    model.train()
    with torch.no_grad():
        out = model(IDS).last_hidden_state
        assert torch.equal(out, model.final_layer_norm(model.embed_in(IDS)))


def test_timm_parallel_vit_drops_its_parallel_paths_together() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_small_patch16_18x2_224", pretrained=False, depth=2, embed_dim=64, num_heads=2,
        img_size=32, patch_size=8, init_values=0.5,
    ).eval()  # fmt: skip
    x = torch.randn(4, 3, 32, 32)
    report = _inject(model, max_drop=1.0, schedule="uniform", example_inputs=x)
    assert len(report.sites) == 2 * len(model.blocks)  # attention and MLP residual per block
    for block in model.blocks:  # timm's drop-path slot on every parallel path is filled
        paths = [*block.attns, *block.ffns]
        assert len(paths) == 4 and all(isinstance(p.drop_path, DropPath) for p in paths)
    model.train()
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        assert torch.equal(model.blocks(tokens), tokens)
