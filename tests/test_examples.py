"""The runnable examples, run as a user runs them: each script in a subprocess with ``--smoke``.

Saved checkpoints are checked against the unmodified architecture built here, with timm and
torchvision directly, not by the example's own code.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


def run_example(script: str, *args: str | Path) -> str:
    """Run ``examples/<script> --smoke ARGS``; assert exit 0 and return its stdout."""
    command = [sys.executable, str(EXAMPLES / script), "--smoke", *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def assert_finetune_output(stdout: str, num_sites: int, num_blocks: int) -> None:
    """The report, a warmup reaching --max-drop, a final accuracy, and a clean removal."""
    assert f"{num_sites} residual sites in {num_blocks} blocks" in stdout
    assert stdout.count(" injected") == num_sites
    assert "verification: eval outputs bit-identical" in stdout
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert "max drop 0.0000" in steps[0] and "max drop 0.1000" in steps[-1]
    assert "final validation accuracy: " in stdout
    assert "removed DropPath: eval outputs bit-identical: True" in stdout


def test_finetune_timm_vit(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    out = tmp_path / "vit.pt"
    stdout = run_example("finetune_timm_vit.py", "--out", out)
    assert_finetune_output(stdout, num_sites=24, num_blocks=12)
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    plain.load_state_dict(torch.load(out, weights_only=True))


def test_finetune_torchvision_resnet(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    out = tmp_path / "resnet.pt"
    stdout = run_example("finetune_torchvision_resnet.py", "--out", out)
    assert_finetune_output(stdout, num_sites=8, num_blocks=8)
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(torch.load(out, weights_only=True))


def step_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("step ")]


def test_finetune_lightning(tmp_path: Path) -> None:
    """Three steps with a checkpoint at step 2, then a run resumed from it: the resumed run's
    step 3 trains at the end of the 2-step warm-up, as the first run's step 3 did."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("lightning")
    out, checkpoints = tmp_path / "convnext.pt", tmp_path / "checkpoints"
    stdout = run_example(
        "finetune_lightning.py", "--out", out, "--checkpoint-dir", checkpoints, "--save-every", 2
    )
    blocks = timm.create_model("convnext_atto", num_classes=10).stages
    assert_finetune_output(stdout, num_sites=12, num_blocks=sum(len(s.blocks) for s in blocks))
    plain = timm.create_model("convnext_atto", num_classes=10)
    plain.load_state_dict(torch.load(out, weights_only=True))
    assert [line.split()[1] for line in step_lines(stdout)] == ["1", "3"]

    resumed = run_example("finetune_lightning.py", "--resume", checkpoints / "epoch=0-step=2.ckpt")
    (line,) = step_lines(resumed)
    assert line.startswith("step    3 ") and "max drop 0.1000" in line


def test_finetune_lora_llama_layerdrop(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path / "llama"
    stdout = run_example("finetune_lora_llama_layerdrop.py", "--skip-compute", "--out", out)
    layers = 4  # the example's tiny Llama: 2 residual branches per decoder layer
    assert f"{2 * layers} residual sites in {layers} blocks" in stdout
    assert f"granularity block: {layers} skips compute" in stdout
    steps = step_lines(stdout)
    assert "max drop 0.0000" in steps[0] and "max drop 0.2000" in steps[-1]
    assert "merged LoRA into LlamaForCausalLM" in stdout
    assert "removed DropPath: eval outputs bit-identical: True" in stdout
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == layers
    assert not info["missing_keys"] and not info["unexpected_keys"]  # LoRA merged, no adapters


def test_finetune_on_an_image_folder(tmp_path: Path) -> None:
    """``--data``: an ImageFolder with train/ and val/, its number of classes taken from it."""
    image = pytest.importorskip("PIL.Image")
    pytest.importorskip("torchvision")
    for split in ("train", "val"):
        for label in ("cat", "dog", "fox"):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                image.new("RGB", (40, 36), (60 * i, 90, 30)).save(folder / f"{i}.png")
    out = tmp_path / "resnet.pt"
    stdout = run_example(
        "finetune_torchvision_resnet.py", "--data", tmp_path / "data", "--out", out
    )
    assert_finetune_output(stdout, num_sites=8, num_blocks=8)
    assert torch.load(out, weights_only=True)["fc.weight"].shape[0] == 3


def test_digits_experiment(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    report = tmp_path / "digits.json"
    stdout = run_example("digits_experiment.py", "--json", report)
    assert "digits: 898 train / 899 validation samples" in stdout
    assert "| max_drop | val accuracy | val loss | train loss | gap (val - train loss) |" in stdout
    for max_drop in ("0", "0.1", "0.2"):
        assert f"max_drop {max_drop}: mean val accuracy " in stdout
    runs = json.loads(report.read_text())["runs"]
    assert sorted((r["max_drop"], r["seed"]) for r in runs) == [
        (d, s) for d in (0.0, 0.1, 0.2) for s in (0, 1)
    ]
    for r in runs:
        assert 0.0 <= r["val_acc"] <= 1.0
        assert r["gap"] == pytest.approx(r["val_loss"] - r["train_loss"])


def test_digits_p_values_are_corrected_for_multiple_comparisons(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Holm-Bonferroni over the table's comparisons: a lone p = 0.049 among six is not a find."""
    pytest.importorskip("sklearn")
    path = Path(__file__).parent.parent / "examples" / "digits_experiment.py"
    spec = importlib.util.spec_from_file_location("digits_experiment", path)
    assert spec is not None and spec.loader is not None
    digits = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "digits_experiment", digits)  # for its dataclasses
    spec.loader.exec_module(digits)
    raw = {(0.1, "a"): 0.01, (0.1, "b"): 0.04, (0.2, "a"): 0.03}
    expected = {(0.1, "a"): 0.03, (0.2, "a"): 0.06, (0.1, "b"): 0.06}
    assert digits.holm(raw) == pytest.approx(expected)
    text = digits.verdict(-0.0047, 0.049, 0.294, "val_acc")
    assert "Holm 0.294: no significant difference" in text
