"""Make CARDs: pruning and binarization methods, importance criteria, schedules, one training loop.

``compress(CompressConfig(...))`` trains and writes one CARD (``card.pt`` + ``card.json``);
``load_card`` rebuilds it. Methods are found by name in ``METHODS``: each method module declares itself
(``SPEC = MethodSpec(...)``, :mod:`carddeck.catalog`) and registers its class; modules are found by
their declarations, not listed: dense, lrr, biprop, filter, and the one-shot methods that prune a
trained dense card: lobs (layer-wise OBS), dsa (searched per-layer allocation), dipgo (learned channel
gates under a MACs budget).
"""

from carddeck.registry import plugin_path

__path__ = plugin_path(__path__, __name__)  # carddeck/compress folders elsewhere on sys.path add methods

from carddeck.compress.checkpoint import CARD_FORMAT, load_card, save_card
from carddeck.compress.methods import METHODS, Method, MethodConfig
from carddeck.compress.pipeline import CompressConfig, CompressResult, compress, plan

__all__ = [
    "CARD_FORMAT",
    "METHODS",
    "CompressConfig",
    "CompressResult",
    "Method",
    "MethodConfig",
    "compress",
    "load_card",
    "plan",
    "save_card",
]
