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
