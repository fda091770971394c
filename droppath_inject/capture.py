"""Capturing a model's data flow from one real eval run, as a ``torch.fx`` graph.

Symbolic tracing sees only code written for it. Here the model's own Python runs on an example
input while a ``TorchFunctionMode`` records every torch function and Tensor method it calls,
and global module hooks record which module call each op happens in. The result is an
``fx.Graph`` of the tensor data flow (one node per op, operands as edges) whose nodes carry:

- ``meta["nn_module_stack"]``: ``{call key: (module path, module class)}``, outermost first,
  one entry per module *call*, so the iterations of a loop are told apart;
- ``meta["tensor_meta"]``: a ``TensorShape`` for nodes that produce tensors;
- ``meta["module_outputs"]``: the ``ModuleOutput`` entries of module calls that returned
  this node's tensor, innermost first (a ``nn.Identity`` returns its input's node);
- ``meta["module_first_inputs"]``: the ``ModuleCall`` entries whose first positional argument
  was this node's tensor;
- ``meta["batch_dim"]``: a ``BatchDim``, the dimension holding the input's batch
  (``batch_dims.py``).

Shape unpacking, ``len()``, einops, ``**kwargs``, ``None`` arguments and value-dependent
branches all simply run; the graph holds the path the example took.

    >>> import torch
    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         b, n = x.shape  # not symbolically traceable as an int, runs fine here
    ...         return x + self.fc(x)
    >>> run = capture(Block(), ((torch.randn(2, 4),), {}))
    >>> [str(n.target) for n in run.graph.nodes if n.op == "call_method"]
    ['add']
"""

from __future__ import annotations

import operator
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from .batch_dims import record_batch_dims
from .graph_facts import data_derived, live_nodes
from .internals import call_tracked, tree_leaves

_SIMPLE_ARGUMENTS = (
    type(None), bool, int, float, complex, str, slice, type(Ellipsis),
    torch.dtype, torch.device, torch.memory_format, torch.layout,
)  # fmt: skip


@dataclass(frozen=True)
class TensorShape:
    """What ``node.meta["tensor_meta"]`` records of a captured tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class ModuleCall:
    """One call of a module: its path in the model and how many calls of it came before."""

    path: str
    index: int

    @property
    def key(self) -> str:
        return f"{self.path}@{self.index}"


@dataclass(frozen=True)
class ModuleOutput:
    """A module call returned a node's tensor, as leaf ``leaf`` of its output (None: whole)."""

    call: ModuleCall
    leaf: int | None


@dataclass
class CapturedRun:
    """The data-flow graph of one eval run, the run's outputs, and the modules that took part.

    ``call_counts`` counts the calls of each module path during the run. The facts every stage
    reads (``data``, ``live``, ``call_nodes``) are computed once, on first use.
    """

    graph: fx.Graph
    outputs: Any
    modules: dict[str, nn.Module]
    call_counts: Counter[str]

    @cached_property
    def data(self) -> set[fx.Node]:
        """Nodes computed from a forward argument (``graph_facts.data_derived``)."""
        return data_derived(self.graph)

    @cached_property
    def live(self) -> set[fx.Node]:
        """Nodes whose value reaches an output (``graph_facts.live_nodes``)."""
        return live_nodes(self.graph)

    @cached_property
    def call_nodes(self) -> dict[str, set[fx.Node]]:
        """For each module call key, the op nodes recorded while it ran."""
        inside: dict[str, set[fx.Node]] = {}
        for node in self.graph.nodes:
            for key in node.meta.get("nn_module_stack", {}):
                inside.setdefault(key, set()).add(node)
        return inside


def _method_name(func: Callable[..., Any]) -> str | None:
    """The Tensor method or property name ``func`` stands for, or None for a free function."""
    owner = getattr(func, "__objclass__", None)
    if owner is not None and issubclass(torch.Tensor, owner):
        return str(func.__name__)
    descriptor = getattr(func, "__self__", None)
    if getattr(func, "__name__", "") == "__get__" and hasattr(descriptor, "__objclass__"):
        return str(getattr(descriptor, "__name__", ""))  # a property: ``x.T``, ``x.data``
    return None


class _Recorder(TorchFunctionMode):
    """Builds the data-flow graph while the model runs (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.module_paths = {id(m): path for path, m in model.named_modules()}
        self.modules = {path: m for path, m in model.named_modules()}
        self.call_counts: Counter[str] = Counter()
        self._stack: list[tuple[ModuleCall, str] | None] = []
        self._state_names: dict[int, str] = {}
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            self._state_names.setdefault(id(tensor), name)
        self._nodes: dict[int, tuple[weakref.ref[Tensor], fx.Node]] = {}
        self._state_nodes: dict[str, fx.Node] = {}

    # -- tensors and nodes ------------------------------------------------------------------
    def _bound_node(self, tensor: Tensor) -> fx.Node | None:
        """The node ``tensor`` is bound to, if any (an id reused by a new tensor is not)."""
        entry = self._nodes.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def node_of(self, tensor: Tensor) -> fx.Node:
        """The node whose op last produced (or mutated) ``tensor``; created for new tensors."""
        bound = self._bound_node(tensor)
        if bound is not None:
            return bound
        name = self._state_names.get(id(tensor))
        if name is not None:
            node = self._state_nodes.get(name)
            if node is None:
                node = self.graph.get_attr(name)
                self._state_nodes[name] = node
        else:
            node = self.graph.create_node("get_attr", "_tensor_constant", name="constant")
            node.meta["constant"] = True  # a tensor no op produced and no parameter or buffer
        self._set_meta(node, tensor)
        self.bind(tensor, node)
        return node

    def bind(self, tensor: Tensor, node: fx.Node) -> None:
        self._nodes[id(tensor)] = (weakref.ref(tensor), node)

    @staticmethod
    def _set_meta(node: fx.Node, tensor: Tensor) -> None:
        node.meta["tensor_meta"] = TensorShape(tuple(tensor.shape), tensor.dtype)

    def placeholder(self, name: str, tensor: Tensor) -> None:
        node = self.graph.placeholder(name)
        self._set_meta(node, tensor)
        self.bind(tensor, node)

    def _argument(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            return self.node_of(value)
        if isinstance(value, list):
            return [self._argument(v) for v in value]
        if isinstance(value, tuple):  # torch.Size and named tuples become plain tuples
            return tuple(self._argument(v) for v in value)
        if isinstance(value, dict):
            return {k: self._argument(v) for k, v in value.items() if isinstance(k, str)}
        return value if isinstance(value, _SIMPLE_ARGUMENTS) else None

    # -- ops --------------------------------------------------------------------------------
    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        call = call_tracked(func, args, kwargs)
        outputs, produced, mutated = call.outputs, call.produced, call.mutated
        if not produced and not mutated:
            return outputs  # a size, dtype or other metadata query
        node = self._op_node(func, args, kwargs)
        self._set_meta(node, (produced or mutated)[0])
        if len(produced) == 1 and produced[0] is outputs:
            self.bind(outputs, node)
        else:
            for index, tensor in enumerate(produced):
                item = self.graph.call_function(operator.getitem, (node, index))
                item.meta.update(nn_module_stack=node.meta["nn_module_stack"])
                self._set_meta(item, tensor)
                self.bind(tensor, item)
        for tensor in mutated:  # in place: later readers see this op's result
            if not any(tensor is t for t in produced):
                self.bind(tensor, node)
            base = tensor._base
            if base is not None:  # ``x[:, :c] += y`` changes ``x`` too
                self.bind(base, node)
        return outputs

    def _op_node(self, func: Callable[..., Any], args: tuple, kwargs: dict) -> fx.Node:
        mapped_args = tuple(self._argument(a) for a in args)
        mapped_kwargs = {k: self._argument(v) for k, v in kwargs.items()}
        method = _method_name(func)
        if method is not None:
            node = self.graph.call_method(method, mapped_args, mapped_kwargs)
        else:
            node = self.graph.call_function(func, mapped_args, mapped_kwargs)
        node.meta["nn_module_stack"] = self.module_stack()
        return node

    def module_stack(self) -> dict[str, tuple[str, type]]:
        return {
            entry[0].key: (entry[0].path, type(self.modules[entry[0].path]))
            for entry in self._stack
            if entry is not None
        }

    # -- module calls -----------------------------------------------------------------------
    def enter(self, module: nn.Module, args: Any) -> None:
        path = self.module_paths.get(id(module))
        if path is None:  # a module built during forward: not part of the model
            self._stack.append(None)
            return
        call = ModuleCall(path, self.call_counts[path])
        self.call_counts[path] += 1
        first = self._bound_node(args[0]) if args and isinstance(args[0], Tensor) else None
        if first is not None:  # what skipping a block returns instead
            first.meta.setdefault("module_first_inputs", []).append(call)
        self._stack.append((call, path))

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        entry = self._stack.pop() if self._stack else None
        if entry is None:
            return
        call = entry[0]
        if isinstance(output, Tensor):
            self._note_output(self.node_of(output), ModuleOutput(call, None))
            return
        leaves = tree_leaves(output)
        for index, leaf in enumerate(leaves):
            if isinstance(leaf, Tensor):
                self._note_output(self.node_of(leaf), ModuleOutput(call, index))

    @staticmethod
    def _note_output(node: fx.Node, output: ModuleOutput) -> None:
        node.meta.setdefault("module_outputs", []).append(output)


@contextmanager
def _module_hooks(recorder: _Recorder) -> Iterator[None]:
    from torch.nn.modules import module as module_hooks

    with ExitStack() as stack:
        pre = module_hooks.register_module_forward_pre_hook(recorder.enter)
        stack.callback(pre.remove)
        post = module_hooks.register_module_forward_hook(recorder.exit)
        stack.callback(post.remove)
        yield


def capture(model: nn.Module, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> CapturedRun:
    """Run ``model(*args, **kwargs)`` once and record its data flow (see the module docstring).

    The caller chooses the mode and grad state; nothing of the model is changed.

    Args:
        model: the model to run.
        inputs: positional and keyword arguments of the call.

    Returns:
        The ``CapturedRun``: its graph ends in an ``output`` node over the returned tensors.
    """
    args, kwargs = inputs
    recorder = _Recorder(model)
    flat = tree_leaves((args, kwargs))
    for index, value in enumerate(flat):
        if isinstance(value, Tensor):
            recorder.placeholder(f"input_{index}", value)
    with _module_hooks(recorder), recorder:
        outputs = model(*args, **kwargs)
    returned = [recorder.node_of(t) for t in tree_leaves(outputs) if isinstance(t, Tensor)]
    recorder.graph.output(tuple(returned))
    record_batch_dims(recorder.graph)
    return CapturedRun(recorder.graph, outputs, recorder.modules, recorder.call_counts)
