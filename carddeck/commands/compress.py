"""``carddeck compress``: train and compress one CARD into ``--out DIR`` (card.pt + card.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from carddeck.catalog import OPTION_TYPES, method_options, method_specs
from carddeck.commands.cli import interrupted, out_dir
from carddeck.errors import InvalidInput

ARCHS = ("resnet20", "resnet18", "preact-wrn18")  # kept in step with carddeck.nets.NETS (tested)
METHOD_NAMES = tuple(method_specs())  # each method module declares itself (carddeck.catalog)
DOMAIN_NAMES = ("clean", "gaussian", "augmix", "lowfreq", "photometric")  # kept in step with DOMAINS (tested)


def _arch_kw(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (VALUE in JSON), got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key}: value {value!r} is not JSON (e.g. false, 2, [16, 32])") from None


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t for t in (s.strip() for s in text.split(",")) if t)


def _epoch_defaults() -> str:
    """Each method's default --epochs, as its MethodSpec declares it: 'N for a, b; M for c (...)'."""
    by: dict[int, list[str]] = {}
    for spec in method_specs().values():
        by.setdefault(spec.epochs, []).append(spec.name)
    short = " (a short retraining after the one-shot prune; 0 allowed)"
    return "; ".join(f"{n} for {', '.join(names)}" + (short if n < 2 else "") for n, names in sorted(by.items()))


def configure(parser: argparse.ArgumentParser) -> None:
    methods = ", ".join(f"{s.name} ({s.summary})" for s in method_specs().values())
    parser.epilog = (
        f"methods: {methods}; lobs, dsa and dipgo prune an --init dense card. "
        f"domains: {', '.join(DOMAIN_NAMES)}. architectures: {', '.join(ARCHS)}."
    )
    a = parser.add_argument
    a("--arch", required=True, help=f"architecture: {', '.join(ARCHS)}")
    a("--data", default=None,
      help="dataset: digits32, cifar10:PATH, npz:PATH, ... (default: the --init card's, else digits32)")  # fmt: skip
    a("--domain", default="clean", help=f"augmentation domain: {', '.join(DOMAIN_NAMES)}")
    a("--method", default="dense", help=f"compression method: {', '.join(METHOD_NAMES)}")
    a("--sparsity", type=float, default=0.0, help="target: fraction of weights removed (filter: of filters), [0, 1)")
    a("--out", type=out_dir, required=True, help="output directory (card.pt, card.json, checkpoint.pt)")
    a("--epochs", type=int, default=None, help=f"epochs per training round (LRR replays them each round); default: "
      f"the method's, {_epoch_defaults()}")  # fmt: skip
    a("--batch-size", type=int, default=128)
    a("--lr", type=float, default=0.1, help="base learning rate (SGD, momentum 0.9)")
    a("--weight-decay", type=float, default=5e-4)
    a("--schedule", default="cosine", help="learning-rate schedule per round: cosine, step, constant")
    a("--jsd", action="store_true", help="add AugMix's Jensen-Shannon consistency loss (weight 12)")
    a("--seed", type=int, default=0)
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a("--width", type=float, default=None, help="width multiplier of the architecture")
    a("--arch-kw", type=_arch_kw, action="append", default=[], metavar="KEY=JSON", help="extra architecture option")
    groups: dict[str, Any] = {}
    for option, users in method_options().values():  # each method's own options, as it declares them
        add = a
        if option.exclusive:
            if option.exclusive not in groups:
                groups[option.exclusive] = parser.add_mutually_exclusive_group()
            add = groups[option.exclusive].add_argument
        add(
            option.flag,
            type=OPTION_TYPES[option.type],
            default=option.default,
            help=f"{', '.join(users)}: {option.help}",
        )
    a("--init", type=Path, default=None, help="start from this dense card.pt (lrr, filter: skips dense training; "
      "lobs, dsa, dipgo: required)")  # fmt: skip
    a("--calib-images", type=int, default=None,
      help="lobs, dsa, dipgo: training images for Hessians, search fitness, gates (default: 1024 or all)")  # fmt: skip
    a("--finetune-lr", type=float, default=None,
      help="lobs, dsa, dipgo: peak learning rate of the retraining after pruning (default: --lr / 10)")  # fmt: skip
    a("--corruptions", type=_csv, default=None, help="comma list for corrupted accuracy, 'none' to skip (default: 15)")
    a("--severities", type=_csv, default=("1", "2", "3", "4", "5"), help="comma list of severities (default 1-5)")
    a("--name", default=None, help="card name (default ARCH-DOMAIN-METHOD)")
    a("--version", type=int, default=1, help="card version")
    a("--resume", action="store_true", help="continue from DIR/checkpoint.pt if present")
    a("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    import torch

    from carddeck.compress.checkpoint import CARD_FILE, TRAIN_FILE
    from carddeck.compress.pipeline import CompressConfig, compress

    held = [f for f in (CARD_FILE, TRAIN_FILE) if (args.out / f).is_file()]
    if held and not args.resume:  # a rerun would overwrite a finished card, or an interrupted run's epochs
        raise InvalidInput(
            f"--out {args.out} already holds a run ({', '.join(held)}): pass --resume to continue it (same "
            "settings), or give a new --out; nothing was overwritten"
        )
    if args.threads < 0:
        raise InvalidInput(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    corruptions = args.corruptions
    if corruptions is not None and tuple(c.lower() for c in corruptions) in {("none",), ()}:
        corruptions = ()
    try:
        severities = tuple(int(s) for s in args.severities)
    except ValueError:
        raise InvalidInput(f"--severities must be integers in 1..5, got {','.join(args.severities)}") from None
    declared = {name: getattr(args, name) for name in method_options()}
    own = {f.name for f in fields(CompressConfig)}  # options with a field of their own; others go in options
    config = CompressConfig(
        arch=args.arch,
        out=args.out,
        data=args.data,
        domain=args.domain,
        method=args.method,
        sparsity=args.sparsity,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        jsd=args.jsd,
        seed=args.seed,
        device=args.device,
        width=args.width,
        arch_kwargs=dict(args.arch_kw),
        init=args.init,
        calib_images=args.calib_images,
        finetune_lr=args.finetune_lr,
        corruptions=corruptions,
        severities=severities,
        name=args.name,
        version=args.version,
        progress=not args.no_progress,
        resume=args.resume,
        **{k: v for k, v in declared.items() if k in own},
        options={k: v for k, v in declared.items() if k not in own},
    )
    try:
        result = compress(config)
    except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to go on (the CLI exits 130)
        saved = args.out / TRAIN_FILE
        kept = f"{saved} holds the last finished epoch; rerun with --resume to continue" if saved.is_file() else (
            "no epoch had finished, nothing was kept")  # fmt: skip
        interrupted(kept)
        raise
    acc = result.meta.accuracy
    corrupted = "n/a" if acc.corrupted is None else f"{acc.corrupted:.4f}"
    print(
        f"{result.card}: {result.meta.compression.method} sparsity {result.meta.compression.sparsity:.4f}, "
        f"clean {acc.clean:.4f}, corrupted {corrupted}, params {result.params}, nonzeros {result.nonzeros}, "
        f"MACs {result.flops}"
    )
    return 0
