"""Every compression method on one budget, in one run, against LRR and the dense card it starts from.

On digits32 with resnet20: one dense card (``--epochs``), then from it

* unstructured, at 90% and 95% of the conv/linear weights: LRR (3 rounds of ``--epochs // 2``),
  one-shot global magnitude + 1 epoch (LRR with one round of one epoch), L-OBS + 1 epoch, DSA + 1 epoch;
* structured, at 50% of the dense MACs: filter pruning (Li et al.; the filter fraction that halves
  the MACs), filter + GraNet regrowth, DiP-GO (+ 1 epoch);

and before any retraining, per unstructured budget: magnitude pruning with the uniform, global and
DSA allocations, and L-OBS (global allocation), with corrupted accuracy at severity 3 only (these
rows only compare with each other; a fifth of the evaluation on a shared machine). DSA searches 8
candidates x 3 generations. For each card: clean and mean corrupted accuracy
(15 CIFAR-10-C corruptions x 5 severities on digits32:val), parameters, nonzeros, MACs and the
calibration + training wall time as a ratio to LRR's at the same budget (structured: to LRR 90%'s).
The issue's targets are printed as checks; a missed target is a finding, not a failure to hide.

    nice -n 5 python benchmarks/bench_compress.py [--epochs 6] [--calib-images 256] [--threads 1]

Writes the tables to stdout and to benchmarks/RESULTS-compress.md (with the command and the time),
keeping the file's hand-written findings (from ``FINDINGS`` on) below the new tables.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carddeck.compress import CompressConfig, CompressResult, compress, load_card
from carddeck.compress.allocation import global_magnitude, layer_sizes, prune_counts_by_magnitude, uniform
from carddeck.compress.filters import kept_channels
from carddeck.compress.oneshot import recalibrate_batchnorm
from carddeck.compress.pipeline import corrupted_accuracy
from carddeck.compress.train import accuracy
from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS
from carddeck.data.datasets import load_dataset
from carddeck.nets import build_net, count_flops

RESULTS = Path(__file__).with_name("RESULTS-compress.md")
BUDGETS = (0.9, 0.95)
MACS_BUDGET = 0.5  # structured: fraction of the dense MACs kept
PRE_SEVERITIES = (3,)  # before retraining: one severity (a fifth of the evaluation) on a shared box
FINDINGS = "## Findings"  # the hand-written part of RESULTS, kept when the tables are rewritten


def kept_findings(path: Path) -> str:
    """The findings section of an earlier RESULTS file ('' when there is none), marked as older than the tables."""
    text = path.read_text() if path.is_file() else ""
    at = text.find(FINDINGS)
    if at < 0:
        return ""
    head, _, body = (text[at:].rstrip() + "\n").partition("\n")
    note = "_(written from an earlier run's figures; rewrite them from the tables above)_"
    return head + "\n" + (body if note in body else note + "\n" + body)


def filter_sparsity_for_macs(arch_kwargs: dict[str, Any], keep_ratio: float, num_classes: int = 10) -> float:
    """The smallest filter fraction (in steps of 1/1000) whose pruned resnet20 has <= ``keep_ratio`` of the MACs."""
    base = build_net("resnet20", num_classes, **arch_kwargs)
    dense = count_flops(base)
    groups = base.channel_groups()  # type: ignore[operator]
    for step in range(1000):
        s = step / 1000
        kw = {k: v for k, v in arch_kwargs.items() if k != "width"}
        kw["stage_widths"] = [kept_channels(g.size, s) for g in groups if g.name.startswith("stage")]
        kw["block_widths"] = [kept_channels(g.size, s) for g in groups if g.name.startswith("block")]
        if count_flops(build_net("resnet20", num_classes, **kw)) <= keep_ratio * dense:
            return s
    raise ValueError(f"no filter fraction reaches {keep_ratio} of the MACs")


def _row(label: str, res: CompressResult, group: str) -> dict[str, Any]:
    acc = res.meta.accuracy
    return {
        "card": label,
        "group": group,
        "epochs": len(res.history),
        "sparsity": res.meta.compression.sparsity,
        "clean": acc.clean,
        "corrupted": acc.corrupted,
        "params": res.params,
        "nonzeros": res.nonzeros,
        "macs": res.flops,
        "sparse_macs": res.sparse_flops,
        "seconds": res.seconds,
        "allocation": res.meta.compression.allocation,
    }


def run(
    epochs: int = 6,
    seed: int = 0,
    out: Path | None = None,
    threads: int = 1,
    calib_images: int = 256,
    data: str = "digits32",
    width: float | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Returns (card rows, before-retraining rows). ``data`` and ``width`` shrink it for a smoke test."""
    if threads:
        torch.set_num_threads(threads)
    root = Path(out or tempfile.mkdtemp(prefix="bench-compress-"))
    cache: dict = {}  # corrupted val images, shared by all cards
    base = dict(arch="resnet20", data=data, width=width, domain="clean", batch_size=64, seed=seed, progress=False)
    short = max(1, epochs // 2)
    rows: list[dict[str, Any]] = []
    before: list[dict[str, Any]] = []

    def make(label: str, group: str, **kw: Any) -> CompressResult:
        res = compress(CompressConfig(out=root / label.replace("+", "-"), **base, **kw), corruption_cache=cache)  # type: ignore[arg-type]
        rows.append(_row(label, res, group))
        acc = res.meta.accuracy
        print(f"{label}: clean {acc.clean:.4f} corrupted {acc.corrupted:.4f} ({res.seconds:.0f} s)", flush=True)
        return res

    dense = make("dense", "dense", method="dense", epochs=epochs)
    one = dict(init=dense.card, epochs=1)
    calib = dict(calib_images=calib_images)
    for sp in BUDGETS:
        tag = f"{round(100 * sp)}%"
        make(f"lrr {tag}", tag, method="lrr", sparsity=sp, rounds=3, epochs=short, init=dense.card)
        make(f"magnitude+1 {tag}", tag, method="lrr", sparsity=sp, rounds=1, **one)
        make(f"lobs+1 {tag}", tag, method="lobs", sparsity=sp, **one, **calib)
        dsa = make(f"dsa+1 {tag}", tag, method="dsa", sparsity=sp, generations=3, **one, **calib)
        before += _before_retraining(dense.card, dsa, sp, cache, data)
        lobs0 = compress(CompressConfig(out=root / f"lobs0-{tag[:-1]}", method="lobs", sparsity=sp, init=dense.card,
                                        epochs=0, severities=PRE_SEVERITIES, **calib, **base), corruption_cache=cache)  # type: ignore[arg-type]  # fmt: skip
        before.append({"budget": tag, "allocation": "global (L-OBS)", "clean": lobs0.meta.accuracy.clean,
                       "corrupted": lobs0.meta.accuracy.corrupted})  # fmt: skip
    _m, _meta, card = load_card(dense.card)
    fs = filter_sparsity_for_macs(card["arch_kwargs"], MACS_BUDGET)
    tag = f"{round(100 * MACS_BUDGET)}% MACs"
    make("filter", tag, method="filter", sparsity=fs, epochs=short, init=dense.card)
    make("filter+regrow", tag, method="filter", sparsity=fs, regrow=0.2, epochs=short, init=dense.card)
    make("dipgo+1", tag, method="dipgo", sparsity=1.0 - MACS_BUDGET, **one, **calib)
    return rows, before


def _before_retraining(
    dense_card: Path, dsa: CompressResult, sparsity: float, cache: dict, data: str
) -> list[dict[str, Any]]:
    """Magnitude pruning of the dense card (BN statistics re-estimated): uniform, global and DSA allocations."""
    device = torch.device("cpu")
    val = load_dataset(data, "val")
    model, _, _ = load_card(dense_card)
    sizes = layer_sizes(model)
    train = load_dataset(data, "train")  # the calibration images compress draws (seed 0), for BN statistics
    calib = train.images[np.sort(np.random.default_rng([0, 5]).choice(len(train), 256, replace=False))]
    layer_sparsity = dsa.meta.compression.layer_sparsity or ()
    allocations = {
        "uniform": uniform(sizes, sparsity),
        "global": global_magnitude(model, sparsity),
        "dsa": {n: round(s * sizes[n]) for n, s in zip(sizes, layer_sparsity)},
    }
    out = []
    for name, counts in allocations.items():
        net, _, _ = load_card(dense_card)
        prune_counts_by_magnitude(net, counts)
        recalibrate_batchnorm(net, calib, device)  # as lobs and dsa do after pruning
        corrupted = corrupted_accuracy(net, val, tuple(BENCHMARK_CORRUPTIONS), PRE_SEVERITIES, device, cache)
        out.append({"budget": f"{round(100 * sparsity)}%", "allocation": f"{name} (magnitude)",
                    "clean": accuracy(net, val.images, val.labels, device),
                    "corrupted": float(np.mean(list(corrupted.values())))})  # fmt: skip
    return out


def verdicts(rows: list[dict[str, Any]], before: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    by = {r["card"]: r for r in rows}
    pre = {(b["budget"], b["allocation"]): b for b in before}
    out = []
    for sp in BUDGETS:
        tag = f"{round(100 * sp)}%"
        lrr, lobs = by[f"lrr {tag}"], by[f"lobs+1 {tag}"]
        gaps = [100 * (lrr[k] - lobs[k]) for k in ("clean", "corrupted")]
        ratio = lobs["seconds"] / lrr["seconds"]
        out.append((
            f"{tag}: L-OBS+1 within 1 point of LRR (clean gap {gaps[0]:+.2f}, corrupted gap {gaps[1]:+.2f}) "
            f"in <= 1/4 of its time ({ratio:.3f}x)",
            max(gaps) <= 1.0 and ratio <= 0.25,
        ))  # fmt: skip
        d = pre[(tag, "dsa (magnitude)")]["corrupted"]
        u, g = pre[(tag, "uniform (magnitude)")]["corrupted"], pre[(tag, "global (magnitude)")]["corrupted"]
        out.append((
            f"{tag}: DSA allocation above uniform and global on corrupted accuracy before retraining "
            f"({100 * d:.2f} vs {100 * u:.2f}, {100 * g:.2f})",
            d > u and d > g,
        ))  # fmt: skip
    lobs, mag = by["lobs+1 95%"], by["magnitude+1 95%"]
    gaps = [100 * (lobs[k] - mag[k]) for k in ("clean", "corrupted")]
    out.append((f"95%: L-OBS+1 at least 2 points above magnitude+1 (clean {gaps[0]:+.2f}, corrupted {gaps[1]:+.2f})",
                min(gaps) >= 2.0))  # fmt: skip
    dip, filt = by["dipgo+1"], by["filter"]
    ratio = dip["seconds"] / filt["seconds"]
    macs_ok = abs(dip["macs"] / by["dense"]["macs"] - MACS_BUDGET) <= 0.02 * MACS_BUDGET
    out.append((
        f"DiP-GO at least filter's accuracy (clean {100 * (dip['clean'] - filt['clean']):+.2f}, corrupted "
        f"{100 * (dip['corrupted'] - filt['corrupted']):+.2f}) at the same MACs ({dip['macs'] / 1e6:.2f}M vs "
        f"{filt['macs'] / 1e6:.2f}M) in <= 1/4 of its time ({ratio:.3f}x)",
        dip["clean"] >= filt["clean"] and dip["corrupted"] >= filt["corrupted"] and macs_ok and ratio <= 0.25,
    ))  # fmt: skip
    dense = by["dense"]
    for r in rows[1:]:
        out.append((
            f"{r['card']} matches or beats dense on corrupted accuracy "
            f"({100 * r['corrupted']:.2f} vs {100 * dense['corrupted']:.2f})",
            r["corrupted"] >= dense["corrupted"],
        ))  # fmt: skip
    return out


def table(rows: list[dict[str, Any]]) -> str:
    by = {r["card"]: r for r in rows}
    dense = by["dense"]
    lines = [
        "| card | sparsity | clean | corrupted | params | nonzeros | MACs | vs dense | nonzero MACs | epochs | s "
        "| time vs LRR |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lrr = by.get(f"lrr {r['group']}", by["lrr 90%"])
        lines.append(
            f"| {r['card']} | {r['sparsity']:.3f} | {100 * r['clean']:.2f} | {100 * r['corrupted']:.2f} | "
            f"{r['params']:,} | {r['nonzeros']:,} | {r['macs'] / 1e6:.2f}M | {r['macs'] / dense['macs']:.3f} | "
            f"{r['sparse_macs'] / 1e6:.2f}M | {r['epochs']} | {r['seconds']:.0f} | "
            f"{r['seconds'] / lrr['seconds']:.3f} |"
        )
    return "\n".join(lines)


def before_table(before: list[dict[str, Any]]) -> str:
    lines = ["| budget | allocation (pruner) | clean | corrupted |", "|---|---|---|---|"]
    for b in before:
        lines.append(f"| {b['budget']} | {b['allocation']} | {100 * b['clean']:.2f} | {100 * b['corrupted']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="dense epochs (lrr: half per round, filter: half)")
    parser.add_argument("--calib-images", type=int, default=256, help="lobs, dsa, dipgo calibration images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a shared 2-core box)")
    parser.add_argument("--out", type=Path, default=None, help="keep the cards here (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS-compress.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    rows, before = run(args.epochs, args.seed, args.out, args.threads, args.calib_images)
    checks = verdicts(rows, before)
    dsa = [f"- {r['card']}: `{r['allocation']}`" for r in rows if r["card"].startswith("dsa")]
    text = "\n".join(
        [
            "# bench_compress: every method on one budget, digits32 (resnet20)",
            "",
            f"`nice -n 5 python benchmarks/bench_compress.py --epochs {args.epochs} --calib-images "
            f"{args.calib_images} --seed {args.seed} --threads {args.threads}`; "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), on a 2-core machine shared with other jobs; total "
            f"{time.time() - t0:.0f} s.",
            "",
            "Accuracies in % on digits32:val (359 images); corrupted = mean over the 15 CIFAR-10-C corruptions x "
            "5 severities. sparsity: fraction of conv/linear weights removed (filter, dipgo: of filters). MACs: "
            "one 32x32 image, dense arithmetic (what ONNX Runtime runs); nonzero MACs: with zero weights skipped. "
            "s: calibration + training wall time (not the final evaluation); time vs LRR: against LRR at the "
            "same budget (structured rows: LRR 90%).",
            "",
            table(rows),
            "",
            "Before any retraining (from the dense card, BatchNorm statistics re-estimated on the 256 calibration "
            "images; corrupted: the 15 corruptions at severity 3 only):",
            "",
            before_table(before),
            "",
            "DSA's discovered allocation functions:",
            "",
            *dsa,
            "",
            "Targets:",
            "",
            *[f"- [{'x' if ok else ' '}] {text}" for text, ok in checks],
            "",
        ]
    )
    print(text)
    if not args.no_write:
        RESULTS.write_text(text + "\n" + kept_findings(RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
