"""The benchmarked models: how to build each one, with or without timm's native drop path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model. ``native`` says whether it has timm's own ``drop_path_rate``."""

    name: str
    label: str
    factory: Callable[..., nn.Module]
    native: bool
    sized: bool = False  # the factory takes ``img_size`` (timm ViT and Swin)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, image_size: int, drop_path_rate: float = 0.0) -> nn.Module:
        """The model with random weights; ``drop_path_rate`` needs a native drop path."""
        kwargs = dict(self.kwargs)
        if self.sized:
            kwargs["img_size"] = image_size
        if self.native:
            kwargs["drop_path_rate"] = drop_path_rate
        elif drop_path_rate:
            raise ValueError(f"{self.label} has no native drop path")
        return self.factory(**kwargs)


def _timm(name: str, sized: bool = False) -> Callable[..., nn.Module]:
    return lambda **kwargs: timm.create_model(name, **kwargs)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("resnet18", "torchvision resnet18", torchvision.models.resnet18, False),
        ModelSpec("resnet50", "torchvision resnet50", torchvision.models.resnet50, False),
        ModelSpec("vit_small", "timm vit_small_patch16_224", _timm("vit_small_patch16_224"), True,
                  sized=True),
        ModelSpec("convnext_tiny", "timm convnext_tiny", _timm("convnext_tiny"), True),
        ModelSpec("swin_tiny", "timm swin_tiny_patch4_window7_224",
                  _timm("swin_tiny_patch4_window7_224"), True, sized=True),
    )
}  # fmt: skip

DEFAULT_MODELS = ("resnet50", "vit_small", "convnext_tiny", "swin_tiny")


@dataclass(frozen=True)
class ScalingFamily:
    """Models of one architecture at growing depth, for the injection-time scaling figure."""

    name: str
    label: str
    depths: tuple[int, ...]
    build: Callable[[int, int], nn.Module]  # (depth, image size) -> model


def _resnet(depth: int, image_size: int) -> nn.Module:
    return getattr(torchvision.models, f"resnet{depth}")()


def _vit(depth: int, image_size: int) -> nn.Module:
    return VisionTransformer(
        img_size=image_size, patch_size=16, embed_dim=192, depth=depth, num_heads=3
    )


SCALING: dict[str, ScalingFamily] = {
    "resnet": ScalingFamily("resnet", "torchvision ResNet-{depth}", (18, 50, 101, 152), _resnet),
    "vit": ScalingFamily(
        "vit", "timm ViT depth {depth} (width 192, 3 heads, patch 16)", (12, 24, 48, 96), _vit
    ),
}

SMOKE_SCALING: dict[str, ScalingFamily] = {
    "resnet": ScalingFamily("resnet", SCALING["resnet"].label, (18, 34), _resnet),
    "vit": ScalingFamily("vit", SCALING["vit"].label, (2, 4), _vit),
}
