"""Tiny random models of the families block granularity must handle, with example inputs.

Dropout is off (a skipped block draws none of its dropout masks, so skip and mask agree only
without it) and constant-initialised parameters (norm weights, biases, layer scales) are
randomised so that comparisons see them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
import torchvision
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTModel,
)

BATCH = 8
SEQUENCE = 12  # not the batch size: row mode refuses tensors it cannot tell apart
LAYERS = 3
VOCAB = 64


def randomize_constants(model: nn.Module) -> nn.Module:
    """Norm weights, biases and layer scales start constant; give them random values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or "gamma" in name or "scale" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def llama(layers: int = LAYERS) -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def gpt2(layers: int = LAYERS) -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def hf_vit(layers: int = LAYERS) -> nn.Module:
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return ViTModel(config, add_pooling_layer=False)


def bert(layers: int = LAYERS) -> nn.Module:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config, add_pooling_layer=False)


def timm_vit(layers: int = LAYERS) -> nn.Module:
    return timm.create_model(
        "vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=48, num_heads=4,
        depth=layers, num_classes=10, init_values=1e-5,
    )  # fmt: skip


def timm_resnet(layers: int = LAYERS) -> nn.Module:
    return timm.create_model("resnet18", num_classes=10)


def torchvision_vit(layers: int = LAYERS) -> nn.Module:
    return torchvision.models.VisionTransformer(32, 8, layers, 4, 32, 64, num_classes=10)


def tokens() -> dict[str, Any]:
    return {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQUENCE))}


def image() -> torch.Tensor:
    return torch.randn(BATCH, 3, 32, 32)


FAMILIES: dict[str, tuple[Callable[..., nn.Module], Callable[[], Any], bool]] = {
    # name: (builder, input, whether the captured graph proves every block skippable)
    "llama": (llama, tokens, True),
    "gpt2": (gpt2, tokens, True),
    "hf_vit": (hf_vit, lambda: {"pixel_values": torch.randn(BATCH, 3, 16, 16)}, True),
    "bert": (bert, tokens, False),  # post-norm: LayerNorm(x + f(x)) is no identity chain
    "timm_vit": (timm_vit, image, True),
    "timm_resnet": (timm_resnet, image, False),  # ReLU after the add, downsampling skips
    "torchvision_vit": (torchvision_vit, image, True),
}


def build(name: str, layers: int = LAYERS) -> tuple[nn.Module, Any]:
    """A seeded model of family ``name`` with randomised constants, and an example input."""
    builder, make_input, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = randomize_constants(builder(layers))
    return model, make_input()


def call(model: nn.Module, inputs: Any) -> torch.Tensor:
    """The model's main output tensor (logits, last hidden state)."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
