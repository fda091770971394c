"""torch.fx tracing aware of timm/torchvision leaf modules, with a piecewise fallback.

Symbolic tracing reads ``self.training`` once and bakes the branch it took, so modules whose
own code depends on the mode are kept as leaves: a traced copy then calls them and they keep
behaving like the original in both modes.
"""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .droppaths import is_drop_path_module


def _integration_leaves() -> tuple[tuple[type, ...], tuple[Callable[..., Any], ...]]:
    """Leaf module classes and opaque functions that timm and torchvision declare for FX.

    Only packages the user has already imported are consulted, so neither is imported here.
    """
    classes: list[type] = []
    functions: list[Callable[..., Any]] = []
    if "timm" in sys.modules:
        from timm.layers import get_notrace_functions, get_notrace_modules

        classes += get_notrace_modules()
        functions += [f for f in get_notrace_functions() if callable(f)]
    if "torchvision" in sys.modules:
        import torchvision.ops

        classes += [
            obj
            for obj in vars(torchvision.ops).values()
            if isinstance(obj, type) and issubclass(obj, nn.Module)
        ]
    return tuple(classes), tuple(functions)


class _InplaceAwareProxy(fx.Proxy):
    """A Proxy that records ``a += b`` as ``operator.iadd``.

    Plain FX proxies have no ``__iadd__``, so Python falls back to ``a = a + b`` and a traced
    ``out += identity`` (torchvision's ResNet) would allocate a new tensor in every forward.
    """

    def __iadd__(self, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})


class DropPathTracer(fx.Tracer):
    """An FX tracer that keeps drop-path modules, integration leaves and chosen modules whole.

    ``extra_leaves`` holds module objects (not classes) to call rather than trace through:
    nested residual blocks and modules whose own code branches on ``self.training``.
    """

    def __init__(self, extra_leaves: Iterable[nn.Module] = ()) -> None:
        leaf_classes, functions = _integration_leaves()
        super().__init__(autowrap_functions=functions, param_shapes_constant=False)
        # Ops on buffers (``~self.mask``, ``self.scale.exp()``) stay in the graph: traced
        # eagerly they would become frozen constants stored on the module.
        self.proxy_buffer_attributes = True
        self._leaf_classes = leaf_classes
        self._extra_leaves = {id(m) for m in extra_leaves}
        self._names_root: nn.Module | None = None
        self._names: dict[int, str] = {}

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceAwareProxy(node, self)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """A ``get_attr`` proxy for the model's parameters and buffers, found by identity.

        torch.fx searches every parameter of the model on each access, which makes tracing
        quadratic in depth; one name table per traced model keeps it linear.
        """
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        name = self._tensor_names().get(id(attr_val))
        if name is None or not (isinstance(attr_val, nn.Parameter) or self.proxy_buffer_attributes):
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def _tensor_names(self) -> dict[int, str]:
        """``id(tensor) -> name`` for the traced model's parameters and buffers."""
        if self._names_root is not self.root:
            tensors = [*self.root.named_parameters(), *self.root.named_buffers()]
            self._names = {}
            for name, tensor in tensors:
                self._names.setdefault(id(tensor), name)
            self._names_root = self.root
        return self._names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._extra_leaves or is_drop_path_module(m, module_qualified_name):
            return True
        if self._leaf_classes and isinstance(m, self._leaf_classes):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, extra_leaves: Iterable[nn.Module] = ()) -> fx.GraphModule:
    """Trace ``module`` into a GraphModule that shares its parameters (for analysis)."""
    tracer = DropPathTracer(extra_leaves)
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


@contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[None]:
    """Temporarily set every submodule's ``training`` flag, restoring each one's own flag after."""
    saved = [(m, m.training) for m in module.modules()]
    try:
        module.train(mode)
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def graph_signature(graph: fx.Graph) -> str:
    """The generated Python source of ``graph``: equal for graphs that compute the same thing."""
    return graph.python_code(root_module="self").src


def trace_in_both_modes(
    module: nn.Module, extra_leaves: Iterable[nn.Module] = ()
) -> tuple[fx.GraphModule, bool]:
    """Trace ``module`` in train and in eval mode: the eval trace, and whether both agree."""
    leaves = list(extra_leaves)
    traces = []
    for mode in (True, False):
        with training_mode(module, mode):
            traces.append(trace(module, leaves))
    same = graph_signature(traces[0].graph) == graph_signature(traces[1].graph)
    return traces[1], same


def _traced_submodules(graph_module: fx.GraphModule) -> list[str]:
    """Paths of the non-leaf submodules a trace went through, innermost first."""
    paths: set[str] = set()
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack", {})
        qualnames = [qualname for qualname, _ in stack.values()]
        if node.op == "call_module":
            qualnames = qualnames[:-1]
        paths.update(qualnames)
    return sorted(paths, key=lambda p: -p.count("."))


def mode_dependent_submodules(
    module: nn.Module, graph_module: fx.GraphModule, extra_leaves: Iterable[nn.Module] = ()
) -> list[nn.Module]:
    """The innermost submodules traced through in ``graph_module`` whose own code is mode-dependent.

    Making them leaves removes every baked ``self.training`` branch below ``module`` itself.
    """
    leaves = list(extra_leaves)
    found: list[nn.Module] = []
    for path in _traced_submodules(graph_module):
        submodule = module.get_submodule(path)
        try:
            _, same = trace_in_both_modes(submodule, leaves + found)
        except Exception:  # noqa: BLE001 - a submodule untraceable alone is left to its parent
            continue
        if not same:
            found.append(submodule)
    return found


@dataclass(frozen=True)
class TracedPiece:
    """A traceable submodule (``path`` relative to the model, ``""`` for the model itself)."""

    path: str
    graph_module: fx.GraphModule


@dataclass(frozen=True)
class UntraceableModule:
    """A module that could not be traced, with the tracer's reason in one line."""

    path: str
    reason: str


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


class _NeverCalled(Exception):
    """A container without a ``forward`` of its own: its children are traced, nothing is lost."""


def is_uncallable_container(module: nn.Module) -> bool:
    """``nn.ModuleList``, ``nn.ModuleDict`` and any module that does not define ``forward``."""
    return isinstance(module, (nn.ModuleList, nn.ModuleDict)) or (
        type(module).forward is nn.Module.forward
    )


def trace_pieces(model: nn.Module) -> tuple[list[TracedPiece], list[UntraceableModule]]:
    """Trace ``model`` whole or, where that fails, its largest traceable submodules.

    Pieces are traced in eval mode, the mode in which shapes are propagated and outputs
    verified (train-only paths such as auxiliary heads are left out of the analysis).
    """
    pieces: list[TracedPiece] = []
    untraceable: list[UntraceableModule] = []

    def visit(path: str, module: nn.Module) -> None:
        try:
            if is_uncallable_container(module):
                raise _NeverCalled  # a ModuleList is indexed or iterated, never called
            pieces.append(TracedPiece(path, trace(module)))
        except Exception as error:  # noqa: BLE001 - any tracer failure: try the children
            if not isinstance(error, _NeverCalled):
                untraceable.append(UntraceableModule(path, _one_line(error)))
            for name, child in module.named_children():
                visit(f"{path}.{name}" if path else name, child)

    with training_mode(model, False):
        visit("", model)
    return pieces, untraceable
