"""DropPathCallback: a real Hugging Face Trainer run on a tiny Llama, and the lazy import.

The rates each training forward runs with are read from the model's DropPath modules by a
forward pre-hook and compared with the curriculum's formula written out here; the Trainer's
own log history must hold the rate each logged step trained with.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from droppath_inject import (
    DropPath,
    DropPathScheduler,
    DropPathWarning,
    inject_droppath,
    remove_droppath,
)
from droppath_inject.layer_drop import skips_of

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from droppath_inject.integrations.huggingface import LOG_KEY, DropPathCallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = 3
SEQUENCE = 8
VOCAB = 64


def tiny_llama() -> nn.Module:
    """A 3-layer Llama with random weights (nothing downloaded), injected at rate 0.1."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, VOCAB, (2, SEQUENCE), generator=torch.Generator().manual_seed(1))
    inject_droppath(model, max_drop=0.1, example_inputs={"input_ids": ids})
    return model


def token_dataset(size: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, VOCAB, (SEQUENCE,), generator=generator) for _ in range(size)]
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def training_arguments(output_dir: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": 5,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "report_to": [],
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


class LogRecorder(transformers.TrainerCallback):
    """Keeps a copy of every ``logs`` dict it is given (it runs after DropPathCallback)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        self.seen.append(dict(logs or {}))


def record_training_rates(model: nn.Module) -> list[list[float]]:
    """Per training forward, the rates of the model's DropPaths in module order."""
    seen: list[list[float]] = []

    def hook(module: nn.Module, args: object, kwargs: object) -> None:
        if module.training:
            seen.append([m.drop_prob for m in module.modules() if isinstance(m, DropPath)])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def warmup_rate(step: int) -> float:
    """Warm-up over 0.8 of 5 steps (4 steps) to 0.4, linear: 0.1 per step, then 0.4."""
    return 0.4 * min(step / (0.8 * 5), 1.0)


def test_trainer_run_applies_and_logs_the_curriculum(tmp_path: Path) -> None:
    model = tiny_llama()
    scheduler = DropPathScheduler.warmup(model, 0.4, fraction=0.8)  # sized from max_steps
    recorder = LogRecorder()
    forwards = record_training_rates(model)
    trainer = transformers.Trainer(
        model=model,
        args=training_arguments(tmp_path, gradient_accumulation_steps=2),
        train_dataset=token_dataset(20),
        callbacks=[DropPathCallback(scheduler), recorder],
    )
    trainer.train()

    # two micro-batches per optimizer step, both at that step's rates, spread linearly by depth
    assert len(forwards) == 2 * 5
    depth = [i / (LAYERS - 1) for i in range(LAYERS) for _ in range(2)]  # 2 residuals per layer
    for index, rates in enumerate(forwards):
        step = index // 2
        expected = [warmup_rate(step) * d for d in depth]
        assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15), (index, rates)
    assert scheduler.count == 5 and scheduler.max_drop == pytest.approx(0.4, rel=1e-12)

    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in step_logs] == [1, 2, 3, 4, 5]
    for entry in step_logs:  # the rate the logged step trained with, as learning_rate
        assert entry[LOG_KEY] == pytest.approx(warmup_rate(entry["step"] - 1), rel=1e-12)
    later = [logs for logs in recorder.seen if "loss" in logs]
    assert [logs[LOG_KEY] for logs in later] == [entry[LOG_KEY] for entry in step_logs]


def test_resumed_trainer_run_continues_the_curriculum(tmp_path: Path) -> None:
    """A run saved at step 3 of 6 and resumed from that checkpoint with
    ``train(resume_from_checkpoint=...)`` (new model object, new scheduler at step 0, new
    Trainer) trains step k at the rates the uninterrupted run had at step k."""
    arguments = {"max_steps": 6, "save_strategy": "steps", "save_steps": 3}
    model = tiny_llama()
    uninterrupted = record_training_rates(model)
    trainer = transformers.Trainer(
        model=model,
        args=training_arguments(tmp_path, **arguments),
        train_dataset=token_dataset(20),
        callbacks=[DropPathCallback(DropPathScheduler.warmup(model, 0.4, fraction=0.8))],
    )
    trainer.train()
    assert len(uninterrupted) == 6

    resumed_model = tiny_llama()
    resumed = record_training_rates(resumed_model)
    scheduler = DropPathScheduler.warmup(resumed_model, 0.4, fraction=0.8)
    assert scheduler.count == 0
    trainer = transformers.Trainer(
        model=resumed_model,
        args=training_arguments(tmp_path, **arguments),
        train_dataset=token_dataset(20),
        callbacks=[DropPathCallback(scheduler)],
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert len(resumed) == 3
    assert resumed == uninterrupted[3:]
    depth = [i / (LAYERS - 1) for i in range(LAYERS) for _ in range(2)]
    for step, rates in enumerate(resumed, start=3):  # and both are the formula (6-step sizing)
        expected = [0.4 * min(step / (0.8 * 6), 1.0) * d for d in depth]
        assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15), (step, rates)
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in step_logs][-3:] == [4, 5, 6]
    for entry in step_logs[-3:]:
        assert entry[LOG_KEY] == pytest.approx(0.4 * min((entry["step"] - 1) / 4.8, 1.0))


def test_trainer_run_skips_dropped_rows_with_the_cache_on(tmp_path: Path) -> None:
    """Layer drop under a Trainer that keeps the cache on (``use_cache=True``; the Trainer turns
    it off by default): every training forward gets a fresh cache, which the kept rows fill, so
    no layer falls back to the mask."""
    model = tiny_llama()
    remove_droppath(model)
    ids = torch.randint(0, VOCAB, (2, SEQUENCE), generator=torch.Generator().manual_seed(1))
    options = {"granularity": "block", "skip_compute": True}
    inject_droppath(model, max_drop=0.5, example_inputs={"input_ids": ids}, **options)
    trainer = transformers.Trainer(
        model=model,
        args=training_arguments(tmp_path, per_device_train_batch_size=4, use_cache=True),
        train_dataset=token_dataset(20),
        callbacks=[DropPathCallback(DropPathScheduler.warmup(model, 0.5, steps=2))],
    )
    assert model.config.use_cache
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropPathWarning)
        trainer.train()
    skips = skips_of(model).values()
    assert len(skips) == LAYERS
    assert all(s.masked_calls == 0 for s in skips)
    assert sum(s.gathered_calls + s.skipped_calls for s in skips) > 0


def test_training_starts_at_the_trainers_global_step_and_keeps_a_given_length() -> None:
    """A resumed run (global_step 6 of 10) trains at step 6's rates; total_steps given wins."""
    model = tiny_llama()
    scheduler = DropPathScheduler.anneal(model, 0.3, fraction=1.0, total_steps=20, shape="linear")
    callback = DropPathCallback(scheduler)
    state = transformers.TrainerState(max_steps=10, global_step=6)
    callback.on_train_begin(None, state, transformers.TrainerControl())  # type: ignore[arg-type]
    assert scheduler.count == 6
    assert scheduler.max_drop == pytest.approx(0.3 * (1 - 6 / 20), rel=1e-12)


def test_callback_takes_only_a_scheduler() -> None:
    with pytest.raises(TypeError, match="DropPathCallback takes a DropPathScheduler, got float"):
        DropPathCallback(0.1)  # type: ignore[arg-type]


@pytest.mark.slow
def test_importing_the_package_does_not_import_transformers() -> None:
    code = textwrap.dedent(
        """
        import sys
        import droppath_inject
        import droppath_inject.integrations
        assert "transformers" not in sys.modules, "transformers imported"
        assert "accelerate" not in sys.modules, "accelerate imported"
        import droppath_inject.integrations.huggingface
        assert "transformers" in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
