"""Where the batch lies in each captured tensor: the input's batch followed through the data flow.

Row mode promises one decision per *sample*, so a DropPath must know which dimension of its
branch holds the samples. It is not always the first: sequence-first code (``(T, B, C)``, the
default of ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``) keeps it second, a
branch may transpose to channels-first and back, and a mixture of experts flattens tokens to
``(B*T, H)``, where no dimension holds the samples alone.

Each dimension of each captured tensor is an *axis*; ops link the axes of their outputs to the
axes of their operands (an add links equal positions, a transpose swaps them, a reshape links
only the dimensions it keeps whole, a linear keeps all but the last), and some ops *mix* an
axis (a linear mixes its input's features, attention its keys' positions, a softmax or a sum its
dimension). Linked axes form classes. The batch is the class of the input's dimension that no
op ever mixes: samples are independent, every other dimension is mixed somewhere. Dimension 0
is preferred where several are never mixed (an MLP over ``(B, T, C)``), which keeps the
convention where the graph cannot tell. A tensor's batch dimension is the one dimension in the
batch's class (``BatchDim.dim``); None when the batch is folded into another dimension, spread
over several, or absent (a parameter). Ops this module has no rule for link equal-sized
dimensions of operands broadcast to the output, and nothing otherwise.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass
from math import prod

from torch import fx

BATCH_DIM = "batch_dim"

Link = tuple[int, fx.Node, int]  # (output dimension, operand, operand dimension)
Axis = tuple[fx.Node, int]


@dataclass(frozen=True)
class BatchDim:
    """``node.meta["batch_dim"]``: the dimension of the node's tensor that holds the samples of
    the input's batch, or None (folded into another dimension, spread over several, absent)."""

    dim: int | None


def batch_dim_of(node: fx.Node) -> int | None:
    """The recorded batch dimension of ``node``'s tensor (None: unknown or not a tensor)."""
    fact = node.meta.get(BATCH_DIM)
    return fact.dim if isinstance(fact, BatchDim) else None


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    else:
        return ""
    return name.strip("_")


def _arg(node: fx.Node, position: int, keyword: str, default: object = None) -> object:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def _dims(value: object, ndim: int) -> list[int] | None:
    """``value`` (an int or a sequence of ints) as non-negative dimensions, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return [value % ndim] if ndim else None
    if isinstance(value, (tuple, list)) and all(isinstance(v, int) for v in value):
        return [v % ndim for v in value] if ndim else None
    return None


def _tensor_operands(node: fx.Node) -> Iterator[fx.Node]:
    def walk(value: object) -> Iterator[fx.Node]:
        if isinstance(value, fx.Node):
            if _shape(value) is not None:
                yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from walk(v)

    yield from walk(node.args)
    yield from walk(list(node.kwargs.values()))


def _broadcast(out: tuple[int, ...], operands: list[fx.Node]) -> list[Link]:
    """Equal-sized dimensions of operands broadcast to ``out``, right-aligned."""
    links: list[Link] = []
    for operand in operands:
        shape = _shape(operand)
        assert shape is not None
        if len(shape) > len(out):
            continue
        offset = len(out) - len(shape)
        broadcasts = all(s in (1, out[offset + i]) for i, s in enumerate(shape))
        if not broadcasts and len(shape) != len(out):
            continue  # not broadcastable and not the same rank: no positional meaning
        links += [(offset + i, operand, i) for i, s in enumerate(shape) if s == out[offset + i]]
    return links


def _positional(
    out: tuple[int, ...], source: fx.Node, skip: frozenset[int] = frozenset()
) -> list[Link]:
    shape = _shape(source) or ()
    return [(i, source, i) for i in range(min(len(out), len(shape))) if i not in skip]


def _reshape(out: tuple[int, ...], source: fx.Node) -> list[Link]:
    """The dimensions a reshape keeps whole: same size after the same number of elements."""
    shape = _shape(source) or ()
    links: list[Link] = []
    ones: dict[int, list[int]] = {}
    out_ones: dict[int, list[int]] = {}
    for i, size in enumerate(shape):
        if size == 1:
            ones.setdefault(prod(shape[:i]), []).append(i)
    for j, size in enumerate(out):
        if size == 1:
            out_ones.setdefault(prod(out[:j]), []).append(j)
    before = {prod(out[:j]): j for j, size in enumerate(out) if size != 1}
    for i, size in enumerate(shape):
        if size == 1:
            continue
        at = before.get(prod(shape[:i]))
        if at is not None and out[at] == size:
            links.append((at, source, i))
    for offset, dims in ones.items():
        if len(dims) == len(out_ones.get(offset, [])):
            links += [(k, source, i) for i, k in zip(dims, out_ones[offset], strict=True)]
    return links


def _getitem(node: fx.Node, out: tuple[int, ...]) -> list[Link]:
    source = node.args[0]
    shape = _shape(source)
    if shape is None or not isinstance(source, fx.Node):
        return []
    index = node.args[1] if len(node.args) > 1 else None
    entries = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(e, (fx.Node, list)) or e is True or e is False for e in entries):
        return []  # advanced indexing: where the dimensions go depends on the index tensors
    used = sum(1 for e in entries if e is not None and e is not Ellipsis)
    expanded: list[object] = []
    for entry in entries:
        if entry is Ellipsis:
            expanded += [slice(None)] * (len(shape) - used)
        else:
            expanded.append(entry)
    expanded += [slice(None)] * (len(shape) - sum(1 for e in expanded if e is not None))
    links: list[Link] = []
    i = j = 0
    for entry in expanded:
        if entry is None:
            j += 1
        elif isinstance(entry, int):
            i += 1
        else:
            links.append((j, source, i))
            i += 1
            j += 1
    return [link for link in links if link[0] < len(out)]


def _permutation(node: fx.Node, name: str, ndim: int) -> list[int] | None:
    """``order`` with output dimension ``i`` read from input dimension ``order[i]``."""
    order = list(range(ndim))
    if name in ("transpose", "swapaxes", "swapdims"):
        pair = _dims([_arg(node, 1, "dim0"), _arg(node, 2, "dim1")], ndim)
        if pair is None:
            return None
        order[pair[0]], order[pair[1]] = order[pair[1]], order[pair[0]]
        return order
    if name in ("t", "T"):
        return order[::-1] if ndim <= 2 else None
    if name == "mT":
        return order[:-2] + order[:-3:-1] if ndim >= 2 else None
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 else list(node.args[1:])
        if not node.args[1:]:
            dims = node.kwargs.get("dims")
        return _dims(dims, ndim)
    if name in ("movedim", "moveaxis"):
        source = _dims(_arg(node, 1, "source"), ndim)
        target = _dims(_arg(node, 2, "destination"), ndim)
        if source is None or target is None or len(source) != len(target):
            return None
        rest = iter(d for d in order if d not in source)
        placed = dict(zip(target, source, strict=True))
        return [placed[i] if i in placed else next(rest) for i in range(ndim)]
    return None


_LAYOUT = frozenset({"transpose", "swapaxes", "swapdims", "t", "T", "mT", "permute", "movedim",
                     "moveaxis"})  # fmt: skip
_VIEWS = frozenset({"view", "reshape", "flatten", "unflatten", "view_as", "reshape_as",
                    "squeeze", "unsqueeze", "unfold_view"})  # fmt: skip
_REDUCTIONS = frozenset(
    {"sum", "mean", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod", "all",
     "any", "argmax", "argmin", "median", "nansum", "nanmean", "count_nonzero", "var_mean",
     "std_mean", "norm", "aminmax", "nanmedian", "mode"}
)  # fmt: skip
_ALONG_DIM = frozenset(
    {"softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "sort",
     "argsort", "topk", "kthvalue", "normalize", "glu"}
)  # fmt: skip
_MATMULS = frozenset({"matmul", "mm", "bmm"})
_CONV = re.compile(r"^conv(_transpose)?([123])d$")
_POOL = re.compile(r"(pool|interpolate|upsample|pixel_(un)?shuffle)")


def _links(node: fx.Node, out: tuple[int, ...], item: int | None) -> tuple[list[Link], list[Axis]]:
    """How ``node``'s output dimensions link to its operands' (``item``: which output of a
    multi-output op), and which operand dimensions it mixes."""
    name = _name(node)
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape = _shape(first) or ()
    ndim = len(shape)
    if name in ("embedding",) and first is not None:
        return [(i, first, i) for i in range(ndim)], []
    if first is None or _shape(first) is None:
        if name == "einsum":
            return _einsum(node, out)
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            return _concat(node, out, name)
        return _broadcast(out, list(_tensor_operands(node))), []
    if name in _LAYOUT:
        order = _permutation(node, name, ndim)
        return ([(i, first, d) for i, d in enumerate(order)] if order else []), []
    if name in _VIEWS:
        return _reshape(out, first), []
    if name == "getitem" and node.op == "call_method":
        return _getitem(node, out), []
    if name == "linear":
        return _positional(out, first, frozenset({ndim - 1})), [(first, ndim - 1)]
    if name in _MATMULS or name in ("rmatmul", "baddbmm", "addmm", "addbmm"):
        return _matmul(node, out, name)
    if (conv := _CONV.match(name)) is not None:
        batched = ndim == int(conv.group(2)) + 2
        mixed = [(first, d) for d in range(1 if batched else 0, ndim)]
        return ([(0, first, 0)] if batched else []), mixed
    if name == "conv_tbc":
        return [(1, first, 1)], [(first, 0), (first, 2)]
    if _POOL.search(name):
        return [(0, first, 0), (1, first, 1)][: min(2, ndim)], [(first, d) for d in range(2, ndim)]
    if name in ("layer_norm", "rms_norm"):
        normalized = _arg(node, 1, "normalized_shape")
        count = len(normalized) if isinstance(normalized, (tuple, list)) else 1
        return _positional(out, first), [(first, d) for d in range(ndim - count, ndim)]
    if name in ("group_norm", "instance_norm"):
        start = 1 if name == "group_norm" else 2
        return _positional(out, first), [(first, d) for d in range(start, ndim)]
    if name in _ALONG_DIM:
        default = 1 if name == "normalize" else -1
        dims = _dims(_arg(node, 1 if name != "normalize" else 2, "dim", default), ndim) or []
        return _positional(out, first), [(first, d) for d in dims]
    if name in _REDUCTIONS and not isinstance(_arg(node, 1, "other"), fx.Node):
        return _reduction(node, out, name, first, ndim)
    if name == "scaled_dot_product_attention":
        key, value = _arg(node, 1, "key"), _arg(node, 2, "value")
        links, mixed = _positional(out, first, frozenset({ndim - 1})), [(first, ndim - 1)]
        for operand in (key, value):
            if isinstance(operand, fx.Node) and (s := _shape(operand)):
                mixed += [(operand, len(s) - 2), (operand, len(s) - 1)]
                offset = len(out) - len(s)  # leading (batch, head) dimensions broadcast
                links += [
                    (offset + i, operand, i)
                    for i in range(len(s) - 2)
                    if offset + i >= 0 and s[i] == out[offset + i]
                ]
        return links, mixed
    if name in ("multi_head_attention_forward", "native_multi_head_attention"):
        sequence = 0 if name == "multi_head_attention_forward" else 1
        if item not in (None, 0) or ndim != 3:
            return [], []  # the attention weights, or an unbatched call
        operands = [o for o in node.args[:3] if isinstance(o, fx.Node)]
        mixed = [(o, sequence) for o in operands] + [(first, 2)]
        return [(1 - sequence, first, 1 - sequence)], mixed
    if name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        batch_first = node.args[-1] is True if len(node.args) >= 9 else False
        if item not in (None, 0) or ndim != 3:
            return [], []  # the final states, or an unbatched call
        batch, time = (0, 1) if batch_first else (1, 0)
        return [(batch, first, batch)], [(first, time), (first, 2)]
    if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
        return _concat(node, out, name)
    if name in ("select", "unbind"):
        dim = _dims(_arg(node, 1, "dim", 0), ndim) or [0]
        return [(i if i < dim[0] else i - 1, first, i) for i in range(ndim) if i != dim[0]], []
    if name in ("index_select", "gather", "narrow", "split", "chunk", "tensor_split"):
        return _positional(out, first), []
    return _broadcast(out, list(_tensor_operands(node))), []


def _reduction(
    node: fx.Node, out: tuple[int, ...], name: str, first: fx.Node, ndim: int
) -> tuple[list[Link], list[Axis]]:
    dims = _dims(_arg(node, 2 if name == "norm" else 1, "dim"), ndim)
    if dims is None or len(dims) == ndim:
        return [], []  # a statistic of the whole tensor (a check, a loss) tells no dimension
    mixed = [(first, d) for d in dims]
    if len(out) == ndim:  # keepdim
        return _positional(out, first, frozenset(dims)), mixed
    kept = [d for d in range(ndim) if d not in dims]
    return [(i, first, d) for i, d in enumerate(kept) if i < len(out)], mixed


def _matmul(node: fx.Node, out: tuple[int, ...], name: str) -> tuple[list[Link], list[Axis]]:
    operands = [a for a in node.args if isinstance(a, fx.Node)]
    if name in ("baddbmm", "addmm", "addbmm"):
        links = _broadcast(out, operands[:1])
        operands = operands[1:]
    else:
        links = []
    if len(operands) != 2:
        return links, []
    a, b = operands
    if name == "rmatmul":  # ``b.__rmatmul__(a)`` is ``a @ b``
        a, b = b, a
    sa, sb = _shape(a) or (), _shape(b) or ()
    if len(sa) < 2 or len(sb) < 2:
        mixed = [(a, len(sa) - 1)] + [(b, max(len(sb) - 2, 0))]
        return links, mixed
    links += [(len(out) - 2, a, len(sa) - 2), (len(out) - 1, b, len(sb) - 1)]
    for operand, shape in ((a, sa), (b, sb)):
        offset = len(out) - len(shape)
        links += [
            (offset + i, operand, i)
            for i in range(len(shape) - 2)
            if offset + i >= 0 and shape[i] == out[offset + i]
        ]
    return links, [(a, len(sa) - 1), (b, len(sb) - 2)]


def _einsum(node: fx.Node, out: tuple[int, ...]) -> tuple[list[Link], list[Axis]]:
    equation = node.args[0] if node.args else None
    operands = [o for o in _tensor_operands(node)]
    if not isinstance(equation, str) or "." in equation:
        return [], []
    equation = equation.replace(" ", "")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if not _:
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    if len(terms) != len(operands):
        return [], []
    links: list[Link] = []
    mixed: list[Axis] = []
    for term, operand in zip(terms, operands, strict=True):
        for d, letter in enumerate(term):
            if letter in output:
                links.append((output.index(letter), operand, d))
            else:
                mixed.append((operand, d))
    return [link for link in links if link[0] < len(out)], mixed


def _concat(node: fx.Node, out: tuple[int, ...], name: str) -> tuple[list[Link], list[Axis]]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(tensors, (tuple, list)):
        return [], []
    links: list[Link] = []
    dim = _arg(node, 1, "dim", 0)
    for tensor in tensors:
        shape = _shape(tensor)
        if shape is None or not isinstance(tensor, fx.Node):
            continue
        if name == "stack" and isinstance(dim, int):
            at = dim % (len(shape) + 1)
            links += [(i if i < at else i + 1, tensor, i) for i in range(len(shape))]
        elif len(shape) == len(out):
            links += [(i, tensor, i) for i in range(len(shape))]
    return links, []


class _Axes:
    """Union-find over the axes (node, dimension) of a graph."""

    def __init__(self) -> None:
        self.parent: dict[Axis, Axis] = {}

    def find(self, axis: Axis) -> Axis:
        parent = self.parent.setdefault(axis, axis)
        while parent != axis:
            grand = self.parent.setdefault(parent, parent)
            self.parent[axis] = grand
            axis, parent = parent, grand
        return axis

    def union(self, a: Axis, b: Axis) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


def _input_batch(graph: fx.Graph, axes: _Axes, mixed: set[Axis]) -> Axis | None:
    """The class of the first used input's dimension that no op mixes: dimension 0 if it is
    never mixed, else the only such dimension; None if there is none or the choice is open."""
    for node in graph.nodes:
        shape = _shape(node) if node.op == "placeholder" and node.users else None
        if not shape:
            continue
        free = [d for d in range(len(shape)) if axes.find((node, d)) not in mixed]
        if free and (free[0] == 0 or len(free) == 1):
            return axes.find((node, free[0]))
        return None
    return None


def record_batch_dims(graph: fx.Graph) -> None:
    """Set ``node.meta["batch_dim"]`` (a ``BatchDim``) on every tensor node of ``graph``."""
    axes = _Axes()
    mixed_axes: list[Axis] = []
    for node in graph.nodes:
        out = _shape(node)
        if out is None or node.op not in ("call_function", "call_method"):
            continue
        item = None
        source = node
        if node.target is operator.getitem and node.args and isinstance(node.args[0], fx.Node):
            source, index = node.args[0], node.args[1]
            item = index if isinstance(index, int) else None
        links, mixed = _links(source, out, item)
        for dim, operand, operand_dim in links:
            if 0 <= dim < len(out):
                axes.union((node, dim), (operand, operand_dim))
        mixed_axes += mixed
    mixed_roots = {axes.find(axis) for axis in mixed_axes}
    batch = _input_batch(graph, axes, mixed_roots)
    for node in graph.nodes:
        shape = _shape(node)
        if shape is None:
            continue
        dims = [d for d in range(len(shape)) if batch is not None and axes.find((node, d)) == batch]
        node.meta[BATCH_DIM] = BatchDim(dims[0] if len(dims) == 1 else None)
