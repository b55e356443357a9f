"""Tiny trained CNNs on digits32 for export tests: dense, 90%-sparse, binary and filter-pruned.

Each net takes float32 NCHW images in [0, 1] and normalizes inside, like carddeck.nets. They are
trained for a few seconds, which is enough for the predictions to mean something (parity on
near-ties of an untrained net would test noise, not the exporter).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from carddeck.card import Compression, InputSpec
from carddeck.data.datasets import Dataset, load_dataset
from tests.cards import tiny_meta

MEAN, STD = (0.2, 0.2, 0.2), (0.3, 0.3, 0.3)


class Normalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TinyNet(nn.Module):
    """Normalize, 3 conv-BN-ReLU stages (one residual), global pooling, linear."""

    def __init__(self, width: int = 16, num_classes: int = 10, affine_bn: bool = True) -> None:
        super().__init__()
        w = width
        self.norm = Normalize()
        self.conv1 = nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w, affine=affine_bn)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w, affine=affine_bn)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * w, affine=affine_bn)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(self.norm(x))))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))

    def prunable(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.conv3, self.fc]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def train(model: nn.Module, data: Dataset, epochs: int, *, after_step=None, lr: float = 0.1, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x, y = to_tensor(data.images), torch.from_numpy(data.labels)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if after_step is not None:
                after_step(model)
    recalibrate_bn(model, x)


def recalibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Exact BatchNorm statistics over the training images (a few dozen steps leave them lagging)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 256):
            model(x[i : i + 256])
    model.eval()


def accuracy(model: nn.Module, data: Dataset) -> float:
    with torch.inference_mode():
        return float((model(to_tensor(data.images)).argmax(1).numpy() == data.labels).mean())


def card_meta(name: str, method: str, sparsity: float = 0.0, bits: int = 32, structured: bool = False):
    meta = tiny_meta(name)
    return meta.replace(
        architecture="tinynet",
        input=InputSpec(height=32, width=32, mean=MEAN, std=STD),
        compression=Compression(method=method, sparsity=sparsity, weight_bits=bits, structured=structured),
    )


@pytest.fixture(scope="session")
def digits() -> dict[str, Dataset]:
    return {s: load_dataset("digits32", s) for s in ("train", "val", "test")}


@pytest.fixture(scope="session")
def dense_net(digits) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet(width=16)
    train(model, digits["train"], epochs=4)
    return model


def _masks(model: TinyNet, sparsity: float) -> list[torch.Tensor]:
    """Per-layer magnitude masks keeping the largest (1 - sparsity) of each weight."""
    masks = []
    for m in model.prunable():
        w = m.weight.detach().abs().flatten()
        k = max(1, int(round((1 - sparsity) * w.numel())))
        threshold = w.topk(k).values[-1]
        masks.append((m.weight.detach().abs() >= threshold).float())
    return masks


@pytest.fixture(scope="session")
def sparse_net(dense_net, digits) -> TinyNet:
    """LRR-like: 90% of each conv/linear weight exactly zero, retrained with the mask held."""
    model = copy.deepcopy(dense_net)
    masks = _masks(model, 0.9)

    def apply(m: TinyNet) -> None:
        with torch.no_grad():
            for layer, mask in zip(m.prunable(), masks):
                layer.weight.mul_(mask)

    apply(model)
    train(model, digits["train"], epochs=3, after_step=apply, lr=0.05)
    return model


@pytest.fixture(scope="session")
def binary_net(digits) -> TinyNet:
    """biprop-like: effective weights sign(w) * alpha * mask per layer, non-affine BatchNorm.

    Trained with a straight-through estimator over latent weights, then the effective weights
    are written into a plain TinyNet (what a card.pt holds).
    """
    torch.manual_seed(1)
    latent = TinyNet(width=16, affine_bn=False)
    train(latent, digits["train"], epochs=3)

    def binarize(w: torch.Tensor, keep: float = 0.5) -> torch.Tensor:
        k = max(1, int(round(keep * w.numel())))
        mask = (w.abs() >= w.abs().flatten().topk(k).values[-1]).float()
        alpha = (w.abs() * mask).sum() / mask.sum()
        return torch.sign(w) * alpha * mask

    layers = latent.prunable()
    originals = [layer.weight for layer in layers]
    for layer in layers:  # weight becomes the STE binarization of a latent parameter
        del layer.weight
    torch.manual_seed(1)
    x, y = to_tensor(digits["train"].images), torch.from_numpy(digits["train"].labels)
    opt = torch.optim.SGD([*originals, *latent.parameters()], lr=0.1, momentum=0.9)
    latent.train()
    for _ in range(10):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            for layer, w in zip(layers, originals):
                layer.weight = w + (binarize(w) - w).detach()
            opt.zero_grad()
            nn.functional.cross_entropy(latent(x[idx]), y[idx]).backward()
            opt.step()
    model = TinyNet(width=16, affine_bn=False)
    state = {k: v for k, v in latent.state_dict().items()}
    for name, w in zip(("conv1", "conv2", "conv3", "fc"), originals):
        state[f"{name}.weight"] = binarize(w.detach())
    model.load_state_dict(state)
    recalibrate_bn(model, x)
    return model


@pytest.fixture(scope="session")
def filter_net(digits) -> TinyNet:
    """The physically smaller network that filter pruning leaves (half the filters)."""
    torch.manual_seed(2)
    model = TinyNet(width=8)
    train(model, digits["train"], epochs=4)
    return model
