"""The recipes of docs/USAGE.md, run from the document's own text on small random models.

Each recipe's code block is read from docs/USAGE.md and executed with a few written-out
substitutions (a tiny model instead of a hub checkpoint, a few steps instead of a thousand);
every substitution must match the text, so a recipe edited out of step with its test fails
here. What each run produced is then checked against the libraries' own structure (timm's
blocks, the Llama config's layer count, the plain architecture's ``state_dict`` keys) and
against outputs worked out by hand (a branch dropped at rate 1 contributes nothing).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from droppath_inject import DropPath, set_drop_rates

USAGE = Path(__file__).resolve().parent.parent / "docs" / "USAGE.md"
TINY_LLAMA_LAYERS = 4

pytestmark = pytest.mark.usefixtures("single_thread")


def recipe(name: str) -> str:
    """The code block after ``<!-- recipe: name -->`` in docs/USAGE.md."""
    found = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", USAGE.read_text(), re.S)
    assert found, f"no recipe {name!r} in {USAGE}"
    return found.group(1)


def run_recipe(name: str, substitutions: dict[str, str], **namespace: Any) -> dict[str, Any]:
    """Run recipe ``name`` with each ``old -> new`` replaced (each must occur), in a namespace
    holding ``namespace``; returns the namespace after the run."""
    code = recipe(name)
    for old, new in substitutions.items():
        assert old in code, f"recipe {name!r} no longer contains {old!r}"
        code = code.replace(old, new)
    scope: dict[str, Any] = {"__name__": f"recipe_{name}", **namespace}
    exec(compile(code, f"{USAGE}:{name}", "exec"), scope)
    return scope


def droppaths(model: nn.Module) -> list[DropPath]:
    return [m for m in model.modules() if isinstance(m, DropPath)]


def image_loader(classes: int = 10, size: int = 32, batches: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4 * batches, 3, size, size, generator=generator)
    return DataLoader(TensorDataset(images, torch.arange(4 * batches) % classes), batch_size=4)


def warmup(step: int, max_drop: float, steps: float) -> float:
    """The linear warm-up written out."""
    return max_drop * min(step / steps, 1.0)


def tiny_llama_config() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=TINY_LLAMA_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


LLAMA_FROM_HUB = 'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")'
LLAMA_TINY = "AutoModelForCausalLM.from_config(TINY_LLAMA)"


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The recipes write to relative paths: run them in a temporary directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_timm_finetune(in_tmp: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    scope = run_recipe("timm", {
        '"vit_small_patch16_224", pretrained=True': '"vit_tiny_patch16_224", img_size=32',
        "steps=500": "steps=2",
    }, loader=image_loader())  # fmt: skip
    model = scope["model"]
    blocks = list(model.blocks)  # timm's own drop_path slots now hold the injected DropPaths
    assert all(isinstance(b.drop_path1, DropPath) for b in blocks)
    assert all(isinstance(b.drop_path2, DropPath) for b in blocks)
    assert len(droppaths(model)) == 2 * len(blocks)
    rates = [b.drop_path1.drop_prob for b in blocks]  # 3 steps: the 2-step warm-up is done
    assert rates == pytest.approx([0.1 * i / (len(blocks) - 1) for i in range(len(blocks))])
    plain = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    plain.load_state_dict(torch.load(in_tmp / "vit_finetuned.pt", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


def test_huggingface_trainer(in_tmp: Path) -> None:
    pytest.importorskip("accelerate")
    config = tiny_llama_config()
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (8, 8), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    scope = run_recipe("trainer", {
        LLAMA_FROM_HUB: LLAMA_TINY,
        "max_steps=1000, save_steps=500": "max_steps=4, save_steps=2, logging_steps=1, "
        "per_device_train_batch_size=2, use_cpu=True, disable_tqdm=True",
    }, TINY_LLAMA=config, train_dataset=data)  # fmt: skip
    model, trainer = scope["model"], scope["trainer"]
    assert len(droppaths(model)) == 2 * config.num_hidden_layers
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3, 4]
    # warm-up over 0.1 of 4 steps: step 0 trains at 0, every later step at 0.1
    assert [e["droppath_max_rate"] for e in logged] == pytest.approx([0.0, 0.1, 0.1, 0.1])
    assert (in_tmp / "llama-droppath" / "checkpoint-2").is_dir()


def train_a_little(model: nn.Module, scheduler: Any) -> None:
    """Three steps of causal LM training with AdamW, the scheduler stepped after each."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, 64, (4, 8), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


INJECT = (
    'model = inject_droppath(model, max_drop=0.2, granularity="block")  # LayerDrop: whole layers\n'
)
WRAP = 'model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))\n'


@pytest.mark.parametrize("order", ["inject, then get_peft_model", "get_peft_model, then inject"])
def test_peft_lora_with_layer_drop(in_tmp: Path, order: str) -> None:
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = tiny_llama_config()
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    base_q = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    seen: dict[str, Any] = {}

    def after_merge(model: nn.Module) -> None:
        """With every layer dropped (rate 1, training), the logits are those of the model
        without its decoder layers: the final norm and head on the embeddings."""
        seen["class"] = type(model).__name__
        seen["droppaths"] = len(droppaths(model))
        ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator())
        set_drop_rates(model, 1.0, "uniform")
        model.train()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            inner = model.model
            expected = model.lm_head(inner.norm(inner.embed_tokens(ids)))
        seen["all dropped"] = torch.equal(logits, expected)
        model.eval()

    def train(model: nn.Module, scheduler: Any) -> None:
        """The LoRA model's sites: the base model's residual branches, 2 per layer."""
        seen["droppaths in training"] = len(droppaths(model))
        train_a_little(model, scheduler)

    substitutions = {
        LLAMA_FROM_HUB: "BASE",
        "steps=1000": "steps=2",
        "# ... train: a loop calling scheduler.step(), or the Trainer with "
        "DropPathCallback(scheduler)": "train_a_little(model, scheduler)",
        "remove_droppath(model)  # for serving": "after_merge(model); remove_droppath(model)  #",
    }
    if order.startswith("get_peft_model"):
        substitutions[INJECT + WRAP] = WRAP + INJECT
    scope = run_recipe(
        "peft", substitutions, BASE=base, train_a_little=train, after_merge=after_merge
    )
    # the merged model is the plain Llama again, its 2 residual branches per layer dropping
    assert seen == {
        "droppaths in training": 2 * config.num_hidden_layers,
        "class": "LlamaForCausalLM",
        "droppaths": 2 * config.num_hidden_layers,
        "all dropped": True,
    }
    assert droppaths(scope["model"]) == []  # removed after the merge, as the recipe does
    saved = transformers.AutoModelForCausalLM.from_pretrained(in_tmp / "llama-lora-merged")
    merged_q = saved.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(merged_q, base_q)  # the trained LoRA update was merged in


def test_lightning(in_tmp: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("timm")
    torch.manual_seed(0)
    scope = run_recipe("lightning", {
        '"convnext_tiny", pretrained=True': '"convnext_atto"',
        "pl.Trainer(max_steps=10_000, ": 'pl.Trainer(max_steps=5, accelerator="cpu", logger=False, '
        "enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, ",
    }, loader=image_loader(batches=5))  # fmt: skip
    model, trainer = scope["model"], scope["trainer"]
    blocks = [block for stage in model.stages for block in stage.blocks]  # timm's ConvNeXt
    assert all(isinstance(block.drop_path, DropPath) for block in blocks)
    assert len(droppaths(model)) == len(blocks) == 12
    assert trainer.global_step == 5
    # warm-up over 0.1 of 5 steps (half a step): 0 at step 0, 0.1 from step 1
    rates = [block.drop_path.drop_prob for block in blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)], rel=1e-12)
    assert float(trainer.logged_metrics["droppath_max_rate"]) == pytest.approx(0.1)


def test_accelerate(in_tmp: Path) -> None:
    pytest.importorskip("accelerate")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    original = model
    scope = run_recipe("accelerate", {"steps=1000": "steps=4"}, model=model, loader=image_loader())
    unwrapped = scope["model"]
    assert unwrapped is original  # the user's module, injected in place
    stages = (model.layer1, model.layer2, model.layer3, model.layer4)
    blocks = [block for stage in stages for block in stage]  # timm's ResNet BasicBlocks
    assert len(droppaths(unwrapped)) == len(blocks) == 8
    assert scope["scheduler"].count == 3
    expected = [warmup(3, 0.1, 4) * i / 7 for i in range(8)]
    assert [m.drop_prob for m in droppaths(unwrapped)] == pytest.approx(expected, rel=1e-12)
    calls: list[int] = []
    for module in droppaths(unwrapped):
        module.register_forward_hook(lambda *args: calls.append(1))
    unwrapped.train()
    unwrapped(torch.randn(4, 3, 32, 32))
    assert len(calls) == 8  # the drop paths run in training


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_dynamo")
def test_inject_then_compile() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), Block(), nn.Linear(8, 3))
    original = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(12, 8, generator=generator), torch.arange(12) % 3)
    scope = run_recipe("compile", {
        # aot_eager: the same graphs without inductor's code generation, for time
        "torch.compile(model)": 'torch.compile(model, backend="aot_eager")',
        "steps=1000": "steps=2",
    }, model=model, loader=DataLoader(data, batch_size=4))  # fmt: skip
    compiled = scope["compiled"]
    assert len(droppaths(model)) == 3
    x = torch.randn(4, 8)
    set_drop_rates(model, 1.0, "uniform")
    compiled.train()
    with torch.no_grad():  # every branch dropped: the head on the input
        assert torch.equal(compiled(x), model[3](x))
    compiled.eval()
    original.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(compiled(x), original(x))


def test_saving_and_reloading(in_tmp: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    small = '"vit_tiny_patch16_224", num_classes=10, img_size=32'
    assert recipe("saving").count('"vit_small_patch16_224", num_classes=10') == 2
    scope = run_recipe("saving", {'"vit_small_patch16_224", num_classes=10': small})
    model, plain = scope["model"], scope["plain"]
    fresh = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32)
    assert torch.load(in_tmp / "weights.pt", weights_only=True).keys() == fresh.state_dict().keys()
    depth = len(fresh.blocks)
    assert len(droppaths(plain)) == len(droppaths(model)) == 2 * depth  # both injected
    assert [m.drop_prob for m in droppaths(model)] == [m.drop_prob for m in droppaths(plain)]
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_save_pretrained_and_inject_again(in_tmp: Path) -> None:
    pytest.importorskip("transformers")
    config = tiny_llama_config()
    torch.manual_seed(0)
    seen: dict[str, int] = {}
    scope = run_recipe("save_pretrained", {
        LLAMA_FROM_HUB: LLAMA_TINY,
        "  # plain again": "; seen['reloaded'] = len(droppaths(model))",
    }, TINY_LLAMA=config, droppaths=droppaths, seen=seen)  # fmt: skip
    assert seen == {"reloaded": 0}  # from_pretrained builds the plain architecture
    model = scope["model"]
    assert len(droppaths(model)) == 2 * config.num_hidden_layers  # injected again
