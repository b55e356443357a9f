"""Write an EvalResult as JSON, a markdown table and a PNG plot (matplotlib imported only here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from carddeck.eval.robustness import EvalResult


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(result: EvalResult) -> str:
    """Methods as rows: clean, mean corrupted, cards per image, then one column per corruption
    (mean over severities). A second table lists the mean over corruptions per severity."""
    corruptions = list(dict.fromkeys(c for c, _ in result.corrupted))
    severities = sorted({s for _, s in result.corrupted})
    head = ["method", "clean", "mean corrupted", "cards/image", *corruptions]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result.methods:
        per = result.per_corruption(m)
        row = [
            m,
            _pct(result.clean(m)),
            _pct(result.mean_corrupted(m)) if result.corrupted else "-",
            f"{result.cards_per_image.get(m, 0):.2f}",
            *(_pct(per[c]) for c in corruptions),
        ]
        lines.append("| " + " | ".join(row) + " |")
    out = ["## Accuracy (%) per corruption, mean over severities", "", *lines, ""]
    if severities:
        head = ["method", *(f"severity {s}" for s in severities)]
        out += ["## Accuracy (%) per severity, mean over corruptions", ""]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in result.methods:
            vals = [
                np.mean([a for (c, s), a in result.accuracy[m].items() if s == sev and c != "clean"])
                for sev in severities
            ]
            out.append("| " + " | ".join([m, *(_pct(float(v)) for v in vals)]) + " |")
        out.append("")
    if result.corrupted:
        out += wins_and_losses(result)
        out += held_out_against_uniform(result)
    if result.selective:
        out += selective_table(result)
    if result.notes:
        out += ["## Notes", "", *(f"- {k}: {v}" for k, v in result.notes.items()), ""]
    return "\n".join(out)


def selective_table(result: EvalResult) -> list[str]:
    """Selective prediction on the corrupted test set: AURC per method, against the uniform deck's
    maximum-softmax baseline (the target: at least 20% below it), and the error at a few coverages."""
    base = result.selective.get("uniform", {}).get("aurc")
    lines = [
        "## Selective prediction (corrupted test set, risk = 1 - max softmax)",
        "",
        "| method | AURC (%) | vs uniform MSP | error at 50% coverage | at 80% | at 100% |",
        "|---|---|---|---|---|---|",
    ]
    for m, sel in sorted(result.selective.items(), key=lambda kv: kv[1]["aurc"]):
        cov, risk = np.asarray(sel["coverage"]), np.asarray(sel["risk"])
        at = [_pct(float(np.interp(c, cov, risk))) for c in (0.5, 0.8, 1.0)]
        rel = "-" if not base else f"{100 * (sel['aurc'] / base - 1):+.0f}%"
        lines.append(f"| {m} | {100 * sel['aurc']:.2f} | {rel} | {' | '.join(at)} |")
    return [*lines, ""]


def wins_and_losses(result: EvalResult) -> list[str]:
    """Each gate against the two baselines it must beat: the best single card (by mean corrupted
    accuracy) and the uniform deck; where it gains and loses most against the best card."""
    cards = [m for m in result.methods if m.startswith("card:")]
    best = max(cards, key=result.mean_corrupted)
    best_clean = max(result.clean(m) or 0.0 for m in cards)
    gates = [m for m in result.methods if m not in cards and m not in ("uniform", "oracle", "set-oracle")]
    head = ["method", "clean - best card's", "corrupted - uniform", "corrupted - best card", "wins most", "loses most"]
    lines = [
        f"## Where each gate wins and loses (points; best card by corrupted accuracy: {best[5:]})",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    ref = result.per_corruption(best)
    for m in ["uniform", *gates]:
        per = result.per_corruption(m)
        delta = {c: per[c] - ref[c] for c in per}
        win, loss = max(delta, key=delta.__getitem__), min(delta, key=delta.__getitem__)
        row = [
            m,
            f"{100 * ((result.clean(m) or 0.0) - best_clean):+.1f}",
            f"{100 * (result.mean_corrupted(m) - result.mean_corrupted('uniform')):+.1f}",
            f"{100 * (result.mean_corrupted(m) - result.mean_corrupted(best)):+.1f}",
            f"{win} {100 * delta[win]:+.1f}",
            f"{loss} {100 * delta[loss]:+.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def held_out_against_uniform(result: EvalResult, margin: float = 0.005) -> list[str]:
    """Each held-out row (routed, or adapted, by what never saw the corruption or its family) against
    the uniform deck, per corruption: the goal is never more than ``margin`` below it."""
    rows = [m for m in result.methods if "held-out" in m]
    if not rows:
        return []
    uniform = result.per_corruption("uniform")
    head = ["method", "corrupted - uniform", "worst corruption", f"more than {100 * margin:g} below uniform"]
    lines = [
        "## Held out of calibration, against the uniform deck (points, per corruption)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for m in rows:
        delta = {c: v - uniform[c] for c, v in result.per_corruption(m).items()}
        worst = min(delta, key=delta.__getitem__)
        below = [f"{c} {100 * d:+.1f}" for c, d in delta.items() if d < -margin]
        mean = result.mean_corrupted(m) - result.mean_corrupted("uniform")
        lines.append(f"| {m} | {100 * mean:+.1f} | {worst} {100 * delta[worst]:+.1f} | {', '.join(below) or 'none'} |")
    return [*lines, ""]


def plot(result: EvalResult, path: Path, methods: list[str] | None = None) -> None:
    """Grouped bars: accuracy per corruption (mean over severities), methods side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = methods or [
        m
        for m in result.methods
        if not m.endswith(("/per-sample", "/confidence")) and not m.startswith("calibrated/held-out")
    ]
    corruptions = ["clean", *dict.fromkeys(c for c, _ in result.corrupted)]
    values = np.array(
        [
            [result.clean(m) or 0.0 if c == "clean" else result.per_corruption(m)[c] for c in corruptions]
            for m in methods
        ]
    )
    fig, ax = plt.subplots(figsize=(max(9.0, 0.9 * len(corruptions) + 4), 4.5))
    width = 0.8 / len(methods)
    x = np.arange(len(corruptions))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: one per method, none repeated
    for i, m in enumerate(methods):
        label = f"{m} ({100 * result.mean_corrupted(m):.1f})" if result.corrupted else m
        offset = (i - (len(methods) - 1) / 2) * width
        ax.bar(x + offset, 100 * values[i], width, label=label, color=colors[i % len(colors)])
    ax.set_xticks(x, corruptions, rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    low = float(np.floor(100 * values.min() / 10) * 10)  # zoom in: differences are a few points
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_title("Accuracy by corruption (mean over severities)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), title="method (mean corrupted)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_risk_coverage(result: EvalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, sel in sorted(result.selective.items(), key=lambda kv: kv[1]["aurc"]):
        style = {"lw": 2.5, "color": "k"} if m == "uniform" else {"lw": 1.2}
        ax.plot(sel["coverage"], 100 * np.asarray(sel["risk"]), label=f"{m} (AURC {100 * sel['aurc']:.2f})", **style)
    ax.set_xlabel("coverage (share of images answered, least risky first)")
    ax.set_ylabel("error among answered images (%)")
    ax.set_title("Risk-coverage on the corrupted test set")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: EvalResult, out: Path, *, png: bool = True) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "eval.json", "markdown": out / "eval.md"}
    paths["json"].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    paths["markdown"].write_text(markdown(result))
    if png:
        try:
            plot(result, out / "eval.png")
            paths["png"] = out / "eval.png"
            if result.selective:
                plot_risk_coverage(result, out / "risk_coverage.png")
                paths["risk_coverage"] = out / "risk_coverage.png"
        except ImportError:  # matplotlib is in the train extra
            pass
    return paths


__all__ = ["held_out_against_uniform", "markdown", "plot", "write_report"]
