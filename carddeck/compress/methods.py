"""The compression-method interface the training loop drives, its registry and the dense baseline.

A method is a few hooks around one shared training loop: ``prepare`` (swap layers, set up masks),
``calibrate`` (one-shot work on a trained net with a few training images, before any step: L-OBS's
Hessians, DSA's search, DiP-GO's gates), ``start_round`` (e.g. prune before a retraining round),
``before_step``/``after_step`` (schedules, regrowth, mask enforcement), ``refresh`` (before
evaluation) and ``finalize`` (a plain ``build_net`` model holding the effective weights, plus its
``arch_kwargs``). Methods are built from the small parts in ``masks``, ``criteria`` and ``schedules``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from carddeck.catalog import MethodSpec
from carddeck.errors import InvalidInput
from carddeck.registry import Registry

GradFn = Callable[[], None]  # runs forward + backward on the current batch (grads left in .grad)


@dataclass(frozen=True)
class MethodConfig:
    sparsity: float = 0.0
    prune_fraction: float = 0.2  # lrr: fraction of remaining weights pruned per round
    rounds: int | None = None  # lrr: number of pruning rounds (overrides prune_fraction)
    regrow: float = 0.0  # filter: GraNet regeneration fraction (0 = Li et al. one-shot)
    ramp: float = 0.5  # biprop / filter+regrow: fraction of the round's steps spent ramping sparsity
    pretrained: bool = False  # weights came from --init: skip the dense training round
    seed: int = 0
    calib_images: int = 1024  # lobs, dsa, dipgo: training images for calibration (Hessians, fitness, gates)
    allocation: str | None = None  # lobs: "uniform", "global" (magnitude; the default) or "dsa"
    population: int = 8  # dsa: candidate allocation functions per generation
    generations: int = 4  # dsa: generations of the evolutionary search
    gate_steps: int = 200  # dipgo: optimization steps of the gates
    options: dict[str, Any] = field(default_factory=dict)  # declared options of methods without a field above


@dataclass(frozen=True)
class Finalized:
    model: nn.Module  # a plain build_net(arch, num_classes, **arch_kwargs) model
    arch_kwargs: dict[str, Any]
    sparsity: float  # achieved: fraction of prunable weights (filters, when structured) removed


class Method:
    name = "dense"
    weight_bits = 32
    structured = False
    uses_init = True  # whether --init (pretrained dense weights) makes sense
    # uint8 NHWC training images as training sees them (the calibration draw, in the card's augmentation
    # domain), to re-estimate BatchNorm statistics on (filter's refresh); set by the pipeline, resumed runs too
    bn_images: np.ndarray | None = None
    needs_init = False  # whether it only prunes a trained dense card (--init required; --epochs 0 allowed)

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    def check(self, arch: str, model: nn.Module) -> None:
        """Raise InvalidInput before training if this method cannot run on ``model``."""
        if self.config.sparsity != 0.0:
            raise InvalidInput(f"method 'dense' trains without pruning; got --sparsity {self.config.sparsity}")

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def calibrate(
        self, model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, progress: bool = False
    ) -> None:
        """One-shot work on the trained ``model`` with uint8 NHWC training ``images``, before training."""

    def num_rounds(self) -> int:
        return 1

    def skip_round(self, r: int) -> bool:
        return False

    def start_round(self, model: nn.Module, r: int, steps: int) -> None:
        pass

    def before_step(self, model: nn.Module, r: int, step: int, steps: int, grad_fn: GradFn) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        pass

    def refresh(self, model: nn.Module) -> None:
        pass

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def finalize(self, model: nn.Module, arch: str, arch_kwargs: dict[str, Any]) -> Finalized:
        return Finalized(model, dict(arch_kwargs), 0.0)

    def compression_fields(self) -> dict[str, Any]:
        """Extra ``carddeck.card.Compression`` fields this method records (e.g. its allocation)."""
        return {}

    def describe(self) -> str:
        return self.name


SPEC = MethodSpec(
    name="dense",
    summary="no compression, the baseline",
    export_format="dense",
)
METHODS: Registry[type[Method]] = Registry("compression method")
METHODS.register("dense")(Method)


def to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
