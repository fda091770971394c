"""Fine-tune a torchvision ResNet with injected DropPath and a drop-rate warmup.

torchvision's ResNets have no stochastic depth of their own; ``inject_droppath`` puts a DropPath
on the residual branch of every BasicBlock/Bottleneck, and the largest rate ramps up from 0 to
``--max-drop`` over ``--warmup-steps``. Offline by default: random weights, synthetic images.

    python examples/finetune_torchvision_resnet.py            # about a minute on 2 CPU cores
    python examples/finetune_torchvision_resnet.py --data DIR --pretrained --image-size 224
"""

from __future__ import annotations

import torch
from finetune_common import accuracy, datasets_and_classes, parse, parser, remove_and_save, train
from torch import nn
from torchvision.models import get_model

from droppath_inject import inject_droppath


def build(name: str, pretrained: bool, num_classes: int) -> nn.Module:
    """The model with a fresh ``num_classes`` head (ImageNet weights with ``pretrained``)."""
    if not pretrained:
        return get_model(name, weights=None, num_classes=num_classes)
    model = get_model(name, weights="DEFAULT")
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(__doc__.split("\n\n")[0], "resnet18", 64, 0.01), argv)
    train_set, val_set, num_classes = datasets_and_classes(args)
    model = build(args.model, args.pretrained, num_classes)
    probe = torch.randn(2, 3, args.image_size, args.image_size)
    model, report = inject_droppath(model, args.max_drop, example_inputs=probe, return_report=True)
    print(report)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    train(model, optimizer, train_set, args)
    print(f"final validation accuracy: {accuracy(model, val_set, args.batch_size):.4f}")
    remove_and_save(model, probe, args.out)


if __name__ == "__main__":
    main()
