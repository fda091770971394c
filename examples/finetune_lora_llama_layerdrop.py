"""Fine-tune a Llama with LoRA adapters and layer drop (one DropPath decision per layer).

``inject_droppath(granularity="block")`` gives each decoder layer's attention and MLP branches
one shared keep decision per sample (LayerDrop; ``--skip-compute`` also skips a dropped layer's
work), PEFT adds LoRA adapters to every linear layer of the decoder (``"all-linear"``), and the
largest rate warms up from 0 to ``--max-drop`` over ``--warmup-steps``. At the end the adapters
are merged (``merge_and_unload``), the drop paths removed (eval outputs checked bit for bit)
and, with ``--out DIR``, the plain Llama saved with ``save_pretrained``. Offline by default: a
tiny Llama with random weights, learning synthetic counting sequences.

    python examples/finetune_lora_llama_layerdrop.py            # 8 s of CPU time on one thread
    python examples/finetune_lora_llama_layerdrop.py --model meta-llama/Llama-3.2-1B --pretrained
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig

from droppath_inject import DropPathScheduler, inject_droppath, remove_droppath

VOCAB = 128


def arguments(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face causal LM (default: a tiny random Llama)")
    p.add_argument("--pretrained", action="store_true", help="download --model (needs network)")
    p.add_argument("--layers", type=int, default=4, help="layers of the tiny Llama")
    p.add_argument("--max-drop", type=float, default=0.2, help="drop rate of the deepest layer")
    p.add_argument("--skip-compute", action="store_true", help="dropped layers are not run")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps to ramp the rate from 0")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", type=Path, help="save_pretrained the merged model here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="tiny CI run: 3 steps, 1 thread")
    args = p.parse_args(argv)
    if not 0 <= args.max_drop <= 1:
        p.error("--max-drop must lie in [0, 1]")
    if args.pretrained and args.model is None:
        p.error("--pretrained needs --model")
    if args.smoke:
        args.steps, args.warmup_steps, args.batch_size, args.seq_len = 3, 2, 4, 16
        args.threads = args.threads or 1
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build(args: argparse.Namespace) -> nn.Module:
    """The base model: ``--model`` from the hub, or a tiny Llama with random weights."""
    if args.pretrained:
        return AutoModelForCausalLM.from_pretrained(args.model)
    if args.model is not None:
        return AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(args.model))
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(config)


def counting_batch(size: int, length: int, vocab: int, generator: torch.Generator) -> Tensor:
    """Sequences ``a, a+d, a+2d, ...`` (mod the vocabulary): learnable from the context."""
    start = torch.randint(0, vocab, (size, 1), generator=generator)
    stride = torch.randint(1, 4, (size, 1), generator=generator)
    return (start + stride * torch.arange(length)) % vocab


@torch.no_grad()
def validation_loss(model: nn.Module, ids: Tensor) -> float:
    model.eval()
    return float(model(input_ids=ids, labels=ids).loss)


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    model = build(args)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    val_ids = counting_batch(64, args.seq_len, vocab, generator)
    model, report = inject_droppath(
        model,
        args.max_drop,
        granularity="block",
        skip_compute=args.skip_compute,
        example_inputs={"input_ids": val_ids[:2]},
        return_report=True,
    )
    print(report)
    model = get_peft_model(model, LoraConfig(r=args.rank, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA: {trainable:,} trainable parameters")
    scheduler = DropPathScheduler.warmup(model, args.max_drop, steps=args.warmup_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        ids = counting_batch(args.batch_size, args.seq_len, vocab, generator)
        rate = scheduler.max_drop  # the rate this step trains with
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step == 1 or step % 5 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}  loss {loss.item():.4f}  max drop {rate:.4f}  {elapsed:.1f} s")
    print(f"final validation loss: {validation_loss(model, val_ids):.4f}")

    model = model.merge_and_unload()  # the base architecture, adapters merged, drop paths on
    print(f"merged LoRA into {type(model).__name__}: validation loss "
          f"{validation_loss(model, val_ids):.4f}")  # fmt: skip
    with torch.no_grad():
        before = model(input_ids=val_ids).logits
        remove_droppath(model)
        unchanged = torch.equal(before, model(input_ids=val_ids).logits)
    print(f"removed DropPath: eval outputs bit-identical: {unchanged}")
    if not unchanged:
        raise SystemExit("eval outputs changed when DropPath was removed")
    if args.out is not None:
        model.save_pretrained(args.out)
        print(f"saved {args.out} (loads with {type(model).__name__}.from_pretrained)")


if __name__ == "__main__":
    main()
