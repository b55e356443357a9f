"""Run the benchmarks and write benchmarks/RESULTS.md: each one's own output, with the machine described.

    python benchmarks/run_all.py [--only formats,gate,server,corruptions] [--deck models]

Every benchmark measures its baseline in the same run and prints ratios against it; this script
only runs them one after another (never in parallel, so they don't load each other) and keeps
what they printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def deck_checkpoints() -> list[str]:
    """The default deck's own augmix checkpoints (from models/build.py), when they are here."""
    work = ROOT / "build" / "deck-work"
    pairs = {"dense": "augmix-dense", "sparse": "augmix-lrr", "binary": "augmix-biprop", "filter": "augmix-filter"}
    found = {fmt: work / name / "card.pt" for fmt, name in pairs.items()}
    if not all(p.exists() for p in found.values()):
        return []  # bench_formats trains quick cards of its own
    return [arg for fmt, p in found.items() for arg in ("--card", f"{fmt}={p.relative_to(ROOT)}")]


def benches(deck: Path) -> dict[str, tuple[str, list[str]]]:
    return {
        "formats": (
            "Card formats: size, speed and accuracy against dense fp32",
            ["bench_formats.py", *deck_checkpoints()],
        ),
        "gate": ("Gate overhead on the default deck (64-image batch)", ["bench_gate.py", "--deck", str(deck)]),
        "shift": ("Shift signal overhead on the default deck", ["bench_shift.py", "--deck", str(deck)]),
        "adapt": (
            "Test-time adaptation: a 64-image shifted Predict, and clean false alarms",
            ["bench_adapt.py", "--deck", str(deck)],
        ),
        "server": (
            "Server throughput and latency against in-process ONNX Runtime and a PyTorch uniform deck",
            ["bench_server.py", "--deck", str(deck)],
        ),
        "http": (
            "The Open Inference Protocol over HTTP against gRPC (Triton's clients, one server)",
            ["bench_http.py", "--deck", str(deck)],
        ),
        "grpc-floor": ("What one unary gRPC call costs the server: threaded vs grpc.aio", ["bench_grpc_floor.py"]),
        "ort-threads": (
            "ONNX Runtime threads and IOBinding for merged batches",
            ["bench_ort_threads.py", "--deck", str(deck)],
        ),
        "peers": (
            "CARD-Deck against Triton (pytriton) and MLServer on one card (peers from their own virtualenv)",
            ["bench_peers.py", "--deck", str(deck)],
        ),
        "corruptions": ("Writing digits32-C (19 corruptions x 5 severities)", ["bench_corruptions.py"]),
        "replicas": ("Replicas converge: three servers on one store (local, S3)", ["bench_replicas.py"]),
    }


def machine() -> str:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor() or "unknown CPU",
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor()
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for mod in ("numpy", "onnxruntime", "torch", "grpc"):
        with contextlib.suppress(ImportError):
            versions.append(f"{mod} {__import__(mod).__version__}")
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, {', '.join(versions)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deck", type=Path, default=ROOT / "models")
    names = ", ".join(benches(ROOT))
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {names}")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    table = benches(args.deck)
    names = args.only.split(",") if args.only else list(table)
    unknown = sorted(set(names) - set(table))
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(table)}")
    parts = [
        "# Benchmark results\n",
        "Produced by `python benchmarks/run_all.py`; do not edit. Each section is one script's own output:",
        "its baseline is measured in the same run and the ratios are against it.\n",
        f"Machine: {machine()}.\n",
    ]
    for name in names:
        title, cmd = table[name]
        print(f"== {name}: python benchmarks/{' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        print(result.stdout[-3000:], flush=True)
        status = "" if result.returncode == 0 else f" (exit status {result.returncode})"
        parts.append(f"## {title}\n\n`python benchmarks/{' '.join(cmd)}` ({seconds:.0f} s){status}\n")
        parts.append("```\n" + result.stdout.strip() + "\n```\n")
        if result.returncode:
            parts.append("```\n" + result.stderr.strip()[-2000:] + "\n```\n")
    args.out.write_text("\n".join(parts))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
