"""The one training loop every method shares.

SGD with momentum, a per-step learning-rate schedule replayed each round, the domain's
augmentation applied per batch in numpy (seeded per round and epoch, so a resumed run sees the
same batches), optional AugMix Jensen-Shannon consistency loss, validation accuracy per epoch and
a checkpoint callback after every epoch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carddeck.compress.methods import Method
from carddeck.compress.schedules import lr_factor
from carddeck.data.datasets import Dataset
from carddeck.data.domains import augment

log = logging.getLogger(__name__)

JSD_WEIGHT = 12.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    domain: str = "clean"
    jsd: bool = False
    jsd_weight: float = JSD_WEIGHT
    seed: int = 0
    progress: bool = True


@dataclass
class Position:
    """Where training stands: the round and the number of epochs of it already done."""

    round: int = 0
    epoch: int = 0


# Called after every epoch with (position after the epoch, optimizer, scheduler, epoch record).
EpochCallback = Callable[[Position, torch.optim.Optimizer, Any, dict[str, Any]], None]


def to_nchw(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 500) -> np.ndarray:
    """Predicted labels for uint8 NHWC ``images``."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = to_nchw(images[i : i + batch_size].astype(np.float32) / np.float32(255.0), device)
        out.append(model(x).argmax(1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    return float((predict(model, images, device) == labels).mean())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 64) -> None:
    """Re-estimate every BatchNorm's running statistics on uint8 NHWC ``images`` (a cumulative average); weights
    untouched. After a prune (lobs, dsa, dipgo, filter) the statistics describe the net before it. The images
    are visited in a fixed shuffled order: the variance is an average of per-batch variances, and batches of a
    split stored class by class miss the spread between classes (leaves32's filter CARDs, 1024 sorted views:
    val 59.8% -> 72.0% shuffled)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m, m.momentum) for m in bns]
    was_training = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        order = np.random.default_rng(0).permutation(len(images))
        for i in range(0, len(images) - 1, batch_size):  # no batch of one image (BatchNorm needs two)
            batch = images[order[i : i + batch_size]]
            if len(batch) > 1:
                model(to_nchw(batch.astype(np.float32) / np.float32(255.0), device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)


def jsd_consistency(logits_clean: torch.Tensor, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """AugMix's Jensen-Shannon divergence between the clean and two augmented predictions."""
    p = [F.softmax(z, dim=1) for z in (logits_clean, logits_a, logits_b)]
    log_mixture = torch.clamp((p[0] + p[1] + p[2]) / 3.0, 1e-7, 1.0).log()
    return sum(F.kl_div(log_mixture, q, reduction="batchmean") for q in p) / 3.0  # type: ignore[return-value]


def _backward(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, labels: torch.Tensor, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the gradients, forward, backward; returns (loss, clean logits)."""
    optimizer.zero_grad(set_to_none=True)
    logits = model(x)
    if config.jsd:
        clean, a, b = torch.split(logits, len(labels))
        loss = F.cross_entropy(clean, labels) + config.jsd_weight * jsd_consistency(clean, a, b)
    else:
        clean, loss = logits, F.cross_entropy(logits, labels)
    loss.backward()
    return loss, clean


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size  # drop the last partial batch (BatchNorm dislikes tiny batches)


def train(
    model: nn.Module,
    method: Method,
    config: TrainConfig,
    train_set: Dataset,
    val_set: Dataset,
    device: torch.device,
    *,
    start: Position | None = None,
    resume_state: dict[str, Any] | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` through all of ``method``'s rounds from ``start``; returns per-epoch records."""
    start = start or Position()
    history: list[dict[str, Any]] = []
    per_epoch = steps_per_epoch(len(train_set), config.batch_size)
    steps = per_epoch * config.epochs
    for r in range(start.round, method.num_rounds()):
        if method.skip_round(r):
            continue
        first_epoch = start.epoch if r == start.round else 0
        if first_epoch >= config.epochs:
            continue
        if first_epoch == 0:
            method.start_round(model, r, steps)
        optimizer = torch.optim.SGD(
            method.trainable(model), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.schedule, steps))
        if first_epoch > 0 and resume_state is not None:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
        for epoch in range(first_epoch, config.epochs):
            record = _epoch(model, method, config, train_set, device, optimizer, scheduler, r, epoch, per_epoch)
            method.refresh(model)
            record["val_accuracy"] = accuracy(model, val_set.images, val_set.labels, device)
            history.append(record)
            log.info(
                "round %d epoch %d/%d: loss %.4f, train acc %.4f, val acc %.4f",
                r, epoch + 1, config.epochs, record["loss"], record["train_accuracy"], record["val_accuracy"],
            )  # fmt: skip
            if on_epoch_end is not None:
                on_epoch_end(Position(r, epoch + 1), optimizer, scheduler, record)
    return history


def _epoch(
    model: nn.Module,
    method: Method,
    config: TrainConfig,
    data: Dataset,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    r: int,
    epoch: int,
    per_epoch: int,
) -> dict[str, Any]:
    rng = np.random.default_rng([config.seed, r, epoch])
    torch.manual_seed(config.seed * 1_000_003 + r * 1009 + epoch)
    order = rng.permutation(len(data))
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    bar = None
    if config.progress:
        from tqdm import tqdm  # lazily: tqdm is in the train extra

        bar = tqdm(total=per_epoch, desc=f"round {r} epoch {epoch + 1}/{config.epochs}", leave=False)
    for i in range(per_epoch):
        idx = order[i * config.batch_size : (i + 1) * config.batch_size]
        images, labels = data.images[idx], torch.from_numpy(data.labels[idx]).to(device)
        if config.jsd:
            views = [augment(images, "clean", rng)] + [augment(images, config.domain, rng) for _ in range(2)]
            x = to_nchw(np.concatenate(views), device)
        else:
            x = to_nchw(augment(images, config.domain, rng), device)
        grad_fn = functools.partial(_backward, model, optimizer, x, labels, config)
        step = epoch * per_epoch + i
        method.before_step(model, r, step, per_epoch * config.epochs, grad_fn)
        loss, logits = _backward(model, optimizer, x, labels, config)
        optimizer.step()
        scheduler.step()
        method.after_step(model)
        total_loss += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(idx)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", lr=f"{scheduler.get_last_lr()[0]:.4f}")
    if bar is not None:
        bar.close()
    return {"round": r, "epoch": epoch + 1, "loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
