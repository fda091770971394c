"""Loading the model to rewrite: a full model file, or a spec with a state_dict loaded into it.

Files are read with ``torch.load(weights_only=True)`` first, because unpickling a full model
runs code from the file: that is only done when the caller says it trusts the file.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SourceError
from .checkpoints import Unwrapped, is_state_dict, unwrap
from .sources import SPEC_HELP, Source, Spec, build_from_spec

_STATE_DICT_HELP = (
    "pass --arch torchvision:NAME or --arch timm:NAME to build the architecture and load it"
)


@dataclass(frozen=True)
class LoadedModel:
    """A model to rewrite, a line saying what it is, and what was unwrapped from its weights."""

    model: nn.Module
    description: str
    unwrapped: Unwrapped | None = None


def summary(error: BaseException) -> str:
    """``Type: first sentence of the message``: what went wrong, without torch's long advice."""
    sentence = str(error).strip().split("\n")[0].split(". ")[0]
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


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


def _torchscript_error(path: Path) -> SourceError:
    return SourceError(
        f"{path} is a TorchScript archive: its compiled code cannot be rewritten; pass the "
        "original model saved with torch.save(model) (and --trust-pickle), or its state_dict "
        "with --arch SPEC"
    )


def torch_load(path: Path, weights_only: bool) -> Any:
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
        raise SourceError(f"cannot read {path}: {error.strerror or summary(error)}") from None
    except (ImportError, AttributeError) as error:
        raise SourceError(
            f"cannot unpickle {path} ({summary(error)}): run where the code defining the "
            "model's class is importable"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch reports corrupt files with many types
        raise SourceError(
            f"cannot read {path} ({summary(error)}): the file is corrupt or was not saved "
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
        raise SourceError(f"cannot read {path}: {error.strerror or summary(error)}") from None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise SourceError(f"cannot read {path} ({summary(error)}): the file is corrupt") from None


def load_state_dict_file(path: Path) -> Unwrapped:
    """The state_dict in a ``.safetensors`` file or a ``torch.save`` checkpoint (unwrapped)."""
    _check_file(path)
    if path.suffix == ".safetensors":
        return Unwrapped(_load_safetensors(path), None, ())
    if _is_torchscript(path):
        raise _torchscript_error(path)
    try:
        value = torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        value = None  # objects beyond tensors: a full model, not weights
    unwrapped = unwrap(value)
    if unwrapped is None:
        raise SourceError(
            f"{path} is not a state_dict: --arch and --weights take weights saved with "
            "torch.save(model.state_dict()), a checkpoint dict holding them under "
            '"state_dict" or "model", or a .safetensors file'
        )
    return unwrapped


def _not_a_model(path: Path, value: Any) -> SourceError:
    if is_state_dict(value):
        return SourceError(
            f"{path} is a state_dict (weights only, no architecture): {_STATE_DICT_HELP}"
        )
    return SourceError(
        f"{path} holds a {type(value).__name__}, not a model: save the model itself with "
        "torch.save(model), or pass a state_dict with --arch SPEC"
    )


def load_model_file(path: Path, *, trust_pickle: bool) -> nn.Module:
    """A full model saved with ``torch.save(model)``; unpickled only if ``trust_pickle``."""
    _check_file(path, f"check the path; {SPEC_HELP}")
    if path.suffix == ".safetensors":
        raise SourceError(f"{path} holds weights only, no architecture: {_STATE_DICT_HELP}")
    if _is_torchscript(path):
        raise _torchscript_error(path)
    try:
        value = torch_load(path, weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise SourceError(
                f"{path} is a full pickled model and unpickling runs code from the file: pass "
                "--trust-pickle if you trust its source, or save its state_dict and pass --arch"
            ) from None
        value = torch_load(path, weights_only=False)
    if not isinstance(value, nn.Module):
        raise _not_a_model(path, value)
    return value


def _load_weights(model: nn.Module, state_dict: dict[str, Tensor], spec: Spec, path: Path) -> None:
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


def load_source(source: Source) -> LoadedModel:
    """The model ``source`` names: built from its spec (with its weights, if any), or a file."""
    unwrapped = None
    if source.spec is None:
        assert source.file is not None
        model = load_model_file(source.file, trust_pickle=source.trust_pickle)
        origin, init = source.text, "full pickle"
    else:
        unwrapped = None if source.weights is None else load_state_dict_file(source.weights)
        model = build_from_spec(source.spec)
        if unwrapped is None or source.weights is None:
            init = "random init"
        else:
            _load_weights(model, unwrapped.state_dict, source.spec, source.weights)
            init = f"weights from {source.weights}"
        origin = str(source.spec)
    description = f"{origin} ({type(model).__name__}, {init}, {_parameters(model)})"
    return LoadedModel(model, description, unwrapped)
