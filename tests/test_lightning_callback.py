"""Lightning ``DropPathCallback``: real ``Trainer.fit`` runs on CPU, resumed from a checkpoint.

The rates each training forward runs with are read from the model's DropPath modules by a
forward pre-hook and compared with the curriculum's formula written out here; the logged rate
is read back from the CSV file Lightning's logger writes.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from droppath_inject import DropPath, DropPathScheduler, inject_droppath
from droppath_inject.errors import CurriculumError

pl = pytest.importorskip("lightning.pytorch")

from droppath_inject.integrations.lightning import (  # noqa: E402
    LOG_KEY,
    DropPathCallback,
    _length,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BLOCKS = 4
WIDTH = 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


def injected_mlp() -> nn.Module:
    """A 4-block residual MLP with random weights, injected: one DropPath per block."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(BLOCKS)], nn.Linear(WIDTH, 3))
    inject_droppath(model, max_drop=0.1, example_inputs=torch.randn(2, WIDTH))
    assert sum(isinstance(m, DropPath) for m in model.modules()) == BLOCKS
    return model


class Classifier(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, WIDTH, generator=generator), torch.arange(64) % 3)
    return DataLoader(data, batch_size=4)


def record_training_rates(model: nn.Module) -> list[list[float]]:
    """Per training forward, the rates of the model's DropPaths in module order."""
    seen: list[list[float]] = []

    def hook(module: nn.Module, args: object) -> None:
        if module.training:
            seen.append([m.drop_prob for m in module.modules() if isinstance(m, DropPath)])

    model.register_forward_pre_hook(hook)
    return seen


def trainer(root: Path, max_steps: int, **options: Any) -> Any:
    settings: dict[str, Any] = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        **options,
    }
    return pl.Trainer(**settings)


def depth_rates(max_drop: float) -> list[float]:
    """The linear depth schedule written out: block i of L at max_drop * i / (L - 1)."""
    return [max_drop * i / (BLOCKS - 1) for i in range(BLOCKS)]


def warmup_rate(step: int, total: int) -> float:
    """Linear warm-up to 0.3 over half of ``total`` optimizer steps, then held."""
    return 0.3 * min(step / (0.5 * total), 1.0)


def test_fit_applies_and_logs_the_curriculum(tmp_path: Path) -> None:
    """Warm-up over half of training, sized from the trainer; two batches per optimizer step."""
    model = injected_mlp()
    scheduler = DropPathScheduler.warmup(model, 0.3, fraction=0.5)  # length from the trainer
    forwards = record_training_rates(model)
    logger = pl.loggers.CSVLogger(str(tmp_path), name="run")
    run = trainer(
        tmp_path, 6, logger=logger, log_every_n_steps=1, accumulate_grad_batches=2,
        callbacks=[DropPathCallback(scheduler)],
    )  # fmt: skip
    run.fit(Classifier(model), loader())

    assert len(forwards) == 2 * 6
    for index, rates in enumerate(forwards):
        expected = depth_rates(warmup_rate(index // 2, 6))
        assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15), (index, rates)
    assert scheduler.count == 6 and scheduler.max_drop == pytest.approx(0.3, rel=1e-12)

    with open(Path(logger.log_dir) / "metrics.csv") as file:
        logged = [row for row in csv.DictReader(file) if row.get(LOG_KEY)]
    # the rate of each optimizer step's last batch, logged at that step
    assert [float(row[LOG_KEY]) for row in logged] == pytest.approx(
        [warmup_rate(step, 6) for step in range(6)], rel=1e-6, abs=1e-12
    )


def test_resumed_fit_continues_the_curriculum(tmp_path: Path) -> None:
    """A run checkpointed at step 3 of 8 and resumed from it (new model object, new scheduler
    at step 0, new trainer) trains step k at the rates the uninterrupted run had at step k."""
    model = injected_mlp()
    uninterrupted = record_training_rates(model)
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1
    )
    first = trainer(tmp_path, 8, enable_checkpointing=True, callbacks=[
        DropPathCallback(DropPathScheduler.warmup(model, 0.3, fraction=0.5)), checkpoints
    ])  # fmt: skip
    first.fit(Classifier(model), loader())
    assert len(uninterrupted) == 8
    saved = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    state = torch.load(saved, weights_only=False)["callbacks"]
    assert state["DropPathCallback"] == {"count": 3, "total_steps": 8}

    resumed_model = injected_mlp()
    resumed = record_training_rates(resumed_model)
    scheduler = DropPathScheduler.warmup(resumed_model, 0.3, fraction=0.5)
    assert scheduler.count == 0
    second = trainer(tmp_path, 8, callbacks=[DropPathCallback(scheduler)])
    second.fit(Classifier(resumed_model), loader(), ckpt_path=str(saved))
    assert len(resumed) == 5
    assert resumed == uninterrupted[3:]
    for step, rates in enumerate(resumed, start=3):  # and both are the formula
        assert rates == pytest.approx(depth_rates(warmup_rate(step, 8)), rel=1e-12, abs=1e-15)


def test_resumed_fit_keeps_the_curriculums_length(tmp_path: Path) -> None:
    """A run of 8 steps resumed at step 2 as a longer one (max_steps 12): the warm-up stays the
    one of 8 steps the checkpoint was trained on."""
    model = injected_mlp()
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1
    )
    first = trainer(tmp_path, 8, enable_checkpointing=True, callbacks=[
        DropPathCallback(DropPathScheduler.warmup(model, 0.3, fraction=0.5, shape="linear")),
        checkpoints,
    ])  # fmt: skip
    first.fit(Classifier(model), loader())

    resumed_model = injected_mlp()
    resumed = record_training_rates(resumed_model)
    scheduler = DropPathScheduler.warmup(resumed_model, 0.3, fraction=0.5)
    second = trainer(tmp_path, 12, callbacks=[DropPathCallback(scheduler)])
    saved = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    second.fit(Classifier(resumed_model), loader(), ckpt_path=str(saved))
    assert len(resumed) == 10
    for step, rates in enumerate(resumed, start=2):
        assert rates == pytest.approx(depth_rates(warmup_rate(step, 8)), rel=1e-12, abs=1e-15)


def test_a_run_of_unknown_length_cannot_size_a_fraction() -> None:
    endless = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(CurriculumError, match="Trainer\\(max_steps=...\\)"):
        _length(endless)  # type: ignore[arg-type]
    assert _length(SimpleNamespace(estimated_stepping_batches=40)) == 40  # type: ignore[arg-type]


def test_callback_takes_only_a_scheduler() -> None:
    with pytest.raises(TypeError, match="DropPathCallback takes a DropPathScheduler, got float"):
        DropPathCallback(0.1)  # type: ignore[arg-type]


@pytest.mark.slow
def test_importing_the_package_does_not_import_lightning() -> None:
    code = textwrap.dedent(
        """
        import sys
        import droppath_inject
        import droppath_inject.integrations
        import droppath_inject.integrations.stepping
        assert "lightning" not in sys.modules, "lightning imported"
        import droppath_inject.integrations.lightning
        assert "lightning" in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
