"""Per-layer sparsity allocations: uniform, global magnitude, and DSA's searched allocation functions.

An allocation is the number of weights pruned in each conv/linear layer (``named_modules`` order),
adding up to ``round(target * total)``.

DSA (Discovering Sparsity Allocation, NeurIPS 2024) searches, by evolution, for a small expression
that maps per-layer statistics to per-layer sparsities. Here an expression is a tree over
``FEATURES`` (each z-scored across the layers) with a few binary and unary operators; its values
are min-max scaled to [0, 1] and spread around the target with a searched ``range`` (the
candidate's second gene); an offset found by bisection makes the weighted mean exactly the target,
and largest-remainder rounding gives whole weights (each layer within one weight of its share).
Departures from the paper: its operator set and statistics are larger and it also searches the
pruning metric; here the statistics are the cheap ones (weight magnitude mean and spread, depth,
size) and candidates are scored by a caller-supplied fitness (see ``carddeck.compress.oneshot``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from carddeck.nets import prunable_modules

FEATURES = ("mag_mean", "mag_std", "depth", "size")
BINARY = ("add", "sub", "mul", "max", "min")
UNARY = ("neg", "abs", "square")
RANGES = (0.1, 0.2, 0.4, 0.8)  # how far layer sparsities may spread around the target

Expr = tuple  # ("var", name) | ("const", value) | (unary, Expr) | (binary, Expr, Expr)


def layer_sizes(model: nn.Module) -> dict[str, int]:
    return {name: m.weight.numel() for name, m in prunable_modules(model).items()}  # type: ignore[union-attr]


def max_prunable(size: int) -> int:
    return max(0, size - 1)  # every layer keeps at least one weight


def exact_counts(sizes: dict[str, int], shares: dict[str, float], total: int) -> dict[str, int]:
    """Whole pruned counts near real-valued ``shares`` (each within one), adding up to ``total``."""
    floors = {n: min(max_prunable(sizes[n]), max(0, math.floor(shares[n]))) for n in sizes}
    left = total - sum(floors.values())
    order = sorted(sizes, key=lambda n: (-(shares[n] - math.floor(shares[n])), n))
    step = 1 if left > 0 else -1
    while left != 0:
        moved = False
        for n in order if step > 0 else reversed(order):
            if left == 0:
                break
            if 0 <= floors[n] + step <= max_prunable(sizes[n]):
                floors[n] += step
                left -= step
                moved = True
        if not moved:
            raise ValueError(f"cannot prune {total} weights from layers of sizes {list(sizes.values())}")
    return floors


def target_total(sizes: dict[str, int], target: float) -> int:
    return int(round(target * sum(sizes.values())))


def uniform(sizes: dict[str, int], target: float) -> dict[str, int]:
    return exact_counts(sizes, {n: target * s for n, s in sizes.items()}, target_total(sizes, target))


def global_magnitude(model: nn.Module, target: float) -> dict[str, int]:
    """The per-layer counts that global magnitude pruning (LRR's criterion) would remove."""
    from carddeck.compress.criteria import global_topk, magnitude

    sizes = layer_sizes(model)
    names = [f"{n}.weight" for n in sizes]
    keep = global_topk(magnitude(model, names), sum(sizes.values()) - target_total(sizes, target))
    return {n: sizes[n] - int(keep[f"{n}.weight"].sum()) for n in sizes}


def sparsities(sizes: dict[str, int], counts: dict[str, int]) -> dict[str, float]:
    return {n: counts[n] / sizes[n] for n in sizes}


# -- DSA: allocation functions ---------------------------------------------------------------------
def layer_stats(model: nn.Module) -> dict[str, np.ndarray]:
    """Each feature over the layers, z-scored (so expressions are free of units)."""
    mods = prunable_modules(model)
    w = [m.weight.detach().abs().flatten().double().cpu() for m in mods.values()]  # type: ignore[union-attr]
    raw = {
        "mag_mean": np.array([float(x.mean()) for x in w]),
        "mag_std": np.array([float(x.std()) for x in w]),
        "depth": np.arange(len(w), dtype=np.float64),
        "size": np.log(np.array([x.numel() for x in w], dtype=np.float64)),
    }
    return {k: (v - v.mean()) / (v.std() or 1.0) for k, v in raw.items()}


def evaluate(expr: Expr, stats: dict[str, np.ndarray]) -> np.ndarray:
    n = len(next(iter(stats.values())))
    op = expr[0]
    if op == "var":
        return stats[expr[1]]
    if op == "const":
        return np.full(n, float(expr[1]))
    if op in UNARY:
        x = evaluate(expr[1], stats)
        return {"neg": -x, "abs": np.abs(x), "square": x * x}[op]
    a, b = evaluate(expr[1], stats), evaluate(expr[2], stats)
    out = {"add": a + b, "sub": a - b, "mul": a * b, "max": np.maximum(a, b), "min": np.minimum(a, b)}[op]
    return np.nan_to_num(out, nan=0.0, posinf=1e6, neginf=-1e6)


def to_text(expr: Expr) -> str:
    if expr[0] == "var":
        return str(expr[1])
    if expr[0] == "const":
        return f"{expr[1]:g}"
    return f"{expr[0]}({', '.join(to_text(e) for e in expr[1:])})"


@dataclass(frozen=True)
class Candidate:
    expr: Expr
    spread: float  # RANGES: the width of the sparsity spread

    def text(self) -> str:
        return f"{to_text(self.expr)} @ range {self.spread:g}"


def allocate(
    candidate: Candidate, stats: dict[str, np.ndarray], sizes: dict[str, int], target: float
) -> dict[str, int]:
    """Per-layer counts of a candidate: scaled scores, offset by bisection to the target mean."""
    names = list(sizes)
    score = evaluate(candidate.expr, stats)
    span = float(score.max() - score.min())
    unit = (score - score.min()) / span if span > 1e-12 else np.full(len(names), 0.5)
    n = np.array([sizes[k] for k in names], dtype=np.float64)
    hi = np.array([max_prunable(sizes[k]) for k in names]) / n
    total = target_total(sizes, target)

    def pruned(offset: float) -> np.ndarray:
        return np.clip(offset + candidate.spread * (unit - 0.5), 0.0, hi) * n

    lo_off, hi_off = -1.0 - candidate.spread, 2.0 + candidate.spread
    for _ in range(100):  # sum(pruned) grows with the offset: bisect for the exact total
        mid = 0.5 * (lo_off + hi_off)
        lo_off, hi_off = (mid, hi_off) if pruned(mid).sum() < total else (lo_off, mid)
    shares = pruned(hi_off)
    return exact_counts(sizes, dict(zip(names, shares.tolist())), total)


def random_expr(rng: np.random.Generator, depth: int) -> Expr:
    if depth <= 0 or rng.random() < 0.3:
        if rng.random() < 0.85:
            return ("var", FEATURES[rng.integers(len(FEATURES))])
        return ("const", float(rng.choice([0.5, 1.0, 2.0])))
    if rng.random() < 0.3:
        return (UNARY[rng.integers(len(UNARY))], random_expr(rng, depth - 1))
    return (BINARY[rng.integers(len(BINARY))], random_expr(rng, depth - 1), random_expr(rng, depth - 1))


def mutate(expr: Expr, rng: np.random.Generator, depth: int = 2) -> Expr:
    """Replace a random subtree with a fresh random one."""
    if expr[0] in ("var", "const") or rng.random() < 0.3:
        return random_expr(rng, depth)
    i = int(rng.integers(1, len(expr)))
    return (*expr[:i], mutate(expr[i], rng, depth), *expr[i + 1 :])


@dataclass(frozen=True)
class SearchResult:
    best: Candidate
    counts: dict[str, int]
    fitness: float
    evaluated: int
    history: list[float]  # best fitness after each generation


def search(
    stats: dict[str, np.ndarray],
    sizes: dict[str, int],
    target: float,
    fitness: Callable[[dict[str, int]], float],
    *,
    seed: int,
    population: int = 8,
    generations: int = 4,
    progress: bool = False,
) -> SearchResult:
    """Evolve allocation functions: keep the better half, refill with mutants of tournament winners.

    The first generation holds the uniform allocation (a constant) and every single statistic, so
    the result is never worse than uniform on the fitness. Allocations already scored are not
    scored again. Same seed, same inputs: same result.
    """
    rng = np.random.default_rng(seed)
    seeds: list[Candidate] = [Candidate(("const", 1.0), RANGES[0])]
    for f in FEATURES:
        seeds += [Candidate(("var", f), RANGES[1]), Candidate(("neg", ("var", f)), RANGES[1])]
    pop = seeds[:population]
    while len(pop) < population:
        pop.append(Candidate(random_expr(rng, 2), float(rng.choice(RANGES))))
    scored: dict[tuple[int, ...], float] = {}
    history: list[float] = []
    results: list[tuple[float, int, Candidate, dict[str, int]]] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=generations * population, desc="dsa search", leave=False)
    order = 0
    for _gen in range(generations):
        for cand in pop:
            counts = allocate(cand, stats, sizes, target)
            key = tuple(counts.values())
            if key not in scored:  # one entry per distinct allocation; ties: the earlier one wins
                scored[key] = fitness(counts)
                results.append((scored[key], -order, cand, counts))
                order += 1
            if bar is not None:
                bar.update(1)
        results.sort(key=lambda r: (r[0], r[1]), reverse=True)
        history.append(results[0][0])
        elite = [r[2] for r in results[: max(2, population // 2)]]
        pop = list(elite)
        while len(pop) < population:
            a, b = rng.choice(len(elite), 2, replace=True)
            parent = elite[min(a, b)]  # tournament of two over the sorted elite
            spread = parent.spread if rng.random() < 0.7 else float(rng.choice(RANGES))
            pop.append(Candidate(mutate(parent.expr, rng), spread))
    if bar is not None:
        bar.close()
    best = results[0]
    return SearchResult(best[2], best[3], best[0], len(scored), history)


@torch.no_grad()
def prune_counts_by_magnitude(model: nn.Module, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Zero the ``counts[layer]`` smallest-magnitude weights of each layer; returns the keep masks."""
    masks = {}
    for name, m in prunable_modules(model).items():
        w = m.weight  # type: ignore[union-attr]
        keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        if counts[name]:
            keep[torch.topk(w.detach().abs().flatten(), counts[name], largest=False).indices] = False
        keep = keep.view_as(w)
        w.mul_(keep)  # type: ignore[operator]
        masks[f"{name}.weight"] = keep
    return masks
