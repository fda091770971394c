"""What the training-loop callbacks share: a ``DropPathScheduler`` driven by the loop's step.

Both ``DropPathCallback``s (Hugging Face, Lightning) follow the same rule: when training starts,
a curriculum set by fraction of training gets the run's length, and the scheduler goes to the
loop's global step (0, or the step a resumed run restarts from); after each optimizer step it
goes to the next one. The rate each step trained with is kept for logging. Importing this
module imports no training library.
"""

from __future__ import annotations

from collections.abc import Callable

from ..curricula import Curriculum
from ..scheduler import DropPathScheduler

#: The key the largest drop rate is logged under, beside the loss and the learning rate.
LOG_KEY = "droppath_max_rate"


class LoopSteps:
    """A ``DropPathScheduler`` following a training loop's optimizer steps.

    Optimizer step ``t`` (from 0) trains at ``max_drop_at(t)``, in a resumed run too, since the
    step is read from the loop rather than counted here.

    Args:
        scheduler: the scheduler of the model the loop trains.
        owner: the callback's name, for the error message.

    Raises:
        TypeError: ``scheduler`` is not a ``DropPathScheduler``.

    Example:
        >>> import torchvision
        >>> from droppath_inject import inject_droppath
        >>> model = inject_droppath(torchvision.models.resnet18(), max_drop=0.1)
        >>> steps = LoopSteps(DropPathScheduler.warmup(model, 0.2, fraction=0.5))
        >>> steps.begin(lambda: 10, global_step=2)
        >>> steps.after_step(3)
        >>> round(steps.trained_rate, 4), round(steps.scheduler.max_drop, 4)
        (0.08, 0.12)
    """

    def __init__(self, scheduler: DropPathScheduler, owner: str = "DropPathCallback") -> None:
        if not isinstance(scheduler, DropPathScheduler):
            raise TypeError(f"{owner} takes a DropPathScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.trained_rate = scheduler.max_drop

    @property
    def total_steps(self) -> int | None:
        """The length a fraction-based curriculum is sized to; None otherwise or until known."""
        curriculum = self.scheduler.max_drop_at
        if isinstance(curriculum, Curriculum) and curriculum.by_fraction:
            return curriculum.total_steps
        return None

    def size(self, total_steps: int) -> None:
        """Give a fraction-based curriculum that does not know its length ``total_steps``."""
        curriculum = self.scheduler.max_drop_at
        if isinstance(curriculum, Curriculum) and curriculum.needs_total_steps:
            self.scheduler.max_drop_at = curriculum.sized(total_steps)

    def begin(self, total_steps: Callable[[], int], global_step: int) -> None:
        """At the start of training: size the curriculum (``total_steps()`` is called only when
        it is needed) and go to ``global_step``."""
        curriculum = self.scheduler.max_drop_at
        if isinstance(curriculum, Curriculum) and curriculum.needs_total_steps:
            self.size(total_steps())
        self.trained_rate = self.scheduler.set_step(global_step)

    def after_step(self, global_step: int) -> None:
        """After an optimizer step: remember the rate it trained with, apply the next step's."""
        self.trained_rate = self.scheduler.max_drop
        self.scheduler.set_step(global_step)
