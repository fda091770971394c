"""Command-line options for inputs and checkpoints as users have them, inputs too large to
allocate, progress lines and ``--quiet``, and a core-only install (no numpy)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import ERROR_PREFIX, PROGRESS, SCRIPT, error_line, snapshot, tiny
from torch import nn

from droppath_inject.cli import checkpoints, main
from droppath_inject.cli.arguments import ExitCode
from droppath_inject.cli.sources import SourceKind, Spec, parse_source


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return x + self.fc(x)


class KeywordModel(nn.Module):
    """Called with keywords: ``model(x=..., scale=...)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x) * scale


def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.chdir(tmp_path)
    return main([*args])


def save(tmp_path: Path, model: nn.Module) -> None:
    torch.save(model, tmp_path / "model.pt")


# --- inputs ------------------------------------------------------------------------------------


def test_input_dtype_long_gives_token_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    save(tmp_path, TokenModel())
    code = cli(tmp_path, monkeypatch, "model.pt", "--trust-pickle", "--input-shape", "2,16",
               "--input-dtype", "long", "--quiet")  # fmt: skip
    assert code == ExitCode.OK, capsys.readouterr().err
    assert (tmp_path / "model_droppath.pt").exists()


def test_a_float_input_for_a_token_model_names_the_input_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    save(tmp_path, TokenModel())
    before = snapshot(tmp_path)
    code = cli(tmp_path, monkeypatch, "model.pt", "--trust-pickle", "--input-shape", "2,16")
    line = error_line(capsys.readouterr().err)
    assert code == ExitCode.MODEL
    assert "--input-dtype long" in line and "--example-inputs" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("model", "value"),
    [
        (TokenModel, torch.randint(0, 50, (2, 5))),
        (TokenModel, (torch.randint(0, 50, (2, 5)),)),
        (KeywordModel, {"x": torch.randn(2, 8), "scale": torch.ones(1)}),
    ],
    ids=["tensor", "tuple", "dict"],
)
def test_example_inputs_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    model: type[nn.Module],
    value: object,
) -> None:
    save(tmp_path, model())
    torch.save(value, tmp_path / "inputs.pt")
    code = cli(tmp_path, monkeypatch, "model.pt", "--trust-pickle", "--example-inputs",
               "inputs.pt", "--quiet")  # fmt: skip
    out = capsys.readouterr()
    assert code == ExitCode.OK, out.err
    assert "1 residual sites" in out.out or "1 residual site" in out.out


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: torch.save(["a", "b"], p), "holds a list of values beyond tensors"),
        (lambda p: p.write_text("not tensors"), "cannot read"),
        (lambda p: None, "no such file"),
    ],
    ids=["not tensors", "corrupt", "missing"],
)
def test_bad_example_inputs_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make: object,
    needle: str,
) -> None:
    save(tmp_path, TokenModel())
    make(tmp_path / "inputs.pt")  # type: ignore[operator]
    before = snapshot(tmp_path)
    code = cli(tmp_path, monkeypatch, "model.pt", "--trust-pickle", "--example-inputs", "inputs.pt")
    assert code == ExitCode.MODEL
    assert needle in error_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_an_input_too_large_to_allocate_is_an_input_error_naming_its_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    save(tmp_path, tiny())
    before = snapshot(tmp_path)
    code = cli(tmp_path, monkeypatch, "model.pt", "--trust-pickle", "--input-shape",
               "1,3,100000,100000")  # fmt: skip
    line = error_line(capsys.readouterr().err)
    assert code == ExitCode.MODEL
    assert "the example input 1x3x100000x100000 float32 needs 112 GiB" in line
    assert snapshot(tmp_path) == before


# --- checkpoints -------------------------------------------------------------------------------


def resnet_state_dict() -> dict[str, torch.Tensor]:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


@pytest.mark.parametrize(
    ("wrap", "said"),
    [
        (lambda sd: {"state_dict": sd, "epoch": 3}, 'took "state_dict" from the checkpoint'),
        (lambda sd: {"model": sd, "optimizer": {}}, 'took "model" from the checkpoint'),
        (
            lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
            'took "state_dict" from the checkpoint, removed "module." prefix',
        ),
        (
            lambda sd: {"state_dict": {"x": torch.zeros(1)}, "state_dict_ema": sd},
            'took "state_dict_ema" from the checkpoint',
        ),
    ],
    ids=["state_dict", "model", "ddp", "ema"],
)
def test_weights_are_unwrapped_and_the_output_says_how(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    wrap: object,
    said: str,
) -> None:
    torch.save(wrap(resnet_state_dict()), tmp_path / "ckpt.pt")  # type: ignore[operator]
    code = cli(tmp_path, monkeypatch, "torchvision:resnet18", "--weights", "ckpt.pt",
               "--dry-run", "--input-shape", "1,3,32,32", "--quiet")  # fmt: skip
    out = capsys.readouterr()
    assert code == ExitCode.OK, out.err
    assert f"weights: {said}\n" in out.out


def test_unwrapping_without_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback removes DDP and torch.compile prefixes, in either order, as timm does."""
    monkeypatch.setitem(sys.modules, "timm.models", None)  # import fails: the own fallback
    weight = torch.zeros(1)
    keys = {"module._orig_mod.a": weight, "_orig_mod.module.b": weight, "module.c": weight}
    unwrapped = checkpoints.unwrap({"model": keys})
    assert unwrapped is not None
    assert list(unwrapped.state_dict) == ["a", "b", "c"]
    assert unwrapped.describe() == (
        'took "model" from the checkpoint, removed "module.", "_orig_mod." prefixes'
    )


def test_a_plain_state_dict_is_not_reported_as_unwrapped() -> None:
    unwrapped = checkpoints.unwrap({"a": torch.zeros(1)})
    assert unwrapped is not None and unwrapped.describe() is None


# --- progress, --quiet, a core-only install ---------------------------------------------------


def run_script(
    *args: str, cwd: Path, extra_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    assert SCRIPT is not None
    paths = [str(extra_path) if extra_path else None, os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    return subprocess.run(
        [SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_progress_lines_and_quiet(tmp_path: Path) -> None:
    """One stderr line per stage with its elapsed time; --quiet: none, an error is one line."""
    save(tmp_path, tiny())
    args = ("model.pt", "--trust-pickle", "--input-shape", "1,3,8,8")
    loud = run_script(*args, cwd=tmp_path)
    assert loud.returncode == 0, loud.stderr
    lines = loud.stderr.splitlines()
    assert all(PROGRESS.match(line) for line in lines), loud.stderr
    stages = ["loaded model.pt", "ran the source model", "captured 1 residual sites", "saved",
              "loaded it back, re-verified"]  # fmt: skip
    assert len(lines) == len(stages)
    assert all(stage in line for stage, line in zip(stages, lines, strict=True)), lines
    quiet = run_script(*args, "--quiet", "-o", "quiet.pt", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == ""
    failed = run_script(*args, "--quiet", cwd=tmp_path)  # the output exists now
    assert failed.returncode == ExitCode.OUTPUT
    assert len(failed.stderr.splitlines()) == 1 and failed.stderr.startswith(ERROR_PREFIX)


HIDE_NUMPY = "import sys\nsys.modules['numpy'] = None  # as if numpy were not installed\n"


@pytest.mark.slow
def test_without_numpy_an_error_is_still_one_line(tmp_path: Path) -> None:
    """torch warns in two lines on import when numpy is missing; the command stays one line."""
    hidden = tmp_path / "no_numpy"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text(HIDE_NUMPY)
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env=dict(os.environ, PYTHONPATH=str(hidden)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "NumPy" in probe.stderr  # the simulation works: torch itself warns
    result = run_script("missing.pt", "--quiet", cwd=tmp_path, extra_path=hidden)
    assert result.returncode == ExitCode.SOURCE
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(ERROR_PREFIX)


# --- SOURCE parsed once ------------------------------------------------------------------------


def test_source_is_parsed_once_into_one_value() -> None:
    spec = parse_source("timm:resnet18", arch=None, weights=Path("w.pt"), trust_pickle=False)
    assert spec.kind is SourceKind.SPEC and spec.spec == Spec("timm", "resnet18")
    assert spec.input_files == [Path("w.pt")]
    assert spec.default_output() == Path("resnet18_droppath.pt")
    state = parse_source("d/w.pt", arch="torchvision:resnet18", weights=None, trust_pickle=False)
    assert state.kind is SourceKind.STATE_DICT and state.input_files == [Path("d/w.pt")]
    assert state.default_output() == Path("d/w_droppath.pt")
    model = parse_source("m.pt", arch=None, weights=None, trust_pickle=True)
    assert model.kind is SourceKind.MODEL_FILE and model.spec is None
    with pytest.raises(ValueError, match="--arch goes with a state_dict SOURCE"):
        parse_source("timm:resnet18", arch="timm:resnet18", weights=None, trust_pickle=False)
