"""Exceptions raised by droppath_inject.

Every error the package raises on purpose derives from ``DropPathInjectError``, so callers (and
the command line) can catch the package's own failures without swallowing unrelated bugs.
Invalid arguments keep Python's conventions and raise ``ValueError`` or ``TypeError``.
"""

from __future__ import annotations


class DropPathInjectError(Exception):
    """Base class of the errors that droppath_inject raises about a model it cannot handle."""


class VerificationError(DropPathInjectError):
    """The rewritten model's eval outputs differ from the original's; the model was restored."""


class ExampleInputError(DropPathInjectError):
    """No example input could be inferred, or the model failed on the one it was given."""


class NoResidualError(DropPathInjectError):
    """The command line found no residual site to give a DropPath, so it wrote nothing."""


class SourceError(DropPathInjectError):
    """The command line cannot read or build the model it was given."""


class OutputError(DropPathInjectError):
    """The command line cannot, or must not, write an output file."""


class DropPathWarning(UserWarning):
    """Injection did little: no residual site was found, or some got no DropPath."""


class CurriculumError(DropPathInjectError):
    """A curriculum set by fraction of training was stepped before it knew how long training is."""
