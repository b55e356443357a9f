"""The corruption registry: name -> function(float32 [N,H,W,3] in [0,1], severity, rng) -> float32."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from carddeck.registry import Registry

CorruptionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
CORRUPTIONS: Registry[CorruptionFn] = Registry("corruption")


def register(name: str) -> Callable[[CorruptionFn], CorruptionFn]:
    return CORRUPTIONS.register(name)
