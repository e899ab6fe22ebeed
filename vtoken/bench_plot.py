"""The trade-off plots of ``vtoken bench``: accuracy against cost, and relevant-patch recall against
cost, one line per method through its budgets.

The x axis is the prefill TFLOPs the same schedule has on LLaVA-1.5-7B (576 visual tokens), the cost
the field quotes; up and to the left is better. The unpruned model is a star (every curve starts
there), random and pool (the floors every method must beat) are grey, the oracle (an upper reference
only a generator can have) is black, and methods that prune inside the LLM are dashed: at the same
budget label they cost more, which is why the curves, not the labels, are what to compare.
"""

from __future__ import annotations

import os

from vtoken.bench_report import BenchRow, curves

#: How each reference row is drawn.
_REFERENCE_STYLE = {
    "random": {"color": "0.45", "linestyle": ":", "marker": "x"},
    "pool": {"color": "0.65", "linestyle": ":", "marker": "s"},
    "oracle": {"color": "black", "linestyle": "-", "marker": "^"},
}


def plot(rows: list[BenchRow], out: str) -> dict[str, str]:
    """Write ``accuracy_vs_flops.png`` and ``recall_vs_flops.png`` into ``out`` (those whose metric
    the rows have); returns what was written. Needs matplotlib (a dependency of vtoken)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    written = {}
    base = next((r for r in rows if r.method == "none"), None)
    in_llm = {r.label for r in rows if r.prunes_in_llm}
    for metric, name, ylabel in (
        ("accuracy", "accuracy_vs_flops.png", "accuracy (%)"),
        ("recall", "recall_vs_flops.png", "relevant patches kept (%)"),
    ):
        lines = curves(rows, metric)
        if not lines:
            stale = os.path.join(out, name)
            if os.path.isfile(stale):  # an earlier run's plot of a metric this run has not: not this run's result
                os.remove(stale)
            continue
        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
        colours = iter(plt.get_cmap("tab10").colors * 3)
        colour_of: dict[str, tuple] = {}  # a tuned row ("vflowopt (tuned)") takes its method's colour
        for label, points in sorted(lines.items()):
            xs, ys = [p[0] for p in points], [100 * p[1] for p in points]
            method = label.split(" (")[0]
            style = _REFERENCE_STYLE.get(label)
            if style is None:
                if method not in colour_of:
                    colour_of[method] = next(colours)
                variant = label != method
                style = {"color": colour_of[method], "marker": "D" if variant else "o",
                         "linestyle": ":" if variant else "--" if label in in_llm else "-"}
            ax.plot(xs, ys, label=label + (" (in LLM)" if label in in_llm else ""), linewidth=1.6,
                    markersize=5, **style)
        if base is not None and (metric == "recall" or base.accuracy is not None):
            value = 100.0 if metric == "recall" else 100 * base.accuracy
            ax.plot([base.tflops_llava_7b], [value], marker="*", markersize=14, color="gold",
                    markeredgecolor="black", linestyle="none", label="unpruned", zorder=5)
        ax.set_xlabel("prefill TFLOPs on LLaVA-1.5-7B, same schedule (lower is cheaper)")
        ax.set_ylabel(ylabel)
        samples = rows[0].samples
        ax.set_title(f"{ylabel.split(' (')[0]} against cost ({samples} records)" if samples else ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best", ncol=2)
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path)
        plt.close(fig)
        written[metric] = path
    return written
