"""Verification: eval outputs compared bitwise, and which change broke them when they differ.

One place for the library (``api``, ``traced``), the CLI's re-verification of a written model
and the benchmarks: ``verify_eval`` runs and compares, ``diagnose`` names the culprit, and
``verify_attached`` is ``inject_droppath``'s check of its attachments.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .apply import Attacher, attach_all
from .attach import Attachment
from .errors import VerificationError
from .inputs import ExampleInputs, run_eval
from .plan import Plan, PlannedSite
from .report import Verification

META_DEVICE_FIX = (
    "eval outputs of a model on the meta device hold no values, so they cannot be compared: "
    "pass verify=False, or load weights first (model.to_empty(device='cpu'), then "
    "load_state_dict)"
)


def outputs_equal(expected: Any, actual: Any) -> bool:
    """``torch.equal`` through nested tuples, lists and dicts; ``==`` for anything else.

    Raises:
        VerificationError: the outputs are meta tensors, which hold no values to compare.
    """
    if isinstance(expected, Tensor):
        if expected.is_meta or (isinstance(actual, Tensor) and actual.is_meta):
            raise VerificationError(META_DEVICE_FIX)
        return (
            isinstance(actual, Tensor)
            and expected.dtype == actual.dtype
            and torch.equal(expected, actual)
        )
    if isinstance(expected, Mapping):
        return (
            isinstance(actual, Mapping)
            and expected.keys() == actual.keys()
            and all(outputs_equal(expected[k], actual[k]) for k in expected)
        )
    if isinstance(expected, (tuple, list)):
        return (
            type(expected) is type(actual)
            and len(expected) == len(actual)
            and all(outputs_equal(e, a) for e, a in zip(expected, actual, strict=True))
        )
    if expected is actual:
        return True
    if type(expected) is type(actual) and hasattr(expected, "__dict__"):
        # an object holding tensors, such as a Hugging Face cache: compare its attributes
        return outputs_equal(vars(expected), vars(actual))
    return bool(expected == actual)


def count_elements(outputs: Any) -> int:
    """Number of tensor elements in a nested output structure."""
    if isinstance(outputs, Tensor):
        return outputs.numel()
    if isinstance(outputs, Mapping):
        return sum(count_elements(v) for v in outputs.values())
    if isinstance(outputs, (tuple, list)):
        return sum(count_elements(v) for v in outputs)
    if hasattr(outputs, "__dict__") and not isinstance(outputs, type):
        return count_elements(vars(outputs))
    return 0


def verify_eval(model: nn.Module, inputs: ExampleInputs, reference: Any) -> Verification:
    """Run ``model`` in eval mode on ``inputs`` and compare its outputs with ``reference``."""
    outputs, _ = run_eval(model, inputs)
    passed = outputs_equal(reference, outputs)
    return Verification(passed, count_elements(outputs), inputs.describe())


@dataclass(frozen=True)
class Change:
    """One undoable part of an injection, tried alone when looking for what broke the outputs."""

    name: str
    apply: Callable[[], None]
    undo: Callable[[], None]


def diagnose(
    model: nn.Module,
    inputs: ExampleInputs,
    reference: Any,
    changes: Iterable[Change],
    all_changes: str,
) -> str:
    """Why eval outputs of the (restored) ``model`` changed, as the end of an error message.

    ``reference`` holds the outputs of the unchanged model. Either the model is not
    reproducible (a second run differs), or the first change that alone changes the outputs
    is named (``all_changes`` when none does alone).
    """
    name = type(model).__name__
    if not verify_eval(model, inputs, reference).passed:
        return (
            f"{name} gives different eval outputs on two runs of the same input, so bit-identity "
            "cannot be checked; the model was restored. Make its eval forward deterministic, or "
            "pass verify=False"
        )
    culprit = all_changes
    for change in changes:
        change.apply()
        try:
            broken = not verify_eval(model, inputs, reference).passed
        finally:
            change.undo()
        if broken:
            culprit = change.name
            break
    return (
        f"eval outputs changed after {culprit}; the model was restored. Please report this "
        "model; inject_droppath(..., verify=False) skips the check"
    )


def verify_attached(
    model: nn.Module, plan: Plan, rates: list[float], attacher: Attacher, inputs: ExampleInputs
) -> Verification:
    """Eval outputs after attaching against the captured ones; raises (model restored) if not
    bit-identical.

    The captured run went through a ``TorchFunctionMode``, which turns off fused fast paths
    (``nn.TransformerEncoderLayer`` in eval); a mismatch is therefore checked once more against
    a plain run of the unchanged model before it counts.
    """
    outputs, _ = run_eval(model, inputs)
    verified = Verification(True, count_elements(outputs), inputs.describe())
    if outputs_equal(plan.run.outputs, outputs):
        return verified
    attacher.undo()
    plain, _ = run_eval(model, inputs)
    if outputs_equal(plain, outputs):  # the fast path differed, not the DropPaths
        attach_all(plan, rates, attacher)
        return verified
    changes = [attaching(planned, plan, rates, attacher) for planned in plan.sites]
    reason = diagnose(
        model, inputs, plain, [c for c in changes if c], "attaching every DropPath together"
    )
    raise VerificationError(reason)


def attaching(
    planned: PlannedSite, plan: Plan, rates: list[float], attacher: Attacher
) -> Change | None:
    """Attaching one site's DropPath alone, as a change ``diagnose`` can try."""
    attachment = planned.attachment
    if not isinstance(attachment, Attachment):
        return None
    place = (planned.block_index, plan.num_blocks)
    rate = rates[planned.block_index]

    def attach() -> None:
        attacher.attach(attachment, rate, place)

    return Change(
        f"attaching a DropPath to {attachment.module or 'the model'}", attach, attacher.undo
    )
