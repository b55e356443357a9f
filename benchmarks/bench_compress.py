"""Train real CARDs on digits32 and compare them with the dense baseline trained in the same run.

For a dense resnet20 and for each method at 90% sparsity (filter: 50% of the filters per channel
group, with and without GraNet regrowth), records clean and mean-corrupted validation accuracy
(15 CIFAR-10-C corruptions x 5 severities on digits32:val), parameters, nonzeros and MACs, and
checks the paper's shape: LRR and biprop keep clean accuracy within 2 points of dense; filter
pruning at least halves the MACs. LRR and filter start from the dense card (LRR's first round is
the dense training); biprop learns a mask over random weights from scratch.

    python benchmarks/bench_compress.py [--epochs 10] [--domain clean] [--threads 1]

Writes the table to stdout and to benchmarks/RESULTS-compress.md (with the command and the time).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from carddeck.compress import CompressConfig, CompressResult, compress

RESULTS = Path(__file__).with_name("RESULTS-compress.md")


def run(
    epochs: int = 10, domain: str = "clean", seed: int = 0, out: Path | None = None, threads: int = 1
) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    root = Path(out or tempfile.mkdtemp(prefix="bench-compress-"))
    cache: dict = {}  # corrupted val images, shared by all cards
    base = dict(arch="resnet20", data="digits32", domain=domain, batch_size=64, seed=seed, progress=False)
    short = max(2, epochs // 2)
    plans = [
        ("dense", dict(method="dense", epochs=epochs)),
        ("lrr", dict(method="lrr", sparsity=0.9, rounds=3, epochs=short, init="dense")),
        ("biprop", dict(method="biprop", sparsity=0.9, epochs=2 * epochs)),
        ("filter", dict(method="filter", sparsity=0.5, epochs=short, init="dense")),
        ("filter+regrow", dict(method="filter", sparsity=0.5, regrow=0.2, epochs=short, init="dense")),
    ]
    rows = []
    results: dict[str, CompressResult] = {}
    for label, kw in plans:
        if kw.get("init") == "dense":
            kw["init"] = results["dense"].card
        t0 = time.perf_counter()
        config = CompressConfig(out=root / label.replace("+", "-"), **base, **kw)  # type: ignore[arg-type]
        res = compress(config, corruption_cache=cache)
        seconds = time.perf_counter() - t0
        results[label] = res
        acc = res.meta.accuracy
        rows.append(
            {
                "card": label,
                "epochs": len(res.history),
                "sparsity": res.meta.compression.sparsity,
                "clean": acc.clean,
                "corrupted": acc.corrupted,
                "params": res.params,
                "nonzeros": res.nonzeros,
                "macs": res.flops,
                "sparse_macs": res.sparse_flops,
                "seconds": seconds,
                "worst": min(res.corrupted, key=res.corrupted.get),
            }
        )
        print(f"{label}: clean {acc.clean:.4f} corrupted {acc.corrupted:.4f} ({seconds:.0f} s)", flush=True)
    return rows


def verdicts(rows: list[dict]) -> list[tuple[str, bool]]:
    by = {r["card"]: r for r in rows}
    dense = by["dense"]
    out = []
    for m in ("lrr", "biprop"):
        gap = 100 * (dense["clean"] - by[m]["clean"])
        out.append((f"{m} clean within 2 points of dense (gap {gap:+.2f} points)", gap <= 2.0))
    for m in ("filter", "filter+regrow"):
        ratio = by[m]["macs"] / dense["macs"]
        out.append((f"{m} MACs at most half of dense ({ratio:.3f}x)", ratio <= 0.5))
    return out


def table(rows: list[dict]) -> str:
    dense = rows[0]
    lines = [
        "| card | sparsity | clean | corrupted | params | nonzeros | MACs | vs dense | nonzero MACs | epochs | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['card']} | {r['sparsity']:.3f} | {100 * r['clean']:.2f} | {100 * r['corrupted']:.2f} | "
            f"{r['params']:,} | {r['nonzeros']:,} | {r['macs'] / 1e6:.2f}M | {r['macs'] / dense['macs']:.3f} | "
            f"{r['sparse_macs'] / 1e6:.2f}M | {r['epochs']} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="dense epochs (lrr/filter: half per round, biprop: 2x)")
    parser.add_argument("--domain", default="clean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 suits a shared 2-core box)")
    parser.add_argument("--out", type=Path, default=None, help="keep the cards here (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite RESULTS-compress.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    rows = run(args.epochs, args.domain, args.seed, args.out, args.threads)
    checks = verdicts(rows)
    text = "\n".join(
        [
            "# bench_compress: CARDs vs dense on digits32 (resnet20)",
            "",
            f"`python benchmarks/bench_compress.py --epochs {args.epochs} --domain {args.domain} --seed {args.seed} "
            f"--threads {args.threads}`; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), total {time.time() - t0:.0f} s.",
            "",
            "Accuracies in % on digits32:val (359 images); corrupted = mean over the 15 CIFAR-10-C corruptions x "
            "5 severities. sparsity: fraction of conv/linear weights removed (filter: of filters). MACs: one "
            "32x32 image, dense arithmetic (what ONNX Runtime runs); nonzero MACs: with zero weights skipped.",
            "",
            table(rows),
            "",
            *[f"- [{'x' if ok else ' '}] {text}" for text, ok in checks],
            "",
        ]
    )
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
