"""The final CARD checkpoint (``card.pt`` + ``card.json``) and the resumable training checkpoint.

``card.pt`` = ``{"format": "carddeck-card/1", "arch", "arch_kwargs", "state_dict", "meta"}``: the
state dict of ``build_net(arch, num_classes, **arch_kwargs)`` holding the effective weights (zeros
in place for lrr, ``sign(w) * alpha * mask`` for biprop, the physically smaller net for filter),
and ``meta`` = ``CardMeta.to_dict()``. The export step reads exactly this.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carddeck.card import CardMeta
from carddeck.errors import InvalidInput
from carddeck.nets import build_net

CARD_FORMAT = "carddeck-card/1"
CARD_FILE = "card.pt"
META_FILE = "card.json"
TRAIN_FILE = "checkpoint.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_card(out: Path, arch: str, arch_kwargs: dict[str, Any], model: nn.Module, meta: CardMeta) -> Path:
    """Write ``out/card.pt`` and ``out/card.json``; returns the card.pt path."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    card = {
        "format": CARD_FORMAT,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "state_dict": state,
        "meta": meta.to_dict(),
    }
    _atomic_save(card, out / CARD_FILE)
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(meta.to_json())
    os.replace(tmp, out / META_FILE)
    return out / CARD_FILE


def load_card(path: Path | str) -> tuple[nn.Module, CardMeta, dict[str, Any]]:
    """Rebuild a card's model (eval mode, CPU) from ``card.pt``: (model, meta, raw checkpoint dict)."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    if not path.is_file():
        raise InvalidInput(f"no CARD checkpoint at {path}")
    card = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise InvalidInput(f"{path} is not a {CARD_FORMAT} checkpoint")
    meta = CardMeta.from_dict(card["meta"], source=str(path))
    model = build_net(card["arch"], meta.num_classes, **card["arch_kwargs"])
    model.load_state_dict(card["state_dict"])
    model.eval()
    return model, meta, card


def save_training(out: Path, state: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_save(state, out / TRAIN_FILE)


def load_training(out: Path) -> dict[str, Any] | None:
    path = out / TRAIN_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
