"""Importance criteria: which weights or filters to keep."""

from __future__ import annotations

import torch
from torch import nn

from carddeck.compress.masks import Masks, named_tensors
from carddeck.nets import ChannelGroup


def global_topk(scores: dict[str, torch.Tensor], keep: int, *, eligible: Masks | None = None) -> Masks:
    """Keep exactly ``keep`` entries with the highest scores over all tensors together.

    Entries outside ``eligible`` (already pruned) are never kept, so pruning only shrinks a mask.
    torch.topk breaks ties, so the count is exact even with equal scores.
    """
    names = list(scores)
    flat = []
    for n in names:
        s = scores[n].detach().flatten().float()
        if eligible is not None and n in eligible:
            s = torch.where(eligible[n].flatten().to(s.device), s, torch.full_like(s, -float("inf")))
        flat.append(s)
    allscores = torch.cat(flat)
    keep = max(0, min(keep, allscores.numel()))
    chosen = torch.zeros(allscores.numel(), dtype=torch.bool, device=allscores.device)
    chosen[torch.topk(allscores, keep, sorted=False).indices] = True
    out: Masks = {}
    start = 0
    for n in names:
        size = scores[n].numel()
        out[n] = chosen[start : start + size].view_as(scores[n])
        start += size
    return out


def magnitude(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    tensors = named_tensors(model)
    return {n: tensors[n].detach().abs() for n in names}


def filter_l1(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Li et al.'s filter importance: the L1 norm of each filter, summed over the group's producers."""
    modules = dict(model.named_modules())
    total = torch.zeros(group.size)
    for conv, _bn in group.producers:
        w = modules[conv].weight.detach()  # type: ignore[union-attr]
        total += w.abs().sum(dim=(1, 2, 3)).cpu()
    return total


def filter_grad(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """GraNet's regrowth score: the absolute gradient sum of each filter, over the group's producers."""
    modules = dict(model.named_modules())
    total = torch.zeros(group.size)
    for conv, _bn in group.producers:
        g = modules[conv].weight.grad  # type: ignore[union-attr]
        if g is not None:
            total += g.detach().abs().sum(dim=(1, 2, 3)).cpu()
    return total
