"""Fine-tune a timm ConvNeXt under PyTorch Lightning with injected DropPath and a warmup.

``inject_droppath`` fills the drop-path slot of every ConvNeXt block (timm leaves them empty at
``drop_path_rate=0``), and ``DropPathCallback`` warms the largest rate up from 0 to
``--max-drop`` over ``--warmup-steps`` of Lightning's optimizer steps, logging it as
``droppath_max_rate``. With ``--checkpoint-dir`` Lightning saves a checkpoint every
``--save-every`` steps; ``--resume CKPT`` continues a run from one, the curriculum included.
Offline by default: random weights, synthetic images.

    python examples/finetune_lightning.py                 # 11 s of CPU time on one thread
    python examples/finetune_lightning.py --data DIR --pretrained --image-size 224 --steps 1000
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from finetune_common import accuracy, datasets_and_classes, parse, parser, remove_and_save
from torch import Tensor, nn
from torch.utils.data import DataLoader

from droppath_inject import DropPathScheduler, inject_droppath
from droppath_inject.integrations.lightning import LOG_KEY, DropPathCallback


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``model`` with AdamW."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self.model(images), labels)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)


class PrintSteps(pl.Callback):
    """Prints the loss and the rate a step trained with, as the other examples do."""

    def __init__(self, every: int = 5) -> None:
        self.every = every

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step, metrics = trainer.global_step, trainer.callback_metrics
        if step == 1 or step % self.every == 0 or step == trainer.max_steps:
            loss, rate = float(metrics["loss"]), float(metrics[LOG_KEY])
            print(f"step {step:4d}  loss {loss:.4f}  max drop {rate:.4f}")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.split("\n\n")[0], "convnext_atto", 32, 1e-3)
    p.add_argument("--checkpoint-dir", type=Path, help="save Lightning checkpoints here")
    p.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--resume", type=Path, help="a Lightning checkpoint to continue from")
    args = parse(p, argv)
    train_set, val_set, num_classes = datasets_and_classes(args)
    model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes)
    probe = torch.randn(2, 3, args.image_size, args.image_size)
    model, report = inject_droppath(model, args.max_drop, example_inputs=probe, return_report=True)
    print(report)
    scheduler = DropPathScheduler.warmup(model, args.max_drop, steps=args.warmup_steps)
    callbacks: list[pl.Callback] = [DropPathCallback(scheduler), PrintSteps()]
    if args.checkpoint_dir is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=str(args.checkpoint_dir), every_n_train_steps=args.save_every, save_top_k=-1
        ))  # fmt: skip
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=args.checkpoint_dir is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    resume = None if args.resume is None else str(args.resume)
    trainer.fit(Classifier(model, args.lr), loader, ckpt_path=resume)
    print(f"final validation accuracy: {accuracy(model, val_set, args.batch_size):.4f}")
    remove_and_save(model, probe, args.out)


if __name__ == "__main__":
    main()
