"""PyTorch Lightning integration: ``DropPathCallback`` drives a ``DropPathScheduler``.

Importing this module imports ``lightning``; ``import droppath_inject`` does not.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from ..errors import CurriculumError
from ..scheduler import DropPathScheduler
from .stepping import LOG_KEY, LoopSteps

__all__ = ["LOG_KEY", "DropPathCallback"]


class DropPathCallback(Callback):
    """Steps a ``DropPathScheduler`` with Lightning's optimizer steps and logs its rate.

    When training starts, a curriculum set by fraction of training without ``total_steps`` is
    sized from ``trainer.estimated_stepping_batches``, and the scheduler goes to
    ``trainer.global_step`` (0, or the step ``fit(ckpt_path=...)`` resumes from), so optimizer
    step ``t`` (from 0) trains at ``max_drop_at(t)``, with gradient accumulation and in a
    resumed run too. After each training batch the scheduler follows the global step, and
    ``droppath_max_rate`` (the largest rate that batch trained with) is logged with
    ``pl_module.log``. The callback's state in a checkpoint is the scheduler's step and the
    length its curriculum was sized to, so a resumed run keeps the same curriculum even where
    its own estimate of the length differs (a run resumed with more epochs); a ``total_steps``
    given to the curriculum wins over both.

    Args:
        scheduler: the scheduler of the model the ``LightningModule`` trains.

    Raises:
        TypeError: ``scheduler`` is not a ``DropPathScheduler``.

    Example:
        >>> from droppath_inject.integrations.lightning import DropPathCallback
        >>> scheduler = DropPathScheduler.warmup(module.model, 0.1, fraction=0.1)  # doctest: +SKIP
        >>> callbacks = [DropPathCallback(scheduler)]  # doctest: +SKIP
        >>> trainer = Trainer(max_steps=1000, callbacks=callbacks)  # doctest: +SKIP
        >>> trainer.fit(module, loader, ckpt_path="last.ckpt")  # doctest: +SKIP
    """

    def __init__(self, scheduler: DropPathScheduler) -> None:
        self.steps = LoopSteps(scheduler)
        self.scheduler = scheduler

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Size a fraction-based curriculum from the trainer; go to its global step."""
        self.steps.begin(lambda: _length(trainer), trainer.global_step)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log the rate this batch trained with; after an optimizer step, apply the next one's."""
        pl_module.log(LOG_KEY, self.scheduler.max_drop, on_step=True, on_epoch=False)
        if trainer.global_step != self.scheduler.count:
            self.steps.after_step(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's step and the length of its curriculum (None: counted in steps)."""
        return {**self.scheduler.state_dict(), "total_steps": self.steps.total_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the saved step, on a curriculum of the saved length."""
        if state_dict.get("total_steps") is not None:
            self.steps.size(int(state_dict["total_steps"]))
        self.scheduler.load_state_dict(state_dict)


def _length(trainer: Trainer) -> int:
    """The optimizer steps of the whole run, as Lightning estimates them."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise CurriculumError(
            "this curriculum is set by fraction of training, but the Lightning run has no known "
            "length (no max_steps, and max_epochs=-1 or an iterable dataset): pass "
            "total_steps=... to the curriculum, or set Trainer(max_steps=...)"
        )
    return int(total)
