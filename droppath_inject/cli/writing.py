"""Writing output files safely: never over an input, never over an existing file unless asked,
and atomically, so that a failure at any point leaves no partial file behind."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError


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


@contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Turn an OSError while writing ``path`` into an OutputError that names it."""
    try:
        yield
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None


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
