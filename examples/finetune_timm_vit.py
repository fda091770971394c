"""Fine-tune a timm Vision Transformer with injected DropPath and a drop-rate warmup.

The model is built without stochastic depth (as a checkpoint often is), ``inject_droppath``
puts a DropPath on each of its residual branches, and the largest rate ramps up from 0 to
``--max-drop`` over ``--warmup-steps``. Offline by default: random weights, synthetic images.

    python examples/finetune_timm_vit.py                    # about a minute on 2 CPU cores
    python examples/finetune_timm_vit.py --data DIR --pretrained --image-size 224 --steps 1000
"""

from __future__ import annotations

import timm
import torch
from finetune_common import accuracy, datasets_and_classes, parse, parser, remove_and_save, train

from droppath_inject import inject_droppath


def main(argv: list[str] | None = None) -> None:
    args = parse(parser(__doc__.split("\n\n")[0], "vit_tiny_patch16_224", 64, 5e-4), argv)
    train_set, val_set, num_classes = datasets_and_classes(args)
    model = timm.create_model(
        args.model, pretrained=args.pretrained, num_classes=num_classes, img_size=args.image_size
    )
    probe = torch.randn(2, 3, args.image_size, args.image_size)
    model, report = inject_droppath(model, args.max_drop, example_inputs=probe, return_report=True)
    print(report)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    train(model, optimizer, train_set, args)
    print(f"final validation accuracy: {accuracy(model, val_set, args.batch_size):.4f}")
    remove_and_save(model, probe, args.out)


if __name__ == "__main__":
    main()
