"""Small models whose residual adds are known by construction, for ``test_synthetic.py``.

Every residual block names, in ``BRANCHES``, the submodules whose outputs, when replaced by
zeros, drop all of its residual branches (and nothing else); ``ADDS`` is how many residual adds
its forward executes. Tests derive the expected sites and a reference "branch dropped" output
from these, never from the code under test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHANNELS = 4
DIM = 8
TOKENS = 4


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) followed by BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)
    )


def conv_branch(c: int = CHANNELS) -> nn.Sequential:
    """Two convs deep: conv-bn-relu-conv-bn."""
    return nn.Sequential(conv_bn(c, c), nn.ReLU(), conv_bn(c, c))


def mlp(dim: int = DIM, hidden: int = 2 * DIM) -> nn.Sequential:
    """Two linears deep."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


# --- residual blocks ---------------------------------------------------------------------------


class PlainResidual(nn.Module):
    """``x + f(x)``."""

    BRANCHES = ("f",)
    ADDS = 1

    def __init__(self, f: nn.Module | None = None) -> None:
        super().__init__()
        self.f = conv_branch() if f is None else f

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x)


class SwappedResidual(PlainResidual):
    """``f(x) + x``: the branch is the first operand."""

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x) + x


class TorchAddResidual(PlainResidual):
    """``torch.add(x, f(x))``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.add(x, self.f(x))


class MethodAddResidual(PlainResidual):
    """``x.add(f(x))``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.add(self.f(x))


class InplaceBranchResidual(PlainResidual):
    """``f(x).add_(x)``: the branch output is mutated in place by the add."""

    def forward(self, x: Tensor) -> Tensor:
        return self.f(x).add_(x)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``, with its ``out += identity``."""

    BRANCHES = ("bn2",)
    ADDS = 1

    def __init__(self, cin: int = CHANNELS, cout: int = CHANNELS, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)

        return out


class ProjectionResidual(nn.Module):
    """``downsample(x) + f(x)``: a one-conv projection against a two-conv branch."""

    BRANCHES = ("f",)
    ADDS = 1

    def __init__(self, cin: int = CHANNELS, cout: int = 2 * CHANNELS, stride: int = 2) -> None:
        super().__init__()
        self.downsample = conv_bn(cin, cout, 1, stride)
        self.f = nn.Sequential(conv_bn(cin, cout, 3, stride), nn.ReLU(), conv_bn(cout, cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(x) + self.f(x)


class LayerScaleResidual(PlainResidual):
    """``x + gamma * f(x)`` with a per-channel layer scale."""

    def __init__(self, f: nn.Module | None = None, shape: tuple[int, ...] = (CHANNELS, 1, 1)):
        super().__init__(f)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, shape[0]).reshape(shape))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma * self.f(x)


class RepVggIdentityBlock(nn.Module):
    """RepVGG with its identity-BN branch: ``conv1x1(x) + convkxk(x)`` then ``+= bn(x)``.

    The parallel convs tie, and their sum against the identity BN is one re-parameterizable
    layer, not a residual block (timm's byobnet drops there, its FastViT does not).
    """

    BRANCHES = ("conv_kxk", "conv_1x1")
    ADDS = 1

    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv_kxk = conv_bn(c, c, 3)
        self.conv_1x1 = conv_bn(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x += identity
        return x


class Attention(nn.Module):
    """Multi-head self-attention, with an optional causal-mask buffer and relative bias."""

    def __init__(
        self, dim: int = DIM, heads: int = 2, *, mask: bool = False, rel_bias: bool = False
    ) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mask: Tensor | None
        if mask:
            self.register_buffer("mask", torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril())
        else:
            self.mask = None
        self.rel_bias = nn.Parameter(torch.randn(heads, TOKENS, TOKENS)) if rel_bias else None

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if self.rel_bias is not None:
            attn = attn + self.rel_bias
        if self.mask is not None:
            attn = attn.masked_fill(~self.mask, float("-inf"))
        if key_mask is not None:
            attn = attn.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, D))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: two residual adds."""

    BRANCHES = ("attn", "mlp")
    ADDS = 2

    def __init__(self, dim: int = DIM, *, mask: bool = False, rel_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, mask=mask, rel_bias=rel_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class MaskedTransformerBlock(TransformerBlock):
    """A transformer block that takes a key-padding mask as a second forward argument."""

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:  # type: ignore[override]
        x = x + self.attn(self.norm1(x), key_mask)
        x = x + self.mlp(self.norm2(x))
        return x


class NestedResidual(nn.Module):
    """``x + body(x)`` where ``body`` holds two inner residual blocks between two convs."""

    BRANCHES = ("body",)
    ADDS = 1

    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn(c, c), PlainResidual(), SwappedResidual(), nn.ReLU(), conv_bn(c, c)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FunctionalDropout(nn.Module):
    """``F.dropout(x, p, training=self.training)`` as a submodule."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, training=self.training)


class OwnDropoutResidual(nn.Module):
    """A residual block whose own forward calls ``F.dropout(..., training=self.training)``."""

    BRANCHES = ("fc2",)
    ADDS = 1

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(torch.relu(self.fc1(x)), 0.5, training=self.training)
        return x + self.fc2(h)


class ParamMatmulResidual(nn.Module):
    """``x + tanh(x @ w)`` with a raw parameter: no conv, linear or embedding anywhere."""

    BRANCHES: tuple[str, ...] = ()
    ADDS = 1

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim) / dim**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(x @ self.w)


# --- models ------------------------------------------------------------------------------------


class Net(nn.Module):
    """``head(blocks(stem(x)))`` with the blocks in a Sequential (paths ``blocks.<i>``)."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))

    def extra_method(self) -> str:
        """A method of the model class that must survive injection."""
        return "still here"


def conv_net(blocks: list[nn.Module], channels: int = CHANNELS) -> Net:
    """A conv stem, the blocks, and a 1x1 conv head, on ``(B, 3, H, W)`` images."""
    return Net(conv_bn(3, CHANNELS), blocks, nn.Conv2d(channels, 3, 1))


def token_net(blocks: list[nn.Module]) -> Net:
    """A linear embedding, the blocks, and a linear head, on ``(B, TOKENS, DIM)`` tokens."""
    return Net(nn.Linear(DIM, DIM), blocks, nn.Linear(DIM, 3))


class MaskedTokenNet(nn.Module):
    """Transformer blocks that all receive a key-padding mask passed to the model."""

    def __init__(self, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(DIM, DIM)
        self.blocks = nn.ModuleList(MaskedTransformerBlock() for _ in range(depth))

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x, key_mask)
        return x


class EarlyExitNet(nn.Module):
    """Residual blocks in a loop with a data-dependent early exit: the model is not traceable."""

    def __init__(self, depth: int = 3, limit: float = 1e4) -> None:
        super().__init__()
        self.stem = conv_bn(3, CHANNELS)
        self.blocks = nn.ModuleList(PlainResidual() for _ in range(depth))
        self.limit = limit

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
            if x.abs().amax() > self.limit:
                break
        return x


# --- non-residual models -----------------------------------------------------------------------


class FPN(nn.Module):
    """A backbone and an FPN top-down path: each level adds the upsampled coarser one.

    Structurally ``lateral4(c4) + up(lateral5(conv5(c4)))`` looks like ``x + F(x)``, but the
    coarser level is an output too, so the "branch" leaks: no residual.
    """

    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.stem = conv_bn(3, c)
        self.layer4 = conv_bn(c, c, stride=2)
        self.layer5 = conv_bn(c, c, stride=2)
        self.lateral3 = nn.Conv2d(c, c, 1)
        self.lateral4 = nn.Conv2d(c, c, 1)
        self.lateral5 = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c3 = self.stem(x)
        c4 = self.layer4(c3)
        c5 = self.layer5(c4)
        p5 = self.lateral5(c5)
        p4 = self.lateral4(c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.lateral3(c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        return p3, p4, p5


class FPNWrapper(nn.Module):
    """The FPN as a submodule, so that its adds are not owned by the model itself."""

    def __init__(self) -> None:
        super().__init__()
        self.fpn = FPN()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.fpn(x)


class UNet(nn.Module):
    """A U-Net with add-skips whose decoder features are also outputs (deep supervision).

    ``dec1 = up(dec2) + enc1`` has encoder features on one side and a deeper path on the other,
    but the deeper path's ``dec2`` (and ``bottom``) leak into the outputs: no residual.
    """

    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.enc1 = conv_bn(3, c)
        self.enc2 = conv_bn(c, c, stride=2)
        self.bottom = conv_bn(c, c, stride=2)
        self.dec2 = conv_bn(c, c)
        self.dec1 = conv_bn(c, c)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        bottom = self.bottom(e2)
        d2 = self.dec2(F.interpolate(bottom, scale_factor=2.0) + e2)
        d1 = self.dec1(F.interpolate(d2, scale_factor=2.0) + e1)
        return d1, d2, bottom


class UNetWrapper(nn.Module):
    """The U-Net as a submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = UNet()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.unet(x)


class PosEmbed(nn.Module):
    """``x + pos_embed``: a parameter, not a branch."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS, DIM))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) + self.pos_embed


class FullPosEmbed(PosEmbed):
    """``x + pos_embed`` where the parameter has the full shape of ``x`` (no broadcasting)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(batch, TOKENS, DIM))


class BufferBias(nn.Module):
    """``conv(x) + bias`` with a per-channel buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.register_buffer("offset", torch.randn(CHANNELS, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.offset


class GlobalContextAdd(nn.Module):
    """``x + conv(mean(x))``: a broadcasting add of a pooled context."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x.mean(dim=(2, 3), keepdim=True))


class RepVggParallel(nn.Module):
    """``conv3x3(x) + conv1x1(x)``: parallel branches of equal depth."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_kxk = conv_bn(CHANNELS, CHANNELS, 3)
        self.conv_1x1 = conv_bn(CHANNELS, CHANNELS, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv_kxk(x) + self.conv_1x1(x))


class LeakyBranch(nn.Module):
    """``x + f(x)`` where ``f(x)``'s hidden activation is also returned: no residual."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, DIM)
        self.fc2 = nn.Linear(DIM, DIM)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.relu(self.fc1(x))
        return x + self.fc2(hidden), hidden


# --- vector blocks for random networks -----------------------------------------------------------


class PreNormResidual(nn.Module):
    """``x + mlp(norm(x))``."""

    BRANCHES = ("mlp",)
    ADDS = 1

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = mlp(dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class PreNormPair(nn.Module):
    """Two pre-norm residuals in one block, like a transformer block without attention."""

    BRANCHES = ("mlp1", "mlp2")
    ADDS = 2

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mlp1 = mlp(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp2 = mlp(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mlp1(self.norm1(x))
        return x + self.mlp2(self.norm2(x))


class LinearProjectionResidual(nn.Module):
    """``downsample(x) + f(x)`` on vectors: one linear against two."""

    BRANCHES = ("f",)
    ADDS = 1

    def __init__(self, din: int = DIM, dout: int = DIM) -> None:
        super().__init__()
        self.downsample = nn.Linear(din, dout, bias=False)
        self.f = nn.Sequential(nn.Linear(din, dout), nn.ReLU(), nn.Linear(dout, dout))

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(x) + self.f(x)


class ParallelSum(nn.Module):
    """``a(x) + b(x)``: two single linears in parallel, no residual."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.a = nn.Linear(dim, dim)
        self.b = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


class BufferScaledResidual(PlainResidual):
    """``x + f(x) * log_scale.exp()``: the block's own forward computes from a buffer."""

    def __init__(self, c: int = CHANNELS) -> None:
        super().__init__()
        self.register_buffer("log_scale", torch.linspace(-0.5, 0.5, c).reshape(c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.f(x) * self.log_scale.exp()
