"""DiP-GO: pruning as a few-step gradient optimization of learnable gates (NeurIPS 2024).

On a trained dense card, one gate per prunable unit (an inner channel of a residual block: a
channel of a filter-pruning ``block`` group) multiplies the outputs of the block's first BatchNorm.
The residual streams are not gated: a stream channel is read and written by every block of its
stage, so one stream gate weighs as many MACs as several inner channels and removes a feature every
later block relies on. (A first version gated them: it met the MACs budget by cutting streams and
landed 46 points below filter pruning at the same MACs.) The paper likewise gates blocks, whose
skipped computation leaves the features passed between blocks intact. With the weights frozen,
``--gate-steps`` Adam steps on ``--calib-images`` training images minimize the distillation loss
against the dense card (KL of the softened logits) plus
``PENALTY * |MACs(gates) / MACs(dense) - (1 - sparsity)|``, where MACs are the exact conv/linear
multiply-accumulates as a function of the channels left on. ``--sparsity`` is the fraction of the
dense MACs to remove.

Gates are hard in the forward pass (on when the logit is positive) with the sigmoid's gradient
(straight-through), and BatchNorm normalizes with each batch's statistics, so what is optimized is
the pruned network as it will be after its BatchNorm re-estimation. Afterwards the units are chosen
from the logits to hit the MACs target (within ``MACS_TOLERANCE``: the gates' own count may
overshoot it, so the weakest units go or the strongest return until it is met), removed physically
with filter pruning's exact removal (a smaller dense net, exported like a filter card), the
BatchNorm statistics are re-estimated on the calibration images, and the net is optionally
fine-tuned (``--epochs``, 0 allowed, at the light fine-tune rate of ``--finetune-lr``) with the
removed channels held at zero.

Departures from the paper: DiP-GO gates the blocks of a diffusion U-Net across denoising steps and
learns them with a consistency loss between the pruned and dense sampler; here the units are
channel groups of a classifier and the loss is distillation of the dense card's logits.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from carddeck.catalog import MethodSpec, Option
from carddeck.compress.filters import FilterPruning
from carddeck.compress.methods import METHODS
from carddeck.compress.train import recalibrate_batchnorm, to_nchw
from carddeck.errors import InvalidInput
from carddeck.nets import ChannelGroup, prunable_modules

log = logging.getLogger(__name__)

INIT_LOGIT = 2.0
LR = 0.05
PENALTY = 5.0
TEMPERATURE = 2.0
MACS_TOLERANCE = 0.01  # chosen units land in [1 - tol, 1] x the MACs target
GATE_BATCH = 16  # images per gate step: a few hundred steps cost about one epoch of a small set


@dataclass(frozen=True)
class MacTerm:
    """One layer's MACs: ``coef * in_channels * out_channels``; a group name where they are prunable."""

    coef: int  # output positions x kernel area
    in_group: str | None
    in_fixed: int
    out_group: str | None
    out_fixed: int


def mac_terms(model: nn.Module, groups: list[ChannelGroup], height: int, width: int) -> list[MacTerm]:
    out_of = {conv: g.name for g in groups for conv, _bn in g.producers}
    in_of = {c: g.name for g in groups for c in g.consumers}
    positions: dict[str, int] = {}
    modules = prunable_modules(model)

    def hook(name: str) -> Any:
        def record(_m: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            positions[name] = out.shape[2] * out.shape[3] if out.dim() == 4 else 1

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    terms = []
    for name, m in modules.items():
        w = m.weight  # type: ignore[union-attr]
        kernel = w[0, 0].numel()
        terms.append(MacTerm(positions[name] * kernel, in_of.get(name), w.shape[1], out_of.get(name), w.shape[0]))
    return terms


def macs(terms: list[MacTerm], active: dict[str, Any]) -> Any:
    """MACs with ``active[group]`` channels on (numbers or tensors: differentiable in them); a group
    missing from ``active`` keeps all its channels."""
    total: Any = 0
    for t in terms:
        cin = active.get(t.in_group, t.in_fixed) if t.in_group else t.in_fixed
        cout = active.get(t.out_group, t.out_fixed) if t.out_group else t.out_fixed
        total = total + t.coef * cin * cout
    return total


def straight_through(logit: torch.Tensor) -> torch.Tensor:
    soft = torch.sigmoid(logit)
    return (logit > 0).to(soft.dtype) + soft - soft.detach()


@contextlib.contextmanager
def gated(model: nn.Module, groups: list[ChannelGroup], gates: dict[str, Any]) -> Iterator[None]:
    """Multiply the BatchNorm outputs of each group in ``gates`` by ``gates[group]()`` (a callable giving [size])."""
    modules = dict(model.named_modules())

    def hook(group: str) -> Any:
        def scale(_m: nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
            return out * gates[group]().view(1, -1, 1, 1)

        return scale

    handles = [
        modules[bn].register_forward_hook(hook(g.name)) for g in groups if g.name in gates for _conv, bn in g.producers
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def select_units(
    logits: dict[str, torch.Tensor], terms: list[MacTerm], target: float, tolerance: float = MACS_TOLERANCE
) -> dict[str, torch.Tensor]:
    """Keep masks from the gate logits whose MACs land in ``[(1 - tolerance) * target, target]``
    (groups without logits keep all their channels).

    Starts from the hard gates (at least one unit per group), then removes the lowest-logit units
    while over the target and adds back the highest-logit ones while under it, skipping a unit
    that would overshoot (a residual-stream channel costs more than an inner one).
    """
    keep = {}
    for g, lg in logits.items():
        k = lg > 0
        if not k.any():
            k[lg.argmax()] = True
        keep[g] = k.clone()

    def total() -> float:
        return float(macs(terms, {g: int(k.sum()) for g, k in keep.items()}))

    low = (1.0 - tolerance) * target
    while total() > target:
        options = []  # (logit, group, index): each group's weakest active unit
        for g, k in keep.items():
            if int(k.sum()) > 1:
                i = int(torch.where(k, logits[g], torch.tensor(torch.inf)).argmin())
                options.append((float(logits[g][i]), g, i))
        if not options:
            break
        options.sort()
        for _logit, g, i in options:
            keep[g][i] = False
            if total() >= low:
                break
            keep[g][i] = True  # would undershoot: try a cheaper unit
        else:  # every removal undershoots: take the weakest
            keep[options[0][1]][options[0][2]] = False
    while total() < low:
        options = []
        for g, k in keep.items():
            if not bool(k.all()):
                i = int(torch.where(~k, logits[g], torch.tensor(-torch.inf)).argmax())
                options.append((-float(logits[g][i]), g, i))
        added = False
        for _neg, g, i in sorted(options):
            keep[g][i] = True
            if total() <= target:
                added = True
                break
            keep[g][i] = False
        if not added:
            break
    return keep


def gated_groups(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """The groups DiP-GO gates: the blocks' inner channels (not the residual streams)."""
    return [g for g in groups if g.name.startswith("block")]


class DiPGO(FilterPruning):
    name = "dipgo"
    needs_init = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.macs_ratio: float | None = None

    def check(self, arch: str, model: nn.Module) -> None:
        if not 0.0 < self.config.sparsity < 1.0:
            raise InvalidInput(
                "method 'dipgo' needs --sparsity in (0, 1) (the fraction of MACs to remove), "
                f"got {self.config.sparsity}"
            )
        if self.config.regrow:
            raise InvalidInput("method 'dipgo' learns its gates; --regrow is for method 'filter'")
        if self.config.gate_steps < 1:
            raise InvalidInput(f"--gate-steps must be at least 1, got {self.config.gate_steps}")
        super().check(arch, model)

    def start_round(self, model: nn.Module, r: int, steps: int) -> None:
        pass  # the units were chosen in calibrate

    def calibrate(self, model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device,
                  progress: bool = False) -> None:  # fmt: skip
        h, w = images.shape[1:3]
        terms = mac_terms(model, self.groups, h, w)
        dense = float(macs(terms, {g.name: g.size for g in self.groups}))
        target = (1.0 - self.config.sparsity) * dense
        logits = self.learn_gates(model, images, terms, target / dense, device, progress)
        self.keep.update({g: k.cpu() for g, k in select_units(logits, terms, target).items()})
        self.macs_ratio = float(macs(terms, {g: int(k.sum()) for g, k in self.keep.items()})) / dense
        self.after_step(model)
        recalibrate_batchnorm(model, images, device)  # the kept channels' statistics, as lobs and dsa do
        log.info("dipgo: MACs %.4f of dense (target %.4f)", self.macs_ratio, 1.0 - self.config.sparsity)

    def learn_gates(self, model: nn.Module, images: np.ndarray, terms: list[MacTerm], target_ratio: float,
                    device: torch.device, progress: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
        """The gate logits after ``gate_steps`` steps of distillation + MACs penalty (weights frozen)."""
        rng = np.random.default_rng([self.config.seed, 11])
        batch = min(GATE_BATCH, len(images))

        def nchw(idx: np.ndarray) -> torch.Tensor:
            return to_nchw(images[idx].astype(np.float32) / np.float32(255.0), device)

        was_training = model.training
        model.eval()  # the teacher: the dense card as it serves
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.no_grad():
            teacher = torch.cat(
                [model(nchw(np.arange(i, min(i + 256, len(images))))) for i in range(0, len(images), 256)]
            )
        logits = {
            g.name: torch.full((g.size,), INIT_LOGIT, device=device, requires_grad=True)
            for g in gated_groups(self.groups)
        }
        # BatchNorm normalizes with each batch's statistics (the running ones left as they are):
        # the function the gates are scored on is the pruned net as it will be after its BatchNorm
        # re-estimation; with the dense statistics the gates chose no better than filter L1 norms.
        bns = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m, _ in bns:
            m.train()
            m.momentum = 0.0
        dense = float(macs(terms, {g.name: g.size for g in self.groups}))
        opt = torch.optim.Adam(list(logits.values()), lr=LR)
        gates = {g: (lambda g=g: straight_through(logits[g])) for g in logits}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=self.config.gate_steps, desc="dipgo gates", leave=False)
        try:
            with gated(model, self.groups, gates):
                for _ in range(self.config.gate_steps):
                    idx = rng.choice(len(images), batch, replace=False)
                    out = model(nchw(idx))
                    kd = F.kl_div(
                        F.log_softmax(out / TEMPERATURE, 1), F.softmax(teacher[idx] / TEMPERATURE, 1),
                        reduction="batchmean",
                    ) * TEMPERATURE**2  # fmt: skip
                    ratio = macs(terms, {g: f().sum() for g, f in gates.items()}) / dense
                    loss = kd + PENALTY * (ratio - target_ratio).abs()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(kd=f"{float(kd):.3f}", macs=f"{float(ratio):.3f}")
        finally:
            if bar is not None:
                bar.close()
            for p, flag in frozen:
                p.requires_grad_(flag)
            for m, momentum in bns:
                m.momentum = momentum
            model.train(was_training)
        return {g: lg.detach().cpu() for g, lg in logits.items()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "macs_ratio": self.macs_ratio}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.macs_ratio = state.get("macs_ratio")

    def describe(self) -> str:
        return f"dipgo: {self.config.gate_steps} gate steps to {1 - self.config.sparsity:.3f} of dense MACs"


SPEC = MethodSpec(
    name="dipgo",
    summary="learned channel gates under a MACs budget",
    export_format="dense",  # physically smaller, like filter
    options=(Option("gate_steps", "int", 200, "optimization steps of the gates"),),
    epochs=1,  # light fine-tuning after the one-shot removal
)
METHODS.register("dipgo")(DiPGO)
