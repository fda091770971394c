"""Which tensors of a real run come from the model's own state, not from its input.

Row mode gathers a branch's per-sample inputs, told by a first dimension equal to the batch. A
tensor computed from parameters and buffers alone (a relative position bias of shape
``(heads, N, N)`` passed to every block) is shared by all samples, even where its first
dimension happens to equal the batch. A ``TorchFunctionMode`` over the example run follows
each op's operands to its results: from the input, from the state only, or from neither (a
tensor built from sizes, like ``torch.ones(B, T)``, which stays per-sample by its shape).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .inputs import ExampleInputs, run_eval
from .internals import call_tracked, tree_leaves


class _TensorSet:
    """Tensors by identity, held weakly (an id reused by a later tensor is not a member)."""

    def __init__(self, tensors: Iterable[Tensor] = ()) -> None:
        self._refs: dict[int, weakref.ref[Tensor]] = {}
        for tensor in tensors:
            self.add(tensor)

    def add(self, tensor: Tensor) -> None:
        self._refs[id(tensor)] = weakref.ref(tensor)

    def __contains__(self, tensor: Tensor) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor


class Provenance(TorchFunctionMode):
    """Follows, while active, which tensors derive from the input and which from state only."""

    def __init__(self, model: nn.Module, inputs: Any) -> None:
        super().__init__()
        self._from_input = _TensorSet(t for t in tree_leaves(inputs) if isinstance(t, Tensor))
        self._from_state = _TensorSet([*model.parameters(), *model.buffers()])

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        call = call_tracked(func, args, kwargs or {})
        results = call.produced + call.mutated
        if any(t in self._from_input for t in call.operands):
            for tensor in results:
                self._from_input.add(tensor)
        elif any(t in self._from_state for t in call.operands):
            for tensor in results:  # ``shared`` reads the input mark first
                self._from_state.add(tensor)
        return call.outputs

    def shared(self, tensor: Tensor) -> bool:
        """Computed from parameters and buffers only, and not expanded along its first
        dimension (``cls_token.expand(B, ...)`` holds one row per sample)."""
        if tensor in self._from_input or tensor not in self._from_state:
            return False
        return tensor.ndim == 0 or tensor.shape[0] <= 1 or tensor.stride(0) != 0


def shared_arguments(
    model: nn.Module, inputs: ExampleInputs, modules: dict[str, nn.Module]
) -> dict[str, frozenset[int | str]]:
    """For each module, its arguments (positions, keywords) that the example run computed from
    parameters and buffers only: shared by all samples, so row mode never gathers them."""
    with Provenance(model, (inputs.args, inputs.kwargs)) as provenance:
        _, calls = run_eval(model, inputs, modules)
    return {
        path: frozenset(
            [i for i, a in enumerate(call.args) if i and _is_shared(a, provenance)]
            + [k for k, v in call.kwargs.items() if _is_shared(v, provenance)]
        )
        for path, call in calls.items()
    }


def _is_shared(value: object, provenance: Provenance) -> bool:
    return isinstance(value, Tensor) and provenance.shared(value)
