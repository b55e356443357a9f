"""Schedules: learning rate per step, sparsity per pruning round or per step."""

from __future__ import annotations

import math
from collections.abc import Callable

from carddeck.errors import InvalidInput

LR_SCHEDULES = ("cosine", "step", "constant")


def lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step t of ``total_steps`` (replayed every round).

    ``cosine`` anneals to 0; ``step`` divides by 10 at 50% and 75% of the steps (the OpenLTH
    CIFAR recipe's 80/120 of 160 epochs); ``constant`` keeps it.
    """
    if schedule not in LR_SCHEDULES:
        raise InvalidInput(f"unknown lr schedule {schedule!r}; valid choices: {', '.join(LR_SCHEDULES)}")
    total = max(1, total_steps)
    if schedule == "cosine":
        return lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))
    if schedule == "step":
        return lambda t: 0.1 ** ((t >= 0.5 * total) + (t >= 0.75 * total))
    return lambda t: 1.0


def cubic_sparsity(t: int, total: int, initial: float, final: float) -> float:
    """Zhu & Gupta's gradual schedule s_t = s_f + (s_i - s_f) (1 - t/T)^3, held at s_f after T."""
    if total <= 0 or t >= total:
        return final
    return final + (initial - final) * (1.0 - t / total) ** 3


def lrr_round_sparsities(target: float, fraction: float | None = None, rounds: int | None = None) -> list[float]:
    """Sparsity after each LRR pruning round.

    Each round removes ``fraction`` of the remaining weights (the last round stops at ``target``);
    with ``rounds`` instead, the fraction is the one that reaches ``target`` in that many rounds.
    """
    if not 0.0 <= target < 1.0:
        raise InvalidInput(f"sparsity must be in [0, 1), got {target}")
    if target == 0.0:
        return []
    if rounds is not None:
        if rounds < 1:
            raise InvalidInput(f"--rounds must be at least 1, got {rounds}")
        fraction = 1.0 - (1.0 - target) ** (1.0 / rounds)
    if fraction is None or not 0.0 < fraction < 1.0:
        raise InvalidInput(f"prune fraction per round must be in (0, 1), got {fraction}")
    out: list[float] = []
    density = 1.0
    while not out or out[-1] < target:
        density *= 1.0 - fraction
        # guard the float rounding of density**n against one extra near-empty round
        out.append(target if 1.0 - density >= target - 1e-9 else 1.0 - density)
    return out
