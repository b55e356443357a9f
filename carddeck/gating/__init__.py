"""The spectral gate: signatures of images and policies that route them to cards (numpy/scipy; no torch)."""

from carddeck.gating.policies import (
    DEFAULT_METRIC,
    DEFAULT_POLICY,
    METRICS,
    POLICIES,
    Gate,
    GateParams,
    Routing,
    pairwise_distances,
)
from carddeck.gating.router import CalibratedRouter, CalibrationPoint, fit_router
from carddeck.gating.signature import SIGNATURE_DIM, batch_signature, domain_signature, sample_signatures

__all__ = [
    "DEFAULT_METRIC",
    "DEFAULT_POLICY",
    "METRICS",
    "POLICIES",
    "SIGNATURE_DIM",
    "CalibratedRouter",
    "CalibrationPoint",
    "Gate",
    "GateParams",
    "Routing",
    "batch_signature",
    "domain_signature",
    "fit_router",
    "pairwise_distances",
    "sample_signatures",
]
