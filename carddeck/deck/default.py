"""The default deck that ships with carddeck, and ``init_deck``: a deck of your own to change.

The default deck is read-only (a ``READ-ONLY`` marker beside its manifest): in the installed package
a change would write into site-packages, in a clone into tracked files. ``init_deck(DIR)`` copies it
(the files its manifest names), or creates an empty deck, where admin calls may change it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from carddeck.deck.cardfile import atomic_write
from carddeck.deck.store import GATE_FILES, MANIFEST, DeckStore
from carddeck.errors import DeckConflict, InvalidInput


def default_deck_path() -> Path:
    """The packaged default deck (``carddeck/_default_deck`` in the wheel), else the repository's models/."""
    packaged = Path(__file__).resolve().parents[1] / "_default_deck"
    if (packaged / MANIFEST).is_file():
        return packaged
    repo = Path(__file__).resolve().parents[2] / "models"
    if (repo / MANIFEST).is_file():
        return repo
    return packaged


def init_deck(dest: Path | str, *, empty: bool = False, source: Path | str | None = None) -> DeckStore:
    """A new writable deck at ``dest``: a copy of ``source`` (default: the default deck), or empty.

    Only what the manifest refers to is copied (cards, the router, calibration images), with the
    umask's permissions; the manifest is written last, so an interrupted copy is not a deck.
    """
    dest = Path(dest).expanduser()
    if (dest / MANIFEST).exists():
        raise DeckConflict(f"{dest} already holds a deck; choose another directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in its place or on its path, no permission: named, not Python's errno text
        raise InvalidInput(
            f"cannot make the deck directory {dest} ({exc.strerror or exc}); give a new directory or an empty one"
        ) from None
    if empty:
        return DeckStore.create(dest)
    src = DeckStore(source if source is not None else default_deck_path())
    manifest = src.manifest()
    extras = (*(manifest.gate.get(k) for k in GATE_FILES), manifest.calibration)
    referenced = [c.path for c in manifest.cards] + [p for p in extras if p]
    root = Path(src.root)  # the packaged deck (or another local one)
    for rel in referenced:
        if (root / rel).is_dir():
            shutil.copytree(root / rel, dest / rel, copy_function=shutil.copyfile, dirs_exist_ok=True)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, dest / rel)
    atomic_write(dest / MANIFEST, (root / MANIFEST).read_bytes())
    return DeckStore(dest)


__all__ = ["default_deck_path", "init_deck"]
