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
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from math import gcd

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


def first_input_batch_dims(graph: fx.Graph) -> dict[str, int | None]:
    """Where the first argument of each module's first call holds the samples, if known."""
    found: dict[str, int | None] = {}
    for node in graph.nodes:
        for call in node.meta.get("module_first_inputs", []):
            found.setdefault(call.path, batch_dim_of(node))
    return found


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
# a statistic (a sum, a mean, a sort) is taken over the batch as readily as over a sequence
# (batch centring, BatchNorm-style code): only these, besides weights and attention, say that a
# dimension is not the batch
_MIXING_ALONG_DIM = frozenset({"softmax", "log_softmax", "normalize", "glu"})
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
    if name in _VIEWS:  # the factors are regrouped by ``_Layout.reshape``
        other = _arg(node, 1, "other")
        if name.endswith("_as") and isinstance(other, fx.Node):  # ``y.reshape_as(x)``: x's layout
            return _positional(out, other), []
        return [], []
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
    if name in ("unfold", "fold") and node.op == "call_function":  # im2col and col2im
        return [(0, first, 0)], [(first, d) for d in range(1, ndim)]
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
        mixing = name in _MIXING_ALONG_DIM
        return _positional(out, first), [(first, d) for d in dims] if mixing else []
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
        operands = [o for o in node.args[:3] if isinstance(o, fx.Node)]
        if ndim == 2 and item in (None, 0):  # one unbatched sequence: (T, C)
            return [], [(o, 0) for o in operands] + [(first, 1)]
        if item not in (None, 0) or ndim != 3:
            return [], []  # the attention weights
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
        return [], []
    if len(out) == ndim:  # keepdim
        return _positional(out, first, frozenset(dims)), []
    kept = [d for d in range(ndim) if d not in dims]
    return [(i, first, d) for i, d in enumerate(kept) if i < len(out)], []


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


Atom = tuple[fx.Node, int, int]  # (node, dimension, factor): one factor of one dimension


class _Layout:
    """Each dimension of each tensor as a list of factors (atoms), linked by union-find.

    A dimension is one atom until a reshape folds several into it (``(B, T, H)`` viewed as
    ``(B*T, H)`` gives its first dimension the atoms of B and T); a later reshape that splits
    it along the same boundaries gives them back, so the batch survives a fold and unfold
    (Hiera's token unrolling, a window partition and its reverse). A dimension holds the batch
    when it is exactly the batch's atom.
    """

    def __init__(self) -> None:
        self.parent: dict[Atom, Atom] = {}
        self.size: dict[Atom, int] = {}
        self.dims: dict[fx.Node, list[list[Atom]]] = {}

    def find(self, atom: Atom) -> Atom:
        parent = self.parent.setdefault(atom, atom)
        while parent != atom:
            grand = self.parent.setdefault(parent, parent)
            self.parent[atom] = grand
            atom, parent = parent, grand
        return atom

    def _fresh(self, node: fx.Node, dim: int, factor: int, size: int) -> Atom:
        atom = (node, dim, factor)
        self.size[atom] = size
        return atom

    def of(self, node: fx.Node) -> list[list[Atom]]:
        dims = self.dims.get(node)
        if dims is None:
            dims = [[self._fresh(node, d, 0, s)] for d, s in enumerate(_shape(node) or ())]
            self.dims[node] = dims
        return dims

    def link(
        self, node: fx.Node, dim: int, operand: fx.Node, operand_dim: int, new: set[int]
    ) -> None:
        """Link a dimension of ``node`` to one of ``operand``: factor by factor; a dimension not
        linked yet takes a folded operand dimension's factors."""
        mine, theirs = self.of(node)[dim], self.of(operand)[operand_dim]
        if dim in new and len(theirs) > 1:
            self.dims[node][dim] = list(theirs)
        elif len(mine) == len(theirs) and all(
            self.size[a] == self.size[b] for a, b in zip(mine, theirs, strict=True)
        ):
            for a, b in zip(mine, theirs, strict=True):
                ra, rb = self.find(a), self.find(b)
                if ra != rb:
                    self.parent[ra] = rb
        new.discard(dim)

    def reshape(self, node: fx.Node, source: fx.Node) -> None:
        """Regroup ``source``'s factors, in row-major order, into ``node``'s dimensions; a
        factor cut by a new boundary becomes new factors."""
        stream = deque((a, self.size[a]) for dim in self.of(source) for a in dim)
        dims: list[list[Atom]] = []
        for j, size in enumerate(_shape(node) or ()):
            taken: list[Atom] = []
            need, factor = size, 0
            if size == 1:
                one = stream[0][1] == 1 if stream else False
                dims.append([stream.popleft()[0] if one else self._fresh(node, j, 0, 1)])
                continue
            while need > 1:
                if stream and stream[0][1] == 1:
                    stream.popleft()
                    continue
                part = gcd(need, stream[0][1]) if stream else 1
                if part == 1:  # nothing left that fits: the rest is new
                    taken.append(self._fresh(node, j, factor, need))
                    break
                atom, atom_size = stream.popleft()
                if part != atom_size:  # cut: both parts are new factors
                    atom = self._fresh(node, j, factor, part)
                    stream.appendleft((self._fresh(node, -1 - j, factor, atom_size // part),
                                       atom_size // part))  # fmt: skip
                taken.append(atom)
                need //= part
                factor += 1
            dims.append(taken)
        self.dims[node] = dims

    def mix(self, node: fx.Node, dim: int) -> list[Atom]:
        """The atom an op mixes along ``dim``; none for a folded dimension, where mixing says
        nothing about which of its factors is the batch (a router counting tokens per expert
        over ``(B*T, E)``)."""
        atom = self.single(node, dim)
        return [] if atom is None else [atom]

    def single(self, node: fx.Node, dim: int) -> Atom | None:
        atoms = self.of(node)[dim]
        return self.find(atoms[0]) if len(atoms) == 1 else None


def _input_batches(graph: fx.Graph, layout: _Layout, mixed: set[Atom]) -> set[Atom]:
    """The atoms of the inputs' batch dimensions: in each used input, the dimension no op mixes
    (dimension 0 if it is never mixed, else the only such one). The first input decides the
    batch size; later inputs count where theirs is the same (the text and image towers of a
    CLIP get one batch each, linked by nothing but being the same samples). Empty if the first
    input's choice is open."""
    batches: set[Atom] = set()
    size = None
    for node in graph.nodes:
        shape = _shape(node) if node.op == "placeholder" and node.users else None
        if not shape:
            continue
        free = [d for d in range(len(shape)) if layout.single(node, d) not in mixed]
        atom = layout.single(node, free[0]) if free and (free[0] == 0 or len(free) == 1) else None
        if size is None:
            if atom is None:
                return set()
            size = shape[free[0]]
        elif atom is None or shape[free[0]] != size:
            continue
        batches.add(atom)
    return batches


def record_batch_dims(graph: fx.Graph) -> None:
    """Set ``node.meta["batch_dim"]`` (a ``BatchDim``) on every tensor node of ``graph``."""
    layout = _Layout()
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
        first = source.args[0] if source.args else None
        if _name(source) in _VIEWS and isinstance(first, fx.Node) and _shape(first) is not None:
            layout.reshape(node, first)
        links, mixed = _links(source, out, item)
        new = set(range(len(out)))
        for dim, operand, operand_dim in links:
            if 0 <= dim < len(out) and 0 <= operand_dim < len(_shape(operand) or ()):
                layout.link(node, dim, operand, operand_dim, new)
        mixed_axes += mixed
    mixed_atoms = {atom for node, dim in mixed_axes for atom in layout.mix(node, dim)}
    batches = _input_batches(graph, layout, mixed_atoms)
    for node in graph.nodes:
        shape = _shape(node)
        if shape is None:
            continue
        dims = [d for d in range(len(shape)) if layout.single(node, d) in batches]
        node.meta[BATCH_DIM] = BatchDim(dims[0] if len(dims) == 1 else None)
