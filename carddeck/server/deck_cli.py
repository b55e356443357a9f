"""``carddeck deck add|remove|list --server ADDR``: change or inspect a running server's deck.

add/remove need the admin token: ``--token-file`` or env CARDDECK_ADMIN_TOKEN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc

from carddeck.card import CardMeta
from carddeck.server.client import add_client_arguments, client_from_args, rpc_error_message, to_json


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="deck_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="upload ONNX cards (streamed in chunks)")
    add.add_argument("cards", nargs="+", type=Path, help="ONNX card files")
    remove = sub.add_parser("remove", help="remove a card")
    remove.add_argument("name")
    remove.add_argument("--version", type=int, default=0, help="one version (default: the served one)")
    lst = sub.add_parser("list", help="list the served cards")
    lst.add_argument("--json", action="store_true", help="print every card's full CardMeta as JSON")
    for p in (add, remove, lst):
        add_client_arguments(p, token_env="CARDDECK_ADMIN_TOKEN")


def run(args: argparse.Namespace) -> int:
    try:
        with client_from_args(args) as client:
            if args.deck_command == "add":
                for path in args.cards:
                    r = client.add_card(path)
                    print(
                        f"added {r.card.name}/{r.card.version} (domain {r.card.domain}); deck version {r.deck_version}"
                    )
            elif args.deck_command == "remove":
                removed = client.remove_card(args.name, args.version)
                print(f"removed {args.name}; deck version {removed.deck_version}")
            else:
                listing = client.list_cards()
                if args.json:
                    print(to_json([CardMeta.from_json(c.meta_json).to_dict() for c in listing.cards]))
                else:
                    print(f"deck version {listing.deck_version}, default policy {listing.default_policy}")
                    for c in listing.cards:
                        print(
                            f"  {c.name}/{c.version}  domain={c.domain}  arch={c.architecture}  "
                            f"{c.compression_method} sparsity={c.sparsity:.2f} bits={c.weight_bits}"
                        )
    except grpc.RpcError as exc:
        print(rpc_error_message(exc), file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"carddeck: error: {exc}", file=sys.stderr)
        return 2
    return 0
