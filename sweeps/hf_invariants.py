"""The invariants an injection must keep on any model, checked against the model itself.

Each check compares the injected model with a copy of the original (outputs, gradients), or
with the model's config (layers), or watches this package's DropPath modules at work (which
dimension their decisions vary over); none trusts the package's report alone.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy
import torch
from torch import Tensor, nn

from droppath_inject import DropPath, DropPathInjectError, Report, SiteStatus

from .placement import our_branches_dropped, our_drop_paths


class Check(Enum):
    """One invariant of the sweep, named as the table's column."""

    EVAL = "eval equal"
    TRAIN_ZERO = "train at 0 equal"
    BLOCKS = "blocks = layers"
    SAME_SITES = "same sites per layer"
    ATTACHED = "every site attached"
    ROWS = "rows over batch"
    NO_RAW = "no raw exception"
    NO_SILENT = "no silent skip"


@dataclass(frozen=True)
class Verdict:
    """A check's result: passed (None: could not be checked), and why not."""

    check: Check
    passed: bool | None
    reason: str = ""


def describe(error: BaseException) -> str:
    """``Type: first line`` of an exception, short enough for a table cell."""
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return f"{type(error).__name__}: {first}"


def is_package_error(error: BaseException) -> bool:
    """Whether ``error`` is one of the package's own exceptions."""
    return isinstance(error, DropPathInjectError)


def tensors(output: Any) -> list[Tensor]:
    """The tensors of a model output (ModelOutput, tuple, dict), flattened, caches left out."""
    if isinstance(output, Tensor):
        return [output]
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors(item)]
    return []


def same_outputs(expected: Any, actual: Any) -> bool:
    """Bitwise equality of two outputs holding at least one tensor each."""
    left, right = tensors(expected), tensors(actual)
    return bool(left) and len(left) == len(right) and all(map(torch.equal, left, right))


def eval_output(model: nn.Module, kwargs: dict[str, Tensor], seed: int = 0) -> Any:
    """The eval-mode output, without gradients, under ``seed`` (ViTMAE masks at random even in
    eval mode)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.eval()(**kwargs)


def train_step(model: nn.Module, kwargs: dict[str, Tensor], seed: int = 0) -> tuple[Any, dict]:
    """Outputs and parameter gradients of one train-mode step under
    ``seed``, the loss a fixed weighting of every differentiable output."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)
    output = model(**kwargs)
    live = [t for t in tensors(output) if t.requires_grad]
    if not live:
        raise ValueError("no output depends on the parameters")
    loss = sum((t * torch.linspace(-1, 1, t.numel()).reshape(t.shape)).sum() for t in live)
    loss.backward()  # type: ignore[union-attr]
    return output, {n: p.grad for n, p in model.named_parameters()}


def same_training(injected: nn.Module, original: nn.Module, kwargs: dict[str, Tensor]) -> str:
    """Empty when train-mode outputs and gradients are bitwise equal, else what differs."""
    out_injected, grads_injected = train_step(injected, kwargs)
    out_original, grads_original = train_step(original, kwargs)
    if not same_outputs(out_original, out_injected):
        return "train-mode outputs differ at rate 0"
    for name, grad in grads_original.items():
        other = grads_injected.get(name)
        if (grad is None) != (other is None) or (grad is not None and not torch.equal(grad, other)):
            return f"gradient of {name} differs at rate 0"
    return ""


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for names in zip(*parts, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


def stack_of(block: str) -> str:
    """The layer stack of a block: its path up to its last index (``encoder.layer.3`` and
    ``encoder.layer.3.attention`` are in ``encoder.layer``)."""
    names = block.split(".")
    indices = [i for i, name in enumerate(names) if name.isdigit()]
    return ".".join(names[: indices[-1]]) if indices else block


def sites_per_layer(report: Report) -> dict[str, list[int]]:
    """Attached sites per block (a block named by its sites' common owner path), grouped by
    stack, in execution order."""
    owners: dict[int, list[str]] = {}
    for site in report.sites:
        if site.status is not SiteStatus.SKIPPED:
            owners.setdefault(site.block_index, []).append(site.owner)
    stacks: dict[str, list[int]] = {}
    for index in sorted(owners):
        stacks.setdefault(stack_of(_common_prefix(owners[index])), []).append(len(owners[index]))
    return stacks


@contextmanager
def _dropping(model: nn.Module, rate: float) -> Iterator[list[tuple[str, DropPath]]]:
    """Eval mode everywhere but this package's DropPaths, which train at ``rate``."""
    drops = [(p, model.get_submodule(p)) for p in our_drop_paths(model)]
    saved = [(m, m.drop_prob) for _, m in drops]
    model.eval()
    for _, drop in drops:
        drop.drop_prob = rate
        drop.train()
    try:
        yield drops  # type: ignore[misc]
    finally:
        for drop, old in saved:
            drop.drop_prob = old
        model.eval()


def varying_dims(x: Tensor, out: Tensor) -> set[int]:
    """The dimensions along which ``out / x`` (the keep mask, where ``x`` is finite and not 0)
    changes."""
    valid = torch.isfinite(x) & (x != 0) & torch.isfinite(out)
    ratio = torch.where(valid, out / torch.where(valid, x, 1), torch.nan).detach()
    dims = set()
    for dim in range(ratio.ndim):
        first = ratio.narrow(dim, 0, 1)
        differs = (ratio != first) & ~ratio.isnan() & ~first.isnan()
        if bool(differs.any()):
            dims.add(dim)
    return dims


def row_decisions(model: nn.Module, kwargs: dict[str, Tensor], batch: int, tries: int = 4) -> str:
    """Empty when every DropPath of this package decides per sample over the batch dimension:
    at rate 1 the output changes, and at rate 0.5 each one's keep mask varies only along
    dimensions of size ``batch`` (the batch dimension: no other has that size). Else why not."""
    reference = eval_output(model, kwargs)
    paths = our_drop_paths(model)
    with torch.no_grad(), our_branches_dropped(model, paths):
        if same_outputs(reference, model(**kwargs)):
            return "dropping every branch (rate 1) leaves the output unchanged"
    seen: dict[str, set[int]] = {p: set() for p in paths}
    wrong: dict[str, str] = {}

    def watch(path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            x = args[0]
            if not isinstance(x, Tensor) or not isinstance(out, Tensor):
                return
            dims = varying_dims(x, out)
            seen[path] |= dims
            bad = [d for d in dims if x.shape[d] != batch]
            if bad and path not in wrong:
                shape = tuple(x.shape)
                wrong[path] = f"decisions vary over dim {bad[0]} of {shape} (batch {batch})"

        return hook

    with torch.no_grad(), _dropping(model, 0.5) as drops:
        handles = [drop.register_forward_hook(watch(path)) for path, drop in drops]
        try:
            for seed in range(tries):
                torch.manual_seed(seed)
                model(**kwargs)
                if wrong or all(seen.values()):
                    break
        finally:
            for handle in handles:
                handle.remove()
    if wrong:
        path, why = next(iter(wrong.items()))
        return f"{len(wrong)} of {len(paths)} DropPaths not per sample ({path}: {why})"
    silent = [p for p, dims in seen.items() if not dims]
    if silent:
        return f"{len(silent)} of {len(paths)} DropPaths never varied a decision ({silent[0]})"
    return ""
