"""The models a deck serves, and the one place a model name is resolved.

The gated deck answers under the server's deck model name (``carddeck`` by default; version = deck
version), each card under its own name (version = card version). A model is resolved on one deck
snapshot and carries it: a request that resolved its model runs on that snapshot to the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from carddeck.card import NAME_PATTERN, CardMeta, InputSpec
from carddeck.deck import Deck
from carddeck.errors import CardNotFound, InvalidInput, shown

DECK_MODEL_NAME = "carddeck"


@dataclass(frozen=True)
class Model:
    """A model resolved on one deck snapshot: the gated deck (``card`` None) or one card."""

    name: str
    deck: Deck
    card: CardMeta | None

    @property
    def version(self) -> str:
        return str(self.deck.version if self.card is None else self.card.version)

    @property
    def input(self) -> InputSpec:
        """The input contract requests are decoded and checked against."""
        return self.deck.input


def check_card_name(name: str, field: str = "name") -> str:
    """Card names reach file paths in the store: only the CardMeta name pattern, never '..' or '/'."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInput(f"{field}: {shown(name)} is not a card name; names match {NAME_PATTERN.pattern}")
    return name


def model_names(deck: Deck, deck_name: str) -> list[str]:
    return [deck_name, *deck.card_names]


def resolve(deck: Deck, deck_name: str, name: str, version: str = "") -> Model:
    """The model ``name`` (at ``version``, when given) on ``deck``; CardNotFound names the models there are."""
    if not name:
        raise InvalidInput(f"name: empty; models: {', '.join(model_names(deck, deck_name))}")
    if name == deck_name:
        if version and version != str(deck.version):
            raise CardNotFound(f"model {shown(name)} has version {deck.version}, not {shown(version)}")
        return Model(name, deck, None)
    if name not in deck.card_names:
        raise CardNotFound(f"no model {shown(name)}; models: {', '.join(model_names(deck, deck_name))}")
    meta = deck.card(name)
    if version and version != str(meta.version):
        raise CardNotFound(f"model {shown(name)} is served at version {meta.version}, not {shown(version)}")
    return Model(name, deck, meta)


__all__ = ["DECK_MODEL_NAME", "Model", "check_card_name", "model_names", "resolve"]
