"""Keep-masks on named parameters and buffers, enforced in place after every optimizer step.

A mask is a bool tensor that broadcasts against its tensor (a weight's full shape for unstructured
pruning, ``[C, 1, 1, 1]`` or ``[C]`` for filters), keyed by the ``named_parameters`` /
``named_buffers`` name. Applying it zeroes what is pruned, so pruned weights stay exactly zero.
"""

from __future__ import annotations

import torch
from torch import nn

Masks = dict[str, torch.Tensor]


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    tensors = named_tensors(model)
    for name, mask in masks.items():
        t = tensors[name]
        t.mul_(mask.to(device=t.device, dtype=t.dtype))


def masks_to(masks: Masks, device: torch.device | str) -> Masks:
    return {k: v.to(device) for k, v in masks.items()}


def weight_sparsity(model: nn.Module, names: list[str]) -> float:
    """Fraction of exactly-zero entries over the named parameters."""
    tensors = named_tensors(model)
    total = sum(tensors[n].numel() for n in names)
    zeros = sum(int((tensors[n] == 0).sum()) for n in names)
    return zeros / total if total else 0.0
