"""Atomic, no-clobber output files: the paths the command line cannot be made to reach."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from droppath_inject.cli.writing import OutputError, atomic_output, check_output, write_text


def test_failure_inside_the_block_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    with pytest.raises(RuntimeError), atomic_output(target, overwrite=False) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_the_old_file_when_overwriting(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target, overwrite=True) as temporary:
        temporary.write_bytes(b"new")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


def test_file_created_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with (
        pytest.raises(OutputError, match="appeared while writing"),
        atomic_output(target, overwrite=False) as temporary,
    ):
        temporary.write_text("new")
        target.write_text("someone else's")
    assert target.read_text() == "someone else's"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("exists", [False, True])
def test_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exists: bool) -> None:
    def no_link(*_: object) -> None:
        raise PermissionError("hard links not supported")

    monkeypatch.setattr(os, "link", no_link)
    target = tmp_path / "out.json"
    if exists:
        target.write_text("old")
        with pytest.raises(OutputError, match="exists"):
            write_text(target, "new", overwrite=False)
        assert target.read_text() == "old"
    else:
        write_text(target, "new", overwrite=False)
        assert target.read_text() == "new"
    assert list(tmp_path.iterdir()) == [target]


def test_written_file_gets_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "out.json", "{}", overwrite=False)
    finally:
        os.umask(umask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o644


def test_hard_link_to_an_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes(b"model")
    os.link(source, tmp_path / "alias.pt")
    with pytest.raises(OutputError, match="over an input"):
        check_output(tmp_path / "alias.pt", [source], force=True)
