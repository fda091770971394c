"""Sweep the Hugging Face vision models whose config has ``drop_path_rate``, as for timm.

Each model is built from its default config shrunk to a few small layers (random weights,
nothing downloaded), once with ``drop_path_rate=0.1`` (the library's own placement, the truth)
and once at 0 with the same weights, which is injected and compared (``timm_families.compare``).

    python -m sweeps.hf_vision --write docs/SWEEP_HF.md
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .placement import randomize_constant_parameters
from .timm_families import Row, _line, compare, failed_row, markdown

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: model types whose config has ``drop_path_rate`` and whose base model takes ``pixel_values``
MODEL_TYPES = (
    "beit", "bit", "convnext", "convnextv2", "cvt", "data2vec-vision", "dinov2",
    "dinov2_with_registers", "dinov3_convnext", "dinov3_vit", "donut-swin", "focalnet",
    "glpn", "hiera", "levit", "pixio", "poolformer", "pvt", "pvt_v2", "segformer",
    "swiftformer", "swin", "swinv2", "vitdet",
)  # fmt: skip

_SMALL: dict[str, Any] = {
    "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
    "embed_dim": 16, "image_size": 64,
}  # fmt: skip


def _shrink(config: Any) -> Any:
    """Fewer, narrower layers where the config names them the common way (widths are left to
    configs that tie them to per-stage lists or head counts)."""
    staged = any(isinstance(getattr(config, k, None), (list, tuple)) for k in
                 ("hidden_sizes", "num_heads", "embed_dim"))  # fmt: skip
    for key, value in _SMALL.items():
        if staged and key in ("hidden_size", "embed_dim", "num_attention_heads", "image_size",
                              "num_hidden_layers"):  # fmt: skip
            continue
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, value)
    for key in ("depths", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)):
            setattr(config, key, [1] * len(value))
    return config


def build(model_type: str, rate: float) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    config = _shrink(transformers.AutoConfig.for_model(model_type))
    stages = config.drop_path_rate
    config.drop_path_rate = [rate] * len(stages) if isinstance(stages, list) else rate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModel.from_config(config)


def _pixels(model: nn.Module) -> torch.Tensor:
    config = model.config
    size = getattr(config, "image_size", 64)
    size = size if isinstance(size, int) else tuple(size)[0]
    channels = getattr(config, "num_channels", 3)
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


#: Why a model's counts differ, read from its code (the table shows them as notes).
DIFFERENCES = {
    "poolformer": "Hugging Face also runs its PoolFormerDropPath class as the MLP's dropout "
    "(`output.drop`, twice inside the branch): 8 of its 16 calls are not on a residual",
    "swin": "Hugging Face's Swin drops only the attention residual; the Swin paper and timm "
    "drop the MLP one too, and so does this package",
    "donut-swin": "a copy of Hugging Face's Swin layer: only the attention residual is dropped",
    "swiftformer": "its additive attention adds the query back (`proj(G * K) + Q`) inside the "
    "attention branch: a residual by the rule, which Hugging Face does not drop",
}


def sweep_type(model_type: str) -> Row:
    native = build(model_type, 0.1)
    randomize_constant_parameters(native)
    plain = build(model_type, 0.0)
    plain.load_state_dict(native.state_dict())
    row = compare(model_type, type(native).__name__, native, plain, _pixels(native))
    known = DIFFERENCES.get(model_type)
    return replace(row, note="; ".join(filter(None, [row.note, known]))) if known else row


def run(model_types: list[str]) -> list[Row]:
    rows = []
    for model_type in model_types:
        try:
            rows.append(sweep_type(model_type))
        except Exception as error:  # noqa: BLE001 - one broken model must not stop the sweep
            rows.append(failed_row(model_type, "?", error))
        print(_line(rows[-1]), flush=True)
    return rows


def table(rows: list[Row]) -> str:
    import transformers

    built = [row for row in rows if row.bitwise is not None]
    matching = sum(row.matches for row in built)
    summary = (
        f"{matching} of {len(built)} Hugging Face vision models built from a small config match "
        f"the library's own placement (transformers {transformers.__version__}); "
        f"{len(rows) - len(built)} could not be built small or run."
    )
    return markdown(summary, "model type", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", help=f"default: {' '.join(MODEL_TYPES)}")
    parser.add_argument("--write", type=Path, help="write the table (Markdown) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = run(args.types or list(MODEL_TYPES))
    text = table(rows) + f"\nSwept in {time.perf_counter() - start:.0f} s.\n"
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
