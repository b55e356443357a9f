"""Export CARDs to compact ONNX with their CardMeta embedded and torch/ONNX parity proven.

``export_card(checkpoint, out, data=...)`` reads a ``card.pt``; ``export_model(model, meta, out,
images=...)`` works on any torch module taking float32 NCHW images in [0, 1]. Names are loaded
lazily; reading a card back (``read_card``, from the torch-free ``carddeck.deck.cardfile``) never
imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ExportReport": "carddeck.export.card_export",
    "export_card": "carddeck.export.card_export",
    "export_model": "carddeck.export.card_export",
    "load_checkpoint": "carddeck.export.card_export",
    "ParityError": "carddeck.export.parity",
    "ParityPolicy": "carddeck.export.parity",
    "ParityReport": "carddeck.export.parity",
    "FORMATS": "carddeck.export.formats",
    "read_card": "carddeck.deck.cardfile",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'carddeck.export' has no attribute {name!r}")


__all__ = sorted(_LAZY)
