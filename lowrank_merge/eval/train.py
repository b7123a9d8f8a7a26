"""Pretraining, frozen-feature heads and full fine-tuning of the small ViT.

The pipeline mirrors the paper's CLIP setting at a small scale: one backbone
is pretrained on a generic corpus whose classes are disjoint from every task;
each task gets a linear head fit on frozen pretrained features (the analogue
of CLIP's zero-shot head), which is then frozen while the whole backbone is
fine-tuned on that task.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Split, Task
from .model import VisionTransformer, ViTConfig

StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class TrainingConfig:
    pretrain_per_class: int = 150
    pretrain_strength: float = 0.3  # milder distortion than the tasks': they are a shift away
    pretrain_steps: int = 500
    pretrain_lr: float = 2e-3
    pretrain_batch_size: int = 128
    head_steps: int = 100
    head_lr: float = 1e-2
    finetune_steps: int = 150
    finetune_lr: float = 5e-4
    batch_size: int = 64
    weight_decay: float = 0.05

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(
    images: Tensor, labels: Tensor, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, Tensor]]:
    """``steps`` minibatches, reshuffling each epoch."""
    order = torch.randperm(len(labels), generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > len(order):
            order, position = torch.randperm(len(labels), generator=generator), 0
        index = order[position : position + batch_size]
        position += batch_size
        yield images[index], labels[index]


def _fit(
    parameters: list[nn.Parameter],
    loss_of: Callable[[Tensor, Tensor], Tensor],
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    seed: int,
) -> None:
    """AdamW with linear warm-up and cosine decay over ``steps`` minibatches."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    schedule = _cosine_schedule(optimizer, steps, warmup=max(1, steps // 10))
    generator = torch.Generator().manual_seed(seed)
    for batch_images, batch_labels in _batches(images, labels, batch_size, steps, generator):
        loss = loss_of(batch_images, batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


def pretrain(corpus: tuple[Tensor, Tensor], model_config: ViTConfig, config: TrainingConfig, seed: int) -> StateDict:
    """Train a backbone with a throw-away linear classifier on the corpus."""
    torch.manual_seed(seed)
    images, labels = corpus
    backbone = VisionTransformer(model_config)
    classifier = nn.Linear(model_config.width, int(labels.max()) + 1)
    backbone.train()

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(classifier(backbone(x)), y)

    parameters = list(backbone.parameters()) + list(classifier.parameters())
    _fit(parameters, loss_of, images, labels, steps=config.pretrain_steps, lr=config.pretrain_lr,
         batch_size=config.pretrain_batch_size, weight_decay=config.weight_decay, seed=seed)
    return {name: value.detach().clone() for name, value in backbone.state_dict().items()}


@torch.inference_mode()
def features(backbone: VisionTransformer, images: Tensor, batch_size: int = 1024) -> Tensor:
    backbone.eval()
    return torch.cat([backbone(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def fit_head(backbone: VisionTransformer, task: Task, config: TrainingConfig, seed: int) -> nn.Linear:
    """A linear head on frozen features of the training split (full-batch AdamW)."""
    torch.manual_seed(seed)
    train_features = features(backbone, task.train.images).clone()
    head = nn.Linear(train_features.shape[1], task.num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.head_lr, weight_decay=config.weight_decay)
    for _ in range(config.head_steps):
        loss = F.cross_entropy(head(train_features), task.train.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    head.requires_grad_(False)
    return head


def finetune(
    pretrained: StateDict, model_config: ViTConfig, head: nn.Linear, task: Task, config: TrainingConfig, seed: int
) -> StateDict:
    """Fine-tune the whole backbone on one task with its head frozen."""
    torch.manual_seed(seed)
    backbone = VisionTransformer(model_config)
    backbone.load_state_dict(pretrained)
    backbone.train()

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(head(backbone(x)), y)

    _fit(list(backbone.parameters()), loss_of, task.train.images, task.train.labels, steps=config.finetune_steps,
         lr=config.finetune_lr, batch_size=config.batch_size, weight_decay=config.weight_decay, seed=seed)
    return {name: value.detach().clone() for name, value in backbone.state_dict().items()}


@torch.inference_mode()
def accuracy(backbone: VisionTransformer, head: nn.Linear, split: Split) -> float:
    """Top-1 accuracy in percent."""
    predictions = head(features(backbone, split.images)).argmax(dim=1)
    return 100.0 * (predictions == split.labels).float().mean().item()
