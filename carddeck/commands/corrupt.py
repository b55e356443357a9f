"""``carddeck corrupt``: write a CIFAR-10-C-style corrupted copy of a dataset split.

Output, in ``--out``: ``<corruption>.npy`` uint8 [k*n, H, W, 3] (the k chosen severities stacked
in blocks of n images, ascending), ``labels.npy`` [k*n] (uint8 when the classes fit, as in the
release), and ``carddeck-c.json`` (severities, class names, source, seed). Every file is written
to a temporary name, flushed and renamed, so a reader never sees a half-written array; the JSON
goes last. Read it back with ``carddeck.data.corrupted.load_corrupted("c:DIR")``.

Images are corrupted in chunks of ``--chunk``; chunk i uses seed ``chunk_seed(seed, i)`` (chunk 0
uses ``seed`` itself, so a split that fits in one chunk is exactly ``corrupt(images, name,
severity, seed)``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from carddeck.commands.cli import interrupted, out_dir
from carddeck.data.corrupted import SUITE_FORMAT, SUITE_META
from carddeck.data.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    check_severity,
    corrupt,
)
from carddeck.data.datasets import SPLITS, load_dataset
from carddeck.errors import InvalidInput

GROUPS = {
    "all": BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS,
    "benchmark": BENCHMARK_CORRUPTIONS,
    "extra": EXTRA_CORRUPTIONS,
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset to corrupt (digits32, cifar10:PATH, npz:PATH, ...)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="split to corrupt (default: test)")
    parser.add_argument("--out", required=True, type=out_dir, help="output directory (created if missing)")
    parser.add_argument(
        "--corruptions",
        default="all",
        help="comma-separated corruption names, or all (19, default), benchmark (the 15), extra (the 4)",
    )
    parser.add_argument("--severities", default="1,2,3,4,5", help="comma-separated severities (default: 1,2,3,4,5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--chunk", type=int, default=1000, help="images corrupted per call (bounds memory)")


def parse_corruptions(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        for name in GROUPS.get(part, (part,)):
            CORRUPTIONS.get(name)  # InvalidInput listing the valid names
            if name not in names:
                names.append(name)
    return tuple(names)


def parse_severities(text: str) -> tuple[int, ...]:
    out: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        try:
            value = int(part)
        except ValueError:
            raise InvalidInput(f"severity {part!r} is not an integer; valid severities: 1, 2, 3, 4, 5") from None
        out.add(check_severity(value))
    return tuple(sorted(out))


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk``: ``seed`` for chunk 0, a derived independent seed otherwise."""
    return seed if chunk == 0 else int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the train extra
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="batch")


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _commit(tmp: Path, final: Path) -> None:
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _chunks(n: int, size: int) -> Iterator[tuple[int, slice]]:
    for i, start in enumerate(range(0, n, size)):
        yield i, slice(start, min(start + size, n))


def write_suite(
    images: np.ndarray,
    labels: np.ndarray,
    out: Path,
    corruptions: Iterable[str],
    severities: tuple[int, ...],
    *,
    seed: int = 0,
    chunk: int = 1000,
    meta: dict | None = None,
) -> Path:
    """Write the suite files for ``images``/``labels`` into ``out`` (see the module docstring)."""
    if chunk < 1:
        raise InvalidInput(f"--chunk must be a positive number of images, got {chunk}")
    corruptions = tuple(corruptions)
    if len(images) == 0:
        raise InvalidInput("nothing to corrupt: the dataset split is empty")
    out.mkdir(parents=True, exist_ok=True)
    # an earlier suite's JSON and labels go first: until the new ones are written, OUT is no suite (a rerun
    # interrupted midway read as the old suite, some of its arrays already replaced; without the JSON, as a
    # CIFAR-10-C-style directory of them)
    for name in (SUITE_META, "labels.npy"):
        (out / name).unlink(missing_ok=True)
    n = len(images)
    steps = list(_chunks(n, chunk))
    bar = _progress(len(corruptions) * len(severities) * len(steps), "corrupt")
    try:
        for name in corruptions:
            bar.set_postfix_str(name)
            tmp = out / f".{name}.npy.tmp"
            shape = (len(severities) * n, *images.shape[1:])
            try:
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
                for block, severity in enumerate(severities):
                    for i, part in steps:
                        rows = slice(block * n + part.start, block * n + part.stop)
                        arr[rows] = corrupt(images[part], name, severity, chunk_seed(seed, i))
                        bar.update(1)
                arr.flush()
                del arr
                _commit(tmp, out / f"{name}.npy")
            finally:
                tmp.unlink(missing_ok=True)
    finally:
        bar.close()
    dtype = np.uint8 if labels.size == 0 or (labels.min() >= 0 and labels.max() < 256) else np.int64
    tmp = out / ".labels.npy.tmp"
    with tmp.open("wb") as f:
        np.save(f, np.tile(labels.astype(dtype), len(severities)))
    _commit(tmp, out / "labels.npy")
    tmp = out / f".{SUITE_META}.tmp"
    body = {"format": SUITE_FORMAT, "severities": list(severities), "corruptions": list(corruptions), "seed": seed}
    tmp.write_text(json.dumps({**body, **(meta or {})}, indent=2) + "\n")
    _commit(tmp, out / SUITE_META)
    return out


def run(args: argparse.Namespace) -> int:
    corruptions = parse_corruptions(args.corruptions)
    severities = parse_severities(args.severities)
    if args.seed < 0:
        raise InvalidInput(f"--seed must be a non-negative integer, got {args.seed}")
    data = load_dataset(args.data, args.split)
    meta = {"source": f"{args.data}:{args.split}", "class_names": list(data.class_names)}
    try:
        write_suite(
            data.images, data.labels, args.out, corruptions, severities, seed=args.seed, chunk=args.chunk, meta=meta
        )
    except KeyboardInterrupt:
        interrupted(
            f"corrupt into {args.out}: the corruption files finished so far are kept, but labels.npy and {SUITE_META} "
            "(written last) are not there, so it is not a suite yet; run the command again to write it whole"
        )
        raise
    print(
        f"wrote {args.out}: {len(corruptions)} corruptions x {len(severities)} severities x {len(data)} images "
        f"of {args.data}:{args.split}; read it with --data c:{args.out}"
    )
    return 0
