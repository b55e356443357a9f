"""biprop: binary-weight pruning of a randomly initialized network (Diffenderfer & Kailkhura 2021).

Conv and linear weights stay frozen at their random (Kaiming) init; each weight gets a learnable
score. A global top-k over |score| (all layers together) picks the mask; the effective weight is
``sign(w_init) * alpha * mask`` with ``alpha = sum(|w_init| * mask) / sum(mask)`` per layer. The
mask is straight-through in the backward pass (edge-popup), so scores get the gradient the mask
would. Global sparsity ramps from 50% (or the target, if lower) to the target on a cubic schedule
over the first ``ramp`` fraction of the steps. Only scores train: BatchNorm is best non-affine
(the CLI builds the net with ``affine_bn=False`` unless told otherwise) and the classifier bias is
frozen at zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carddeck.catalog import MethodSpec, Option
from carddeck.compress.criteria import global_topk
from carddeck.compress.methods import METHODS, Finalized, GradFn, Method
from carddeck.compress.schedules import cubic_sparsity
from carddeck.errors import InvalidInput
from carddeck.nets import build_net, prunable_modules

RAMP_START = 0.5
SCORE_INIT = 0.01


def binary_sign(w: torch.Tensor) -> torch.Tensor:
    """sign() with sign(0) = +1, so every kept weight is exactly +alpha or -alpha."""
    return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))


class _Scored:
    """Mixin for conv/linear layers: frozen ``weight``, learnable ``scores``, a hard ``mask``."""

    weight: nn.Parameter
    scores: nn.Parameter
    mask: torch.Tensor

    def init_scores(self) -> None:
        self.weight.requires_grad_(False)
        # One score scale for every layer: with edge-popup's fan-in-scaled init, global top-k at
        # 90% would empty the widest layers at step 0 (observed on resnet20).
        self.scores = nn.Parameter(torch.empty_like(self.weight).uniform_(-SCORE_INIT, SCORE_INIT))
        self.mask = torch.ones_like(self.weight, dtype=torch.bool)

    def effective_weight(self, straight_through: bool = True) -> torch.Tensor:
        hard = self.mask.to(self.weight.dtype)
        if straight_through:
            a = self.scores.abs()
            m = hard + a - a.detach()  # forward: the hard mask; backward: gradient to |scores|
        else:
            m = hard
        alpha = (self.weight.abs() * m).sum() / hard.sum().clamp(min=1.0)
        return binary_sign(self.weight) * alpha * m


class BipropConv2d(nn.Conv2d, _Scored):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class BipropLinear(nn.Linear, _Scored):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def _swap(module: nn.Module) -> None:
    """Turn every Conv2d/Linear into its biprop twin, keeping the (random) weights."""
    for child in module.children():
        if type(child) is nn.Conv2d:
            child.__class__ = BipropConv2d
            child.init_scores()  # type: ignore[attr-defined]
        elif type(child) is nn.Linear:
            child.__class__ = BipropLinear
            child.init_scores()  # type: ignore[attr-defined]
        else:
            _swap(child)


class Biprop(Method):
    name = "biprop"
    weight_bits = 1
    uses_init = False

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.step = 0
        self.total_steps = 0
        self.current = RAMP_START

    def check(self, arch: str, model: nn.Module) -> None:
        if not 0.0 <= self.config.sparsity < 1.0:
            raise InvalidInput(f"sparsity must be in [0, 1), got {self.config.sparsity}")
        if self.config.pretrained:
            raise InvalidInput("biprop learns a mask over random weights; --init is not accepted")

    def prepare(self, model: nn.Module) -> nn.Module:
        _swap(model)
        for name, p in model.named_parameters():
            if not name.endswith("scores"):
                p.requires_grad_(False)
        for m in prunable_modules(model).values():
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        return model

    def layers(self, model: nn.Module) -> dict[str, _Scored]:
        return {n: m for n, m in model.named_modules() if isinstance(m, _Scored)}

    def target_at(self, step: int, steps: int) -> float:
        start = min(RAMP_START, self.config.sparsity)
        return cubic_sparsity(step, int(self.config.ramp * steps), start, self.config.sparsity)

    @torch.no_grad()
    def set_masks(self, model: nn.Module, sparsity: float) -> None:
        layers = self.layers(model)
        scores = {n: m.scores.abs() for n, m in layers.items()}
        for s in scores.values():  # every layer keeps its best weight: a global top-k can empty a layer
            s.view(-1)[s.argmax()] = math.inf
        total = sum(s.numel() for s in scores.values())
        masks = global_topk(scores, total - int(round(sparsity * total)))
        for n, m in layers.items():
            m.mask = masks[n]
        self.current = sparsity

    def before_step(self, model: nn.Module, r: int, step: int, steps: int, grad_fn: GradFn) -> None:
        self.step, self.total_steps = step, steps
        self.set_masks(model, self.target_at(step, steps))

    def refresh(self, model: nn.Module) -> None:
        self.set_masks(model, self.current)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = float(state.get("current", RAMP_START))

    @torch.no_grad()
    def finalize(self, model: nn.Module, arch: str, arch_kwargs: dict[str, Any]) -> Finalized:
        self.set_masks(model, self.config.sparsity)
        layers = self.layers(model)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("scores")}
        for n, m in layers.items():
            state[f"{n}.weight"] = m.effective_weight(straight_through=False).detach().clone()
        num_classes = model.fc.out_features  # type: ignore[union-attr]
        plain = build_net(arch, num_classes, **arch_kwargs).to(next(model.parameters()).device)
        plain.load_state_dict(state)
        kept = sum(int(m.mask.sum()) for m in layers.values())
        total = sum(m.mask.numel() for m in layers.values())
        return Finalized(plain, dict(arch_kwargs), 1.0 - kept / total)


SPEC = MethodSpec(
    name="biprop",
    summary="binary weights + mask",
    export_format="binary",
    options=(Option("ramp", "float", 0.5, "fraction of steps ramping the sparsity"),),
)
METHODS.register("biprop")(Biprop)
