"""CARD-Deck on distributed engines that users already run (Ray Serve). Optional: ``pip install carddeck[ray]``.

Nothing on the serving path imports this package; KServe needs no Python here (serve/kserve/).
"""
