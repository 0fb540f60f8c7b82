"""A grid of linear classifiers trained together on frozen-backbone features (DINOv2 linear protocol).

The official ``dinov2/eval/linear.py`` trains many linear heads at once: every backbone output feeds
all of them, one per (learning rate, number of last blocks, avgpool) combination, and the summed
cross-entropy is minimised with one SGD optimiser (the heads share no parameters, so each is trained
exactly as if alone). This module is that grid on feature tensors; ``dinolab.eval.linear`` feeds it
from images.

Features are a dict with two entries (float32, any device):

- ``"cls"``: (N, K, D) CLS tokens of the last K blocks, in block order (the last block last);
- ``"patch_mean"``: (N, D) mean of the last block's patch tokens.

The input of a head with ``n_blocks = n`` and ``avgpool`` is the concatenation of the CLS tokens of
the last n blocks, then (if ``avgpool``) the patch mean: dimension ``(n + avgpool) * D``.

Learning rates are given per batch of 256 and scaled linearly by ``batch_size / 256`` (the official
``scale_lr``, with the global batch size); ``HeadConfig.lr`` is the rate actually used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dinolab.errors import DinolabError
from dinolab.eval.metrics import topk_correct

# The official grid (dinov2/eval/linear.py), per 256 images.
DEFAULT_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
Features = Mapping[str, Tensor]


@dataclass(frozen=True)
class HeadConfig:
    """One classifier of the grid: ``lr`` = ``base_lr * batch_size / 256`` is the rate used."""

    base_lr: float
    lr: float
    n_blocks: int
    avgpool: bool

    def as_dict(self) -> dict:
        return asdict(self)


def scale_lr(base_lr: float, batch_size: int) -> float:
    """The official linear scaling rule: ``base_lr * batch_size / 256``."""
    return base_lr * batch_size / 256.0


def make_configs(
    lrs: Sequence[float] | None, n_blocks: Sequence[int], avgpool: Sequence[bool], batch_size: int
) -> list[HeadConfig]:
    """The grid n_blocks x avgpool x lrs (official order); checks the values."""
    lrs = tuple(DEFAULT_LRS if lrs is None else lrs)
    if not lrs or any(not lr > 0 for lr in lrs):
        raise DinolabError(f"lrs must be a non-empty list of positive learning rates, got {lrs}")
    if not n_blocks or any(not isinstance(n, int) or n < 1 for n in n_blocks):
        raise DinolabError(f"n_blocks must be a non-empty list of integers >= 1, got {n_blocks}")
    if not avgpool or any(not isinstance(a, bool) for a in avgpool):
        raise DinolabError(f"avgpool must be a non-empty list of booleans, got {avgpool}")
    if batch_size < 1:
        raise DinolabError(f"batch_size must be >= 1, got {batch_size}")
    return [
        HeadConfig(float(lr), scale_lr(float(lr), batch_size), n, a)
        for n in dict.fromkeys(n_blocks) for a in dict.fromkeys(avgpool) for lr in dict.fromkeys(lrs)
    ]


def linear_input(feats: Features, n_blocks: int, avgpool: bool) -> Tensor:
    """(B, (n_blocks + avgpool) * D) input of a head: last n CLS tokens, then the patch mean."""
    x = feats["cls"][:, -n_blocks:].flatten(1)  # (B, n * D)
    if avgpool:
        x = torch.cat((x, feats["patch_mean"]), dim=1)  # (B, (n + 1) * D)
    return x.float()


class LinearGrid(nn.Module):
    """The heads of the grid: ``nn.Linear`` each, weight ~ N(0, 0.01), bias 0 (official init)."""

    def __init__(
        self, configs: Sequence[HeadConfig], embed_dim: int, num_classes: int,
        *, generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.configs = list(configs)
        self.embed_dim, self.num_classes = embed_dim, num_classes
        self.heads = nn.ModuleList()
        for c in self.configs:
            head = nn.utils.skip_init(nn.Linear, (c.n_blocks + c.avgpool) * embed_dim, num_classes)
            nn.init.normal_(head.weight, mean=0.0, std=0.01, generator=generator)
            nn.init.zeros_(head.bias)
            self.heads.append(head)

    def forward(self, feats: Features) -> list[Tensor]:
        """Logits (B, num_classes) of every head; each distinct input is built once."""
        inputs: dict[tuple[int, bool], Tensor] = {}
        out = []
        for c, head in zip(self.configs, self.heads):
            key = (c.n_blocks, c.avgpool)
            if key not in inputs:
                inputs[key] = linear_input(feats, *key)
            out.append(head(inputs[key]))
        return out


def cosine_factor(step: int, total_steps: int) -> float:
    """Cosine decay from 1 at step 0 towards 0 at ``total_steps`` (``CosineAnnealingLR``, eta_min 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


class GridTrainer:
    """SGD (momentum 0.9, weight decay 0), one parameter group per head at its own lr, cosine
    schedule to 0 over ``total_steps``; the loss is the sum of the heads' cross-entropies."""

    def __init__(self, grid: LinearGrid, total_steps: int) -> None:
        self.grid, self.total_steps, self.steps = grid, max(1, total_steps), 0
        groups = [{"params": h.parameters(), "lr": c.lr, "base_lr": c.lr} for c, h in zip(grid.configs, grid.heads)]
        self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=0.0)

    def step(self, feats: Features, y: Tensor) -> Tensor:
        """One SGD step on a batch; returns the mean (over heads) loss, detached."""
        factor = cosine_factor(self.steps, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        logits = self.grid(feats)
        loss = torch.stack([F.cross_entropy(lg, y) for lg in logits]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        return loss.detach() / len(logits)


@torch.no_grad()
def evaluate_grid(
    grid: LinearGrid, feats: Features, y: Tensor, *, batch_size: int = 256
) -> tuple[list[dict[str, float]], Tensor]:
    """Per head ``{"top1", "top5", "loss"}`` (accuracies in %, top-5 = top-min(5, C), mean
    cross-entropy) and the predicted classes (N, H) int64 of every head (argmax, as
    ``dinolab.eval.metrics``: ties go to the lowest class index)."""
    device = next(grid.parameters()).device
    H, n = len(grid.heads), len(y)
    hits1, hits5, loss = torch.zeros(H), torch.zeros(H), torch.zeros(H)
    preds = []
    for s in range(0, n, batch_size):
        yb = y[s:s + batch_size].to(device)
        logits = grid({key: v[s:s + batch_size].to(device) for key, v in feats.items()})  # H x (B, C)
        hits = [topk_correct(lg, yb, (1, 5)) for lg in logits]
        hits1 += torch.stack([h[1].sum() for h in hits]).cpu()
        hits5 += torch.stack([h[5].sum() for h in hits]).cpu()
        loss += torch.stack([F.cross_entropy(lg, yb, reduction="sum") for lg in logits]).cpu()
        preds.append(torch.stack([lg.argmax(1) for lg in logits], dim=1).cpu())  # (B, H)
    metrics = [{"top1": 100.0 * float(hits1[i]) / n, "top5": 100.0 * float(hits5[i]) / n,
                "loss": float(loss[i]) / n} for i in range(H)]
    return metrics, torch.cat(preds)


@dataclass
class GridOutcome:
    """A trained grid and, per evaluation set name, the metrics and predictions of every head."""

    grid: LinearGrid
    metrics: dict[str, list[dict[str, float]]]
    predictions: dict[str, Tensor]


def check_features(feats: Features, y: Tensor, configs: Sequence[HeadConfig], name: str) -> None:
    """Raise ``DinolabError`` unless ``feats`` has the shapes the grid needs."""
    pooled = any(c.avgpool for c in configs)
    if "cls" not in feats or (pooled and "patch_mean" not in feats):
        raise DinolabError(f"{name} features need keys 'cls' (N, K, D) and, for avgpool heads, 'patch_mean' "
                           f"(N, D), got {list(feats)}")
    cls = feats["cls"]
    pm = feats["patch_mean"] if pooled else cls[:, -1]  # without avgpool heads patch_mean is never read
    if cls.ndim != 3 or pm.shape != (cls.shape[0], cls.shape[2]) or len(y) != cls.shape[0]:
        raise DinolabError(f"{name} features: 'cls' must be (N, K, D), 'patch_mean' (N, D) and labels (N,), "
                           f"got {tuple(cls.shape)}, {tuple(pm.shape)}, {tuple(y.shape)}")
    if len(y) == 0:
        raise DinolabError(f"{name} set is empty")
    if max(c.n_blocks for c in configs) > cls.shape[1]:
        raise DinolabError(f"n_blocks up to {max(c.n_blocks for c in configs)} needs that many CLS tokens, "
                           f"the {name} features have {cls.shape[1]}")


def build_grid(
    configs: Sequence[HeadConfig], embed_dim: int, num_classes: int, device: torch.device, seed: int
) -> LinearGrid:
    """A freshly initialised grid on ``device``; the init depends only on ``seed``."""
    return LinearGrid(configs, embed_dim, num_classes, generator=torch.Generator().manual_seed(seed)).to(device)


def train_linear_grid(
    train_feats: Features,
    train_y: Tensor,
    eval_sets: Mapping[str, tuple[Features, Tensor]],
    *,
    num_classes: int | None = None,
    lrs: Sequence[float] | None = None,
    n_blocks: Sequence[int] = (1, 4),
    avgpool: Sequence[bool] = (False, True),
    epochs: int = 10,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> GridOutcome:
    """Train the grid on cached features for ``epochs`` full shuffled passes (ceil(N / batch_size)
    steps each), then evaluate every head on each of ``eval_sets`` ({name: (features, labels)}).

    ``num_classes`` defaults to 1 + the largest training label. Deterministic for a given ``seed``
    (initialisation and shuffling use their own generator, not the global one).
    """
    configs = make_configs(lrs, n_blocks, avgpool, batch_size)
    if epochs < 1:
        raise DinolabError(f"epochs must be >= 1, got {epochs}")
    train_y = torch.as_tensor(train_y, dtype=torch.long)
    for name, (f, y) in {"train": (train_feats, train_y), **eval_sets}.items():
        check_features(f, torch.as_tensor(y), configs, name)
    num_classes = num_classes or int(train_y.max()) + 1
    for name, (_, y) in {"train": (None, train_y), **eval_sets}.items():
        y = torch.as_tensor(y)
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise DinolabError(f"{name} labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = build_grid(configs, train_feats["cls"].shape[-1], num_classes, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    trainer = GridTrainer(grid, epochs * math.ceil(len(train_y) / batch_size))
    with tqdm(total=trainer.total_steps, disable=not progress, desc="linear grid", unit="step") as bar:
        for _ in range(epochs):
            for idx in torch.randperm(len(train_y), generator=gen).split(batch_size):
                batch = {k: v[idx].to(device, non_blocking=True) for k, v in train_feats.items()}
                trainer.step(batch, train_y[idx].to(device))
                bar.update()
    return evaluate_sets(grid, eval_sets)


def evaluate_sets(grid: LinearGrid, eval_sets: Mapping[str, tuple[Features, Tensor]]) -> GridOutcome:
    """Evaluate every head of ``grid`` on each named set."""
    grid.eval()
    metrics, preds = {}, {}
    for name, (f, y) in eval_sets.items():
        metrics[name], preds[name] = evaluate_grid(grid, f, torch.as_tensor(y, dtype=torch.long))
    return GridOutcome(grid, metrics, preds)
