"""The CI subset of ``sweeps.timm_families``: families whose structure the rule must get right.

Truth is timm's own placement (``drop_path_rate > 0``), compared on shared weights by zeroing
timm's drop paths against dropping ours (``sweeps.placement``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]

#: family -> model, and what it exercises
SUBSET = {
    "vision_transformer": "vit_tiny_patch16_224",  # two adds per block, drop-path slots
    "convnext": "convnextv2_atto",  # GRN's weightless add inside the MLP branch is no block
    "fastvit": "fastvit_t8",  # MobileOne and RepMixer re-parameterizable layers are no blocks
    "metaformer": "poolformer_s12",  # weightless pooling mixers against the identity: 24 sites
    "efficientformer": "efficientformer_l1",  # a layer scale read through a view
    "resnet": "resnet18d",  # in-place add, projection shortcuts
}


@pytest.fixture
def sweep(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``sweeps.timm_families``, importable from the repository root (it is not installed)."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("sweeps.timm_families")


@pytest.mark.parametrize(("family", "model"), SUBSET.items(), ids=SUBSET.keys())
def test_family_matches_timm(sweep: ModuleType, family: str, model: str) -> None:
    torch.manual_seed(0)
    row = sweep.sweep_model(family, model)
    assert row.truth > 0
    assert row.found == row.truth + row.unbuilt, row
    assert row.placement is True and row.bitwise is True, row
    assert row.unbuilt == (1 if family == "resnet" else 0)  # timm's ResNet: none at rate 0
