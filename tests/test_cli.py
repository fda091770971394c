"""The ``droppath-inject`` command line, driven as a user drives it: the installed console script
(and ``python -m droppath_inject``) in a subprocess, on files written here with torch itself.

Written models are checked in yet another process, against references built here directly
with torchvision/timm, not by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

SCRIPT = shutil.which(
    "droppath-inject", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
)
ERROR_PREFIX = "droppath-inject: error: "
#: A progress line on stderr, e.g. ``[  1.2s] loaded torchvision:resnet18``.
PROGRESS = re.compile(r"^\[ *\d+\.\ds\] \S")
SMALL = "1,3,64,64"

# Classes for models that must fail verification; written to a module the subprocess can import.
HELPER_MODULE = '''
import types

import torch
from torch import nn


class SlowToSave(nn.Module):
    """A residual model whose pickling, once ``SLOW_SAVE_MARKER`` names a file, creates that
    file and then takes a minute: a write that SIGTERM can interrupt."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return x + self.conv(x)

    def __getstate__(self):
        import os, pathlib, time

        marker = os.environ.get("SLOW_SAVE_MARKER")
        if marker:
            pathlib.Path(marker).touch()
            time.sleep(60)
        return super().__getstate__()


class Drifting(nn.Module):
    """Eval outputs change on every call, so no rewrite of it can verify (the count is kept in
    an object: injection puts module attributes back after each run, not objects' state)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.clock = types.SimpleNamespace(calls=0)

    def forward(self, x):
        self.clock.calls += 1
        return x + self.conv(x) + self.clock.calls


class ChangesWhenReloaded(nn.Module):
    """Each unpickled copy adds one more to its outputs: its written file cannot verify."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.loads = 0

    def forward(self, x):
        return x + self.conv(x) + self.loads

    def __setstate__(self, state):
        super().__setstate__(state)
        self.loads += 1
'''

# Run in a fresh process: load the written model and a reference, compare them.
CHECK_WRITTEN = """
import json, sys, torch
from droppath_inject import DropPath
written = torch.load(sys.argv[1], weights_only=False)
reference = torch.load(sys.argv[2], weights_only=False) if sys.argv[2] != "-" else None
shape = [int(n) for n in sys.argv[3].split(",")]
x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
drop_paths = [m for m in written.modules() if isinstance(m, DropPath)]
result = {
    "class": type(written).__name__,
    "drop_paths": len(drop_paths),
    "rates": [m.drop_prob for m in drop_paths],
    "modes": sorted({m.mode for m in drop_paths}),
}
if reference is not None:
    written.eval(), reference.eval()
    with torch.no_grad():
        result["equal"] = torch.equal(written(x), reference(x))
    result["same_keys"] = list(written.state_dict()) == list(reference.state_dict())
print(json.dumps(result))
"""


def run_cli(
    *args: object, cwd: Path, module: bool = False, pythonpath: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the console script (or ``python -m droppath_inject``) with ``args`` in ``cwd``."""
    assert SCRIPT is not None, "the droppath-inject console script is not installed"
    command = [sys.executable, "-m", "droppath_inject"] if module else [SCRIPT]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def check_written(written: Path, reference: Path | None, shape: str = SMALL) -> dict:
    """What a new process finds in ``written``, and whether it computes what ``reference`` does."""
    result = subprocess.run(
        [sys.executable, "-c", CHECK_WRITTEN, str(written), str(reference or "-"), shape],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(result.stdout)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) and a hash of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def error_line(stderr: str) -> str:
    """The one error line of a failed run: its last line, every other line a progress line."""
    lines = stderr.splitlines()
    assert lines, "no error on stderr"
    assert all(PROGRESS.match(line) for line in lines[:-1]), stderr
    assert lines[-1].startswith(ERROR_PREFIX), stderr
    return lines[-1]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def seeded_resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18()


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A seeded resnet18 as a full pickle, a state_dict and a .safetensors file."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    directory = tmp_path_factory.mktemp("resnet")
    model = seeded_resnet18()
    files = {
        "pickle": directory / "resnet.pt",
        "state_dict": directory / "weights.pt",
        "safetensors": directory / "weights.safetensors",
    }
    torch.save(model, files["pickle"])
    torch.save(model.state_dict(), files["state_dict"])
    safetensors_torch.save_file(model.state_dict(), files["safetensors"])
    return files


def copy_into(source: Path, directory: Path, name: str | None = None) -> Path:
    target = directory / (name or source.name)
    shutil.copyfile(source, target)
    return target


def tiny() -> nn.Module:
    """A stem and one torchvision BasicBlock: one residual, classes any process can import."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), BasicBlock(4, 4))


def save_tiny(directory: Path, name: str = "model.pt") -> None:
    torch.save(tiny(), directory / name)


#: A trusted pickle of ``tiny()`` with an input shape that fits it.
TRUSTED = ("model.pt", "--trust-pickle", "--input-shape", "1,3,8,8")


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.slow
def test_resnet_pickle_round_trip(tmp_path: Path, resnet_files: dict[str, Path]) -> None:
    source = copy_into(resnet_files["pickle"], tmp_path, "model.pt")
    before = source.read_bytes()
    result = run_cli(source.name, "--trust-pickle", "--input-shape", SMALL, cwd=tmp_path)
    assert_ok(result)
    written = tmp_path / "model_droppath.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_droppath.pt"]
    assert source.read_bytes() == before
    assert "8 residual sites in 8 blocks" in result.stdout
    assert "layer4.1" in result.stdout
    assert "eval outputs bit-identical on input (1, 3, 64, 64) (1,000 elements)" in result.stdout
    assert f"wrote {written.name}; reloaded it: eval outputs bit-identical" in result.stdout
    found = check_written(written, resnet_files["pickle"], "2,3,64,64")
    assert found["class"] == "ResNet"
    assert found["drop_paths"] == 8
    assert found["rates"] == pytest.approx([0.1 * i / 7 for i in range(8)])
    assert found["equal"] and found["same_keys"]


@pytest.mark.slow
def test_timm_vit_pickle_round_trip(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    reference = tmp_path / "vit.pt"
    torch.save(vit, reference)
    (tmp_path / "out").mkdir()
    result = run_cli(
        "vit.pt", "--trust-pickle", "--input-shape", SMALL, "-o", "out/vit_dp.pt",
        "--schedule", "uniform", "--mode", "batch", "--max-drop", "0.2", "--json", "report.json",
        cwd=tmp_path, module=True,
    )  # fmt: skip
    assert_ok(result)
    assert "24 residual sites in 12 blocks" in result.stdout
    found = check_written(tmp_path / "out" / "vit_dp.pt", reference)
    assert found["class"] == "VisionTransformer"
    assert found["drop_paths"] == 24
    assert found["rates"] == [0.2] * 24 and found["modes"] == ["batch"]
    assert found["equal"] and found["same_keys"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["output"] == "out/vit_dp.pt" and report["num_blocks"] == 12
    assert len(report["sites"]) == 24 and {s["rate"] for s in report["sites"]} == {0.2}
    assert report["verification"]["passed"] and report["written_verification"]["passed"]
    assert report["written_verification"]["compared_elements"] == 1000


# Run in a fresh process: how the written model's blocks drop in training.
CHECK_LAYER_DROP = """
import json, sys, torch
from droppath_inject.block_gate import BlockDropPath
from droppath_inject.layer_skip import LayerSkip
written = torch.load(sys.argv[1], weights_only=False).train()
skips = [vars(block).get("forward") for block in written.blocks]
torch.manual_seed(0)
for _ in range(8):
    written(torch.randn(4, 3, 32, 32)).sum().backward()
print(json.dumps({
    "block_drop_paths": [
        sum(isinstance(m, BlockDropPath) for m in block.modules()) for block in written.blocks
    ],
    "layer_skips": sum(isinstance(skip, LayerSkip) for skip in skips),
    "skipped_or_gathered": sum(s.skipped_calls + s.gathered_calls for s in skips),
}))
"""


@pytest.mark.slow
def test_block_granularity_and_skip_compute_write_a_layer_dropping_model(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4)
    torch.save(vit, tmp_path / "vit.pt")
    result = run_cli(
        "vit.pt", "--trust-pickle", "--input-shape", "1,3,32,32", "--max-drop", "0.5",
        "--granularity", "block", "--skip-compute", "--json", "report.json", cwd=tmp_path,
    )  # fmt: skip
    assert_ok(result)
    report = json.loads((tmp_path / "report.json").read_text())
    layer_drop = report["layer_drop"]
    assert layer_drop["granularity"] == "block"
    assert [b["handling"] for b in layer_drop["blocks"]] == ["skips compute"] * len(vit.blocks)
    found = subprocess.run(
        [sys.executable, "-c", CHECK_LAYER_DROP, str(tmp_path / "vit_droppath.pt")],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    written = json.loads(found.stdout)
    assert written["block_drop_paths"] == [2] * len(vit.blocks)  # attention and MLP branches
    assert written["layer_skips"] == len(vit.blocks)
    assert written["skipped_or_gathered"] > 0  # at rates up to 0.5, 8 steps of 4 samples


@pytest.mark.slow
def test_spec_without_weights_writes_to_the_current_directory(tmp_path: Path) -> None:
    result = run_cli("torchvision:resnet18", "--input-shape", SMALL, cwd=tmp_path)
    assert_ok(result)
    assert "torchvision:resnet18 (ResNet, random init" in result.stdout
    assert "reloaded it: eval outputs bit-identical on input (1, 3, 64, 64)" in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["resnet18_droppath.pt"]
    reference = tmp_path.parent / f"{tmp_path.name}_keys_reference.pt"
    torch.save(seeded_resnet18(), reference)  # other weights: only the keys are compared
    found = check_written(tmp_path / "resnet18_droppath.pt", reference)
    assert found["drop_paths"] == 8 and found["same_keys"]
    reference.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["state_dict", "safetensors"])
def test_spec_with_weights(tmp_path: Path, resnet_files: dict[str, Path], kind: str) -> None:
    weights = copy_into(resnet_files[kind], tmp_path)
    result = run_cli(
        "torchvision:resnet18", "--weights", weights.name, "-o", "dp.pt", "--input-shape", SMALL,
        cwd=tmp_path,
    )  # fmt: skip
    assert_ok(result)
    assert f"weights from {weights.name}" in result.stdout
    found = check_written(tmp_path / "dp.pt", resnet_files["pickle"])
    assert found["drop_paths"] == 8 and found["equal"] and found["same_keys"]


@pytest.mark.slow
def test_state_dict_with_arch_writes_next_to_it(
    tmp_path: Path, resnet_files: dict[str, Path]
) -> None:
    (tmp_path / "ckpt").mkdir()
    copy_into(resnet_files["state_dict"], tmp_path / "ckpt")
    result = run_cli(
        "ckpt/weights.pt", "--arch", "torchvision:resnet18", "--input-shape", SMALL, cwd=tmp_path
    )
    assert_ok(result)
    found = check_written(tmp_path / "ckpt" / "weights_droppath.pt", resnet_files["pickle"])
    assert found["drop_paths"] == 8 and found["equal"]


@pytest.mark.slow
def test_timm_spec_dry_run(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    result = run_cli("timm:vit_tiny_patch16_224", "--dry-run", cwd=tmp_path, module=True)
    assert_ok(result)
    assert "24 residual sites in 12 blocks" in result.stdout
    assert (
        "dry run: nothing written (would write vit_tiny_patch16_224_droppath.pt)" in result.stdout
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_dry_run_writes_only_the_json_report(tmp_path: Path, resnet_files: dict[str, Path]) -> None:
    copy_into(resnet_files["pickle"], tmp_path, "model.pt")
    before = snapshot(tmp_path)
    result = run_cli(
        "model.pt", "--trust-pickle", "--dry-run", "--input-shape", SMALL, "--json", "plan.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert_ok(result)
    assert "8 residual sites in 8 blocks" in result.stdout
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k != "plan.json"} == before
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["output"] is None and len(plan["sites"]) == 8 and plan["verification"] is None


def test_force_replaces_an_existing_output(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    (tmp_path / "model_droppath.pt").write_bytes(b"an older file")
    result = run_cli(*TRUSTED, "--force", cwd=tmp_path)
    assert_ok(result)
    assert check_written(tmp_path / "model_droppath.pt", tmp_path / "model.pt", "1,3,8,8")["equal"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "model_droppath.pt"]


def test_no_verify_still_writes_and_reloads(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    result = run_cli(*TRUSTED, "--no-verify", cwd=tmp_path)
    assert_ok(result)
    assert "reloaded it: outputs not compared (--no-verify)" in result.stdout
    assert check_written(tmp_path / "model_droppath.pt", None)["class"] == "Sequential"


def test_help_documents_exit_codes(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path, module=True)
    assert_ok(result)
    for code in ("0", "1", "2", "3", "4", "5", "6", "7", "130", "143"):
        assert f"\n  {code} " in result.stdout
    assert "--trust-pickle" in result.stdout


# --- bad inputs: one line on stderr, a documented exit code, no file created or changed ---------


def save_torchscript(directory: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated, and still what users have
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(tiny(), torch.randn(1, 3, 8, 8)), directory / "model.pt")


def save_truncated(directory: Path) -> None:
    save_tiny(directory)
    path = directory / "model.pt"
    path.write_bytes(path.read_bytes()[:200])


def save_helper_model(name: str) -> Callable[[Path], None]:
    """Pickle one of HELPER_MODULE's classes; the subprocess finds the module in ``directory``."""

    def save(directory: Path) -> None:
        (directory / "cli_helper_models.py").write_text(textwrap.dedent(HELPER_MODULE))
        sys.path.insert(0, str(directory))
        try:
            import cli_helper_models

            torch.save(getattr(cli_helper_models, name)(), directory / "model.pt")
        finally:
            sys.path.remove(str(directory))
            sys.modules.pop("cli_helper_models", None)

    return save


def nothing(directory: Path) -> None:
    """No files."""


def save_sub(directory: Path) -> None:
    save_tiny(directory)
    (directory / "sub").mkdir()


BAD_INPUTS = {
    # 2: bad arguments
    "max drop above 1": (save_tiny, (*TRUSTED, "--max-drop", "1.5"), 2),
    "max drop negative": (save_tiny, (*TRUSTED, "--max-drop=-0.1"), 2),
    "max drop nan": (save_tiny, (*TRUSTED, "--max-drop", "nan"), 2),
    "max drop not a number": (save_tiny, (*TRUSTED, "--max-drop", "lots"), 2),
    "malformed input shape": (save_tiny, ("model.pt", "--trust-pickle", "--input-shape", "1,x"), 2),
    "zero in input shape": (save_tiny, ("model.pt", "--trust-pickle", "--input-shape", "1,0"), 2),
    "unknown schedule": (save_tiny, (*TRUSTED, "--schedule", "cosine"), 2),
    "weights with a file source": (save_tiny, (*TRUSTED, "--weights", "model.pt"), 2),
    "arch that is not a spec": (save_tiny, ("model.pt", "--arch", "resnet18"), 2),
    # 3: unusable source
    "missing file": (nothing, ("model.pt", "--trust-pickle"), 3),
    "directory": (save_sub, ("sub", "--trust-pickle"), 3),
    "empty file": (lambda d: (d / "model.pt").write_bytes(b""), TRUSTED, 3),
    "text file": (lambda d: (d / "model.pt").write_text("not a model\n" * 20), TRUSTED, 3),
    "truncated file": (save_truncated, TRUSTED, 3),
    "not a model": (lambda d: torch.save([1, 2, 3], d / "model.pt"), TRUSTED, 3),
    "pickle without trust": (save_tiny, ("model.pt", "--input-shape", "1,3,8,8"), 3),
    "torchscript": (save_torchscript, TRUSTED, 3),
    "state_dict without arch": (
        lambda d: torch.save(tiny().state_dict(), d / "model.pt"),
        TRUSTED,
        3,
    ),
    "unknown torchvision model": (nothing, ("torchvision:resnet19",), 3),
    "spec that is a path": (nothing, ("torchvision:../../etc/passwd",), 3),
    "missing weights": (nothing, ("torchvision:resnet18", "--weights", "w.pt"), 3),
    "weights that do not fit": (
        lambda d: torch.save(tiny().state_dict(), d / "w.pt"),
        ("torchvision:resnet18", "--weights", "w.pt"),
        3,
    ),
    # 4: unusable model
    "input shape that does not fit": (
        save_tiny,
        ("model.pt", "--trust-pickle", "--input-shape", "1,5,8,8"),
        4,
    ),
    "input shape that does not fit, no verify": (
        save_tiny,
        ("model.pt", "--trust-pickle", "--no-verify", "--input-shape", "1,5,8,8"),
        4,
    ),
    "input shape that does not fit, dry run": (
        save_tiny,
        ("model.pt", "--trust-pickle", "--dry-run", "--input-shape", "1,5,8,8"),
        4,
    ),
    "no input can be inferred": (
        lambda d: torch.save(nn.Sequential(nn.ReLU()), d / "model.pt"),
        ("model.pt", "--trust-pickle"),
        4,
    ),
    "no input can be inferred, no verify": (
        lambda d: torch.save(nn.Sequential(nn.ReLU()), d / "model.pt"),
        ("model.pt", "--trust-pickle", "--no-verify"),
        4,
    ),
    # 5: verification failed
    "outputs change in memory": (save_helper_model("Drifting"), TRUSTED, 5),
    "written file differs": (save_helper_model("ChangesWhenReloaded"), TRUSTED, 5),
    # 7: no residual site
    "no residual site": (
        lambda d: torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), d / "model.pt"),
        TRUSTED,
        7,
    ),
    # 6: output refused
    "output exists": (lambda d: (save_tiny(d), save_tiny(d, "model_droppath.pt")), TRUSTED, 6),
    "output is the input": (save_tiny, (*TRUSTED, "-o", "./model.pt", "--force"), 6),
    "output is a symlink to the input": (
        lambda d: (save_tiny(d), (d / "link.pt").symlink_to(d / "model.pt")),
        (*TRUSTED, "-o", "link.pt", "--force"),
        6,
    ),
    "output directory missing": (save_tiny, (*TRUSTED, "-o", "nowhere/out.pt"), 6),
    "output named .safetensors": (save_tiny, (*TRUSTED, "-o", "out.safetensors"), 6),
    "json is the input": (save_tiny, (*TRUSTED, "--json", "model.pt", "--force"), 6),
}


@pytest.mark.parametrize(("make", "args", "code"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input(
    tmp_path: Path, make: Callable[[Path], object], args: tuple[str, ...], code: int
) -> None:
    make(tmp_path)
    before = snapshot(tmp_path)
    result = run_cli(*args, cwd=tmp_path, pythonpath=tmp_path)
    assert result.returncode == code, result.stderr
    error_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    save_tiny(tmp_path)
    (tmp_path / "model.pt").chmod(0)
    result = run_cli(*TRUSTED, cwd=tmp_path)
    assert result.returncode == 3 and error_line(result.stderr)
    assert "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_safetensors_output_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The output is a whole model; .safetensors holds tensors only: refused, nothing written."""
    save_tiny(tmp_path)
    result = run_cli(*TRUSTED, "-o", "out.safetensors", cwd=tmp_path)
    assert result.returncode == 6
    assert "whole model" in result.stderr and "name it .pt" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_sigterm_during_the_write_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM while the model is being written: exit 143, one line, no partial file left."""
    save_helper_model("SlowToSave")(tmp_path)
    before = snapshot(tmp_path)
    marker = tmp_path.parent / f"{tmp_path.name}.saving"
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath, SLOW_SAVE_MARKER=str(marker))
    assert SCRIPT is not None
    process = subprocess.Popen(
        [SCRIPT, *TRUSTED, "--quiet"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the write never started"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.startswith(ERROR_PREFIX) and "SIGTERM" in stderr
    assert len(stderr.splitlines()) == 1
    assert snapshot(tmp_path) == before  # no hidden .model_droppath.pt.<hex>.tmp left
