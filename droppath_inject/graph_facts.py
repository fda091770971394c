"""What the ops of a captured or traced graph mean, for the residual rule and its users.

The vocabulary (adds, sums, weight-bearing ops, norms, metadata queries) and ``GraphFacts``,
the per-graph lookups every candidate add shares: topological order, which nodes are tensors,
which are computed from the forward's arguments and which from parameters alone.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Collection
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx, nn

from .droppaths import is_drop_path_module
from .internals import BATCH_NORM_BASE, GROUPED_MATMULS, NATIVE_MULTI_HEAD_ATTENTION, NORM_BASE

if TYPE_CHECKING:
    from .capture import CapturedRun

_ADD_FUNCTIONS = frozenset(
    {operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.Tensor.add_}
)
_ADD_METHODS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})
_INPLACE_ADDS = frozenset({operator.iadd, torch.Tensor.add_, "add_", "__iadd__"})

_WEIGHT_FUNCTIONS = frozenset(
    {
        F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d,
        F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
        F.scaled_dot_product_attention, F.multi_head_attention_forward,
        torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
        torch.einsum, torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu,
        NATIVE_MULTI_HEAD_ATTENTION, torch.conv_tbc, torch.addbmm, *GROUPED_MATMULS,
    }
)  # fmt: skip
_WEIGHT_METHODS = frozenset(
    {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm"}
)
_SUM_FUNCTIONS = frozenset(
    {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
)
_SUM_METHODS = frozenset(
    {"add", "add_", "sub", "sub_", "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__",
     "__isub__"}
)  # fmt: skip

_METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "stride", "is_contiguous", "element_size"})

_NORM_CLASS_NAME = re.compile(r"Norm(\d*d|\d+)?$")  # RmsNorm, LayerNorm2d, GroupNorm1, ...
_NORM_TYPES = (
    NORM_BASE,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


# Ops linear (affine) in their inputs computed from a fork, as the eval run computes them: a
# linear map of those inputs plus terms computed from parameters and constants alone (batch_norm
# included: the captured run is an eval run, where it is affine).
_STRUCTURAL_NAMES = frozenset(
    {
        "view", "reshape", "flatten", "unflatten", "contiguous", "clone", "view_as", "reshape_as",
        "squeeze", "unsqueeze", "to", "float", "half", "bfloat16", "double", "type", "type_as",
        "detach", "transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t",
        "T", "mT", "expand", "expand_as", "repeat", "chunk", "split", "unbind", "narrow",
        "__getitem__", "getitem", "cat", "concat", "concatenate", "stack", "pad", "roll", "flip",
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "adaptive_avg_pool3d", "pixel_shuffle", "pixel_unshuffle", "dropout", "dropout1d",
        "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "batch_norm",
        "sum", "mean", "neg", "__neg__", "add", "add_", "__add__", "__radd__", "__iadd__",
        "iadd", "sub", "sub_", "__sub__", "__rsub__", "__isub__", "isub",
    }
)  # fmt: skip
_PRODUCT_NAMES = frozenset(
    {
        "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
        "conv_transpose3d", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "einsum",
        "baddbmm", "addmm", "_grouped_mm", "grouped_mm", "mul", "mul_", "__mul__", "__rmul__",
        "imul", "multiply",
    }
)  # fmt: skip
_QUOTIENT_NAMES = frozenset({"div", "div_", "__truediv__", "truediv", "true_divide", "divide"})
_LINEAR_MODULES = (
    nn.Linear, nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten, BATCH_NORM_BASE,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)  # fmt: skip


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return str(getattr(node.target, "__name__", ""))


def is_linear_in(node: fx.Node, sources: Collection[fx.Node], module: nn.Module | None) -> bool:
    """``node`` is linear (affine) in its inputs that lie in ``sources``: a view, cast, pad,
    average pool, eval dropout or BatchNorm, sum, or a product (conv, linear, matmul, ``*``) or
    quotient whose other operands are not in ``sources``; ``module`` is what a ``call_module``
    node calls."""
    if node.op == "call_module":
        return isinstance(module, _LINEAR_MODULES)
    if node.op not in ("call_function", "call_method"):
        return False
    name = _op_name(node)
    if name in _STRUCTURAL_NAMES:
        return True
    inputs = [n for n in node.all_input_nodes if n in sources]
    if name in _PRODUCT_NAMES:
        return len(inputs) <= 1
    if name in _QUOTIENT_NAMES:
        return inputs == [node.args[0]]
    return False


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain elementwise add node, or None for anything else."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )
    if not is_add or "out" in node.kwargs or node.kwargs.get("alpha", 1) != 1:
        return None
    operands = list(node.args[:2])
    if len(operands) == 1 and "other" in node.kwargs:
        operands.append(node.kwargs["other"])
    if len(operands) != 2 or len(node.args) > 2:
        return None
    a, b = operands
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
        return None
    return a, b


def stacked_terms(node: fx.Node) -> list[fx.Node] | None:
    """The terms of a sum written ``torch.stack([t1, ..., tn]).sum(dim=0)`` (timm's parallel
    blocks), or None for anything else."""
    if _op_name(node) != "sum" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    stack = node.args[0]
    if dim != 0 or _op_name(stack) != "stack" or len(stack.users) != 1:
        return None
    stack_dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    terms = stack.args[0] if stack.args else stack.kwargs.get("tensors")
    if stack_dim != 0 or not isinstance(terms, (list, tuple)):
        return None
    nodes = [t for t in terms if isinstance(t, fx.Node)]
    return nodes if len(nodes) == len(terms) >= 2 else None


def is_inplace_add(node: fx.Node) -> bool:
    """True for ``a.add_(b)`` and ``operator.iadd``, which mutate their first operand."""
    return node.target in _INPLACE_ADDS


def data_derived(graph: fx.Graph, shared: Collection[str] = ()) -> set[fx.Node]:
    """Nodes that depend on a forward argument (not only on parameters and constants); the
    placeholders named in ``shared`` hold the model's own state, not data."""
    derived: set[fx.Node] = set()
    for node in graph.nodes:
        argument = node.op == "placeholder" and node.target not in shared
        if argument or any(n in derived for n in node.all_input_nodes):
            derived.add(node)
    return derived


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value reaches the graph's output through the data flow (all, without one).

    A value that reaches no output is dead in the run: an unused result, or a write into a
    cache that nothing reads afterwards (Hugging Face Mamba's ``conv_state.copy_(...)``).
    """
    outputs = [node for node in graph.nodes if node.op == "output"]
    if not outputs:
        return set(graph.nodes)
    live = set(outputs)
    stack = list(outputs)
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in live:
                live.add(parent)
                stack.append(parent)
    return live


def rejoins_add(node: fx.Node, add: fx.Node) -> bool:
    """The rest of a branch whose first channels take the add, concatenated back with it:
    ReXNet's ``cat([x[:, :c] + shortcut, x[:, c:]], dim=1)``."""
    if not (node.op == "call_method" and node.target == "__getitem__" and len(node.users) == 1):
        return False
    (user,) = node.users
    return user.op == "call_function" and user.target is torch.cat and add in user.all_input_nodes


def writes_back(node: fx.Node, add: fx.Node) -> bool:
    """``x[idx] = add``: Python's write-back of ``x[:, :c] += shortcut`` into the branch."""
    return node.op == "call_method" and node.target == "__setitem__" and add in node.args[2:]


_SAME_VALUE_METHODS = frozenset({"to", "contiguous", "type_as", "float", "clone"})


def unaliased(node: fx.Node) -> fx.Node:
    """The value ``node`` copies unchanged (``x.to(x.dtype)`` returns ``x`` itself, and the
    recorder binds ``x`` to the cast node: Llama's RMSNorm), else ``node``."""
    while (
        node.op == "call_method"
        and node.target in _SAME_VALUE_METHODS
        and node.args
        and isinstance(node.args[0], fx.Node)
        and node.meta.get("tensor_meta") == node.args[0].meta.get("tensor_meta")
    ):
        node = node.args[0]
    return node


class GraphFacts:
    """Per-graph lookups shared by every candidate add: topological index, tensor-ness, modules."""

    def __init__(self, run: CapturedRun) -> None:
        self.nodes = list(run.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.modules = run.modules
        self.shapes_known = any("tensor_meta" in n.meta for n in self.nodes)
        self._tensor: dict[fx.Node, bool] = {}
        self.data = run.data  # nodes computed from a forward argument
        self.live = run.live  # nodes whose value reaches the output
        self.parameters: set[fx.Node] = set()  # parameters and values computed from them alone
        for node in self.nodes:
            if node in self.data:
                continue
            if (node.op == "get_attr" and not node.meta.get("constant")) or any(
                n in self.parameters for n in node.all_input_nodes
            ):
                self.parameters.add(node)  # ``self.gamma.view(1, -1, 1, 1)`` reads gamma too

    def is_tensor(self, node: fx.Node) -> bool:
        """Whether ``node`` produces tensor data (not a shape, dtype or other metadata)."""
        if node not in self._tensor:
            self._tensor[node] = self._compute_is_tensor(node)
        return self._tensor[node]

    def _compute_is_tensor(self, node: fx.Node) -> bool:
        if node.op == "output":
            return False
        if self.shapes_known:
            return "tensor_meta" in node.meta
        if node.op == "call_method" and node.target in _METADATA_METHODS:
            return False
        if node.op == "call_function" and node.target is getattr:
            return node.args[1] not in _METADATA_ATTRIBUTES
        inputs = node.all_input_nodes
        if node.op in ("call_function", "call_method") and inputs:
            return any(self.is_tensor(n) for n in inputs)
        return True

    def tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if self.is_tensor(n)]

    def data_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Tensor inputs computed from a forward argument (not parameters or constants)."""
        return [n for n in node.all_input_nodes if n in self.data and self.is_tensor(n)]

    def is_dead(self, node: fx.Node) -> bool:
        """A value that reaches no output: an unused result such as attention weights or an RNN
        state, or one only written into a cache that the run never reads again."""
        return node not in self.live

    def is_sum(self, node: fx.Node) -> bool:
        """An elementwise add or subtraction."""
        return (node.op == "call_function" and node.target in _SUM_FUNCTIONS) or (
            node.op == "call_method" and node.target in _SUM_METHODS
        )

    def is_subtraction(self, node: fx.Node) -> bool:
        return self.is_sum(node) and "sub" in getattr(node.target, "__name__", str(node.target))

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        return None if shape is None else tuple(shape)

    def module_of(self, node: fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.modules[str(node.target)]

    def has_parameters(self, node: fx.Node) -> bool:
        """An op that holds or reads parameters: a module with any, or a function of a get_attr."""
        if node.op == "call_module":
            module = self.module_of(node)
            return not is_drop_path_module(module) and any(True for _ in module.parameters())
        return self.is_weight_op(node) or any(n in self.parameters for n in node.all_input_nodes)

    def is_linear(self, fork: fx.Node, region: Collection[fx.Node]) -> bool:
        """Every op of ``region`` (computed from ``fork``) is linear in ``fork``."""
        sources = {fork, *region}
        return all(
            is_linear_in(n, sources, self.module_of(n) if n.op == "call_module" else None)
            for n in region
        )

    def is_weight_op(self, node: fx.Node) -> bool:
        """Conv, linear, matmul, attention, or a leaf module holding weights (norms excluded)."""
        if node.op == "call_module":
            module = self.module_of(node)
            if is_drop_path_module(module) or isinstance(module, _NORM_TYPES):
                return False
            if _NORM_CLASS_NAME.search(type(module).__name__):
                return False
            return any(True for _ in module.parameters())
        if node.op == "call_function":
            return node.target in _WEIGHT_FUNCTIONS
        if node.op == "call_method":
            return node.target in _WEIGHT_METHODS
        return False
