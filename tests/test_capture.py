"""Models symbolic tracing cannot see, captured from a real run (issue: "any model that runs").

Each block below was missed (or crashed the dry run) when residuals were found on a symbolic
``torch.fx`` trace; each is written the way research code writes it. Expected sites come from
the blocks' own ``BRANCHES``/``ADDS`` and the placement check zeroes those modules in an
untouched copy (``injection_checks.check_injection``).
"""

from __future__ import annotations

import einops
import pytest
import torch
import torch.nn.functional as F
from helpers import synthetic_models as sm
from helpers.injection_checks import MAX_DROP, check_injection, linear_rate, seeded, tokens
from torch import Tensor, nn

from droppath_inject import DropPath, DropPathWarning, SiteStatus, find_residuals, inject_droppath

pytestmark = pytest.mark.usefixtures("single_thread")

DIM, HEADS = sm.DIM, 2


class ShapeUnpackingAttention(nn.Module):
    """``b, n, c = x.shape`` and ``q, k, v = qkv.chunk(3)``: ints and tuples from tensors."""

    BRANCHES = ("proj",)
    ADDS = 1

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) / c**0.5).softmax(dim=-1)
        return x + self.proj((attn @ v).reshape(b, n, c))


class MlpBranch(nn.Module):
    """A block whose residual branch is ``f``, a two-layer MLP; subclasses write the forward."""

    BRANCHES = ("f",)
    ADDS = 1

    def __init__(self) -> None:
        super().__init__()
        self.f = sm.mlp()


class LenOfTensor(MlpBranch):
    """``len(x)`` (an int a symbolic trace cannot give)."""

    def forward(self, x: Tensor) -> Tensor:
        scale = 1.0 if len(x) > 0 else 0.0
        return x + self.f(x) * scale


class EinopsAttention(nn.Module):
    """lucidrains' style: ``rearrange`` to heads and back."""

    BRANCHES = ("to_out",)
    ADDS = 1

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.to_qkv = nn.Linear(DIM, 3 * DIM, bias=False)
        self.to_out = nn.Linear(DIM, DIM)

    def attend(self, x: Tensor) -> Tensor:
        qkv = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (einops.rearrange(t, "b n (h d) -> b h n d", h=HEADS) for t in qkv)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(einops.rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attend(x)


class ValueBranch(MlpBranch):
    """A branch on a tensor's value, taken the same way on every input."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.isfinite(x).all():
            return x + self.f(x)
        return x


class KwargsForward(MlpBranch):
    """A Hugging Face v5 style ``forward(self, x, **kwargs)``."""

    def forward(self, x: Tensor, **kwargs: object) -> Tensor:
        scale = kwargs.get("scale", 1.0)
        assert isinstance(scale, float)
        return x + self.f(x) * scale


class OptionalMask(MlpBranch):
    """``forward(self, x, mask=None)``, called without the mask."""

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = self.f(x)
        if mask is not None:
            h = h.masked_fill(mask[..., None], 0.0)
        return x + h


class MaskedNet(nn.Module):
    """Passes an optional ``mask=None`` down to its blocks."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(OptionalMask() for _ in range(depth))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, mask=mask)
        return x


class MultiheadAttentionWithWeights(nn.Module):
    """``out, _ = mha(h, h, h)`` with the default ``need_weights=True``: unused weights."""

    BRANCHES = ("mha",)
    ADDS = 1

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        out, _ = self.mha(h, h, h)
        return x + out


class RecurrentBranch(nn.Module):
    """``out, _ = lstm(h)``: the unused recurrent state is not a leak."""

    BRANCHES = ("rnn",)
    ADDS = 1

    def __init__(self, kind: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.rnn = kind(DIM, DIM, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return x + out


class UnusedChunk(nn.Module):
    """``a, _ = fc(x).chunk(2)``: half the projection is never used."""

    BRANCHES = ("out",)
    ADDS = 1

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(DIM, 2 * DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        a, _ = self.fc(x).chunk(2, dim=-1)
        return x + self.out(F.gelu(a))


UNTRACEABLE = {
    "shape-unpacking-and-chunk": ShapeUnpackingAttention,
    "len-of-tensor": LenOfTensor,
    "einops": EinopsAttention,
    "value-dependent-branch": ValueBranch,
    "kwargs-forward": KwargsForward,
    "multihead-attention-weights-unused": MultiheadAttentionWithWeights,
    "lstm-state-unused": RecurrentBranch,
    "gru-state-unused": lambda: RecurrentBranch(nn.GRU),
    "unused-chunk": UnusedChunk,
}


@pytest.mark.parametrize("block", UNTRACEABLE.values(), ids=UNTRACEABLE.keys())
def test_blocks_symbolic_tracing_cannot_see(block: type[nn.Module]) -> None:
    """Three such blocks: three sites, placed on their branches, rates 0, 0.1, 0.2."""
    factory = seeded(lambda: sm.token_net([block() for _ in range(3)]))
    _, report = check_injection(factory, tokens(), ["blocks.0", "blocks.1", "blocks.2"])
    assert report.skipped == []
    assert all(site.status is SiteStatus.INJECTED for site in report.sites)


def test_optional_argument_that_is_none_at_run_time() -> None:
    """``forward(x, mask=None)`` called without the mask: found, dry run and injection alike."""
    factory = seeded(MaskedNet)
    check_injection(factory, tokens(), ["blocks.0", "blocks.1", "blocks.2"])
    assert len(find_residuals(factory(), tokens()).sites) == 3


class LoopTransformer(nn.Module):
    """vit-pytorch's ``Transformer``: one module runs every layer's two residuals in a loop."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([EinopsAttentionBranch(), FeedForward()]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.norm(x)


class EinopsAttentionBranch(EinopsAttention):
    """The attention branch alone, as vit-pytorch's ``Attention`` returns it."""

    def forward(self, x: Tensor) -> Tensor:
        return self.attend(x)


class FeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(),
                                 nn.Linear(2 * DIM, DIM))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_layers_of_a_loop_are_blocks() -> None:
    """Each iteration of the loop is a block: both its adds share a rate, rates rise by layer."""
    torch.manual_seed(0)
    model = LoopTransformer(depth=4)
    _, report = inject_droppath(model, MAX_DROP, example_inputs=tokens(), return_report=True)
    assert report.num_blocks == 4 and len(report.sites) == 8
    expected = [linear_rate(i, 4, MAX_DROP) for i in range(4) for _ in range(2)]
    assert [s.rate for s in report.sites] == [pytest.approx(r) for r in expected]
    # the DropPaths sit on the layers' own modules, as the layers run them
    hooked = [s.attached_to for s in report.sites]
    assert hooked == [f"layers.{i}.{j}" for i in range(4) for j in range(2)]
    rates = {path: m.drop_prob for path, m in model.named_modules() if isinstance(m, DropPath)}
    assert sorted(rates.values()) == [pytest.approx(r) for r in sorted(expected)]


def test_torchvision_drop_paths_built_at_zero_get_the_schedule() -> None:
    """convnext_tiny with ``stochastic_depth_prob=0``: its StochasticDepth modules (all at 0)
    are re-rated to the schedule, so ``max_drop`` is not ignored; ``keep`` leaves them at 0."""
    torchvision = pytest.importorskip("torchvision")
    from torchvision.ops import StochasticDepth

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for existing, top in (("rerate", 0.1), ("keep", 0.0)):
        model = torchvision.models.convnext_tiny(stochastic_depth_prob=0.0)
        depth = [m for m in model.modules() if isinstance(m, StochasticDepth)]
        assert len(depth) == 18 and all(m.p == 0.0 for m in depth)
        _, report = inject_droppath(
            model, 0.1, example_inputs=x, existing=existing, return_report=True
        )
        status = SiteStatus.RE_RATED if existing == "rerate" else SiteStatus.KEPT
        assert [s.status for s in report.sites] == [status] * 18
        assert not any(isinstance(m, DropPath) for m in model.modules())  # never doubled
        expected = [top * i / 17 for i in range(18)]
        assert [m.p for m in depth] == [pytest.approx(r) for r in expected]


class Double(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2


class SharedScale(nn.Module):
    """One ``scale`` serves a residual branch and, after it, the head: it must not be hooked (a
    hook would drop the head's call too), so the branch's DropPath goes on ``mlp``, whose output
    the scaling commutes with."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = sm.mlp()
        self.scale = Double()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.scale(self.mlp(x))
        return self.scale(x)


def test_module_called_outside_a_branch_is_not_hooked() -> None:
    torch.manual_seed(0)
    model = SharedScale()
    _, report = inject_droppath(model, 0.1, example_inputs=tokens(), return_report=True)
    (site,) = report.sites
    assert site.status is SiteStatus.INJECTED and site.attached_to == "mlp"
    assert not model.scale._forward_hooks
    drop = next(m for m in model.modules() if isinstance(m, DropPath))
    drop.drop_prob = 1.0
    drop.train()
    with torch.no_grad():  # the branch is dropped, the head's call of scale is not
        assert torch.equal(model(tokens()[0]), tokens()[0] * 2)


class SharedOnly(nn.Module):
    """The branch is ``proj``'s output and nothing else: with ``proj`` also called outside the
    branch, no module can carry a DropPath; the site is reported, not attached wrongly."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.proj(x)
        return self.proj(x)


def test_shared_module_with_no_alternative_is_skipped_with_the_reason() -> None:
    torch.manual_seed(0)
    model = SharedOnly()
    with pytest.warns(DropPathWarning, match="1 of 1 residual sites"):
        _, report = inject_droppath(model, 0.1, example_inputs=tokens(), return_report=True)
    (site,) = report.sites
    assert site.status is SiteStatus.SKIPPED and "also called elsewhere" in site.detail
    assert not model.proj._forward_hooks


class SliceResidual(nn.Module):
    """ReXNet's partial residual: the shortcut is added into the branch's first channels."""

    BRANCHES = ("f",)
    ADDS = 1

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.f = nn.Linear(DIM, 2 * DIM)
        self.in_place = in_place

    def forward(self, x: Tensor) -> Tensor:
        h = self.f(x)
        if self.in_place:
            h[..., :DIM] += x
            return h[..., :DIM] * h[..., DIM:].sigmoid()
        out = torch.cat([h[..., :DIM] + x, h[..., DIM:]], dim=-1)
        return out[..., :DIM] * out[..., DIM:].sigmoid()


@pytest.mark.parametrize("in_place", [True, False], ids=["x[:, :c] += shortcut", "cat"])
def test_residual_added_into_a_channel_slice(in_place: bool) -> None:
    """The DropPath goes on the whole branch (``f``), as timm's ReXNet drops it."""
    factory = seeded(lambda: sm.token_net([SliceResidual(in_place) for _ in range(3)]))
    _, report = check_injection(factory, tokens(), ["blocks.0", "blocks.1", "blocks.2"])
    assert [s.attached_to for s in report.sites] == [f"blocks.{i}.f" for i in range(3)]
