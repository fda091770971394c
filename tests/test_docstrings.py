"""The examples in the docstrings run, and every exported name documents itself."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import droppath_inject

pytestmark = pytest.mark.usefixtures("single_thread")


def _modules() -> list[ModuleType]:
    names = [
        info.name for info in pkgutil.walk_packages(droppath_inject.__path__, "droppath_inject.")
    ]
    return [
        importlib.import_module(name) for name in sorted(names) if not name.endswith("__main__")
    ]


@pytest.mark.parametrize("module", _modules(), ids=lambda m: m.__name__)
def test_docstring_examples_run(module: ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


#: Exported names that take arguments: their docstrings say what the arguments are and show a call.
DOCUMENTED_CALLS = [
    "DropPath",
    "DropPathScheduler",
    "drop_path",
    "drop_rates",
    "find_residuals",
    "inject_droppath",
    "remove_droppath",
    "set_drop_rates",
]


@pytest.mark.parametrize("name", DOCUMENTED_CALLS)
def test_exported_calls_document_arguments_and_show_an_example(name: str) -> None:
    doc = inspect.getdoc(getattr(droppath_inject, name)) or ""
    assert "Args:" in doc
    assert "Example:" in doc and ">>> " in doc


def test_every_exported_name_has_a_docstring() -> None:
    missing = [
        name
        for name in droppath_inject.__all__
        if name != "__version__" and not inspect.getdoc(getattr(droppath_inject, name))
    ]
    assert missing == []
