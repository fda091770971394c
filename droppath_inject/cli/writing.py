"""Writing output files safely: never over an input, never over an existing file unless asked,
and atomically, so that a failure at any point leaves no partial file behind."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError

_ADVICE = {
    errno.ENOSPC: "free some space, or pass -o on another file system",
    errno.EDQUOT: "free some of your quota, or pass -o on another file system",
    errno.EROFS: "pass -o on a writable file system",
}


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: through symlinks, ``..`` and hard links."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_output(path: Path, inputs: Iterable[Path], *, force: bool, option: str = "-o") -> None:
    """Refuse ``path`` (given by ``option``) before any work is done if writing it would be
    wrong or cannot succeed."""
    if any(_same_file(path, source) for source in inputs):
        raise OutputError(f"refusing to write {path} over an input: pass {option} another path")
    if path.is_dir():
        raise OutputError(f"{path} is a directory: pass {option} with a file name")
    if path.exists() and not force:
        raise OutputError(f"{path} exists: pass --force to replace it, or {option} another path")
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(
            f"cannot write {path}: directory {parent} does not exist; create it first"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable")


def _publish(temporary: Path, path: Path, overwrite: bool) -> None:
    """Move the finished file into place; without ``overwrite``, never replace an existing file."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # atomic, and fails rather than replacing a file
    except FileExistsError:
        raise OutputError(f"{path} appeared while writing: pass --force to replace it") from None
    except OSError:  # a file system without hard links: check, then rename
        if path.exists():
            raise OutputError(f"{path} exists: pass --force to replace it") from None
        os.replace(temporary, path)


def write_error(path: Path, error: OSError) -> OutputError:
    """The OutputError for an OSError while writing ``path``: the path, the cause in words
    ("no space left on device") and, for a full, over-quota or read-only disk, what to do."""
    cause = error.strerror or str(error) or type(error).__name__
    cause = cause[:1].lower() + cause[1:]
    advice = _ADVICE.get(error.errno) if error.errno is not None else None
    return OutputError(f"cannot write {path}: {cause}" + (f" ({advice})" if advice else ""))


@contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into an OutputError that names it."""
    try:
        yield
    except OSError as error:
        raise write_error(path, error) from None


def _os_error(error: BaseException) -> OSError | None:
    """The OSError ``error`` is, or was raised while handling (``torch.save`` reports a failed
    write to a file object as its own ``RuntimeError``, chained to the OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def torch_save(value: Any, path: Path) -> None:
    """``torch.save(value, path)``, raising the OSError of a failed write (ENOSPC, EDQUOT,
    EROFS, ...) rather than torch's ``RuntimeError`` ("enforce fail at inline_container.cc").

    Saved through a Python file object: writing to a path, torch's C++ stream drops the
    cause; a file object's OSError stays chained to the RuntimeError."""
    with open(path, "wb") as file:
        try:
            torch.save(value, file)
        except Exception as error:
            cause = _os_error(error)
            if cause is None or cause is error:
                raise
            raise cause from None


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_output(path: Path, *, overwrite: bool) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; flushed to disk and moved into place if the
    block succeeds, removed whatever happens: ``path`` is either complete or untouched."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with output_errors(path):
        # Created here with the default mode (the umask applies), unlike mkstemp's 0600.
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temporary
        with output_errors(path):
            _fsync(temporary)
            _publish(temporary, path, overwrite)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: Path, text: str, *, overwrite: bool) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_output(path, overwrite=overwrite) as temporary, output_errors(path):
        temporary.write_text(text, encoding="utf-8")
