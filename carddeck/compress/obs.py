"""Layer-wise Optimal Brain Surgeon: the second-order pruning step of L-OBS (Dong et al. 2017).

For a conv or linear layer with weight rows w (one per output channel, ``d = in * k * k`` entries)
and input patches x, the layer-output reconstruction error of a change dw is ``dw H dw^T`` with
``H = E[x x^T]``: the same ``d x d`` Hessian for every row (L-OBS's block-diagonal structure), so
one damped Hessian per layer is shared by all rows. Conv inputs are unfolded into patches.

Removing weight q of a row costs ``w_q^2 / (2 [H^-1]_qq)`` (its saliency) once the other weights
take the OBS correction ``dw = -w_q / [H^-1]_qq * H^-1[:, q]``. For a whole pruned set P the optimal
correction is the multi-weight OBS solution: the kept weights K solve ``H_KK w_K = (H w0)_K``.

Departures from the paper, and why:

* Row-wise OBS with a shared Hessian, as OBC (Frantar & Alistarh 2022) does: rows of a layer compete
  for the layer's pruning budget by saliency, so one layer's count is split over its rows where
  the error is lowest.
* L-OBS prunes with the saliencies of the dense layer; OBC re-scores after every single weight.
  Here the saliencies are re-scored ``steps`` times on the way to the target (each time with the
  exact per-row inverse ``(H_KK)^-1`` of the surviving weights), and the final weights are the exact
  multi-weight OBS solution for the chosen set (equal to the sequential OBS updates).
  One weight at a time would cost ``d`` inverse updates per row; a few steps cost a few batched
  solves, each gathered down to the surviving weights.
* All Hessians are measured in one pass through the dense network (as L-OBS does), not on the
  outputs of already-pruned layers (as OBC and SparseGPT do).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DAMP = 0.01  # times the mean diagonal, added to H: keeps H invertible (dead inputs, few images)
MAX_BATCH_ELEMENTS = 2**24  # rows x d x d float64 values solved at once (128 MB)


def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows of ``d`` values, one per output position (conv: unfolded)."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions are not supported ({module})")
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # type: ignore[arg-type]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def layer_hessians(
    model: nn.Module, names: list[str], images: np.ndarray, device: torch.device, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """``H = E[x x^T]`` (float64, undamped) of each named layer's inputs over uint8 NHWC ``images``."""
    from carddeck.compress.train import to_nchw

    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(names, 0)

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
            x = patches(module, inputs[0].float())
            xx = (x.T @ x).double()
            sums[name] = sums[name] + xx if name in sums else xx
            counts[name] += x.shape[0]

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            model(to_nchw(images[i : i + batch_size].astype(np.float32) / np.float32(255.0), device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (sums[n] / counts[n]).cpu() for n in names}


def damped(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    h = h.double()
    scale = float(h.diagonal().mean()) or 1.0
    return h + damp * scale * torch.eye(h.shape[0], dtype=h.dtype)


def _solve(w0: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The multi-weight OBS solution for each row's kept set K, and the diagonal of ``(H_KK)^-1``.

    Each row's system is gathered down to its kept entries (padded with the identity to the
    longest row of the chunk), so the cost falls with the cube of the density.
    """
    rows, _d = w0.shape
    hw0 = w0 @ h  # (H w0) per row (h is symmetric)
    weights = torch.zeros_like(w0)
    diags = torch.ones_like(w0)
    kept = keep.sum(dim=1)
    m = int(kept.max())
    if m == 0:
        return weights, diags
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :m]  # kept indices first
    valid = torch.arange(m).unsqueeze(0) < kept.unsqueeze(1)
    chunk = max(1, MAX_BATCH_ELEMENTS // (m * m))
    for i in range(0, rows, chunk):
        idx, v = order[i : i + chunk], valid[i : i + chunk].double()
        a = h[idx.unsqueeze(2), idx.unsqueeze(1)] * v.unsqueeze(2) * v.unsqueeze(1) + torch.diag_embed(1.0 - v)
        inv = torch.linalg.inv(a)
        w_k = torch.einsum("rij,rj->ri", inv, hw0[i : i + chunk].gather(1, idx) * v) * v
        r = torch.arange(i, i + len(idx)).unsqueeze(1)
        weights[r, idx] = torch.where(v > 0, w_k, weights[r, idx])
        diags[r, idx] = torch.where(v > 0, inv.diagonal(dim1=1, dim2=2), diags[r, idx])
    untouched = keep.all(dim=1, keepdim=True)  # exactly as they were, not H^-1 H w0 up to rounding
    return torch.where(untouched, w0, weights), diags


def saliency(w: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """OBS's error increase ``w_q^2 / (2 [H^-1]_qq)`` of removing each weight alone."""
    return w.pow(2) / (2.0 * hinv_diag)


def obs_prune(
    weight: torch.Tensor, hessian: torch.Tensor, count: int, *, steps: int = 3, damp: float = DAMP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``count`` weights of one layer by OBS saliency with OBS correction.

    Returns (corrected weight with the pruned entries exactly 0, keep mask), both shaped like
    ``weight``. ``steps`` re-scorings on the way to ``count`` (see the module docstring).
    """
    shape, dtype = weight.shape, weight.dtype
    w0 = weight.detach().reshape(shape[0], -1).double().cpu()
    count = max(0, min(int(count), w0.numel()))
    h = damped(hessian, damp)
    keep = torch.ones_like(w0, dtype=torch.bool)
    if count == 0:
        return weight.detach().clone(), keep.view(shape)
    w, hinv_diag = w0, torch.linalg.inv(h).diagonal().expand_as(w0)
    steps = max(1, min(steps, count))
    density = 1.0 - count / w0.numel()
    for s in range(1, steps + 1):
        # geometric in density (as LRR's rounds): each re-scoring removes the same fraction
        target = count if s == steps else round(w0.numel() * (1.0 - density ** (s / steps)))
        more = target - int((~keep).sum())
        if more > 0:
            score = torch.where(keep, saliency(w, hinv_diag), torch.full_like(w, torch.inf)).flatten()
            drop = torch.topk(score, more, largest=False).indices
            keep = keep.flatten().clone()
            keep[drop] = False
            keep = keep.view_as(w0)
        w, hinv_diag = _solve(w0, h, keep)
    return w.to(dtype).view(shape).to(weight.device), keep.view(shape).to(weight.device)


def reconstruction_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum over rows of dw H dw^T``: the mean squared change of the layer's outputs (undamped H)."""
    dw = (pruned - weight).detach().reshape(weight.shape[0], -1).double().cpu()
    return float(torch.einsum("ri,ij,rj->", dw, hessian.double(), dw))
