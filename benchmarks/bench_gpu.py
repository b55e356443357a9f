"""The deck on a GPU: ONNX Runtime's CUDA execution provider against a PyTorch uniform deck, one run.

    python benchmarks/bench_gpu.py [--deck models] [--seconds 2]

Needs onnxruntime-gpu and a CUDA device (and torch with CUDA for the PyTorch baseline). Measures
images/s and p50/p99 per request at batch 64 (concurrency 1) and batch 1 (concurrency 1 and 32):
  * in-process ORT on the CPU (the CPU reference of the same machine);
  * in-process ORT on CUDA, ``Deck.predict`` (numpy in and out, gate included);
  * in-process ORT on CUDA with IOBinding, every card, no gate: the input is copied to the device once
    and shared by all cards, outputs stay on the device until the combined result is read back
    (the compute limit of a uniform deck on this GPU);
  * ``carddeck serve --providers CUDAExecutionProvider,...`` over gRPC, micro-batching on;
  * a uniform deck in PyTorch eager on the same GPU (random weights, same architectures).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import ROOT, Server, measure, torch_modules_for

from carddeck.deck import Deck
from carddeck.deck.runtime import CPU, CUDA


def iobinding_uniform(deck: Deck):
    """All cards on one device copy of the batch; probabilities averaged on the host."""
    import onnxruntime as ort

    sessions = [deck._sessions[name].session for name in deck.card_names]
    local = threading.local()  # an IOBinding is not thread-safe: one set per client thread

    def run(images: np.ndarray) -> np.ndarray:
        if not hasattr(local, "bindings"):
            local.bindings = [s.io_binding() for s in sessions]
        bindings = local.bindings
        x = ort.OrtValue.ortvalue_from_numpy(deck.prepare(images), "cuda", 0)
        for session, io in zip(sessions, bindings, strict=True):
            io.bind_ortvalue_input("images", x)
            io.bind_output("logits", "cuda")
            session.run_with_iobinding(io)
        logits = np.stack([io.copy_outputs_to_cpu()[0] for io in bindings])
        z = np.exp(logits - logits.max(axis=2, keepdims=True))
        return (z / z.sum(axis=2, keepdims=True)).mean(axis=0)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deck", type=Path, default=ROOT / "models")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import onnxruntime as ort
    import torch

    from carddeck.client.api import CardDeckClient

    if CUDA not in ort.get_available_providers() or not torch.cuda.is_available():
        print(f"needs onnxruntime-gpu and torch with CUDA; ORT offers {ort.get_available_providers()}")
        return 2
    cpu = Deck.open(args.deck, providers=[CPU])
    gpu = Deck.open(args.deck, providers=[CUDA, CPU])
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"deck: {len(gpu.cards)} cards, policy {gpu.default_policy}; providers {gpu.providers()}")
    modules = [m.cuda() for m in torch_modules_for(gpu)]

    def torch_uniform(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).cuda().permute(0, 3, 1, 2).float().div(255)
        with torch.inference_mode():
            return torch.stack([m(t).softmax(1) for m in modules]).mean(0).cpu().numpy()

    server = Server(args.deck, "--providers", f"{CUDA},{CPU}", "--max-wait-ms", "2")
    local = threading.local()

    def served(x: np.ndarray) -> object:
        if not hasattr(local, "c"):
            local.c = CardDeckClient(server.address)
        return local.c.predict(x)

    configs = {
        "ORT CPU, Deck.predict": lambda x: cpu.predict(x),
        "ORT CUDA, Deck.predict": lambda x: gpu.predict(x),
        "ORT CUDA IOBinding, all cards": iobinding_uniform(gpu),
        "server on CUDA (gRPC)": served,
        "torch CUDA eager, uniform": torch_uniform,
    }
    rng = np.random.default_rng(0)
    images = {n: (rng.random((n, 32, 32, 3)) * 255).astype(np.uint8) for n in (1, 64)}
    rows: dict[str, dict] = {}
    try:
        for batch, conc in ((64, 1), (1, 1), (1, 32)):
            print(f"\nbatch {batch}, concurrency {conc}:", flush=True)
            for _ in range(args.repeats):
                for label, fn in configs.items():
                    r = measure(fn, images[batch], conc, args.seconds)
                    key = f"{label}|b{batch}|c{conc}"
                    if key not in rows or r["images_per_s"] > rows[key]["images_per_s"]:
                        rows[key] = r
            for label in configs:
                r = rows[f"{label}|b{batch}|c{conc}"]
                print(f"  {label:<30} {r['images_per_s']:9.1f} img/s  p50 {r['p50_ms']:8.2f} ms  "
                      f"p99 {r['p99_ms']:8.2f} ms", flush=True)  # fmt: skip
    finally:
        server.stop()

    def ratio(a: str, b: str) -> float:
        return rows[a]["images_per_s"] / rows[b]["images_per_s"]

    print("\nratios:")
    pairs = (
        ("server on CUDA / torch CUDA uniform deck", "server on CUDA (gRPC)", "torch CUDA eager, uniform"),
        ("server on CUDA / in-process ORT CUDA", "server on CUDA (gRPC)", "ORT CUDA, Deck.predict"),
        ("in-process ORT CUDA / ORT CPU", "ORT CUDA, Deck.predict", "ORT CPU, Deck.predict"),
    )
    for b, c in ((64, 1), (1, 32)):
        for text, a, base in pairs:
            print(f"  batch {b}, conc {c}: {text:<42} {ratio(f'{a}|b{b}|c{c}', f'{base}|b{b}|c{c}'):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
