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
from carddeck.errors import CardRejected, InvalidInput
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
    """Rebuild a card's model (eval mode, CPU) from ``card.pt`` (or its directory): (model, meta, raw
    checkpoint dict). The one reader of card.pt (``--init`` and ``carddeck export``): a missing file is
    InvalidInput, anything else wrong with it CardRejected naming what."""
    path = Path(path)
    if path.is_dir():
        path = path / CARD_FILE
    if not path.is_file():
        raise InvalidInput(f"checkpoint {path} not found; expected a {CARD_FILE} written by `carddeck compress`")
    try:
        card = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for bad files
        raise CardRejected(f"checkpoint {path}: unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise CardRejected(f"checkpoint {path}: format {found!r}, expected {CARD_FORMAT!r}")
    missing = [k for k in ("arch", "arch_kwargs", "state_dict", "meta") if k not in card]
    if missing:
        raise CardRejected(f"checkpoint {path}: missing {', '.join(missing)}")
    try:
        meta = CardMeta.from_dict(card["meta"], source=f"{path}:meta")
    except InvalidInput as exc:
        raise CardRejected(str(exc)) from None
    model = build_net(card["arch"], meta.num_classes, **dict(card["arch_kwargs"]))
    try:
        model.load_state_dict(card["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CardRejected(f"checkpoint {path}: state_dict does not fit {card['arch']}: {exc}") from None
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
