"""What the two fine-tuning examples share: flags, data, and the loop that warms DropPath up.

The part specific to each library (building the model, injecting DropPath) stays in its script.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from droppath_inject import DropPathScheduler, remove_droppath

SYNTHETIC_CLASSES = 10
SIGNAL = 0.3  # template amplitude against unit noise: learnable, but not trivially


def parser(description: str, model: str, image_size: int, lr: float) -> argparse.ArgumentParser:
    """The flags both examples take, with the defaults that fit each model."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default=model)
    p.add_argument("--pretrained", action="store_true", help="download weights (needs network)")
    p.add_argument("--max-drop", type=float, default=0.1, help="rate of the deepest block")
    p.add_argument("--warmup-steps", type=int, default=20, help="steps to ramp the rate from 0")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=image_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--data", type=Path, help="ImageFolder root with train/ and val/ (default: "
                   "synthetic images, 10 classes)")  # fmt: skip
    p.add_argument("--out", type=Path, help="save the fine-tuned state_dict (DropPath removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="tiny CI run: 3 steps, 32 px, 1 thread")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check, apply ``--smoke``, seed torch and set its thread count."""
    args = p.parse_args(argv)
    if not 0 <= args.max_drop <= 1:
        p.error("--max-drop must lie in [0, 1]")
    if args.warmup_steps < 1 or args.steps < 1:
        p.error("--steps and --warmup-steps must be at least 1")
    if args.smoke:
        args.steps, args.warmup_steps, args.batch_size, args.image_size = 3, 2, 4, 32
        args.threads = args.threads or 1  # tiny tensors: more threads only add contention
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def synthetic_split(num: int, image_size: int, seed: int) -> TensorDataset:
    """Learnable random images: a faint fixed random template per class under strong noise."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.randn(SYNTHETIC_CLASSES, 3, image_size, image_size, generator=generator)
    labels = torch.randint(SYNTHETIC_CLASSES, (num,), generator=generator)
    noise = torch.randn(num, 3, image_size, image_size, generator=generator)
    return TensorDataset(SIGNAL * templates[labels] + noise, labels)


def image_folder_split(root: Path, image_size: int, train: bool) -> Dataset:
    """An ImageFolder split, resized and normalized with the ImageNet statistics."""
    from torchvision import datasets, transforms

    crop = transforms.RandomResizedCrop if train else transforms.CenterCrop
    steps = [] if train else [transforms.Resize(image_size)]
    steps += [crop(image_size), transforms.ToTensor()]
    steps.append(transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    return datasets.ImageFolder(str(root), transforms.Compose(steps))


def datasets_and_classes(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """Train and validation sets, from ``--data`` or synthetic, and the number of classes."""
    if args.data is None:
        # The same templates (seed) in both splits, different noise: validation is meaningful.
        num_train = args.batch_size * min(args.steps, 8)
        full = synthetic_split(num_train + 256, args.image_size, args.seed)
        images, labels = full.tensors
        train = TensorDataset(images[:num_train], labels[:num_train])
        return train, TensorDataset(images[num_train:], labels[num_train:]), SYNTHETIC_CLASSES
    train = image_folder_split(args.data / "train", args.image_size, train=True)
    val = image_folder_split(args.data / "val", args.image_size, train=False)
    return train, val, len(train.classes)


def forever(loader: DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches from ``loader``, epoch after epoch."""
    while True:
        yield from loader


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_set: Dataset,
    args: argparse.Namespace,
) -> None:
    """Fine-tune for ``args.steps`` steps while the DropPath rate warms up from 0."""
    scheduler = DropPathScheduler.linear_warmup(model, args.max_drop, args.warmup_steps)
    loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    if len(loader) == 0:
        raise SystemExit(f"fewer training images than --batch-size {args.batch_size}")
    batches = forever(loader)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, labels = next(batches)
        rate = scheduler.max_drop  # the rate this step trains with
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step == 1 or step % 5 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step:4d}  loss {loss.item():.4f}  max drop {rate:.4f}  {elapsed:.1f} s")


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        correct += (model(images).argmax(1) == labels).sum().item()
        total += len(labels)
    return correct / total


@torch.no_grad()
def remove_and_save(model: nn.Module, probe: Tensor, out: Path | None) -> None:
    """Remove DropPath, check eval outputs did not change, and save the plain state_dict."""
    model.eval()
    before = model(probe)
    remove_droppath(model)
    unchanged = torch.equal(before, model(probe))
    print(f"removed DropPath: eval outputs bit-identical: {unchanged}")
    if not unchanged:
        raise SystemExit("eval outputs changed when DropPath was removed")
    if out is not None:
        torch.save(model.state_dict(), out)
        print(f"saved {out} (loads into the unmodified architecture)")
