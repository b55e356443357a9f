"""``carddeck predict --server ADDR IMAGES...``: classify png/jpg/npy files with a running server.

PNG/JPEG files are read with Pillow (a core dependency; carddeck.client.images turns them upright by their EXIF
orientation) and resized to the deck's input size;
.npy files must hold uint8 [H, W, 3] / [N, H, W, 3] or float32 [3, H, W] / [N, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from carddeck.card import CardMeta
from carddeck.client.api import (
    CardDeckClient,
    Verdict,
    add_client_arguments,
    client_from_args,
    rpc_error_message,
    to_json,
)
from carddeck.client.images import read_rgb
from carddeck.client.results import RemoteError
from carddeck.commands.cli import positive_int
from carddeck.errors import InvalidInput, NotReady, Unauthenticated

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Verdict.covered_by's paths that rest on the cards' own outputs (carddeck.gating.shift.COVERED_BY less "known",
# not imported: it would load scipy into the client)
CARDS_WORD = ("in_scope", "confidence", "agreement")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files: .png, .jpg/.jpeg or .npy")
    parser.add_argument("--policy", default="", help="gate policy (default: the deck's)")
    parser.add_argument("--per-sample", action="store_true", help="route each image on its own")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per request")
    parser.add_argument("--json", action="store_true", help="print JSON (probabilities and routing) instead of lines")
    parser.add_argument(
        "--abstain-above-risk", type=probability, default=None, metavar="P",
        help="mark images whose estimated error probability exceeds P (0-1) as abstained",
    )  # fmt: skip
    add_client_arguments(parser)


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (an error probability), got {text!r}")
    return value


def load_file(path: Path, size: tuple[int, int]) -> tuple[list[str], np.ndarray]:
    """The names of a file's images and one uint8 NHWC or float32 NCHW array; InvalidInput says what is wrong."""
    suffix = path.suffix.lower()
    if path.is_dir():
        raise InvalidInput(f"{path}: is a directory; pass image files (e.g. {path}/*.png)")
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{path}: not a readable .npy file ({exc})") from None
        if arr.ndim == 3:
            arr = arr[None]
        if arr.dtype not in (np.uint8, np.float32) or arr.ndim != 4:
            raise InvalidInput(
                f"{path}: .npy must hold uint8 [N,H,W,3] or float32 [N,3,H,W], got {arr.dtype} {arr.shape}"
            )
        if len(arr) == 0:
            raise InvalidInput(f"{path}: holds no images (shape {arr.shape}); send at least one")
        return ([str(path)] if len(arr) == 1 else [f"{path}[{i}]" for i in range(len(arr))], arr)
    if suffix in IMAGE_SUFFIXES:
        rgb = read_rgb(path).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        return ([str(path)], np.asarray(rgb, np.uint8)[None])
    raise InvalidInput(f"{path}: unsupported file type {suffix!r}; accepted: .png, .jpg, .jpeg, .npy")


def _input_size(client: CardDeckClient) -> tuple[int, int]:
    cards = client.list_cards().cards
    if not cards:
        raise InvalidInput("the server's deck has no cards")
    spec = CardMeta.from_json(cards[0].meta_json).input
    return spec.height, spec.width


def _predict_file(client: CardDeckClient, args: argparse.Namespace, names: list[str], arr: np.ndarray) -> list[dict]:
    # One request per file (chunked by --batch-size): a file's images share a routing decision,
    # different files never influence each other's.
    results = []
    for start in range(0, len(arr), max(1, args.batch_size)):
        part = arr[start : start + args.batch_size]
        r = client.predict(
            part, policy=args.policy, per_sample=args.per_sample, abstain_above_risk=args.abstain_above_risk
        )
        v = r.verdict
        for j in range(len(part)):
            row = j if args.per_sample else 0
            selected = [c for c, w in zip(r.routing["card_names"], r.routing["weights"][row]) if w > 0]
            distances = dict(zip(r.routing["domains"], r.routing["distances"][row]))
            results.append(
                {
                    "image": names[start + j],
                    "label": int(r.labels[j]),
                    "class": r.label_names[j],
                    "probability": float(r.probabilities[j, r.labels[j]]),
                    "cards": selected,
                    "policy": r.routing["policy"],
                    "domain_distances": distances,
                    "probabilities": r.probabilities[j],
                    "deck_version": r.deck_version,
                    "first_of_request": j == 0,
                    **(_verdict_of(v, j) if v is not None else {}),
                }
            )
    return results


def _verdict_of(v: Verdict, j: int) -> dict:
    return {
        "shift_state": v.shift_state,
        "shift_scope": v.scope,
        "expected_accuracy": v.expected_accuracy,
        "expected_accuracy_kind": v.expected_accuracy_kind,
        "shift_covered_by": v.covered_by,
        "out_of_scope": float(v.out_of_scope[j]),
        "in_scope": bool(v.in_scope[j]),
        "risk": float(v.risk[j]),
        "abstained": bool(v.abstained[j]),
    }


def warnings_of(line: dict, *, first_of_request: bool = True) -> list[str]:
    """The warning lines ``carddeck predict`` prints for one image (none when the deck can be believed);
    the request's shift warning (uncovered, or covered only on the cards' word) only with its first image."""
    out = []
    if line.get("in_scope") is False:
        out.append(f"out of scope (score {line['out_of_scope']:.1f} > 1): unlike anything the deck was made for")
    if first_of_request and line.get("shift_state") == "uncovered":
        acc = line["expected_accuracy"]
        bound = "unknown" if acc is None else f"at most {100 * acc:.0f}%"
        out.append(f"its {line['shift_scope']} is under a shift the deck does not cover (expected accuracy {bound})")
    if first_of_request and line.get("shift_covered_by") in CARDS_WORD:  # not near a known condition: say so
        acc = line["expected_accuracy"]
        expected = "unknown" if acc is None else f"{100 * acc:.0f}%"
        out.append(
            f"its {line['shift_scope']} is under a new shift, covered on the cards' own word "
            f"({line['shift_covered_by']}), which a shift can fool (expected accuracy {expected})"
        )
    if line.get("abstained"):
        out.append(f"abstained: estimated risk {line['risk']:.2f} above the bound")
    return out


def _print_lines(results: list[dict]) -> None:
    for line in results:
        # why the gate chose: the distance from the image's spectral signature to each domain
        why = ", ".join(f"{d} {v:.2f}" for d, v in sorted(line["domain_distances"].items(), key=lambda kv: kv[1]))
        print(
            f"{line['image']}: {line['class']} ({line['probability']:.3f}) cards={','.join(line['cards'])} "
            f"[{line['policy']}; distance to {why}]",
            flush=True,
        )
        for warning in warnings_of(line, first_of_request=line.get("first_of_request", True)):
            print(f"  warning: {line['image']}: {warning}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Every file is tried: a bad one is reported on stderr, the rest still run; exit 1 if any failed."""
    results, failed = [], 0
    try:
        with client_from_args(args) as client:
            size = _input_size(client)
            for path in args.images:
                try:
                    names, arr = load_file(path, size)
                    done = _predict_file(client, args, names, arr)
                except RemoteError as exc:  # before InvalidInput: the server's InvalidInput is both
                    if isinstance(exc, NotReady | Unauthenticated):
                        raise  # the server, not the file: the other files would fail the same way
                    failed += 1
                    print(f"{rpc_error_message(exc)} ({path})", file=sys.stderr, flush=True)
                    continue
                except InvalidInput as exc:
                    failed += 1
                    message = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
                    print(f"carddeck: error: {message}", file=sys.stderr, flush=True)
                    continue
                results.extend(done)
                if not args.json:
                    _print_lines(done)
    except RemoteError as exc:
        print(rpc_error_message(exc), file=sys.stderr)
        return 1
    if args.json:
        print(to_json(results))
    if failed:
        print(f"carddeck: {failed} of {len(args.images)} files failed", file=sys.stderr)
    return 1 if failed else 0
