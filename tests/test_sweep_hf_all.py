"""The CI subset of ``sweeps.hf_all``: one model type per family the rule must get right.

Each model type is built small from its transformers config, injected and checked once (the
checks of ``sweeps.hf_invariants``); each invariant is its own test. Invariants that do not
hold today are strict xfails naming the issue 19 class they belong to: flip them when it is
fixed.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]
pytest.importorskip("transformers")

#: model type -> what it exercises
SUBSET = {
    "llama": "decoder, pre-norm, rotary",
    "gpt2": "decoder, Conv1D projections",
    "bert": "encoder, post-norm",
    "deberta": "encoder, disentangled relative attention",
    "t5": "encoder-decoder, sublayers in a ModuleList of their own",
    "bart": "encoder-decoder, post-norm",
    "fsmt": "fairseq-style encoder-decoder, sequence-first (T, B, C) layers",
    "whisper": "audio encoder-decoder (input_features)",
    "wav2vec2": "audio encoder (input_values), convolutional position embedding",
    "vit": "vision transformer",
    "convnext": "convolutional stages (depths)",
    "clip": "composite: text and vision towers",
    "gpt_neox": "parallel attention and MLP",
    "falcon": "parallel attention and MLP",
    "qwen2_moe": "mixture of experts with a shared expert",
    "mamba": "state-space layers writing a cache",
}

_POSITIONS = "open: wav2vec2's convolutional position embedding (x + conv(x)) counts as a block"

#: (model type, check value) -> why it does not hold today
KNOWN: dict[tuple[str, str], str] = {
    ("wav2vec2", "blocks = layers"): _POSITIONS,
}

CHECKS = (
    "eval equal",
    "train at 0 equal",
    "blocks = layers",
    "same sites per layer",
    "every site attached",
    "rows over batch",
    "no raw exception",
    "no silent skip",
)


def _sweep() -> Any:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("sweeps.hf_all")


@cache
def _result(model_type: str) -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sweep().sweep_type(model_type)
    finally:
        torch.set_num_threads(threads)


def test_checks_are_the_sweeps() -> None:
    assert tuple(check.value for check in _sweep().Check) == CHECKS


def _cases() -> list[Any]:
    cases = []
    for model_type in SUBSET:
        for check in CHECKS:
            known = KNOWN.get((model_type, check))
            marks = [pytest.mark.xfail(strict=True, reason=known)] if known else []
            cases.append(pytest.param(model_type, check, marks=marks, id=f"{model_type}-{check}"))
    return cases


@pytest.mark.parametrize(("model_type", "check"), _cases())
def test_invariant(model_type: str, check: str) -> None:
    result = _result(model_type)
    assert result.outcome.built, result.reason
    verdict = result.verdict(_sweep().Check(check))
    assert verdict is not None and verdict.passed is True, verdict


@pytest.mark.parametrize("model_type", SUBSET)
def test_layers_read_from_the_config(model_type: str) -> None:
    """The truth the blocks are held to: 2 layers per stack, as the small config sets them."""
    two_stacks = {"t5", "bart", "fsmt", "whisper", "clip"}  # encoder + decoder, text + vision
    expected = (4,) if model_type == "convnext" else (2, 2) if model_type in two_stacks else (2,)
    assert _result(model_type).layers == expected  # convnext: depths 1 x 4 stages


def _hang(model_type: str) -> Any:
    while True:  # busy: stopped by the CPU-time limit
        pass


def _die(model_type: str) -> Any:
    import os

    os._exit(3)


def test_a_hung_or_dying_model_type_does_not_stop_the_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each model type runs in a forked process: one over its CPU-time limit is stopped, one
    that dies is reported, and the sweep goes on."""
    sweep = _sweep()
    monkeypatch.setattr(sweep, "_warm_up", lambda: None)  # it would run the fake here
    for fake, outcome in ((_hang, sweep.Outcome.TIMED_OUT), (_die, sweep.Outcome.CRASHED)):
        monkeypatch.setattr(sweep, "sweep_type", fake)
        [result] = sweep.run(["llama"], timeout=1.0)
        assert result.outcome is outcome, result
