"""What the gate costs next to the cards it routes to, for a 64-image batch.

Measures, in the same run and on the same deck: ``Deck.route`` (validation + signatures + policy)
and ``Deck.predict`` (route + the selected cards + combine), and prints the ratio. Target: the gate
under 2% of the deck's time. Without ``--deck`` it builds a temporary deck of two ResNet-20-sized
convolutional ONNX cards (about 40 MFLOPs per image, like the default deck's CARDs).

    python benchmarks/bench_gate.py [--deck models/digits32] [--batch 64] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carddeck.card import METADATA_KEY, Accuracy, CardMeta, Compression, InputSpec, Provenance
from carddeck.deck import Deck, DeckStore
from carddeck.gating import batch_signature, sample_signatures


def conv_card(name: str, domain: str, signature: tuple[float, ...], seed: int) -> bytes:
    """A plain 3-stage CNN (16/32/64 channels, 3 convs per stage) with the card contract."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, cin = "images", 3
    for stage, cout in enumerate((16, 32, 64)):
        for j in range(3):
            stride = 2 if (stage > 0 and j == 0) else 1
            w = f"w{stage}{j}"
            inits.append(
                numpy_helper.from_array(
                    (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32), w
                )
            )
            nodes.append(helper.make_node("Conv", [x, w], [f"c{stage}{j}"], pads=[1, 1, 1, 1], strides=[stride] * 2))
            nodes.append(helper.make_node("Relu", [f"c{stage}{j}"], [f"r{stage}{j}"]))
            x, cin = f"r{stage}{j}", cout
    inits.append(numpy_helper.from_array((rng.standard_normal((64, 10)) * 0.1).astype(np.float32), "fc"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fcb"))
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"]))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    nodes.append(helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = CardMeta(
        name=name,
        version=1,
        architecture="cnn9",
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        input=InputSpec(height=32, width=32),
        compression=Compression(),
        domain=domain,
        signature=signature,
        accuracy=Accuracy(),
        provenance=Provenance(dataset="synthetic", seed=seed),
    )
    helper.set_model_props(model, {METADATA_KEY: meta.to_json()})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def synthetic_deck(root: Path, images: np.ndarray) -> Path:
    store = DeckStore.create(root)
    clean = tuple(float(v) for v in batch_signature(images))
    noisy = tuple(v + (0.5 if i > 8 else 0.0) for i, v in enumerate(clean))
    for i, (domain, sig) in enumerate([("augmix", clean), ("augmix", clean), ("gaussian", noisy), ("gaussian", noisy)]):
        store.add_card(conv_card(f"{domain}-{i}", domain, sig, seed=i))
    return root


def timeit(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare_metrics(args: argparse.Namespace) -> int:
    """Mean corrupted accuracy of each distance-based policy under each metric, on the validation split."""
    from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS
    from carddeck.data.datasets import load_dataset
    from carddeck.eval.robustness import collect_runs, conditions_for, evaluate, generated_source

    if not args.deck:
        raise SystemExit("--metrics needs --deck DIR with trained cards")
    deck = Deck.open(args.deck)
    val = load_dataset(args.data, "val")
    conditions = conditions_for(BENCHMARK_CORRUPTIONS, (1, 2, 3, 4, 5))
    runs = collect_runs(deck, conditions, generated_source(val.images, val.labels, seed=1), desc="val")
    policies = ("nearest-domain", "top-k", "soft")
    print(
        f"{'metric':8s} "
        + " ".join(f"{p:>22s}" for p in policies)
        + "   (mean corrupted val accuracy, per batch / per sample)"
    )
    for metric in ("l2", "l1", "cosine"):
        r = evaluate(deck, runs, router=None, batch_size=args.batch, policies=policies, metric=metric)
        cells = [
            f"{100 * r.mean_corrupted(p):6.2f} / {100 * r.mean_corrupted(p + '/per-sample'):6.2f}" for p in policies
        ]
        print(f"{metric:8s} " + " ".join(f"{c:>22s}" for c in cells))
    r = evaluate(deck, runs, router=None, batch_size=args.batch, policies=())
    print(f"uniform {100 * r.mean_corrupted('uniform'):.2f}, oracle {100 * r.mean_corrupted('oracle'):.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deck", default=None, help="deck directory (default: a temporary synthetic deck)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="instead: compare the L2/L1/cosine distances by the gate policies' accuracy on corrupted "
        "validation data of --data (needs --deck with trained cards)",
    )
    parser.add_argument("--data", default="digits32")
    args = parser.parse_args()
    if args.metrics:
        return compare_metrics(args)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.deck) if args.deck else synthetic_deck(Path(tmp) / "deck", images)
        deck = Deck.open(root)
        spec = deck.input
        images = rng.integers(0, 256, (args.batch, spec.height, spec.width, spec.channels), dtype=np.uint8)
        x = deck.prepare(images)
        providers = sorted({p for ps in deck.providers().values() for p in ps})
        print(f"deck {root}: {len(deck.cards)} cards, batch {args.batch}, providers {providers}")
        rows = [
            ("batch signature", timeit(lambda: batch_signature(x), args.repeats)),
            ("per-sample signatures", timeit(lambda: sample_signatures(x), args.repeats)),
            ("route (per batch)", timeit(lambda: deck.route(images), args.repeats)),
            ("route (per sample)", timeit(lambda: deck.route(images, per_sample=True), args.repeats)),
            ("predict nearest-domain", timeit(lambda: deck.predict(images), args.repeats)),
            ("predict uniform", timeit(lambda: deck.predict(images, policy="uniform"), args.repeats)),
        ]
        cards = deck.predict(images).routing.cards_per_image
    gated = dict(rows)["predict nearest-domain"]
    for name, t in rows:
        print(f"{name:26s} {1e3 * t:8.3f} ms   {100 * t / gated:6.2f}% of predict nearest-domain")
    ratio = dict(rows)["route (per batch)"] / gated
    print(f"gate overhead (route / predict nearest-domain, {cards:g} cards/image): {100 * ratio:.2f}% (target < 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
