"""Grouping residual sites into blocks: the layers that share one rate of the depth schedule.

The adds of one layer share a rate (a transformer layer's attention and MLP residuals), and
rates rise with depth. A layer is the element of the nearest container (``nn.Sequential``,
``nn.ModuleList``, ``nn.ModuleDict``) that holds the add's owner: ``blocks.3`` in timm,
``encoder.layer.3`` in Hugging Face (whose two adds sit in ``encoder.layer.3`` and
``encoder.layer.3.attention``). When the owner itself loops over a container
(``for attn, ff in self.layers: x = attn(x) + x; x = ff(x) + x``), the element the branch comes
from is the layer, so each iteration is a block. Without containers, the owner's call is one.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .residuals import ResidualSite

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _prefixes(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _container_elements(path: str, modules: dict[str, nn.Module]) -> list[str]:
    """The prefixes of ``path`` that are elements of a container module, outermost first."""
    return [
        prefix
        for prefix in _prefixes(path)
        if isinstance(modules.get(prefix.rpartition(".")[0]), CONTAINERS)
    ]


def enclosing_layer(owner: str, modules: dict[str, nn.Module]) -> str | None:
    """The innermost container element at or above ``owner`` (its layer's module), if any."""
    elements = _container_elements(owner, modules)
    return elements[-1] if elements else None


def block_key(site: ResidualSite, branch_module: str, modules: dict[str, nn.Module]) -> str:
    """The identity of ``site``'s layer (see the module docstring).

    Args:
        site: a residual site of a captured or traced graph.
        branch_module: the module computing the branch (its hooked module, slot or drop path).
        modules: the model's modules by path.
    """
    owner = site.owner
    layer = enclosing_layer(owner, modules)
    if layer is not None:
        calls = [
            k for k, (path, _) in site.add.meta.get("nn_module_stack", {}).items() if path == layer
        ]
        return calls[-1] if calls else layer
    below = [
        e
        for e in _container_elements(branch_module, modules)
        if e.startswith(owner + ".") or not owner
    ]
    if below:
        return f"{below[0]}|{site.owner_call}"
    return site.owner_call or owner


def group_blocks(keys: Sequence[str]) -> list[int]:
    """Block index of each site, blocks numbered by their first site (execution order)."""
    numbers: dict[str, int] = {}
    return [numbers.setdefault(key, len(numbers)) for key in keys]
