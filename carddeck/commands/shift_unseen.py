"""``carddeck shift --unseen``: the shift verdict on condition families outside the corruption catalog.

The detector is scored as it is fitted: the unseen shifts (:mod:`carddeck.data.corruptions.unseen`: colour,
geometry, occlusion) were never among its conditions or its scope, so nothing needs holding out. Per
condition: the deck's accuracy against clean, harmful (more than 5 points under clean) or benign (within 2),
the share of 16-image batches flagged (not in-distribution) and uncovered, by which path covered batches were
covered (near a known condition, in scope with the estimate near clean, the confidences (DoC), the cards'
agreement (DoA)), and the expected accuracy against the true one; then #21's targets per family.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def evaluate_unseen(deck: Any, detector: Any, args: argparse.Namespace, progress: Any) -> dict[str, Any]:
    from carddeck.commands.shift import _images, family_targets, foreign_sets, kind_of, scored, served
    from carddeck.data.corruptions.unseen import family_of, unseen_conditions, unseen_shift
    from carddeck.data.datasets import load_dataset
    from carddeck.gating.shift import CONFIDENCE
    from carddeck.gating.shift_fit import deck_outputs

    images, labels = served(load_dataset(args.data, args.split), args)
    seed = 1 if args.split == "val" else 0  # as the catalog: val conditions drawn with seed 1, test with 0
    rng = np.random.default_rng(seed)
    spec = deck.input
    conditions = unseen_conditions(tuple(f for f in args.unseen.split(",") if f))
    rows: list[dict[str, Any]] = []
    sources = {"clean": "", **{f"{c}/{s}": "" for c, s in conditions}, **foreign_sets(args.foreign)}
    for name in progress(list(sources), f"shift (unseen, {args.split})"):
        family = ""
        if name.startswith("foreign:"):
            x, y = _images(sources[name], len(images), (spec.height, spec.width), rng), None
        elif name == "clean":
            x, y = images, labels
        else:
            c, s = name.rsplit("/", 1)
            x, y, family = unseen_shift(images, c, int(s), seed=seed), labels, family_of(c)
        outputs = deck_outputs(deck, x, batch_size=args.batch)
        features = outputs.features
        hits = outputs.labels == y if y is not None else None
        draws = args.draws * (10 if name == "clean" else 1)
        rows.append({
            "condition": name,
            "family": family,
            "accuracy": None if hits is None else float(hits.mean()),
            "confidence": float(features[:, CONFIDENCE].mean()),
            "out_of_scope": float((detector.image_scores(features) > 1).mean()),
            **scored(detector, outputs, hits, args.batch, draws),
        })  # fmt: skip
    clean_acc = rows[0]["accuracy"]
    for row in rows:
        row["kind"] = kind_of(row, clean_acc)
    targets = unseen_targets(rows, family_targets)
    return {"deck": str(deck.root), "data": args.data, "split": args.split, "batch": args.batch,
            "clean_accuracy": clean_acc, "conditions": rows, "targets": targets}  # fmt: skip


def unseen_targets(rows: list[dict[str, Any]], family_targets: Any) -> dict[str, dict[str, Any]]:
    """#21's targets per unseen family (and all), plus where the verdict fails: harmful conditions covered in
    more than 10% of batches, and the largest overestimate of a harmful condition's accuracy."""
    out = family_targets(rows)
    for fam, summary in out.items():
        harmful = [r for r in rows if r["kind"] == "harmful" and fam in ("all", r["family"])]
        summary["harmful_covered_over_10"] = [r["condition"] for r in harmful if r["batches"]["covered"] > 0.1]
        summary["harmful_unflagged_over_10"] = [r["condition"] for r in harmful
                                                if r["batches"]["in_distribution"] > 0.1]  # fmt: skip
        over = [r["expected_accuracy_error"] for r in harmful if r["expected_accuracy_error"] is not None]
        summary["harmful_max_overestimate"] = max(over, default=None)
    return out


def _points(v: float | None, signed: bool = False) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def unseen_markdown(result: dict[str, Any]) -> str:
    from carddeck.commands.shift import _pct

    t = result["targets"]
    lines = [
        f"## Shift verdict on unseen families ({result['split']} split)",
        "",
        f"Deck {result['deck']}, {result['data']}, clean accuracy {100 * result['clean_accuracy']:.1f}; "
        f"{result['batch']}-image batches; the detector as fitted (these families are in no fit). Harmful: more "
        "than 5 points under clean; benign: within 2.",
        "",
        "| family | harmful | least flagged (>= 90%) | harmful covered > 10% of batches | harmful not flagged > 10% "
        "| benign most uncovered (<= 10%) | MAE (<= 5) | worst harmful error (<= 12) | largest harmful overestimate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for fam, f in t.items():
        lines.append(
            f"| {fam} | {f['harmful']} | {_pct(f['harmful_min_flagged'])} | "
            f"{', '.join(f['harmful_covered_over_10']) or 'none'} | "
            f"{', '.join(f['harmful_unflagged_over_10']) or 'none'} "
            f"| {_pct(f['benign_max_uncovered'])} | {_points(f['expected_accuracy_mae'])} ({f['estimated']} estimated) "
            f"| {_points(f['harmful_max_error'])} | {_points(f['harmful_max_overestimate'], signed=True)} |"
        )
    lines += [
        "",
        "| condition | kind | accuracy (vs clean) | expected | flagged | uncovered "
        "| covered: known / in scope / DoC / DoA | out of scope |",
        "|---|---|---|---|---|---|---|---|",
    ]
    from carddeck.gating.shift import COVERED_BY

    clean = result["clean_accuracy"]
    for r in result["conditions"]:
        b, paths = r["batches"], r["covered_by"]
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f} ({100 * (r['accuracy'] - clean):+.1f})"
        lines.append(
            f"| {r['condition']} | {r['kind']} | {acc} | {_points(r['expected_accuracy'])} | "
            f"{100 * (1 - b['in_distribution']):.0f}% | {100 * b['uncovered']:.0f}% | "
            f"{' / '.join(f'{100 * paths[p]:.0f}%' for p in COVERED_BY)} | {100 * r['out_of_scope']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["evaluate_unseen", "unseen_markdown", "unseen_targets"]
