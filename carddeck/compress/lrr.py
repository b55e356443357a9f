"""LRR: iterative global magnitude pruning with learning-rate rewinding (Renda et al. 2020).

Round 0 trains dense (skipped when starting from ``--init`` weights). Each later round prunes the
smallest-magnitude conv/linear weights over the whole network down to the round's sparsity, then
retrains from the current weights replaying the full learning-rate schedule. Masks are re-applied
after every optimizer step, so pruned weights stay exactly zero.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from carddeck.catalog import MethodSpec, Option
from carddeck.compress.criteria import global_topk, magnitude
from carddeck.compress.masks import Masks, apply_masks, masks_to, weight_sparsity
from carddeck.compress.methods import METHODS, Finalized, Method, to_cpu
from carddeck.compress.schedules import lrr_round_sparsities
from carddeck.errors import InvalidInput
from carddeck.nets import prunable_modules


def prunable_weights(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name in prunable_modules(model)]


class MagnitudePruning(Method):
    """Global unstructured magnitude pruning, mask kept through training."""

    name = "lrr"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.sparsities = lrr_round_sparsities(config.sparsity, config.prune_fraction, config.rounds)
        self.masks: Masks = {}

    def check(self, arch: str, model: nn.Module) -> None:
        if not 0.0 <= self.config.sparsity < 1.0:
            raise InvalidInput(f"sparsity must be in [0, 1), got {self.config.sparsity}")

    def num_rounds(self) -> int:
        return 1 + len(self.sparsities)

    def skip_round(self, r: int) -> bool:
        return r == 0 and self.config.pretrained

    def prune_to(self, model: nn.Module, sparsity: float) -> None:
        names = prunable_weights(model)
        scores = magnitude(model, names)
        total = sum(s.numel() for s in scores.values())
        keep = total - int(round(sparsity * total))
        self.masks = global_topk(scores, keep, eligible=self.masks or None)
        apply_masks(model, self.masks)

    def start_round(self, model: nn.Module, r: int, steps: int) -> None:
        if r >= 1:
            self.prune_to(model, self.sparsities[r - 1])

    def after_step(self, model: nn.Module) -> None:
        if self.masks:
            apply_masks(model, self.masks)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": to_cpu(self.masks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = dict(state.get("masks", {}))

    def finalize(self, model: nn.Module, arch: str, arch_kwargs: dict[str, Any]) -> Finalized:
        if self.masks:
            device = next(model.parameters()).device
            self.masks = masks_to(self.masks, device)
            apply_masks(model, self.masks)
        return Finalized(model, dict(arch_kwargs), weight_sparsity(model, prunable_weights(model)))

    def describe(self) -> str:
        steps = ", ".join(f"{s:.3f}" for s in self.sparsities)
        return f"lrr: {len(self.sparsities)} pruning rounds to sparsities [{steps}]"


SPEC = MethodSpec(
    name="lrr",
    summary="iterative magnitude pruning + LR rewinding",
    export_format="sparse",
    options=(
        Option("prune_fraction", "float", 0.2, "fraction of remaining weights per round", exclusive="rounds"),
        Option("rounds", "int", None, "number of pruning rounds to reach --sparsity", exclusive="rounds"),
    ),
)
METHODS.register("lrr")(MagnitudePruning)
