"""Compact card formats against the dense fp32 card, for one architecture, measured in one run.

For each format: ONNX file size, ONNX Runtime images/s at batch 1 and 64 (intra-op threads 2),
accuracy on digits32 test and on digits32-C (the 15 benchmark corruptions at the chosen
severities), and the ratio of each against dense. Targets on a 2-core CPU: binary int8 >= 1.8x
dense throughput, 50% filter pruning >= 2x; sparse >= 4x smaller, binary >= 3.5x smaller.

Cards come from ``--card FORMAT=DIR/card.pt`` (e.g. written by ``carddeck compress``); any not given
are trained here, quickly, on digits32 and cached under ``--work``:
  dense   resnet20 trained ``--epochs``;
  sparse  dense, 90% of each conv/linear weight magnitude-pruned (exact zeros), fine-tuned with the mask;
  binary  dense weights binarized to sign(w) * alpha * mask (50% kept, one alpha per layer), fine-tuned
          through a straight-through estimator, written as the effective weights;
  filter  resnet20 with half the filters of every conv (the network 50% filter pruning leaves),
          trained ``--epochs``.
Throughput rounds are interleaved across formats and the best round is kept, so load from other
processes hurts every format alike.

    python benchmarks/bench_formats.py [--epochs 12] [--severities 3] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carddeck.card import Accuracy, CardMeta, Compression, InputSpec, Provenance
from carddeck.data.datasets import Dataset, load_dataset

FORMATS = ("dense", "sparse", "binary", "filter")
METHOD = {"dense": "dense", "sparse": "lrr", "binary": "biprop", "filter": "filter"}


# -- quick cards ------------------------------------------------------------------------------------
def _tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def _train(model, data: Dataset, epochs: int, lr: float, *, weight_fn=None, after_step=None, seed: int = 0) -> None:
    """SGD with cosine decay and flip/shift-free batches; ``weight_fn`` swaps weights for the forward (STE)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x, y = _tensor(data.images), torch.from_numpy(data.labels)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=steps, desc="train", leave=False) if tqdm else None
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            restore = weight_fn(model) if weight_fn else None
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            if restore:
                restore()
            opt.step()
            sched.step()
            if after_step:
                after_step(model)
            if bar:
                bar.update()
    if bar:
        bar.close()
    model.eval()


def _prunable(model):
    from carddeck.nets import prunable_modules

    return list(prunable_modules(model).values())


def _binarize(w, keep: float = 0.5):
    k = max(1, int(round(keep * w.numel())))
    mask = (w.abs() >= w.abs().flatten().topk(k).values[-1]).float()
    return w.sign() * (w.abs() * mask).sum() / mask.sum() * mask


def _quick_card(fmt: str, train: Dataset, epochs: int, dense_model):
    """(model, arch_kwargs) for one format, trained quickly from ``dense_model`` or from scratch."""
    import torch

    from carddeck.nets import build_net

    mean, std = train.images.reshape(-1, 3).mean(0) / 255.0, train.images.reshape(-1, 3).std(0) / 255.0
    kwargs = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    if fmt == "dense":
        model = build_net("resnet20", train.num_classes, **kwargs)
        _train(model, train, epochs, 0.1)
        return model, kwargs
    if fmt == "filter":
        kwargs = {**kwargs, "width": 0.5}
        model = build_net("resnet20", train.num_classes, **kwargs)
        _train(model, train, epochs, 0.1, seed=1)
        return model, kwargs
    model = copy.deepcopy(dense_model)
    layers = _prunable(model)
    finetune = max(2, epochs // 2)
    if fmt == "sparse":
        masks = []
        for m in layers:
            k = int(0.9 * m.weight.numel())
            masks.append((m.weight.detach().abs() > m.weight.detach().abs().flatten().kthvalue(k).values).float())

        def apply(net) -> None:
            with torch.no_grad():
                for m, mask in zip(layers, masks):
                    m.weight.mul_(mask)

        apply(model)
        _train(model, train, finetune, 0.02, after_step=apply, seed=2)
        return model, kwargs

    # binary: straight-through estimator over the latent weights, then store the effective weights
    def swap(net):
        latent = [m.weight.data.clone() for m in layers]
        for m in layers:
            m.weight.data = _binarize(m.weight.data)

        def restore() -> None:  # the gradient at the binary weights updates the latent ones
            for m, w in zip(layers, latent):
                m.weight.data = w

        return restore

    _train(model, train, finetune, 0.02, weight_fn=swap, seed=3)
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(_binarize(m.weight))
    _recalibrate_bn(model, train)
    return model, kwargs


def _recalibrate_bn(model, data: Dataset) -> None:
    import torch
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        x = _tensor(data.images)
        for i in range(0, len(x), 256):
            model(x[i : i + 256])
    model.eval()


def _meta(fmt: str, train: Dataset, kwargs: dict) -> CardMeta:
    sparsity = {"dense": 0.0, "sparse": 0.9, "binary": 0.5, "filter": 0.5}[fmt]
    return CardMeta(
        name=f"bench-{fmt}",
        version=1,
        architecture="resnet20",
        num_classes=train.num_classes,
        class_names=train.class_names,
        input=InputSpec(32, 32, mean=tuple(kwargs["mean"]), std=tuple(kwargs["std"])),
        compression=Compression(METHOD[fmt], sparsity, 1 if fmt == "binary" else 32, fmt == "filter"),
        domain="clean",
        accuracy=Accuracy(),
        provenance=Provenance(dataset="digits32", seed=0),
    )


def ensure_cards(given: dict[str, Path], work: Path, epochs: int) -> dict[str, Path]:
    from carddeck.compress.checkpoint import load_card, save_card

    train = load_dataset("digits32", "train")
    paths: dict[str, Path] = {}
    dense_model = None
    for fmt in FORMATS:
        if fmt in given:
            paths[fmt] = given[fmt]
            continue
        path = work / f"{fmt}-e{epochs}" / "card.pt"
        if not path.is_file():
            if fmt in ("sparse", "binary") and dense_model is None:
                dense_model = load_card(paths["dense"])[0]
            t0 = time.perf_counter()
            model, kwargs = _quick_card(fmt, train, epochs, dense_model)
            save_card(path.parent, "resnet20", kwargs, model, _meta(fmt, train, kwargs))
            print(f"trained {fmt} card in {time.perf_counter() - t0:.0f} s -> {path}", file=sys.stderr)
        paths[fmt] = path
    return paths


# -- measurements -----------------------------------------------------------------------------------
def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # no busy-waiting between runs: on a shared machine spinning threads only measure the neighbours,
    # and without it process CPU time is the work done
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def throughput(sess, x: np.ndarray, seconds: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) over about ``seconds``."""
    feed = {"images": x}
    for _ in range(2):
        sess.run(["logits"], feed)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        sess.run(["logits"], feed)
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return n * len(x) / wall, n * len(x) / max(cpu, 1e-9)


def measure_speed(sessions: dict, batches: dict[int, np.ndarray], rounds: int, seconds: float) -> dict:
    """Per format and batch: median images/s (wall and CPU) and median ratio to dense, over rounds.

    Each round measures every format back to back in a shuffled order, so the ratio of a round
    compares formats under the same load; the median discards rounds a neighbour disturbed.
    """
    rng = np.random.default_rng(0)
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {(f, b): [] for f in sessions for b in batches}
    for _ in range(rounds):
        for b, x in batches.items():
            for fmt in rng.permutation(list(sessions)):
                samples[fmt, b].append(throughput(sessions[fmt], x, seconds))
    result = {}
    for (fmt, b), vals in samples.items():
        dense = samples["dense", b]
        result[fmt, b] = {
            "wall": float(np.median([v[0] for v in vals])),
            "cpu": float(np.median([v[1] for v in vals])),
            "wall_ratio": float(np.median([v[0] / d[0] for v, d in zip(vals, dense)])),
            "cpu_ratio": float(np.median([v[1] / d[1] for v, d in zip(vals, dense)])),
        }
    return result


def accuracy(sess, images: np.ndarray, labels: np.ndarray) -> float:
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    pred = np.concatenate(
        [sess.run(["logits"], {"images": x[i : i + 256]})[0].argmax(1) for i in range(0, len(x), 256)]
    )
    return float(np.mean(pred == labels))


def corrupted_set(test: Dataset, severities: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, corrupt

    return [(corrupt(test.images, c, s, seed=0), test.labels) for c in BENCHMARK_CORRUPTIONS for s in severities]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--card", action="append", default=[], metavar="FORMAT=PATH", help="use this card.pt")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "carddeck-bench-formats")
    parser.add_argument("--epochs", type=int, default=12, help="epochs for the quick cards")
    parser.add_argument("--severities", default="3", help="digits32-C severities, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from carddeck.export import export_card

    given = {}
    for item in args.card:
        fmt, _, path = item.partition("=")
        if fmt not in FORMATS or not path:
            parser.error(f"--card takes FORMAT=PATH with FORMAT in {', '.join(FORMATS)}, got {item!r}")
        given[fmt] = Path(path)
    cards = ensure_cards(given, args.work, args.epochs)

    onnx_paths: dict[str, Path] = {}
    export_notes: dict[str, str] = {}
    for fmt, ckpt in cards.items():
        out = args.work / "onnx" / fmt / "model.onnx"
        report = export_card(ckpt, out)  # the format follows the card's compression method
        onnx_paths[fmt] = out
        export_notes[fmt] = report.parity.reason

    test = load_dataset("digits32", "test")
    severities = [int(s) for s in args.severities.split(",")]
    corrupted = corrupted_set(test, severities)
    sessions = {fmt: session(p, args.threads) for fmt, p in onnx_paths.items()}
    rng = np.random.default_rng(0)
    batches = {b: rng.random((b, 3, 32, 32), dtype=np.float32) for b in (1, 64)}
    speed = measure_speed(sessions, batches, args.rounds, args.seconds)

    rows = []
    for fmt, sess in sessions.items():
        rows.append(
            {
                "format": fmt,
                "size_bytes": onnx_paths[fmt].stat().st_size,
                **{f"{k}_b{b}": speed[fmt, b][k] for b in batches for k in ("wall", "cpu", "wall_ratio", "cpu_ratio")},
                "test_accuracy": accuracy(sess, test.images, test.labels),
                "corrupted_accuracy": float(np.mean([accuracy(sess, x, y) for x, y in corrupted])),
                "parity": export_notes[fmt],
            }
        )
    base = rows[0]
    print(
        f"resnet20 on digits32, ONNX Runtime CPU, {args.threads} threads; digits32-C: 15 corruptions x severities "
        f"{severities}. Throughput: median over {args.rounds} interleaved rounds, images/s (wall) and the ratio "
        "to dense in wall and in process-CPU time, measured in this run."
    )
    print(
        f"{'format':<7} {'KiB':>7} {'smaller':>7} | {'b1 img/s':>8} {'x wall':>6} {'x cpu':>6} | "
        f"{'b64 img/s':>9} {'x wall':>6} {'x cpu':>6} | {'test':>6} {'d pts':>6} | {'C':>6} {'d pts':>6}"
    )
    for r in rows:
        print(
            f"{r['format']:<7} {r['size_bytes'] / 1024:>7.1f} {base['size_bytes'] / r['size_bytes']:>6.2f}x | "
            f"{r['wall_b1']:>8.0f} {r['wall_ratio_b1']:>5.2f}x {r['cpu_ratio_b1']:>5.2f}x | "
            f"{r['wall_b64']:>9.0f} {r['wall_ratio_b64']:>5.2f}x {r['cpu_ratio_b64']:>5.2f}x | "
            f"{100 * r['test_accuracy']:>5.2f}% {100 * (r['test_accuracy'] - base['test_accuracy']):>+6.2f} | "
            f"{100 * r['corrupted_accuracy']:>5.2f}% "
            f"{100 * (r['corrupted_accuracy'] - base['corrupted_accuracy']):>+6.2f}"
        )
    print("(sparse runs the same graph as dense once ORT has folded its decoder: its ratio shows the noise)")
    print("parity at export (val split):")
    for r in rows:
        print(f"  {r['format']:<7} {r['parity']}")
    by = {r["format"]: r for r in rows}
    targets = [
        (f"binary int8 >= 1.8x dense throughput (batch {b})", by["binary"][f"wall_ratio_b{b}"] >= 1.8) for b in batches
    ]
    targets += [
        (f"filter-50% >= 2x dense throughput (batch {b})", by["filter"][f"wall_ratio_b{b}"] >= 2.0) for b in batches
    ]
    targets += [
        ("sparse file >= 4x smaller", base["size_bytes"] / by["sparse"]["size_bytes"] >= 4.0),
        ("binary file >= 3.5x smaller", base["size_bytes"] / by["binary"]["size_bytes"] >= 3.5),
    ]
    for name, ok in targets:
        print(f"target {name}: {'met' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "severities": severities, "threads": args.threads}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
