"""The ``carddeck`` command.

Each subcommand lives in the module that owns its work and exposes ``configure(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported, so ``carddeck serve``
never imports torch and starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from carddeck import __version__
from carddeck.errors import CarddeckError, install_hint

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("carddeck.commands.serve", "serve a deck over gRPC (own API + Open Inference Protocol) and HTTP/REST"),
    "ray-serve": ("carddeck.commands.ray_serve", "serve a deck on Ray Serve: one autoscaled deployment per card"),
    "predict": ("carddeck.commands.predict", "classify image files with a running server"),
    "deck": ("carddeck.commands.deck", "make a deck or set its batching; add, remove or list a running server's cards"),
    "corrupt": ("carddeck.commands.corrupt", "write a CIFAR-10-C-style corrupted copy of a dataset"),
    "compress": ("carddeck.commands.compress", "train and compress a CARD (lrr, biprop, filter, lobs, dsa, dipgo)"),
    "export": ("carddeck.commands.export", "export a CARD checkpoint to compact ONNX with parity checks"),
    "calibrate": ("carddeck.commands.calibrate", "compute domain signatures and fit the calibrated router"),
    "eval": ("carddeck.commands.eval", "robustness evaluation of a deck: tables, JSON and plots"),
    "shift": ("carddeck.commands.shift", "fit the deck's shift detector and score it offline: table and plot"),
}


# shared by the commands that take a deck location (help text) or a comma-separated list of ints
DECK_LOCATION_HELP = "deck: a directory (manifest.json + cards/), file://DIR or s3://BUCKET/PREFIX"


def comma_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


# argparse types: a bad value is named with what is accepted, before any work starts
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def out_dir(text: str) -> Path:
    """A directory the command may write into (made if missing): a file in its place or on its path, or a
    folder it cannot write in, is said now, not after minutes of work."""
    out = Path(text)
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{existing} is a file, not a directory; give a directory (made if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {existing}; give a directory you can write to")
    return out


def interrupted(what: str) -> None:
    """Ctrl-C in a command: one line saying what was interrupted and what was kept or not written (``main``
    then exits 130). The command calls it in its ``except KeyboardInterrupt`` and raises again."""
    print(f"carddeck: interrupted: {what}", file=sys.stderr)


def add_order_argument(parser: argparse.ArgumentParser, shuffled_by: str) -> None:
    """``--order``: what a serving batch of the test split holds (eval and shift batch alike)."""
    parser.add_argument(
        "--order",
        choices=("dataset", "shuffled"),
        default="dataset",
        help="what a serving batch holds: the test split in its stored order (leaves32's is class by class: "
        f"one or two classes per batch) or shuffled {shuffled_by} (every class mixed); default dataset",
    )


# the optional modules a command may import -> the extra that installs them
EXTRAS = {"torch": "train", "tqdm": "train", "matplotlib": "train", "sklearn": "train", "ray": "ray"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already names it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, "", argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action) or help_text


def _parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carddeck",
        description="CARD-Deck: robust image classification from a gated deck of compressed networks.",
    )
    parser.add_argument("--version", action="version", version=f"carddeck {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == command:  # configure (and import) only the chosen command
            importlib.import_module(module).configure(p)
            for action in p._actions:  # nested commands (carddeck deck add) show defaults too
                if isinstance(action, argparse._SubParsersAction):
                    for child in action.choices.values():
                        child.formatter_class = HelpFormatter
    return parser


def _missing_extra(exc: ModuleNotFoundError, command: str | None) -> str | None:
    """The one-line advice for a command whose optional dependency is not installed, else None."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    return (
        f"carddeck: error: `carddeck {command}` needs the [{extra}] extra (module {top!r} is not installed): "
        f"{install_hint(extra)}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's C core writes its own INFO lines to stderr (a failed TLS handshake, client or server side):
    # noise under a one-line error, and a line that is not JSON in `serve --log-format json`. Its errors
    # still show; GRPC_VERBOSITY set by the user wins. Before any command imports grpc.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = _parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except CarddeckError as exc:
        print(f"carddeck: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        advice = _missing_extra(exc, command)
        if advice is None:
            raise
        print(advice, file=sys.stderr)
        return 2
    except BrokenPipeError:  # `carddeck predict ... | head`: the reader has all it wanted; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 0
    except OSError as exc:  # a file that cannot be read or written: say which, without a traceback
        print(f"carddeck: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
