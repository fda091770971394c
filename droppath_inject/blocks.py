"""Grouping residual sites into blocks: the layers that share one rate of the depth schedule.

The adds of one layer share a rate (a transformer layer's attention and MLP residuals), and
rates rise with depth. A layer is the repeated unit of the model's *layer stack*: an element
of a container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) whose elements that
hold residual adds are repeats of one unit (``blocks.3`` in timm, ``encoder.layer.3`` in
Hugging Face, ``stages.0.blocks.1`` in a staged network). A container whose residual-bearing
elements differ in class and hold one add each is not a stack but the sublayers of one layer:
Hugging Face T5 keeps ``[self-attention, cross-attention, feed-forward]`` in
``T5Block.layer``, and the layer is ``decoder.block.3``. Of the stacks holding the add's owner
and its branch, the innermost gives the layer (a stage of blocks is a stack of stacks); where
no container is a stack, the innermost container element is. When the owner itself loops over
a container (``for attn, ff in self.layers: x = attn(x) + x; x = ff(x) + x``), the element the
branch comes from is the layer, so each iteration is a block. Without containers, the owner's
call is one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from torch import nn

from .residuals import ResidualSite

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _prefixes(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _container_elements(path: str, modules: dict[str, nn.Module]) -> list[str]:
    """The prefixes of ``path`` that are elements of a container module, outermost first."""
    return [
        prefix for prefix in _prefixes(path) if isinstance(modules.get(_parent(prefix)), CONTAINERS)
    ]


def _common(owner: str, branch_module: str) -> str:
    """The innermost module holding both ``owner`` and ``branch_module``: the owner, unless the
    branch is computed by a module outside it (a sublayer wrapper called with its layer's
    attention as an argument)."""
    if not branch_module or not owner:
        return owner
    shared = []
    for a, b in zip(owner.split("."), branch_module.split("."), strict=False):
        if a != b:
            break
        shared.append(a)
    return ".".join(shared)


class LayerStacks:
    """Which containers of a model are layer stacks, read from the adds' owners.

    A container is a stack unless it is a list of sublayers: elements of different classes,
    each holding a single residual add, in a module with no add of its own (T5's
    ``[self-attention, cross-attention, feed-forward]``; residual blocks in the branch of an
    outer residual are nested layers, not sublayers). Elements of different classes that hold
    more (EdgeNeXt's convolution and transposed-attention blocks in one stage, a hybrid model's
    Mamba and attention layers) are layers of one stack.
    """

    def __init__(self, owners: Iterable[str], modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        adds: Counter[str] = Counter()
        owning = set()
        for owner in owners:
            owning.add(owner)
            adds.update(_container_elements(owner, modules))
        kinds: dict[str, set[type]] = {}
        single: dict[str, bool] = {}
        for element, count in adds.items():
            container = _parent(element)
            kinds.setdefault(container, set()).add(type(modules[element]))
            single[container] = single.get(container, True) and count == 1
        self.stacks = frozenset(
            c
            for c, k in kinds.items()
            if len(k) == 1 or not single[c] or _parent(c) in owning  # nested in a residual
        )

    def layer_of(self, owner: str, branch_module: str = "") -> str | None:
        """The layer's module: the innermost element of a stack holding ``owner`` and the
        branch's module, else the innermost container element holding them, if any."""
        elements = _container_elements(_common(owner, branch_module), self.modules)
        in_stacks = [e for e in elements if _parent(e) in self.stacks]
        if in_stacks:
            return in_stacks[-1]
        return elements[-1] if elements else None


def block_key(
    site: ResidualSite, branch_module: str, modules: dict[str, nn.Module], stacks: LayerStacks
) -> str:
    """The identity of ``site``'s layer (see the module docstring).

    Args:
        site: a residual site of a captured or traced graph.
        branch_module: the module computing the branch (its hooked module, slot or drop path).
        modules: the model's modules by path.
        stacks: the model's layer stacks.
    """
    owner = site.owner
    layer = stacks.layer_of(owner, branch_module)
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
