"""Residuals whose branch reads more than its fork, on the real library classes.

- Two streams attending jointly (diffusers ``SD3Transformer2DModel``, MMDiT): one attention over
  the image and text tokens concatenated, its output split back, each stream with its own
  residual; neither branch is closed alone, the two together are.
- Class attention (timm ``cait_*``, vit-pytorch ``CaiT``): ``x_cls + attn(cat(x_cls, x))``,
  where the first layer's ``x_cls`` is a parameter expanded to the batch.
- A branch that writes a cache (Hugging Face ``MambaModel`` with ``use_cache=True``).
- The same joint attention in plain torch, one call returning both streams (hooked per leaf),
  and a merge inside an enclosing branch, which stays no residual.

Truths come from the libraries: diffusers' ``JointTransformerBlock`` (its ``context_pre_only``
decides whether the text stream has residuals), timm's own drop paths, vit-pytorch's
``Transformer.layers`` pairs, Mamba's ``num_hidden_layers``. Placement is checked by dropping
each of our DropPaths alone and finding the one library module whose output, zeroed, gives the
same outputs bit for bit.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.injection_checks import drop_paths, dropping_only, zeroed
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from droppath_inject import Report, SiteStatus, inject_droppath

ROOT = Path(__file__).resolve().parent.parent
MAX_DROP = 0.2

pytestmark = pytest.mark.usefixtures("single_thread")


def _randomize(model: nn.Module, seed: int = 3) -> nn.Module:
    """Every parameter drawn at random (diffusers and timm start norms at one, gates and
    layer scales at constants): a misplaced branch cannot hide behind a zero or a one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model


def _tensors(outputs: Any) -> list[Tensor]:
    return [t for t in pytree.tree_leaves(outputs) if isinstance(t, Tensor)]


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _run(model: nn.Module, inputs: Any, train: bool) -> tuple[list[Tensor], dict]:
    """Outputs, and in train mode the gradients of a fixed projection of them."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with torch.set_grad_enabled(train):
        outputs = _tensors(_call(model, inputs))
    grads: dict[str, Tensor | None] = {}
    if train:
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view(t.shape)).sum()
                   for t in outputs if t.is_floating_point())  # fmt: skip
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
    return outputs, grads


def _equal(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b, strict=False)
    )


def _inject(model: nn.Module, inputs: Any) -> tuple[nn.Module, Report]:
    """Inject a copy of ``model``; eval bitwise and train at rate 0 bitwise (outputs, grads)."""
    injected = copy.deepcopy(model)
    _, report = inject_droppath(injected, MAX_DROP, example_inputs=inputs, return_report=True)
    assert all(s.status is SiteStatus.INJECTED for s in report.sites), report
    assert report.verification is not None and report.verification.passed
    assert _equal(_run(model, inputs, False)[0], _run(injected, inputs, False)[0])
    rates = {m: m.drop_prob for m in drop_paths(injected)}
    for layer in rates:
        layer.drop_prob = 0.0
    (out_a, grads_a), (out_b, grads_b) = _run(model, inputs, True), _run(injected, inputs, True)
    assert _equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys()
    for key, grad in grads_a.items():
        other = grads_b[key]
        assert (grad is None) == (other is None) and (grad is None or torch.equal(grad, other)), key
    for layer, rate in rates.items():
        layer.drop_prob = rate
    return injected, report


@contextmanager
def _leaf_zeroed(model: nn.Module, path: str, leaf: int) -> Iterator[None]:
    """Replace leaf ``leaf`` of the output of the module at ``path`` by zeros."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        leaves, spec = pytree.tree_flatten(output)
        leaves[leaf] = torch.zeros_like(leaves[leaf])
        return pytree.tree_unflatten(leaves, spec)

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _assert_placement(
    original: nn.Module, injected: nn.Module, inputs: Any, branches: list[str]
) -> None:
    """Dropping each of our DropPaths alone equals zeroing exactly one of ``branches`` (the
    library's modules computing a residual branch; ``path:leaf`` zeroes one leaf of a module's
    output), and every branch is matched once."""
    with torch.no_grad():
        references = []
        for branch in branches:
            path, _, leaf = branch.partition(":")
            context = _leaf_zeroed(original, path, int(leaf)) if leaf else zeroed(original, [path])
            with context:
                references.append(_tensors(_call(original.eval(), inputs)))
        matched: list[str] = []
        for layer in drop_paths(injected):
            saved = layer.drop_prob
            outputs = _tensors(_call(dropping_only(injected, [layer]), inputs))
            layer.drop_prob = saved
            injected.eval()
            hits = [p for p, ref in zip(branches, references, strict=True) if _equal(ref, outputs)]
            assert len(hits) == 1, (hits, layer)
            matched.append(hits[0])
    assert sorted(matched) == sorted(branches)


# -- two streams, one attention: diffusers SD3 / MMDiT -------------------------------------------


def _sd3() -> tuple[nn.Module, dict[str, Tensor]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=generator),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=generator),
        "pooled_projections": torch.randn(2, 16, generator=generator),
        "timestep": torch.tensor([3, 700]),
    }
    return _randomize(model.eval()), inputs


def _joint_block_branches(model: nn.Module) -> list[list[str]]:
    """Per ``JointTransformerBlock``, the modules computing its residual branches, read from
    diffusers' block: the image stream's attention and MLP, and the text stream's attention and
    MLP unless ``context_pre_only`` (the last block, whose text output is discarded)."""
    layers = []
    for index, block in enumerate(model.transformer_blocks):
        path = f"transformer_blocks.{index}"
        # SD3.5's second image attention adds onto ``x + attn`` beside it (a parallel block,
        # issue 19 class 1): not covered here
        assert not block.use_dual_attention
        branches = [f"{path}.attn.to_out.0", f"{path}.ff"]
        if not block.context_pre_only:
            branches += [f"{path}.attn.to_add_out", f"{path}.ff_context"]
        layers.append(branches)
    return layers


def test_joint_attention_residuals_of_both_streams() -> None:
    model, inputs = _sd3()
    layers = _joint_block_branches(model)
    injected, report = _inject(model, inputs)
    assert report.num_blocks == model.config.num_layers
    owners = [s.owner for s in report.sites]
    for index, branches in enumerate(layers):
        assert owners.count(f"transformer_blocks.{index}") == len(branches), report
    assert len(report.sites) == sum(map(len, layers))
    assert [s.block_index for s in report.sites] == sorted(s.block_index for s in report.sites)
    _assert_placement(model, injected, inputs, [b for branches in layers for b in branches])


# -- class attention: timm CaiT, vit-pytorch CaiT ------------------------------------------------


def test_class_attention_matches_timm_cait(monkeypatch: pytest.MonkeyPatch) -> None:
    """timm's own drop paths (two per class-attention layer, one per patch layer's branch) are
    the truth; ``compare`` zeroes them against dropping ours on shared weights."""
    timm = pytest.importorskip("timm")
    monkeypatch.syspath_prepend(str(ROOT))  # ``sweeps`` is not installed
    sweep = importlib.import_module("sweeps.timm_families")
    placement = importlib.import_module("sweeps.placement")
    torch.manual_seed(0)
    name = "cait_xxs24_224"
    native = timm.create_model(name, pretrained=False, img_size=32, depth=2, drop_path_rate=0.1)
    placement.randomize_constant_parameters(native)
    plain = timm.create_model(name, pretrained=False, img_size=32, depth=2)
    plain.load_state_dict(native.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    class_layers = len(native.blocks_token_only)
    calls = placement.calls_of(
        native, [f"blocks_token_only.{i}.drop_path" for i in range(class_layers)], x
    )
    assert calls == 2 * class_layers  # timm's class-attention layers: two residuals each
    untouched = copy.deepcopy(plain).eval()
    row = sweep.compare("cait", name, native, plain, x)  # injects ``plain``
    assert row.truth == placement.calls_of(native, placement.library_drop_paths(native), x)
    assert (row.found, row.placement, row.bitwise) == (row.truth, True, True), row
    _inject(untouched, x)


def test_class_attention_of_vit_pytorch_cait() -> None:
    """vit-pytorch's ``Transformer`` runs ``x = attn(x, context=context) + x; x = ff(x) + x``
    over its ``layers`` pairs: both of every pair are residual branches."""
    cait = pytest.importorskip("vit_pytorch.cait")
    torch.manual_seed(0)
    model = cait.CaiT(
        image_size=32, patch_size=8, num_classes=10, dim=16, depth=2, cls_depth=2, heads=2,
        mlp_dim=32, dim_head=8,
    )  # fmt: skip
    model = _randomize(model.eval())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    branches = [
        f"{stack}.layers.{i}.{j}"
        for stack in ("patch_transformer", "cls_transformer")
        for i in range(len(model.get_submodule(stack).layers))
        for j in range(2)
    ]
    injected, report = _inject(model, x)
    assert len(report.sites) == len(branches)
    assert report.num_blocks == len(branches) // 2
    _assert_placement(model, injected, x, branches)


# -- a branch that writes a cache: Hugging Face Mamba --------------------------------------------


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_mamba_residuals_with_a_cache_written_in_the_branch(use_cache: bool) -> None:
    """``MambaBlock``: ``residual + mixer(norm(hidden_states))``, one per layer; the mixer
    writes its convolution and SSM states into the cache (``use_cache=True`` is the default)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    config = transformers.MambaConfig(
        vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=3, expand=2,
        conv_kernel=4, use_cache=use_cache,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _randomize(transformers.MambaModel(config).eval())
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    injected, report = _inject(model, ids)
    layers = config.num_hidden_layers
    assert len(report.sites) == layers and report.num_blocks == layers
    _assert_placement(model, injected, ids, [f"layers.{i}.mixer" for i in range(layers)])


# -- where the joint rule stops ------------------------------------------------------------------


class _SplitMerge(nn.Module):
    """A residual block whose branch holds an add of two paths that share a value read
    elsewhere in the same branch: that add is a merge inside the branch, not a residual."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inner = nn.ModuleList(nn.Linear(width, width) for _ in range(5))

    def forward(self, x: Tensor) -> Tensor:
        first, second, third, fourth, last = self.inner
        h = first(x)
        a = second(h)
        merged = h + third(a)  # ``a`` also feeds ``fourth`` below, inside the outer branch
        return x + last(fourth(a) * merged)


class _Model(nn.Module):
    def __init__(self, block: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(block(), block())

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


def test_a_merge_inside_an_enclosing_branch_is_not_a_joint_residual() -> None:
    model = _randomize(_Model(_SplitMerge).eval())
    x = torch.randn(3, 8)
    _, report = _inject(model, x)
    assert [(s.owner, s.branch) for s in report.sites] == [
        ("blocks.0", "blocks.0.inner.4"), ("blocks.1", "blocks.1.inner.4")
    ]  # fmt: skip


class _JointAttention(nn.Module):
    """MMDiT's joint attention in plain torch: one attention over both streams' tokens, its
    output split back and projected per stream inline; one call returns both streams."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.qkv_x, self.qkv_c = nn.Linear(width, 3 * width), nn.Linear(width, 3 * width)
        self.out_x = nn.Parameter(torch.randn(width, width))
        self.out_c = nn.Parameter(torch.randn(width, width))

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        tokens = x.shape[1]
        q, k, v = torch.cat([self.qkv_x(x), self.qkv_c(c)], dim=1).chunk(3, dim=-1)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x_part, c_part = attended[:, :tokens], attended[:, tokens:]
        return nn.functional.linear(x_part, self.out_x), nn.functional.linear(c_part, self.out_c)


class _JointBlock(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.norm_x, self.norm_c = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _JointAttention(width)

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        attended_x, attended_c = self.attn(self.norm_x(x), self.norm_c(c))
        return x + attended_x, c + attended_c


class _TwoStreams(nn.Module):
    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_JointBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for block in self.blocks:
            x, c = block(x, c)
        return self.head(torch.cat([x, c], dim=1))


@pytest.mark.parametrize(
    "options",
    [{}, {"granularity": "block"}, {"skip_compute": True}],
    ids=["branch", "block", "skip-compute"],
)
def test_joint_streams_in_plain_torch(options: dict[str, Any]) -> None:
    model = _randomize(_TwoStreams().eval())
    generator = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(4, 5, 8, generator=generator),
              "c": torch.randn(4, 3, 8, generator=generator)}  # fmt: skip
    injected = copy.deepcopy(model)
    _, report = inject_droppath(
        injected, MAX_DROP, example_inputs=inputs, return_report=True, **options
    )
    assert report.verification is not None and report.verification.passed
    branches = [f"blocks.{i}.attn:{leaf}" for i in range(3) for leaf in (0, 1)]
    assert [s.owner for s in report.sites] == [f"blocks.{i}" for i in range(3) for _ in "xc"]
    assert report.num_blocks == 3
    assert _equal(_run(model, inputs, False)[0], _run(injected, inputs, False)[0])
    for layer in drop_paths(injected):
        layer.drop_prob = 0.0
    (out_a, grads_a), (out_b, grads_b) = _run(model, inputs, True), _run(injected, inputs, True)
    assert _equal(out_a, out_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    if not options:  # one DropPath per stream, on its leaf of the attention's output only
        _assert_placement(model, injected, inputs, branches)
