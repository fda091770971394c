"""Loading the model to rewrite: from a file, a state_dict plus an architecture, or a spec.

A spec (``torchvision:resnet18``, ``timm:vit_tiny_patch16_224``) builds a model with random
weights, never downloading any. Files are read with ``torch.load(weights_only=True)`` first,
because unpickling a full model runs code from the file: that is only done when the caller
says it trusts the file.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import DropPathInjectError

SPEC_PREFIXES: tuple[str, ...] = ("torchvision", "timm")
_SPEC_HELP = "a model spec is torchvision:NAME or timm:NAME"
_STATE_DICT_HELP = (
    "pass --arch torchvision:NAME or --arch timm:NAME to build the architecture and load it"
)


class SourceError(DropPathInjectError):
    """The model to rewrite cannot be read or built from what was given."""


@dataclass(frozen=True)
class LoadedModel:
    """A model to rewrite, and a line saying what it is and where it came from."""

    model: nn.Module
    description: str


def parse_spec(text: str) -> tuple[str, str] | None:
    """``(library, name)`` for a spec such as ``timm:vit_tiny_patch16_224``, else None."""
    library, sep, name = text.partition(":")
    return (library, name) if sep and library in SPEC_PREFIXES else None


def _summary(error: BaseException) -> str:
    """``Type: first sentence of the message``: what went wrong, without torch's long advice."""
    sentence = str(error).strip().split("\n")[0].split(". ")[0]
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


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


def _build_torchvision(name: str) -> nn.Module:
    torchvision = _import("torchvision")
    if name not in torchvision.models.list_models():
        raise _unknown_name("torchvision", name, torchvision.models.list_models())
    builder = torchvision.models.get_model_builder(name)
    # Detection and segmentation builders would download a pretrained backbone by default.
    extra = (
        {"weights_backbone": None}
        if "weights_backbone" in inspect.signature(builder).parameters
        else {}
    )
    return builder(weights=None, **extra)


def _build_timm(name: str) -> nn.Module:
    timm = _import("timm")
    if not timm.is_model(name):
        raise _unknown_name("timm", name, timm.list_models())
    return timm.create_model(name, pretrained=False)


def check_spec(spec: str) -> None:
    """Raise ``SourceError`` unless ``spec`` names a model its library has (nothing is built)."""
    parsed = parse_spec(spec)
    if parsed is None or not parsed[1]:
        raise SourceError(f"not a model spec: {spec!r} ({_SPEC_HELP})")
    library, name = parsed
    module = _import(library)
    known = module.models.list_models() if library == "torchvision" else None
    if known is not None and name not in known:
        raise _unknown_name(library, name, known)
    if known is None and not module.is_model(name):
        raise _unknown_name(library, name, module.list_models())


def build_from_spec(spec: str) -> nn.Module:
    """The spec's architecture with random weights (``pretrained=False``: nothing is downloaded)."""
    parsed = parse_spec(spec)
    if parsed is None or not parsed[1]:
        raise SourceError(f"not a model spec: {spec!r} ({_SPEC_HELP})")
    library, name = parsed
    return _build_torchvision(name) if library == "torchvision" else _build_timm(name)


def _check_file(path: Path, hint: str = "check the path") -> None:
    if path.is_dir():
        raise SourceError(f"{path} is a directory, not a file ({hint})")
    if not path.exists():
        raise SourceError(f"no such file: {path} ({hint})")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding ``constants.pkl`` beside compiled code."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith("/constants.pkl") for n in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _is_state_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items())
    )


def _torchscript_error(path: Path) -> SourceError:
    return SourceError(
        f"{path} is a TorchScript archive: its compiled code cannot be rewritten; pass the "
        "original model saved with torch.save(model) (and --trust-pickle), or its state_dict "
        "with --arch SPEC"
    )


def _torch_load(path: Path, weights_only: bool) -> Any:
    """``torch.load`` on the CPU; OSError and corrupt data become a SourceError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError:
        if weights_only:
            raise
        raise SourceError(
            f"cannot read {path}: the file is corrupt or was not saved by torch.save"
        ) from None
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror or _summary(error)}") from None
    except (ImportError, AttributeError) as error:
        raise SourceError(
            f"cannot unpickle {path} ({_summary(error)}): run where the code defining the "
            "model's class is importable"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch reports corrupt files with many types
        raise SourceError(
            f"cannot read {path} ({_summary(error)}): the file is corrupt or was not saved "
            "by torch.save"
        ) from None


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise SourceError(
            f"reading {path} needs the safetensors package: pip install safetensors"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except OSError as error:
        raise SourceError(f"cannot read {path}: {error.strerror or _summary(error)}") from None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise SourceError(f"cannot read {path} ({_summary(error)}): the file is corrupt") from None


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """A state_dict from a ``torch.save(model.state_dict())`` or ``.safetensors`` file."""
    _check_file(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if _is_torchscript(path):
        raise _torchscript_error(path)
    try:
        value = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        value = None  # objects beyond tensors: a full model, not weights
    if not _is_state_dict(value):
        raise SourceError(
            f"{path} is not a state_dict: --arch and --weights take weights saved with "
            "torch.save(model.state_dict()) or a .safetensors file"
        )
    return dict(value)


def _not_a_model(path: Path, value: Any) -> SourceError:
    if _is_state_dict(value):
        return SourceError(
            f"{path} is a state_dict (weights only, no architecture): {_STATE_DICT_HELP}"
        )
    return SourceError(
        f"{path} holds a {type(value).__name__}, not a model: save the model itself with "
        "torch.save(model), or pass a state_dict with --arch SPEC"
    )


def load_model_file(path: Path, *, trust_pickle: bool) -> nn.Module:
    """A full model saved with ``torch.save(model)``; unpickled only if ``trust_pickle``."""
    _check_file(path, f"check the path; {_SPEC_HELP}")
    if path.suffix == ".safetensors":
        raise SourceError(f"{path} holds weights only, no architecture: {_STATE_DICT_HELP}")
    if _is_torchscript(path):
        raise _torchscript_error(path)
    try:
        value = _torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise SourceError(
                f"{path} is a full pickled model and unpickling runs code from the file: pass "
                "--trust-pickle if you trust its source, or save its state_dict and pass --arch"
            ) from None
        value = _torch_load(path, weights_only=False)
    if not isinstance(value, nn.Module):
        raise _not_a_model(path, value)
    return value


def _load_weights(model: nn.Module, state_dict: dict[str, Tensor], spec: str, path: Path) -> None:
    """Strict ``load_state_dict``, with a one-line error when the weights do not fit."""
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shape mismatches
        detail = str(error).strip().splitlines()[-1].strip()
        raise SourceError(
            f"{path} does not fit {spec} ({detail}): pass the spec it was saved from"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise SourceError(
            f"{path} does not fit {spec}: {len(missing)} missing keys "
            f"{missing[:2]}, {len(unexpected)} unexpected keys {unexpected[:2]}; "
            "pass the spec the weights were saved from"
        )


def _parameters(model: nn.Module) -> str:
    return f"{sum(p.numel() for p in model.parameters()):,} parameters"


def load_source(
    source: str, *, arch: str | None = None, weights: Path | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """The model named by ``source``: a spec (weights from ``weights`` if given), a model file,
    or, with ``arch``, a state_dict file loaded into that spec's architecture."""
    if parse_spec(source):
        state_dict = None if weights is None else load_state_dict_file(weights)
        model = build_from_spec(source)
        if state_dict is None:
            init = "random init"
        else:
            _load_weights(model, state_dict, source, weights)
            init = f"weights from {weights}"
        origin = source
    elif arch is not None:
        path = Path(source)
        state_dict = load_state_dict_file(path)
        model = build_from_spec(arch)
        _load_weights(model, state_dict, arch, path)
        origin, init = arch, f"weights from {path}"
    else:
        model = load_model_file(Path(source), trust_pickle=trust_pickle)
        origin, init = source, "full pickle"
    description = f"{origin} ({type(model).__name__}, {init}, {_parameters(model)})"
    return LoadedModel(model, description)
