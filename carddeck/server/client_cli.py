"""``carddeck predict --server ADDR IMAGES...``: classify png/jpg/npy files with a running server.

PNG/JPEG files are read with Pillow (``pip install pillow``) and resized to the deck's input size;
.npy files must hold uint8 [H, W, 3] / [N, H, W, 3] or float32 [3, H, W] / [N, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
import numpy as np

from carddeck.card import CardMeta
from carddeck.errors import InvalidInput
from carddeck.server.client import CardDeckClient, add_client_arguments, client_from_args, rpc_error_message, to_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files: .png, .jpg/.jpeg or .npy")
    parser.add_argument("--policy", default="", help="gate policy (default: the deck's)")
    parser.add_argument("--per-sample", action="store_true", help="route each image on its own")
    parser.add_argument("--batch-size", type=int, default=64, help="images per request")
    parser.add_argument("--json", action="store_true", help="print JSON (probabilities and routing) instead of lines")
    add_client_arguments(parser)


def load_images(paths: list[Path], size: tuple[int, int]) -> list[tuple[list[str], np.ndarray]]:
    """Per file: the names of its images and one uint8 NHWC or float32 NCHW array."""
    out: list[tuple[list[str], np.ndarray]] = []
    for path in paths:
        suffix = path.suffix.lower()
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
            if arr.ndim == 3:
                arr = arr[None]
            if arr.dtype not in (np.uint8, np.float32) or arr.ndim != 4:
                raise InvalidInput(
                    f"{path}: .npy must hold uint8 [N,H,W,3] or float32 [N,3,H,W], got {arr.dtype} {arr.shape}"
                )
            out.append(([str(path)] if len(arr) == 1 else [f"{path}[{i}]" for i in range(len(arr))], arr))
        elif suffix in IMAGE_SUFFIXES:
            try:
                from PIL import Image
            except ImportError:
                raise InvalidInput("reading png/jpg needs Pillow: pip install pillow (or pass .npy files)") from None
            try:
                with Image.open(path) as im:
                    rgb = im.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
            except OSError as exc:
                raise InvalidInput(f"{path}: not a readable image ({exc})") from None
            out.append(([str(path)], np.asarray(rgb, np.uint8)[None]))
        else:
            raise InvalidInput(f"{path}: unsupported file type {suffix!r}; accepted: .png, .jpg, .jpeg, .npy")
    return out


def _input_size(client: CardDeckClient) -> tuple[int, int]:
    cards = client.list_cards().cards
    if not cards:
        raise InvalidInput("the server's deck has no cards")
    spec = CardMeta.from_json(cards[0].meta_json).input
    return spec.height, spec.width


def run(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            files = load_images(args.images, _input_size(client))
            # One request per file (chunked by --batch-size): a file's images share a routing decision,
            # different files never influence each other's.
            results = []
            for names, arr in files:
                for start in range(0, len(arr), max(1, args.batch_size)):
                    part = arr[start : start + args.batch_size]
                    r = client.predict(part, policy=args.policy, per_sample=args.per_sample)
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
                            }
                        )
    except grpc.RpcError as exc:
        print(rpc_error_message(exc), file=sys.stderr)
        return 1
    if args.json:
        print(to_json(results))
    else:
        for line in results:
            # why the gate chose: the distance from the image's spectral signature to each domain
            why = ", ".join(f"{d} {v:.2f}" for d, v in sorted(line["domain_distances"].items(), key=lambda kv: kv[1]))
            print(
                f"{line['image']}: {line['class']} ({line['probability']:.3f}) cards={','.join(line['cards'])} "
                f"[{line['policy']}; distance to {why}]"
            )
    return 0
