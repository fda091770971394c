"""Hugging Face ``Trainer`` integration: ``DropPathCallback`` drives a ``DropPathScheduler``.

Importing this module imports ``transformers``; ``import droppath_inject`` does not.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..scheduler import DropPathScheduler
from .stepping import LOG_KEY, LoopSteps

__all__ = ["LOG_KEY", "DropPathCallback"]


class DropPathCallback(TrainerCallback):
    """Steps a ``DropPathScheduler`` with the Trainer's optimizer steps and logs its rate.

    When training starts, a curriculum set by fraction of training without ``total_steps`` is
    sized from the Trainer's ``max_steps``, and the scheduler goes to the Trainer's global step
    (0, or the step a resumed run restarts from), so optimizer step ``t`` (from 0) trains at
    ``max_drop_at(t)`` in a resumed run too. After each optimizer step the scheduler moves to
    the next step, as the Trainer's learning rate scheduler does. Every log gets
    ``droppath_max_rate``: the largest rate the latest optimizer step trained with (as
    ``learning_rate`` is the learning rate it used). It is added to the Trainer's
    ``state.log_history`` and seen by the callbacks after this one; the integrations
    ``report_to`` names are called before it, so to send the rate to one of them pass it
    after this callback instead (``report_to="none"``, ``callbacks=[DropPathCallback(s),
    TensorBoardCallback()]``).

    Args:
        scheduler: the scheduler of the model the Trainer trains.

    Example:
        >>> from droppath_inject.integrations.huggingface import DropPathCallback
        >>> scheduler = DropPathScheduler.warmup(model, 0.1, fraction=0.1)  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=data,  # doctest: +SKIP
        ...                   callbacks=[DropPathCallback(scheduler)])
    """

    def __init__(self, scheduler: DropPathScheduler) -> None:
        self.steps = LoopSteps(scheduler)
        self.scheduler = scheduler

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Size a fraction-based curriculum from ``state.max_steps``; go to the global step."""
        self.steps.begin(lambda: state.max_steps, state.global_step)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """After an optimizer step: apply the rates of the next one."""
        self.steps.after_step(state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add ``droppath_max_rate`` to ``logs`` and to the matching ``state.log_history`` entry."""
        if logs is None:
            return
        history = state.log_history
        recorded = bool(history) and all(history[-1].get(k) == v for k, v in logs.items())
        logs[LOG_KEY] = self.steps.trained_rate
        if recorded:  # the Trainer appends a copy of logs just before calling on_log
            history[-1][LOG_KEY] = self.steps.trained_rate
