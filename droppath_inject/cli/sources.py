"""What SOURCE names, parsed once: a spec to build, a file to load, or both, and building specs.

A spec (``torchvision:resnet18``, ``timm:vit_tiny_patch16_224``) builds a model with random
weights, never downloading any; ``files.py`` reads model and weight files.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SourceError

SPEC_PREFIXES: tuple[str, ...] = ("torchvision", "timm")
SPEC_HELP = "a model spec is torchvision:NAME or timm:NAME"


@dataclass(frozen=True)
class Spec:
    """A model of an installed library, e.g. ``timm:vit_tiny_patch16_224``."""

    library: str
    name: str

    @classmethod
    def parse(cls, text: str) -> Spec | None:
        """The spec ``text`` names, or None if it is not one (then it is a file name)."""
        library, sep, name = text.partition(":")
        return cls(library, name) if sep and library in SPEC_PREFIXES else None

    def __str__(self) -> str:
        return f"{self.library}:{self.name}"


class SourceKind(Enum):
    """How the model is obtained."""

    SPEC = "spec"  # built from a spec, with random weights or ``--weights``
    STATE_DICT = "state_dict"  # a state_dict file loaded into ``--arch``
    MODEL_FILE = "model_file"  # a full model saved with ``torch.save(model)``


@dataclass(frozen=True)
class Source:
    """SOURCE, ``--arch`` and ``--weights`` as one value: what to build and what to load."""

    text: str
    spec: Spec | None  # the architecture to build: the spec SOURCE, or --arch
    file: Path | None  # the SOURCE file: a full model, or a state_dict with --arch
    weights: Path | None  # the state_dict to load into ``spec``: --weights, or the SOURCE file
    trust_pickle: bool = False

    @property
    def kind(self) -> SourceKind:
        if self.file is None:
            return SourceKind.SPEC
        return SourceKind.MODEL_FILE if self.spec is None else SourceKind.STATE_DICT

    @property
    def input_files(self) -> list[Path]:
        """The files read, which no output may overwrite."""
        files = [self.file, self.weights]
        return list(dict.fromkeys(f for f in files if f is not None))

    def default_output(self) -> Path:
        """``NAME_droppath.pt`` beside a source file, or in the current directory for a spec."""
        if self.file is None:
            assert self.spec is not None
            return Path(f"{self.spec.name}_droppath.pt")
        return self.file.with_name(f"{self.file.stem}_droppath.pt")


def parse_source(
    text: str, *, arch: str | None, weights: Path | None, trust_pickle: bool
) -> Source:
    """The one parse of the command's source options; ``ValueError`` if they do not combine."""
    spec = Spec.parse(text)
    if weights is not None and spec is None:
        raise ValueError("--weights goes with a spec SOURCE; for a state_dict file use --arch SPEC")
    if arch is None:
        file = None if spec is not None else Path(text)
        return Source(text, spec, file, weights, trust_pickle)
    if spec is not None:
        raise ValueError("--arch goes with a state_dict SOURCE; with a spec use --weights FILE")
    arch_spec = Spec.parse(arch)
    if arch_spec is None:
        raise ValueError(f"--arch takes torchvision:NAME or timm:NAME, got {arch!r}")
    return Source(text, arch_spec, Path(text), Path(text), trust_pickle)


def _import(library: str) -> Any:
    """Import timm or torchvision only when a spec needs it: they are optional, and slow."""
    try:
        return importlib.import_module(library)
    except ImportError:
        raise SourceError(
            f"the spec needs {library}, which is not installed: pip install {library}"
        ) from None


def _unknown_name(library: str, name: str, known: list[str]) -> SourceError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    lister = (
        "torchvision.models.list_models()" if library == "torchvision" else "timm.list_models()"
    )
    return SourceError(
        f"unknown {library} model {name!r}: {hint}"
        f"python -c 'import {library}; print({lister})' lists the valid names"
    )


def check_spec(spec: Spec) -> None:
    """Raise ``SourceError`` unless the spec's library has its model (nothing is built)."""
    if not spec.name:
        raise SourceError(f"not a model spec: {str(spec)!r} ({SPEC_HELP})")
    module = _import(spec.library)
    if spec.library == "torchvision":
        known = module.models.list_models()
        if spec.name not in known:
            raise _unknown_name(spec.library, spec.name, known)
    elif not module.is_model(spec.name):
        raise _unknown_name(spec.library, spec.name, module.list_models())


def build_from_spec(spec: Spec) -> nn.Module:
    """The spec's architecture with random weights (``pretrained=False``: nothing is downloaded)."""
    check_spec(spec)
    module = _import(spec.library)
    if spec.library == "timm":
        return module.create_model(spec.name, pretrained=False)
    builder = module.models.get_model_builder(spec.name)
    # Detection and segmentation builders would download a pretrained backbone by default.
    extra = (
        {"weights_backbone": None}
        if "weights_backbone" in inspect.signature(builder).parameters
        else {}
    )
    model: nn.Module = builder(weights=None, **extra)
    return model
