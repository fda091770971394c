"""Small library models for the skip-vs-mask tests (tests/test_skip_equivalence.py).

Each builder returns a fresh model with random weights (dropout 0 in its config, constant
initialisations such as layer scales, LoRA's zero ``B`` and norm weights randomised, so that a
dropped branch always changes the output) and its example inputs; ``FAMILY`` says where the
library keeps its layers, so that tests can count calls of the modules computing the branches
from the library's own structure rather than from the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

BATCH = 4
TOKENS = 8
VOCAB = 64
DIM = 32
HEADS = 2
LAYERS = 2


@dataclass(frozen=True)
class Case:
    """A model and inputs: positional ``args`` or keyword ``kwargs`` (HF style)."""

    model: nn.Module
    inputs: Any  # a tensor, a tuple of positional arguments or a dict of keyword ones
    branch_modules: Callable[[nn.Module], list[nn.Module]]  # the library's branch submodules
    batch_norm: bool = False  # BatchNorm in the branches: compare with it in eval mode


def call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def tensors_of(output: Any) -> list[Tensor]:
    """Every float tensor in a model output (HF ``ModelOutput``, tuple, tensor)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):  # ModelOutput is an OrderedDict
        return [t for value in output.values() for t in tensors_of(value)]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in tensors_of(item)]
    return []


def randomize_constants(model: nn.Module, seed: int = 2) -> nn.Module:
    """Re-draw parameters and buffers a library initialises to a constant (norm weights and
    biases, layer scales, LoRA's zero ``B``, BatchNorm running statistics)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            flat = tensor.flatten()
            if torch.all(flat == flat[0]):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
                if flat[0] == 0 and tensor.ndim > 1:  # zero-init matrices (LoRA B): small
                    tensor.mul_(0.1)
    return model


def _ids(generator: torch.Generator) -> Tensor:
    return torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)


def _padding_mask() -> Tensor:
    """Per-sample padding: a side input that differs between rows."""
    mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
    mask[1, -3:] = 0
    mask[3, -1:] = 0
    return mask


def _hf_layers(*names: str) -> Callable[[nn.Module], list[nn.Module]]:
    """The submodules ``names`` of each layer in the model's first ``nn.ModuleList``."""

    def modules(model: nn.Module) -> list[nn.Module]:
        layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList))
        return [layer.get_submodule(n) for layer in layers for n in names]

    return modules


def hf_vit() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * DIM,
        image_size=16,
        patch_size=8,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = randomize_constants(transformers.ViTModel(config))
    x = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return Case(model, x, _hf_layers("attention", "mlp"))


def _llama_config() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=2 * DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=64,
        attention_dropout=0.0,
        use_cache=False,
    )


def _token_inputs() -> dict[str, Tensor]:
    return {"input_ids": _ids(torch.Generator().manual_seed(1)), "attention_mask": _padding_mask()}


def hf_llama() -> Case:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = randomize_constants(transformers.LlamaModel(_llama_config()))
    return Case(model, _token_inputs(), _hf_layers("self_attn", "mlp"))


def peft_lora_llama() -> Case:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaModel(_llama_config())
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = randomize_constants(peft.get_peft_model(base, lora))
    return Case(model, _token_inputs(), _hf_layers("self_attn", "mlp"))


def hf_bert() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * DIM,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = randomize_constants(transformers.BertModel(config))
    # post-norm: the LayerNorms after each add still run when a branch is dropped
    branches = ("attention.self", "attention.output.dense", "intermediate", "output.dense")
    return Case(model, _token_inputs(), _hf_layers(*branches))


def qwen2_moe() -> Case:
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=2 * DIM,
        moe_intermediate_size=DIM,
        shared_expert_intermediate_size=DIM,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=64,
        attention_dropout=0.0,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = randomize_constants(transformers.Qwen2MoeModel(config))
    return Case(model, _token_inputs(), _hf_layers("self_attn", "mlp"))


def vit_pytorch_vit() -> Case:
    vit_pytorch = pytest.importorskip("vit_pytorch")
    torch.manual_seed(0)
    model = vit_pytorch.ViT(
        image_size=16,
        patch_size=8,
        num_classes=10,
        dim=DIM,
        depth=LAYERS,
        heads=HEADS,
        dim_head=16,
        mlp_dim=2 * DIM,
        dropout=0.0,
        emb_dropout=0.0,
    )
    x = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def branches(m: nn.Module) -> list[nn.Module]:  # transformer.layers[i] = [Attention, FF]
        return [sub for pair in m.transformer.layers for sub in pair]

    return Case(randomize_constants(model), x, branches)


def torchvision_resnet50() -> Case:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=10)
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def branches(m: nn.Module) -> list[nn.Module]:  # each Bottleneck's three convolutions
        blocks = [block for stage in (m.layer1, m.layer2, m.layer3, m.layer4) for block in stage]
        return [conv for block in blocks for conv in (block.conv1, block.conv2, block.conv3)]

    return Case(randomize_constants(model), x, branches, batch_norm=True)


def timm_convnext_tiny() -> Case:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # convnext_tiny's blocks and widths, one or two blocks per stage (18 would triple CI time)
    model = timm.create_model(
        "convnext_tiny", pretrained=False, num_classes=10, depths=(1, 1, 2, 1)
    )
    x = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def branches(m: nn.Module) -> list[nn.Module]:  # each ConvNeXt block's conv and MLP
        return [sub for stage in m.stages for b in stage.blocks for sub in (b.conv_dw, b.mlp)]

    return Case(randomize_constants(model), x, branches)


BUILDERS: dict[str, Callable[[], Case]] = {
    "hf_vit": hf_vit,
    "hf_llama": hf_llama,
    "hf_bert": hf_bert,
    "peft_lora_llama": peft_lora_llama,
    "qwen2_moe": qwen2_moe,
    "vit_pytorch": vit_pytorch_vit,
    "resnet50": torchvision_resnet50,
    "convnext_tiny": timm_convnext_tiny,
}
