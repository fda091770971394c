"""The command line on a disk that fails while the model is written: a full file system (a real
small tmpfs, where this process may mount one) and ENOSPC, EDQUOT and EROFS raised by the file
being written. One line naming the output and the cause, exit 6, nothing left behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from droppath_inject.cli import ExitCode, main

ERROR_PREFIX = "droppath-inject: error: "


def save_model(directory: Path) -> Path:
    """A stem and one torchvision BasicBlock, pickled: about 20 kB once written."""
    torch.manual_seed(0)
    path = directory / "model.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 16, 3), BasicBlock(16, 16)), path)
    return path


def cli(source: Path, out: Path) -> list[str]:
    return [str(source), "--trust-pickle", "--input-shape", "1,3,8,8", "-o", str(out), "--quiet"]


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 kB tmpfs: too small for any model file. Skipped where it cannot be mounted."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_full_file_system(
    tmp_path: Path, full_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = save_model(tmp_path)
    assert source.stat().st_size > 4096  # the model cannot fit
    out = full_disk / "out.pt"
    code = main(cli(source, out))
    stderr = capsys.readouterr().err
    assert code == ExitCode.OUTPUT == 6, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith(ERROR_PREFIX), stderr
    assert str(out) in stderr and "no space left on device" in stderr, stderr
    assert list(full_disk.iterdir()) == []  # no temporary file left


class FailingFile:
    """A binary file on a disk that fails after ``room`` bytes with ``OSError(code)``."""

    def __init__(self, file: Any, code: int, room: int = 1000) -> None:
        self.file, self.code, self.room = file, code, room

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(self.code, os.strerror(self.code))
        self.room -= size
        return int(self.file.write(data))

    def flush(self) -> None:
        self.file.flush()


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EROFS, "read-only file system"),
    ],
)
def test_write_errors_name_the_output_and_the_cause(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    cause: str,
) -> None:
    """torch.save writes through a file whose writes fail as the disk's would, whether torch is
    handed a path or a file object."""
    source = save_model(tmp_path)
    real_save = torch.save

    def save_on_failing_disk(value: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(target, (str, os.PathLike)):
            with open(target, "wb") as file:
                real_save(value, FailingFile(file, code), *args, **kwargs)  # type: ignore[arg-type]
        else:
            real_save(value, FailingFile(target, code), *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", save_on_failing_disk)
    out = tmp_path / "out" / "model_droppath.pt"
    out.parent.mkdir()
    exit_code = main(cli(source, out))
    stderr = capsys.readouterr().err
    assert exit_code == ExitCode.OUTPUT, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith(ERROR_PREFIX), stderr
    assert str(out) in stderr and cause in stderr.lower(), stderr
    assert list(out.parent.iterdir()) == []
