"""Structured filter pruning (Li et al. 2017) with optional GraNet-style regeneration.

Filters are pruned per channel group (see ``ChannelGroup``: the residual stream of a stage is one
group, so every conv writing it loses the same channels). Importance is the L1 norm of the filters
(summed over the group's producers); each group keeps ``size - round(sparsity * size)`` channels
(at least one), so FLOPs fall roughly with the square of the kept fraction.

While training, a pruned channel is masked: its producer filters, BatchNorm weight, bias and
running mean are held at exactly zero, so the channel outputs exactly zero and removing it (with
the matching input channels of its consumers) leaves the network's function unchanged.
``finalize`` does that removal and returns a physically smaller dense net whose per-group widths
are in its ``arch_kwargs`` (``stage_widths``, ``block_widths``).

Without ``regrow`` the pruning is one-shot at the start of the fine-tuning round (Li et al.). With
``regrow = r`` it is gradual (GraNet, Liu et al. 2021): the kept fraction follows the cubic
schedule over the first ``ramp`` of the round, and at each pruning step a further r (cosine-decayed)
of each group's active channels with the lowest absolute weight sum are removed and as many pruned
channels with the highest absolute gradient sum are regrown (fresh Kaiming filters, BN reset,
the consumers' input weights for them zeroed, so regrowth alone leaves the function unchanged).
The gradient of a zeroed filter is read with its BN scale set to 1 and its shift to a tiny 1e-3 for
that one pass (the channel then outputs that small constant): with scale 0, or a ReLU at exactly 0,
the gradient of a pruned filter would be blocked. So regrowth needs affine BatchNorm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from carddeck.catalog import MethodSpec, Option
from carddeck.compress.criteria import filter_grad, filter_l1
from carddeck.compress.masks import Masks, apply_masks
from carddeck.compress.methods import METHODS, Finalized, GradFn, Method
from carddeck.compress.schedules import cubic_sparsity
from carddeck.compress.train import recalibrate_batchnorm
from carddeck.errors import InvalidInput
from carddeck.nets import ChannelGroup, build_net

PRUNE_STEPS = 10  # gradual pruning updates over the ramp
SCORING_SHIFT = 1e-3  # BN shift of pruned channels during the regrowth scoring pass


def kept_channels(size: int, sparsity: float) -> int:
    return max(1, size - int(round(sparsity * size)))


class FilterPruning(Method):
    name = "filter"
    structured = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.groups: list[ChannelGroup] = []
        self.keep: dict[str, torch.Tensor] = {}  # group name -> bool [size]
        if config.regrow < 0 or config.regrow >= 1:
            raise InvalidInput(f"--regrow must be in [0, 1), got {config.regrow}")

    def check(self, arch: str, model: nn.Module) -> None:
        if not 0.0 <= self.config.sparsity < 1.0:
            raise InvalidInput(f"sparsity must be in [0, 1), got {self.config.sparsity}")
        if not hasattr(model, "channel_groups"):
            raise InvalidInput(
                f"filter pruning needs an architecture with channel groups (resnet20, resnet18); got {arch!r}"
            )
        affine = all(m.affine for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        if self.config.regrow > 0 and not affine:
            raise InvalidInput("--regrow needs affine BatchNorm (scoring switches pruned channels on); drop affine_bn")

    def prepare(self, model: nn.Module) -> nn.Module:
        self.groups = model.channel_groups()  # type: ignore[operator]
        self.keep = {g.name: torch.ones(g.size, dtype=torch.bool) for g in self.groups}
        return model

    def num_rounds(self) -> int:
        return 2 if self.config.sparsity > 0 else 1

    def skip_round(self, r: int) -> bool:
        return r == 0 and self.config.pretrained and self.num_rounds() > 1

    # -- masks ------------------------------------------------------------------------------------
    def tensor_masks(self, model: nn.Module) -> Masks:
        modules = dict(model.named_modules())
        masks: Masks = {}
        for g in self.groups:
            keep = self.keep[g.name]
            for conv, bn in g.producers:
                masks[f"{conv}.weight"] = keep.view(-1, 1, 1, 1)
                bn_mod = modules[bn]
                if bn_mod.weight is not None:  # type: ignore[union-attr]
                    masks[f"{bn}.weight"] = keep
                    masks[f"{bn}.bias"] = keep
                masks[f"{bn}.running_mean"] = keep
        return masks

    def after_step(self, model: nn.Module) -> None:
        apply_masks(model, self.tensor_masks(model))

    def prune_to(self, model: nn.Module, sparsity: float) -> None:
        """Shrink each group to its kept count by L1 norm (pruned channels score lowest)."""
        for g in self.groups:
            k = kept_channels(g.size, sparsity)
            if int(self.keep[g.name].sum()) <= k:
                continue
            scores = torch.where(self.keep[g.name], filter_l1(model, g), torch.tensor(-math.inf))
            keep = torch.zeros(g.size, dtype=torch.bool)
            keep[torch.topk(scores, k).indices] = True
            self.keep[g.name] = keep
        self.after_step(model)

    def regenerate(self, model: nn.Module, fraction: float, grad_fn: GradFn) -> None:
        modules = dict(model.named_modules())
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        saved = [(m, m.momentum) for m in bns]
        # Unblock the gradient of zeroed filters for this pass: BN scale 1 (not 0) and a shift of
        # SCORING_SHIFT, so the ReLU after the channel is not sitting at exactly 0 (gradient 0).
        for g in self.groups:
            pruned = ~self.keep[g.name]
            for _conv, bn in g.producers:
                bn_mod = modules[bn]
                with torch.no_grad():
                    bn_mod.weight[pruned.to(bn_mod.weight.device)] = 1.0  # type: ignore[union-attr,index]
                    bn_mod.bias[pruned.to(bn_mod.bias.device)] = SCORING_SHIFT  # type: ignore[union-attr,index]
        try:
            for m in bns:
                m.momentum = 0.0  # the scoring pass must not move the running statistics
            grad_fn()
        finally:
            for m, momentum in saved:
                m.momentum = momentum
        for g in self.groups:
            keep = self.keep[g.name]
            active, pruned = int(keep.sum()), int((~keep).sum())
            n = min(int(round(fraction * active)), pruned, active - 1)
            if n <= 0:
                continue
            weight_score = torch.where(keep, filter_l1(model, g), torch.tensor(math.inf))
            drop = torch.topk(weight_score, n, largest=False).indices
            grad_score = torch.where(~keep, filter_grad(model, g), torch.tensor(-math.inf))
            grow = torch.topk(grad_score, n).indices
            keep = keep.clone()
            keep[drop] = False
            keep[grow] = True
            self.keep[g.name] = keep
            self._reset_channels(modules, g, grow)
        model.zero_grad(set_to_none=True)
        self.after_step(model)

    @torch.no_grad()
    def _reset_channels(self, modules: dict[str, nn.Module], g: ChannelGroup, idx: torch.Tensor) -> None:
        """Regrow channels ``idx`` of ``g`` without changing what the network computes.

        Producers get fresh Kaiming filters and a reset BatchNorm; the consumers' input weights for
        these channels are zeroed, so the new channels are invisible at first and the gradient
        (through their nonzero activations) grows the consumer weights from there.
        """
        active = self.keep[g.name].clone()
        active[idx] = False
        for conv, bn in g.producers:
            w = modules[conv].weight  # type: ignore[union-attr]
            fresh = torch.empty_like(w[idx])  # type: ignore[index]
            nn.init.kaiming_normal_(fresh, mode="fan_out", nonlinearity="relu")
            # at the median L1 norm of the layer's surviving filters: neither the first to be dropped
            # again (as a zero filter would be) nor shielded from it (as a larger one would be)
            target = w[active.to(w.device)].abs().sum(dim=(1, 2, 3)).median()  # type: ignore[index]
            fresh *= target / fresh.abs().sum(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
            w[idx] = fresh  # type: ignore[index]
            bn_mod = modules[bn]
            if bn_mod.weight is not None:  # type: ignore[union-attr]
                bn_mod.weight[idx] = 1.0  # type: ignore[index,union-attr]
                bn_mod.bias[idx] = 0.0  # type: ignore[index,union-attr]
            bn_mod.running_mean[idx] = 0.0  # type: ignore[index]
            bn_mod.running_var[idx] = 1.0  # type: ignore[index]
        for consumer in g.consumers:
            modules[consumer].weight[:, idx] = 0.0  # type: ignore[index,union-attr]

    # -- hooks ------------------------------------------------------------------------------------
    def start_round(self, model: nn.Module, r: int, steps: int) -> None:
        if r == 1 and self.config.regrow == 0:
            self.prune_to(model, self.config.sparsity)

    def before_step(self, model: nn.Module, r: int, step: int, steps: int, grad_fn: GradFn) -> None:
        if r != 1 or self.config.regrow == 0:
            return
        ramp = max(1, int(self.config.ramp * steps))
        every = max(1, ramp // PRUNE_STEPS)
        if step % every or step > ramp:
            return
        self.prune_to(model, cubic_sparsity(step + every, ramp, 0.0, self.config.sparsity))
        if step + every <= ramp:  # regenerate while the ramp lasts, with a cosine-decayed rate
            fraction = self.config.regrow * 0.5 * (1 + math.cos(math.pi * step / ramp))
            self.regenerate(model, fraction, grad_fn)

    def refresh(self, model: nn.Module) -> None:
        """Before each evaluation of the pruned net (every epoch's val accuracy, and the card): its BatchNorm
        statistics re-estimated on ``bn_images``. A prune changes what every later layer sees, and the running
        statistics follow only at momentum 0.1 per step: after a 1-epoch fine-tune on digits32 (8 steps) they
        were still mostly the unpruned net's and the card scored chance (10%; re-estimated: 70%). Training
        normalizes with batch statistics, so this changes what is measured and stored, not what is learned."""
        if self.bn_images is None or all(bool(k.all()) for k in self.keep.values()):
            return
        recalibrate_batchnorm(model, self.bn_images, next(model.parameters()).device)
        self.after_step(model)  # pruned channels: running mean back to exactly 0

    def state_dict(self) -> dict[str, Any]:
        return {"keep": {k: v.clone() for k, v in self.keep.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keep.update(state.get("keep", {}))

    # -- physical removal -------------------------------------------------------------------------
    @torch.no_grad()
    def finalize(self, model: nn.Module, arch: str, arch_kwargs: dict[str, Any]) -> Finalized:
        self.after_step(model)
        idx = {g.name: torch.nonzero(self.keep[g.name]).flatten() for g in self.groups}
        out_of: dict[str, torch.Tensor] = {}
        in_of: dict[str, torch.Tensor] = {}
        for g in self.groups:
            for conv, bn in g.producers:
                out_of[conv] = out_of[bn] = idx[g.name]
            for consumer in g.consumers:
                in_of[consumer] = idx[g.name]
        new_kwargs = dict(arch_kwargs)
        new_kwargs.pop("width", None)
        new_kwargs["stage_widths"] = [len(idx[g.name]) for g in self.groups if g.name.startswith("stage")]
        new_kwargs["block_widths"] = [len(idx[g.name]) for g in self.groups if g.name.startswith("block")]
        num_classes = model.fc.out_features  # type: ignore[union-attr]
        small = build_net(arch, num_classes, **new_kwargs)
        state = {}
        for key, value in model.state_dict().items():
            module, _, kind = key.rpartition(".")
            v = value.detach().cpu()
            if kind != "num_batches_tracked":
                if module in out_of:
                    v = v.index_select(0, out_of[module])
                if module in in_of and kind == "weight":
                    v = v.index_select(1, in_of[module])
            state[key] = v
        small.load_state_dict(state)
        small.to(next(model.parameters()).device)
        total = sum(g.size for g in self.groups)
        kept = sum(len(i) for i in idx.values())
        return Finalized(small, new_kwargs, 1.0 - kept / total)


SPEC = MethodSpec(
    name="filter",
    summary="structured L1 filter pruning, optional GraNet regrowth",
    export_format="dense",  # physically smaller
    options=(
        Option("regrow", "float", 0.0, "GraNet regeneration fraction (0: one-shot Li et al.)"),
        Option("ramp", "float", 0.5, "fraction of steps ramping the sparsity"),
    ),
)
METHODS.register("filter")(FilterPruning)
