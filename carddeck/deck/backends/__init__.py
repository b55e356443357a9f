"""Deck store backends, one module per URL scheme (``file``, ``s3``): each defines ``BACKEND``, a class with
``from_location(location)`` that implements :class:`carddeck.deck.backend.Backend`. Modules are found by
name when a location first names their scheme; ``carddeck/deck/backends/`` folders elsewhere on
``sys.path`` add theirs (:func:`carddeck.registry.plugin_path`)."""

from carddeck.registry import plugin_path

__path__ = plugin_path(__path__, __name__)
