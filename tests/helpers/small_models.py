"""The small real models the training, control and persistence tests share (random weights)."""

from __future__ import annotations

from collections.abc import Callable

import timm
import torch
import torchvision
from torch import nn

NUM_CLASSES = 10


def build_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=NUM_CLASSES)


def build_vit_tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=NUM_CLASSES)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": build_resnet18,
    "vit_tiny": build_vit_tiny,
}
