"""Hugging Face key/value caches met by a block that runs on its kept rows only.

A training step with ``config.use_cache`` on (the models' default outside the Trainer) hands
every decoder layer a fresh ``DynamicCache``. Such a cache can take the kept rows alone: the
layer stores only the rows it ran on, and nothing reads them back in that step. A cache that
already holds the layer's keys, or one read without gradients (``generate()`` on a model left in
training mode, whose next call reads the keys back for every row), cannot.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def is_cache(value: object) -> bool:
    """A Hugging Face key/value cache (``transformers.Cache``), recognised by its methods."""
    return callable(getattr(value, "get_seq_length", None)) and callable(
        getattr(value, "update", None)
    )


def layer_index(module: nn.Module) -> int | None:
    """The ``layer_idx`` under which ``module``'s attention writes to a cache, if exactly one."""
    found = {
        index
        for sub in module.modules()
        if isinstance(index := getattr(sub, "layer_idx", None), int) and not isinstance(index, bool)
    }
    return found.pop() if len(found) == 1 else None


def fillable_by_rows(cache: object, index: int | None) -> bool:
    """Whether the kept rows alone may fill ``cache`` for layer ``index``: a plain
    ``DynamicCache`` holding nothing for it yet, in a forward that records gradients."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    dynamic = getattr(cache_utils, "DynamicCache", None)
    if dynamic is None or type(cache) is not dynamic or index is None:
        return False
    if not torch.is_grad_enabled():
        return False
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return False
    if index >= len(layers):
        return True  # a cache that adds its layers as they are first written
    return getattr(layers[index], "is_initialized", True) is False
