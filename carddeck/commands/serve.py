"""``carddeck serve``: the settings from flags, environment and file, then one serving process
(:func:`carddeck.app.process.serve`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from carddeck.app.process import serve
from carddeck.serving.settings import add_arguments, load_settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.description = (
        "Serve a deck over gRPC: carddeck.v1.CardDeck, the Open Inference Protocol "
        "(inference.GRPCInferenceService, for Triton/KServe clients), grpc.health.v1 and server reflection; "
        "and the Open Inference Protocol over HTTP/REST (KServe V2 / Triton routes under /v2)."
    )
    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    code = serve(load_settings(args))
    # The process ends here, now: a normal exit joins every worker thread, and after a drain timeout
    # some may still be inside an ONNX Runtime run that nothing can interrupt (seconds to minutes).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["configure", "run"]
