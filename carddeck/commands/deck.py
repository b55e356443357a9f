"""``carddeck deck init DIR`` makes a deck of your own; ``carddeck deck batching DIR`` sets its batching per
model (servers sharing the store take it with the next snapshot); ``carddeck deck add|remove|list
--server ADDR`` change or inspect a running server's deck.

add/remove need the admin token: ``--token-file`` or env CARDDECK_ADMIN_TOKEN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from carddeck.card import CardMeta
from carddeck.client.api import (
    ADMIN_TOKEN_ENV,
    CardDeckClient,
    add_client_arguments,
    client_from_args,
    rpc_error_message,
    to_json,
)
from carddeck.client.results import RemoteError
from carddeck.errors import InvalidInput, NotReady, Unauthenticated


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="deck_command", metavar="ACTION", required=True)
    init = sub.add_parser(
        "init", help="create a deck you can change: a copy of the default deck (served read-only), or empty"
    )
    init.add_argument("dir", type=Path, help="new deck directory (serve it with `carddeck serve --deck DIR`)")
    init.add_argument("--empty", action="store_true", help="an empty deck instead of a copy of the default deck")
    batching = sub.add_parser(
        "batching",
        help="show or set a deck's batching, like Triton's per-model dynamic_batching (unset: the server's flags)",
    )
    batching.add_argument("dir", help="deck store: a directory or a store URL")
    batching.add_argument("--card", default="", help="set the batching of this card as a model of its own")
    batching.add_argument("--max-batch-size", type=int, help="most images in one batch")
    batching.add_argument("--max-queue-delay-us", type=int, help="longest wait for more requests (microseconds)")
    batching.add_argument("--preferred-batch-sizes", help="comma-separated sizes that run at once (empty: none)")
    batching.add_argument("--clear", action="store_true", help="drop the deck's (or --card's) settings first")
    add = sub.add_parser("add", help="upload ONNX cards (streamed in chunks)")
    add.add_argument("cards", nargs="+", type=Path, help="ONNX card files")
    add.add_argument(
        "--version",
        type=version_or_next,
        default="",
        metavar="N|next",
        help="upload under this card version instead of the file's own; `next`: one above the version the "
        "server holds (to replace a card already in the deck)",
    )
    remove = sub.add_parser("remove", help="remove a card: every version of it, or one with --version")
    remove.add_argument("name", help="the card's name (as `carddeck deck list` shows it)")
    remove.add_argument(
        "--version", type=card_version, default=0, metavar="N", help="remove only this version (default: every version)"
    )
    lst = sub.add_parser("list", help="list the served cards")
    lst.add_argument("--json", action="store_true", help="print every card's full CardMeta as JSON")
    for p in (add, remove, lst):
        add_client_arguments(p, token_env=ADMIN_TOKEN_ENV)
    for action in sub._choices_actions:  # `carddeck deck ACTION --help` opens with what ACTION does
        sub.choices[action.dest].description = action.help


def card_version(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a card version (an integer >= 1), got {text!r}")
    return int(text)


def version_or_next(text: str) -> str:
    if text not in ("", "next") and not (text.isdigit() and int(text) >= 1):  # "": the file's own
        raise argparse.ArgumentTypeError(f"expected a card version (an integer >= 1) or `next`, got {text!r}")
    return text


def card_bytes(path: Path, version: str, client: CardDeckClient) -> bytes:
    """The card file's bytes, with its CardMeta version replaced when ``version`` asks for it."""
    if path.suffix == ".pt" or (path / "card.pt").is_file():  # compress's output: one step short of a card
        raise InvalidInput(
            f"{path}: a training checkpoint from `carddeck compress`, not an ONNX card; export it first: "
            f"carddeck export {path} --out DIR/model.onnx, then add DIR/model.onnx"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the card file ({exc.strerror or exc})") from None
    if not version:
        return data
    from carddeck.deck.cardfile import read_card_bytes, set_card_meta

    model, meta, _ = read_card_bytes(data)
    if version == "next":
        served = {c.name: c.version for c in client.list_cards().cards}
        new = served[meta.name] + 1 if meta.name in served else meta.version
    else:  # checked by version_or_next
        new = int(version)
    set_card_meta(model, meta.replace(version=new))
    return model.SerializeToString()


def set_batching(args: argparse.Namespace) -> dict:
    """The deck's batching after applying the flags (none given: unchanged)."""
    from carddeck.deck import DeckStore

    store = DeckStore(args.dir)
    config = dict(store.manifest().batching)
    cards = dict(config.pop("cards", {}))
    target = dict(cards.get(args.card, {})) if args.card else config
    if args.card:
        store.manifest().find(args.card)  # CardNotFound names the deck's cards
    changes = {
        "max_batch_size": args.max_batch_size,
        "max_queue_delay_microseconds": args.max_queue_delay_us,
        "preferred_batch_size": _sizes(args.preferred_batch_sizes),
    }
    if not args.clear and all(v is None for v in changes.values()):
        return store.manifest().to_dict().get("batching", {})
    if args.clear:
        target = {}
    target.update({k: v for k, v in changes.items() if v is not None})
    if args.card:
        cards[args.card] = target
    else:
        config = target
    new = {**config, **({"cards": {k: v for k, v in cards.items() if v}} if any(cards.values()) else {})}
    return dict(store.set_batching(new).batching)


def _sizes(text: str | None) -> object:
    """``16,32`` -> [16, 32]; anything else is passed on for batching_config to name what is accepted."""
    if text is None:
        return None
    parts = [v.strip() for v in text.split(",") if v.strip()]
    return [int(v) for v in parts] if all(v.isdigit() for v in parts) else text


def run(args: argparse.Namespace) -> int:
    if args.deck_command == "batching":
        print(to_json(set_batching(args)))
        return 0
    if args.deck_command == "init":
        from carddeck.deck import default_deck_path, init_deck

        store = init_deck(args.dir, empty=args.empty)
        what = "an empty deck" if args.empty else f"a copy of the default deck ({default_deck_path()})"
        print(f"created {what} in {store.root}: {len(store.manifest().cards)} cards, deck version {store.version}")
        print(f"serve it with: carddeck serve --deck {store.root}")
        return 0
    try:
        with client_from_args(args) as client:
            if args.deck_command == "add":
                failed = 0
                for path in args.cards:  # each card is tried; a refused one is named and the rest still go
                    try:
                        data = card_bytes(path, args.version, client)
                    except InvalidInput as exc:  # this file (unreadable, not a card): the others still go
                        failed += 1
                        print(f"carddeck: error: {exc}", file=sys.stderr, flush=True)
                        continue
                    try:
                        r = client.add_card(data)
                    except RemoteError as exc:
                        if isinstance(exc, NotReady | Unauthenticated):
                            raise  # the server, not the card: the others would fail the same way
                        failed += 1
                        print(f"{rpc_error_message(exc)} ({path})", file=sys.stderr, flush=True)
                        continue
                    done = "already present (same bytes)" if r.already_present else "added"
                    card = f"{r.card.name}/{r.card.version} (domain {r.card.domain})"
                    print(f"{done} {card}; deck version {r.deck_version}", flush=True)
                if failed:
                    print(f"carddeck: {failed} of {len(args.cards)} cards failed", file=sys.stderr)
                    return 1
            elif args.deck_command == "remove":
                removed = client.remove_card(args.name, args.version)
                which = f"{args.name}/{args.version}" if args.version else f"{args.name} (every version)"
                print(f"removed {which}; deck version {removed.deck_version}")
                if removed.default_policy_note:  # the removal changed the default policy: say so, and why
                    print(f"note: {removed.default_policy_note}")
            else:
                listing = client.list_cards()
                if args.json:
                    print(to_json([CardMeta.from_json(c.meta_json).to_dict() for c in listing.cards]))
                else:
                    print(f"deck version {listing.deck_version}, default policy {listing.default_policy}")
                    if listing.default_policy_note:
                        print(f"note: {listing.default_policy_note}")
                    for c in listing.cards:
                        print(
                            f"  {c.name}/{c.version}  domain={c.domain}  arch={c.architecture}  "
                            f"{c.compression_method} sparsity={c.sparsity:.2f} bits={c.weight_bits}"
                        )
    except RemoteError as exc:
        print(rpc_error_message(exc), file=sys.stderr)
        return 1
    return 0
