"""DropPath (stochastic depth) and its functional form.

In training, a residual branch ``F(x)`` in ``x + F(x)`` is zeroed with probability ``drop_prob``,
so the block degrades to the identity, and kept branches are scaled by ``1 / (1 - drop_prob)``
so the expected output is unchanged. ``mode="row"`` decides per sample (timm, torchvision "row");
``mode="batch"`` decides once for the whole batch (Huang et al. 2016, torchvision "batch").
``mode="fixed"`` keeps exactly ``k = max(1, round((1 - p) * B))`` samples, drawn uniformly
without replacement and scaled by ``B / k`` (DINOv2's ``drop_add_residual_stochastic_depth``):
the kept count depends on ``B`` and ``p`` only, so a skipping run has static shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, TypeAlias

import torch
from torch import Tensor, nn

Mode: TypeAlias = Literal["row", "batch", "fixed"]
MODES: tuple[str, ...] = ("row", "batch", "fixed")


def _check_drop_prob(drop_prob: float) -> None:
    """Raise ValueError unless ``drop_prob`` lies in [0, 1]; NaN fails the comparison too."""
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must lie in [0, 1], got {drop_prob!r}")


def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _mask_shape(x: Tensor, mode: str, batch_dim: int = 0) -> tuple[int, ...]:
    """Shape of the keep mask: the batch size at ``batch_dim`` and ones elsewhere per sample
    (``(B, 1, ..., 1)`` batch first), or all ones for the whole batch."""
    if x.ndim == 0:
        raise ValueError("drop_path needs an input with a batch dimension, got a 0-d tensor")
    if not -x.ndim <= batch_dim < x.ndim:
        raise ValueError(f"batch_dim {batch_dim} is not a dimension of a {x.ndim}-d input")
    shape = [1] * x.ndim
    if mode != "batch":
        shape[batch_dim] = x.shape[batch_dim]
    return tuple(shape)


def drop_path(
    x: Tensor,
    drop_prob: float,
    training: bool,
    mode: Mode = "row",
    scale_by_keep: bool = True,
    batch_dim: int = 0,
) -> Tensor:
    """Zero ``x`` per sample (or per batch) with probability ``drop_prob`` while training.

    Args:
        x: the residual branch's output.
        drop_prob: the probability of dropping, in [0, 1].
        training: whether to drop at all (pass the module's ``self.training``).
        mode: ``"row"``, one decision per sample, ``"batch"``, one for the whole batch, or
            ``"fixed"``, exactly ``kept_count(B, drop_prob)`` samples kept.
        scale_by_keep: scale kept values by ``1 / (1 - drop_prob)`` (``B / k`` when fixed).
        batch_dim: the dimension of ``x`` holding the samples (1 for ``(T, B, C)``).

    Returns:
        ``x`` itself in eval mode or at rate 0. At rate 1, exact zeros that stay connected to
        autograd with zero gradient (even where ``x`` holds inf or NaN), so distributed training
        never sees an unused parameter.

    Raises:
        ValueError: ``drop_prob`` outside [0, 1], an unknown ``mode``, a 0-d ``x`` or a
            ``batch_dim`` it lacks.

    Example:
        >>> x = torch.ones(4, 3)
        >>> drop_path(x, 0.5, training=False) is x
        True
        >>> out = drop_path(x, 0.5, training=True)
        >>> {float(v) for v in out.flatten()} <= {0.0, 2.0}  # each row dropped, or kept x2
        True
    """
    _check_drop_prob(drop_prob)
    check_mode(mode)
    if not training or drop_prob == 0.0:
        return x
    shape = _mask_shape(x, mode, batch_dim)
    if drop_prob == 1.0:  # ``where``, not ``x * 0``: no NaN from inf, and the layout survives
        return torch.where(x.new_ones(shape, dtype=torch.bool), 0.0, x)
    if mode == "fixed":
        return x * fixed_keep_mask(shape, drop_prob, scale_by_keep, x.dtype, x.device)
    return x * keep_mask(shape, drop_prob, scale_by_keep, x.dtype, x.device)


def keep_mask(
    shape: tuple[int, ...],
    drop_prob: float,
    scale_by_keep: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Random keep mask: 1 (or ``1 / keep_prob``, scaling) with probability ``1 - drop_prob``."""
    keep_prob = 1.0 - drop_prob
    # ``rand < keep_prob``, not ``bernoulli_(keep_prob)``: torch.compile keeps a changed rate as a
    # symbolic input of these ops, where bernoulli_ would bake it in and recompile on every change
    uniform = torch.rand(shape, dtype=torch.promote_types(dtype, torch.float32), device=device)
    mask = (uniform < keep_prob).to(dtype)
    if scale_by_keep and keep_prob > 0.0:
        mask = mask / keep_prob
    return mask


def kept_count(batch: int, drop_prob: float) -> int:
    """How many of ``batch`` samples a fixed-count draw keeps: all at rate 0, none at rate 1,
    else ``max(1, round((1 - drop_prob) * batch))`` (Python's round: halves go to even)."""
    if drop_prob == 0.0:
        return batch
    if drop_prob == 1.0:
        return 0
    return max(1, round((1.0 - drop_prob) * batch))


def fixed_rows(batch: int, drop_prob: float, device: torch.device) -> Tensor:
    """``kept_count(batch, drop_prob)`` sample indices, uniform without replacement (the head
    of a random permutation): a shape known before the draw, no ``nonzero``, no host sync."""
    return torch.randperm(batch, device=device)[: kept_count(batch, drop_prob)]


def fixed_scale(batch: int, kept: int, scale_by_keep: bool) -> float:
    """What kept samples are multiplied by: ``batch / kept`` (the realised keep rate), or 1."""
    return batch / kept if scale_by_keep and kept else 1.0


def fixed_keep_mask(
    shape: tuple[int, ...],
    drop_prob: float,
    scale_by_keep: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Fixed-count keep mask of ``shape`` (the batch size in one dimension, ones elsewhere):
    ``fixed_scale`` on the ``fixed_rows`` samples, 0 on the others."""
    batch = max(shape)
    rows = fixed_rows(batch, drop_prob, device)
    value = fixed_scale(batch, rows.shape[0], scale_by_keep)
    mask = torch.zeros(batch, dtype=dtype, device=device).index_fill_(0, rows, value)
    return mask.view(shape)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: ``x + DropPath(p)(F(x))``.

    ``drop_prob`` and ``mode`` are plain attributes, so a schedule may change them between steps;
    they are checked again on every call. No parameters or buffers: ``state_dict()`` is empty.
    ``batch_dim`` is the dimension holding the samples: ``inject_droppath`` sets it from the
    captured run (1 on a sequence-first ``(T, B, C)`` branch).

    Args:
        drop_prob: the probability of dropping the branch, in [0, 1].
        mode: ``"row"`` (per sample, timm's), ``"batch"`` (one decision for the batch) or
            ``"fixed"`` (exactly ``kept_count(B, drop_prob)`` samples kept, DINOv2's).
        scale_by_keep: scale kept branches by ``1 / (1 - drop_prob)``.
        batch_dim: the dimension of the branch that holds the samples.

    Raises:
        ValueError: ``drop_prob`` outside [0, 1], or an unknown ``mode``.

    Example:
        >>> drop = DropPath(0.2)
        >>> drop
        DropPath(drop_prob=0.2, mode='row')
        >>> x = torch.randn(8, 16)
        >>> torch.equal(drop.eval()(x), x)
        True
    """

    batch_dim: int = 0  # a class default, so DropPaths pickled before it existed still load

    def __init__(
        self,
        drop_prob: float = 0.0,
        mode: Mode = "row",
        scale_by_keep: bool = True,
        batch_dim: int = 0,
    ) -> None:
        super().__init__()
        _check_drop_prob(drop_prob)
        check_mode(mode)
        self.drop_prob = drop_prob
        self.mode = mode
        self.scale_by_keep = scale_by_keep
        self.batch_dim = batch_dim

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(
            x, self.drop_prob, self.training, self.mode, self.scale_by_keep, self.batch_dim
        )

    def extra_repr(self) -> str:
        text = f"drop_prob={self.drop_prob:g}, mode={self.mode!r}"
        if self.batch_dim != 0:
            text += f", batch_dim={self.batch_dim}"
        return text if self.scale_by_keep else f"{text}, scale_by_keep=False"


def gather_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x.index_select(0, rows)`` in ``x``'s memory format (channels_last stays so)."""
    gathered = x.index_select(0, rows)
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return gathered.contiguous(memory_format=torch.channels_last)
    return gathered


class SkippingDropPath(DropPath):
    """``skip + DropPath(branch(*inputs))`` that does not compute what it drops.

    ``mode="batch"``: a dropped branch is not run. ``mode="row"``: the branch runs on the kept
    samples only, the inputs flagged in ``per_sample`` gathered by row (``None``: always mask).
    While any module in ``batch_norms`` trains, rows are not gathered (their batch statistics
    would change) unless ``gather_batch_norm``. The branch is a plain attribute, not a child:
    its modules belong to the block that holds this module, so ``state_dict()`` keys stay.
    Keep decisions are drawn like ``drop_path``'s; batch-mode ones on the CPU (no device sync).
    """

    branch: Callable[..., Tensor]
    batch_norms: list[nn.Module]

    def __init__(
        self,
        branch: Callable[..., Tensor],
        per_sample: tuple[bool, ...] | None,
        batch_norms: Sequence[nn.Module] = (),
        drop_prob: float = 0.0,
        mode: Mode = "row",
        gather_batch_norm: bool = False,
    ) -> None:
        super().__init__(drop_prob, mode)
        # plain attributes, past nn.Module.__setattr__, which would register them as children
        object.__setattr__(self, "branch", branch)
        object.__setattr__(self, "batch_norms", list(batch_norms))
        self.per_sample = per_sample
        self.gather_batch_norm = gather_batch_norm

    def forward(self, skip: Tensor, *inputs: object) -> Tensor:
        _check_drop_prob(self.drop_prob)
        check_mode(self.mode)
        if not self.training or self.drop_prob == 0.0:
            return skip + self.branch(*inputs)
        if self.mode == "batch":
            return self._batch(skip, inputs)
        if self.per_sample is None or (
            not self.gather_batch_norm and any(m.training for m in self.batch_norms)
        ):
            return skip + drop_path(self.branch(*inputs), self.drop_prob, True, self.mode)
        if self.mode == "fixed":
            return self._fixed(skip, inputs)
        return self._rows(skip, inputs)

    def _mask(self, skip: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return keep_mask(shape, self.drop_prob, self.scale_by_keep, skip.dtype, device)

    def _batch(self, skip: Tensor, inputs: tuple[object, ...]) -> Tensor:
        mask = self._mask(skip, (1,) * skip.ndim, torch.device("cpu"))
        if not mask.any():
            return skip.clone()  # a new tensor, as the add made: later in-place ops stay safe
        return skip + self.branch(*inputs) * mask.to(skip.device)

    def _rows(self, skip: Tensor, inputs: tuple[object, ...]) -> Tensor:
        batch = skip.shape[0]
        mask = self._mask(skip, (batch,) + (1,) * (skip.ndim - 1), skip.device)
        kept = mask.view(-1).nonzero().squeeze(1)
        if kept.numel() == 0:
            return skip.clone()
        if kept.numel() == batch:
            return skip + self.branch(*inputs) * mask
        return self._add_rows(skip, inputs, kept, mask.index_select(0, kept))

    def _fixed(self, skip: Tensor, inputs: tuple[object, ...]) -> Tensor:
        """Fixed-count rows: static shapes, so compiled code needs no guard on the draw."""
        batch = skip.shape[0]
        rows = fixed_rows(batch, self.drop_prob, skip.device)
        if rows.shape[0] == 0:
            return skip.clone()
        scale = fixed_scale(batch, rows.shape[0], self.scale_by_keep)
        return self._add_rows(skip, inputs, rows, scale)

    def _add_rows(
        self, skip: Tensor, inputs: tuple[object, ...], kept: Tensor, scale: Tensor | float
    ) -> Tensor:
        """``skip`` plus the branch run on the ``kept`` rows (times ``scale``) at those rows."""
        batch = skip.shape[0]
        gathered = [
            gather_rows(x, kept) if flag and isinstance(x, Tensor) and len(x) == batch else x
            for x, flag in zip(inputs, self.per_sample or (), strict=True)
        ]
        kept_out = self.branch(*gathered) * scale
        dtype = torch.promote_types(skip.dtype, kept_out.dtype)
        out = skip.to(dtype).clone()  # clone keeps the memory format, out-of-place index_add not
        return out.index_add_(0, kept, kept_out.to(dtype))

    def extra_repr(self) -> str:
        how = "whole branch" if self.mode == "batch" else "kept rows"
        if self.mode == "row" and self.per_sample is None:
            how = "mask"
        return f"{super().extra_repr()}, skips={how}"
