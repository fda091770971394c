"""Does injected DropPath help a small residual network on a real dataset? Measure it.

scikit-learn's digits (1,797 8x8 images, shipped inside the package: nothing is downloaded)
are split once into fixed train and validation halves. A residual MLP is trained from the same
initialisation and on the same batch order for each seed, once as it is and once per DropPath
rate injected by ``inject_droppath``; the final validation accuracy and loss and the
generalization gap (validation loss minus training loss, both in eval mode) are averaged over
seeds. Each DropPath setting is compared with the baseline by a paired t-test over the seeds;
the p-values are corrected for the table's comparisons (Holm-Bonferroni) and the verdict says
"no significant difference" unless the corrected p < 0.05.

    python examples/digits_experiment.py              # the docs table, 5 to 16 min of CPU on 1 core
    python examples/digits_experiment.py --smoke      # a few seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import ttest_rel
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from droppath_inject import inject_droppath

METRICS = ("val_acc", "val_loss", "train_loss", "gap")
HIGHER_IS_BETTER = {"val_acc"}


class ResidualBlock(nn.Module):
    """Pre-norm MLP block: ``x + W2 gelu(W1 norm(x))``; its add is what gets a DropPath."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """Linear stem, ``depth`` residual blocks, norm and linear head."""

    def __init__(self, depth: int, width: int, in_features: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))


@dataclass(frozen=True)
class Data:
    """The fixed split, as tensors."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor


@dataclass(frozen=True)
class Run:
    """Final metrics of one training run (all measured in eval mode)."""

    max_drop: float
    seed: int
    val_acc: float
    val_loss: float
    train_loss: float
    gap: float


def load_data(val_fraction: float, split_seed: int) -> Data:
    """Digits scaled to [0, 1], split once, stratified by class."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    parts = train_test_split(
        x, y, test_size=val_fraction, random_state=split_seed, stratify=digits.target
    )
    x_train, x_val, y_train, y_val = parts
    return Data(x_train, y_train, x_val, y_val)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy in eval mode (DropPath is the identity there)."""
    model.eval()
    logits = model(x)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    return accuracy, F.cross_entropy(logits, y).item()


def train_one(data: Data, args: argparse.Namespace, max_drop: float, seed: int) -> Run:
    """Train from seed ``seed``'s initialisation; ``max_drop > 0`` injects DropPath first."""
    torch.manual_seed(seed)
    model = ResidualMLP(args.depth, args.width)
    if max_drop > 0:
        inject_droppath(model, max_drop, example_inputs=data.x_train[:2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    order = torch.Generator().manual_seed(seed)  # same batches whatever DropPath draws
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(data.y_train), generator=order).split(args.batch_size):
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    _, train_loss = evaluate(model, data.x_train, data.y_train)
    val_acc, val_loss = evaluate(model, data.x_val, data.y_val)
    return Run(max_drop, seed, val_acc, val_loss, train_loss, val_loss - train_loss)


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std; 0 for a single run)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def paired_p(runs: list[Run], baseline: list[Run], metric: str) -> float | None:
    """Paired t-test p-value over seeds, or None when there is nothing to test."""
    ours, theirs = [getattr(r, metric) for r in runs], [getattr(b, metric) for b in baseline]
    if len(ours) < 2 or ours == theirs:
        return None
    return float(ttest_rel(ours, theirs).pvalue)


def holm(pvalues: dict[tuple[float, str], float]) -> dict[tuple[float, str], float]:
    """Holm-Bonferroni adjusted p-values over every comparison of the table (step-down)."""
    order = sorted(pvalues, key=lambda key: pvalues[key])
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def verdict(mean_diff: float, p: float | None, adjusted: float | None, metric: str) -> str:
    """Mean difference, raw and Holm-adjusted p, and the verdict at adjusted p < 0.05."""
    if p is None or adjusted is None:
        return f"{mean_diff:+.4f} (no test: too few seeds or identical runs)"
    tested = f"{mean_diff:+.4f} (p = {p:.3f}, Holm {adjusted:.3f}"
    if adjusted >= 0.05:
        return f"{tested}: no significant difference)"
    better = (mean_diff > 0) == (metric in HIGHER_IS_BETTER)
    return f"{tested}: significantly {'better' if better else 'worse'})"


COMPARED = ("val_acc", "val_loss", "gap")


def table(results: dict[float, list[Run]]) -> str:
    """Markdown tables: metrics by setting, then each setting's paired difference to baseline,
    its p-value corrected (Holm) for all the comparisons in the table."""
    lines = [
        "| max_drop | val accuracy | val loss | train loss | gap (val - train loss) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for max_drop, runs in results.items():
        cells = [mean_std([getattr(r, m) for r in runs]) for m in METRICS]
        lines.append(f"| {max_drop:g} | " + " | ".join(cells) + " |")
    baseline = results[0.0]
    compared = [(d, m) for d in results if d > 0 for m in COMPARED]
    raw = {key: paired_p(results[key[0]], baseline, key[1]) for key in compared}
    adjusted = holm({key: p for key, p in raw.items() if p is not None})
    lines += [
        "",
        "| vs. baseline | Δ val accuracy | Δ val loss | Δ gap |",
        "| --- | --- | --- | --- |",
    ]
    for max_drop, runs in results.items():
        if max_drop > 0:
            cells = []
            for metric in COMPARED:
                diff = statistics.mean(getattr(r, metric) for r in runs) - statistics.mean(
                    getattr(b, metric) for b in baseline
                )
                key = (max_drop, metric)
                cells.append(verdict(diff, raw[key], adjusted.get(key), metric))
            lines.append(f"| {max_drop:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-drops", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--seeds", type=int, default=20, help="seeds 0 .. N-1")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--depth", type=int, default=8, help="residual blocks")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--val-fraction", type=float, default=0.5)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small matmuls)")
    parser.add_argument("--json", type=Path, help="also write every run and the settings here")
    parser.add_argument("--smoke", action="store_true", help="2 seeds, 2 epochs: a quick check")
    args = parser.parse_args(argv)
    if not all(0 < d <= 1 for d in args.max_drops):
        parser.error("--max-drops must lie in (0, 1]: the baseline (no DropPath) always runs")
    if args.smoke:
        args.seeds, args.epochs = 2, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_data(args.val_fraction, args.split_seed)
    print(
        f"digits: {len(data.y_train)} train / {len(data.y_val)} validation samples; "
        f"{args.depth} residual blocks of width {args.width}, {args.epochs} epochs, "
        f"seeds 0..{args.seeds - 1}"
    )
    start = time.perf_counter()
    results: dict[float, list[Run]] = {}
    for max_drop in [0.0, *args.max_drops]:
        results[max_drop] = [train_one(data, args, max_drop, s) for s in range(args.seeds)]
        accuracy = statistics.mean(r.val_acc for r in results[max_drop])
        print(f"max_drop {max_drop:g}: mean val accuracy {accuracy:.4f}", flush=True)
    print(f"\n{table(results)}\n\ntook {time.perf_counter() - start:.1f} s")
    if args.json:
        runs = [asdict(r) for runs in results.values() for r in runs]
        report = {"settings": vars(args), "runs": runs}
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
