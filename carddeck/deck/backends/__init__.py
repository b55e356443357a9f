"""Deck store backends, one module per URL scheme (``file``, ``s3``): each defines ``BACKEND``, a class with
``from_location(location)`` that implements :class:`carddeck.deck.backend.Backend`. Modules are found by
name when a location first names their scheme; ``carddeck/deck/backends/`` folders elsewhere on
``sys.path`` add theirs (a namespace-style ``__path__``)."""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
