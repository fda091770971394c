"""The ``droppath-inject`` command line: load a model, inject DropPath, write it, re-verify it.

The report goes to stdout and progress to stderr; every failure is one line on stderr and an
exit code that says which kind of problem it was (``arguments.ExitCode``). Output files are
written atomically and the written model is loaded back and compared, bit for bit, with the
source model before it is kept.

Modules: ``arguments`` (options, exit codes), ``sources`` (SOURCE parsed once into a
``Source``; specs), ``files`` and ``checkpoints`` (reading models and weights), ``inputs``
(the example input), ``run`` (the stages), ``progress``, ``writing`` (atomic outputs).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

from ..errors import (
    DropPathInjectError,
    NoResidualError,
    OutputError,
    SourceError,
    VerificationError,
)
from .arguments import PROG, ExitCode, build_parser, check_input_options
from .files import summary
from .run import run
from .sources import parse_source

__all__ = ["ExitCode", "build_parser", "main"]

_EXIT_CODES: tuple[tuple[type[DropPathInjectError], ExitCode], ...] = (
    (SourceError, ExitCode.SOURCE),
    (OutputError, ExitCode.OUTPUT),
    (VerificationError, ExitCode.VERIFICATION),
    (NoResidualError, ExitCode.NO_RESIDUAL),
    (DropPathInjectError, ExitCode.MODEL),
)


def _fail(message: str, code: ExitCode) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that partial outputs are removed on the way out
    (a ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` swallows it)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m droppath_inject``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_input_options(parser, args)
    try:
        source = parse_source(
            args.source, arch=args.arch, weights=args.weights, trust_pickle=args.trust_pickle
        )
    except ValueError as error:
        parser.error(str(error))
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        run(args, source)
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written", ExitCode.INTERRUPTED)
    except _Terminated:
        return _fail("terminated (SIGTERM); nothing was written", ExitCode.TERMINATED)
    except DropPathInjectError as error:
        code = next(code for kind, code in _EXIT_CODES if isinstance(error, kind))
        return _fail(str(error), code)
    except Exception as error:  # noqa: BLE001 - one line, never a traceback
        return _fail(f"unexpected {summary(error)}: this is a bug, please report it", ExitCode.BUG)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return ExitCode.OK
