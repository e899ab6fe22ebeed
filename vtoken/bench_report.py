"""What ``vtoken bench`` prints and writes: the short terminal view, the full Markdown and JSON tables,
and the comparison of methods at equal cost.

Budget labels do not make methods comparable: a method that prunes inside the LLM at "1/9" (FastV
drops tokens after layer 2) still runs its first layers on every token, and AIF keeps every token and
costs more than no pruning. So the summary compares methods at matched cost: each method's accuracy
is interpolated along its own curve of (LLaVA-1.5-7B-projected TFLOPs, accuracy) points, the unpruned
model being every curve's top end, at the cost of the reference rows (random, which keeps its budget
in front of the LLM). A method whose cheapest point costs more than a target is not ranked there
("does not reach it"); nothing is extrapolated.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

#: The row every method is compared with at matched cost: the floor every method must beat.
REFERENCE = "random"
#: Rows that are references, not methods (marked in the plot, left out of rankings as competitors).
REFERENCE_ROWS = ("none", "random", "oracle")


@dataclass
class BenchRow:
    """One measured point: ``method`` at ``budget`` (``label`` tells rows of the same method apart,
    e.g. ``"vflowopt (tuned)"``)."""

    method: str
    budget: str
    site: str
    kept_tokens: float
    visual_tokens: int
    prefill_ms: float
    batch_ms: float
    batch: int
    tflops: float
    tflops_llava_7b: float
    accuracy: float | None = None
    retained: float | None = None
    recall: float | None = None
    families: dict[str, float] | None = None
    samples: int = 0
    label: str = ""
    prunes_in_llm: bool = False

    def __post_init__(self):
        self.label = self.label or self.method

    @classmethod
    def from_dict(cls, data: dict) -> "BenchRow":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --- numbers -----------------------------------------------------------------------------------

def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _flops(value: float) -> str:
    """TFLOPs with a unit that keeps three significant digits readable (a toy model's 0.00051 TFLOPs
    is 0.51 GFLOPs)."""
    if not math.isfinite(value):
        return "-"
    for scale, unit in ((1.0, "T"), (1e-3, "G"), (1e-6, "M")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value * 1e9:.3g} k"


# --- tables ------------------------------------------------------------------------------------

def short_table(rows: list[BenchRow]) -> str:
    """The terminal view: one line per point, under 100 characters (the full table is in the files)."""
    accuracy = rows[0].accuracy is not None
    head = ["method", "budget", "LLM tokens"]
    head += ["acc %", "retained %"] if accuracy else []
    head += ["7B TFLOPs", "prefill ms"]
    body = []
    for r in rows:
        cells = [r.label + (" *" if r.prunes_in_llm else ""), r.budget, f"{r.kept_tokens:.0f}/{r.visual_tokens}"]
        cells += [_pct(r.accuracy), _pct(r.retained)] if accuracy else []
        cells += [f"{r.tflops_llava_7b:.2f}", f"{r.prefill_ms:.1f}"]
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths]), *(line(c) for c in body)]
    if any(r.prunes_in_llm for r in rows):
        out.append("* prunes inside the LLM: its first layers see every visual token (LLM tokens = layer mean)")
    return "\n".join(out) + "\n"


def to_markdown(rows: list[BenchRow]) -> str:
    """The full table: every column the sweep measured."""
    accuracy = rows[0].accuracy is not None
    families = sorted(rows[0].families or {}) if accuracy else []
    head = ["method", "budget", "stages", "visual tokens (LLM layer mean)"]
    if accuracy:
        head += ["accuracy", *families, "retained", "relevant-patch recall"]
    head += ["prefill ms (b=1)", f"prefill ms (b={rows[0].batch})", "FLOPs (this model)",
             "TFLOPs (LLaVA-1.5-7B, same schedule)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.label, r.budget, r.site, f"{r.kept_tokens:.1f} / {r.visual_tokens}"]
        if accuracy:
            cells += [_pct(r.accuracy), *(_pct((r.families or {}).get(f)) for f in families), _pct(r.retained),
                      _pct(r.recall)]
        cells += [f"{r.prefill_ms:.1f}", f"{r.batch_ms:.1f}", _flops(r.tflops),
                  "-" if not math.isfinite(r.tflops_llava_7b) else f"{r.tflops_llava_7b:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- equal cost --------------------------------------------------------------------------------

def curves(rows: list[BenchRow], metric: str = "accuracy") -> dict[str, list[tuple[float, float]]]:
    """Per label, its (7B TFLOPs, ``metric``) points from the unpruned end down (the unpruned row
    starts every curve; a label with a single trained or tuned point has that point alone)."""
    base = next((r for r in rows if r.method == "none"), None)
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        value = getattr(r, metric)
        if r.method == "none" or value is None or not math.isfinite(r.tflops_llava_7b):
            continue
        out.setdefault(r.label, []).append((r.tflops_llava_7b, value))
    for label, points in out.items():
        points.sort(key=lambda p: -p[0])
        start = getattr(base, metric) if base is not None else None
        if metric == "recall" and base is not None:
            start = 1.0  # unpruned keeps every relevant patch
        variant = any(r.label == label and r.label != r.method for r in rows)  # a tuned config: one point
        if start is not None and not variant:
            points.insert(0, (base.tflops_llava_7b, start))
    return out


def at_cost(points: list[tuple[float, float]], tflops: float, relative: float = 0.01) -> float | None:
    """The value of a curve at ``tflops``, linear between the two neighbouring points (in the curve's
    order); ``None`` if the curve never comes down to (or up to) that cost. Costs within ``relative``
    of each other count as equal (a method keeping 16.0 tokens on average and one keeping exactly 16
    differ by rounding, not by cost)."""
    tolerance = relative * tflops
    for (f0, v0), (f1, v1) in zip(points, points[1:]):
        lo, hi = min(f0, f1), max(f0, f1)
        if lo - tolerance <= tflops <= hi + tolerance:
            if abs(f1 - f0) < tolerance:
                return max(v0, v1)
            at = min(max(tflops, lo), hi)  # a cost just past an end takes the end's value
            return v0 + (v1 - v0) * (at - f0) / (f1 - f0)
    if len(points) == 1 and abs(points[0][0] - tflops) <= tolerance:
        return points[0][1]
    return None


def matched_cost_summary(rows: list[BenchRow]) -> str:
    """Methods ranked by accuracy at the cost of each reference point (random at each budget), with
    each method's place between random (0) and the oracle (1) at that same cost."""
    if rows[0].accuracy is None:
        return ""
    accuracy = curves(rows)
    in_llm = {r.label for r in rows if r.prunes_in_llm}
    references = [r for r in rows if r.method == REFERENCE and r.accuracy is not None]
    oracle = {r.budget: r for r in rows if r.method == "oracle" and r.accuracy is not None}
    lines = []
    for ref in sorted(references, key=lambda r: -r.tflops_llava_7b):
        cost = ref.tflops_llava_7b
        placed, unreached = [], []
        for label, points in accuracy.items():
            if label in REFERENCE_ROWS:
                continue
            value = at_cost(points, cost)
            if value is None:
                own = [r.tflops_llava_7b for r in rows if r.label == label]  # its measured points only
                cheapest = min(own)
                if len(points) == 1:
                    unreached.append(f"{label} (measured at {cheapest:.2f} only)")
                else:
                    unreached.append(f"{label} (cheapest {cheapest:.2f})" if cheapest > cost else label)
            else:
                placed.append((value, label))
        placed.sort(reverse=True)
        lines.append(f"- at {cost:.2f} TFLOPs (the cost of keeping {ref.budget} of the tokens before the LLM): "
                     f"random {_pct(ref.accuracy)}"
                     + (f", oracle {_pct(oracle[ref.budget].accuracy)}" if ref.budget in oracle else ""))
        if placed:
            lines.append("  ranking: " + ", ".join(
                f"{label}{' *' if label in in_llm else ''} {_pct(value)}" for value, label in placed))
            top = oracle.get(ref.budget)
            if top is not None and top.accuracy - ref.accuracy > 1e-9:
                span = top.accuracy - ref.accuracy
                lines.append("  between random (0) and oracle (1): " + ", ".join(
                    f"{label} {round((value - ref.accuracy) / span, 2) + 0.0:.2f}" for value, label in placed))
            elif top is not None:  # the scale would run backwards (too few questions to tell them apart)
                lines.append(f"  between random and oracle: not placed, the oracle ({_pct(top.accuracy)}) does not beat "
                             f"random ({_pct(ref.accuracy)}) here (answer more questions)")
        if unreached:
            lines.append("  does not reach this cost: " + ", ".join(unreached))
    if not lines:
        return ""
    return ("Ranking at equal cost (accuracy %, interpolated along each method's curve of LLaVA-1.5-7B "
            "TFLOPs; * prunes inside the LLM):\n\n" + "\n".join(lines) + "\n")


def oracle_gap_summary(rows: list[BenchRow]) -> str:
    """Per budget: how far ``oracle`` beats ``random`` (the benchmark's test of itself: a good
    benchmark shows at least 15 points at 1/9). Both keep their budget in front of the LLM, so they
    cost the same; where methods land between them at that cost is in :func:`matched_cost_summary`."""
    by = {(r.method, r.budget): r for r in rows if r.accuracy is not None}
    lines = []
    for budget in dict.fromkeys(r.budget for r in rows if r.method == "oracle"):
        oracle, random = by.get(("oracle", budget)), by.get(("random", budget))
        if oracle is None or random is None:
            continue
        gap = 100 * (oracle.accuracy - random.accuracy)
        verdict = "meets" if gap >= 15 else "misses"
        lines.append(f"- budget {budget}: oracle {100 * oracle.accuracy:.1f}, random {100 * random.accuracy:.1f}:"
                     f" gap {gap:+.1f} points ({verdict} the 15-point bar).")
    return ("Oracle against random:\n\n" + "\n".join(lines) + "\n") if lines else ""


# --- files -------------------------------------------------------------------------------------

def write(rows: list[BenchRow], out: str, command: str, notes: list[str] | None = None) -> dict[str, str]:
    """Write ``bench.md`` and ``bench.json`` into ``out`` (called after every row, so a crash keeps
    what was measured); returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = {"markdown": os.path.join(out, "bench.md"), "json": os.path.join(out, "bench.json")}
    with open(paths["markdown"], "w") as f:
        f.write(f"Produced by `{command}`.\n\n")
        if rows[0].accuracy is not None:
            f.write(f"Accuracy: exact match of the greedy answer on {rows[0].samples} records, in percent; "
                    "retained = accuracy / unpruned accuracy. TFLOPs are projected to LLaVA-1.5-7B (576 visual "
                    "tokens, 64 text tokens) with the same schedule. Prefill times are this model's, on this "
                    "machine: on a model this small per-call overheads dominate them, so judge speed by "
                    "`python eval/bench_speed.py` (a LLaVA-1.5 shape scaled to CPU, eval/results/bench_speed/) "
                    "instead.\n\n")
        for note in notes or []:
            f.write(f"{note}\n\n")
        f.write(to_markdown(rows))
        for summary in (matched_cost_summary(rows), oracle_gap_summary(rows)):
            if summary:
                f.write("\n" + summary)
    with open(paths["json"], "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=2)
    return paths


def read(path: str) -> list[BenchRow]:
    """Rows from a ``bench.json`` (written by :func:`write`)."""
    with open(path) as f:
        return [BenchRow.from_dict(item) for item in json.load(f)]
