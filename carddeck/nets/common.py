"""The architecture registry, the in-graph ``Normalize`` module and size/cost counters."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from carddeck.errors import InvalidInput
from carddeck.registry import Registry

# CIFAR-10 channel statistics: a neutral default; `carddeck compress` passes the training set's own.
DEFAULT_MEAN = (0.4914, 0.4822, 0.4465)
DEFAULT_STD = (0.2470, 0.2435, 0.2616)

NETS: Registry[Callable[..., nn.Module]] = Registry("architecture")


class Normalize(nn.Module):
    """(x - mean) / std per channel; buffers, so export puts normalization in the graph."""

    def __init__(self, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise InvalidInput(f"mean/std need 3 values with std > 0, got mean={mean} std={std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_net(arch: str, num_classes: int, **arch_kwargs: Any) -> nn.Module:
    """Build ``arch`` for ``num_classes``; unknown names or keyword arguments raise InvalidInput."""
    factory = NETS.get(arch)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise InvalidInput(f"num_classes must be an integer >= 2, got {num_classes!r}")
    accepted = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    unknown = sorted(set(arch_kwargs) - set(accepted))
    if unknown:
        raise InvalidInput(f"architecture {arch!r} has no option {unknown[0]!r}; accepted: {', '.join(accepted)}")
    return factory(num_classes=num_classes, **arch_kwargs)


def prunable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The conv and linear layers whose weights the compression methods prune or binarize."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters) over all parameters of the model."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return total, nonzero


def count_flops(model: nn.Module, height: int = 32, width: int = 32, *, sparse: bool = False) -> int:
    """Multiply-accumulates of one forward pass of conv and linear layers for one image.

    ``sparse=True`` counts only the MACs of nonzero weights (what unstructured pruning could save
    on hardware that skips zeros; ONNX Runtime does not).
    """
    total = 0

    def hook(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        weight = module.weight  # type: ignore[union-attr]
        per_weight = out.shape[2] * out.shape[3] if isinstance(module, nn.Conv2d) else 1
        kept = int(torch.count_nonzero(weight)) if sparse else weight.numel()
        total += kept * per_weight

    handles = [m.register_forward_hook(hook) for m in prunable_modules(model).values()]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
