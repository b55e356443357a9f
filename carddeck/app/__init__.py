"""One process assembled from the parts: settings, both transports, metrics and the store poller.

:mod:`carddeck.app.process` runs ``carddeck serve``; :mod:`carddeck.app.transports` builds the gRPC servicer
and the HTTP app over any data plane (the Ray Serve ingress uses it). Only commands and integrations
import this package; it is the one place that imports both transports.
"""
