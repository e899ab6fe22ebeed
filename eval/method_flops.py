"""LLaVA-1.5-7B FLOPs of every registered method's own schedule, next to the papers' published TFLOPs.

    python eval/method_flops.py --out /tmp/method_flops.md
    python eval/method_flops.py --out eval/results/method_flops.md --overwrite   # the committed table

``--out`` is the Markdown file to write; an existing one is refused unless ``--overwrite`` is given.

Each method is wrapped, with its defaults and a budget of 192 / 128 / 64 visual tokens (1/3, 2/9, 1/9
of 576), around a LLaVA-1.5-7B built from the shipped config on the meta device (no weights, no
network). The schedule is read back from the wrapped model (``vtoken.schedule_of``), so what is
reported is what the method actually does: its stages, and its scoring cost as its own line.
A budget means visual tokens reaching the LLM (pre-LLM methods) or surviving the pruning layer (in-LLM
methods); the column "LLM-layer mean" makes in-LLM and progressive schedules comparable.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vtoken import signals
from vtoken.accounting import DEFAULT_TEXT_TOKENS, flops
from vtoken.bench import LLAVA_7B as LLAVA, llava_7b_schedule
from vtoken.registry import get_strategy, strategy_names

sys.path.insert(0, str(Path(__file__).resolve().parent))
from output import report_output  # noqa: E402  (eval/output.py)

BUDGETS = (192, 128, 64)

# Published LLaVA-1.5-7B TFLOPs (the "paper" convention: LLM multiply-adds over visual tokens), with
# the schedule behind each figure and where it is printed. Methods whose papers print none are absent.
PUBLISHED: dict[str, list[tuple[str, float, str, list]]] = {
    "fastv": [
        ("K=2, keep 288", 2.01, "TransPrune Tab. 1", [("llm", 288, 2)]),
        ("K=2, keep 144", 1.12, "TransPrune Tab. 1", [("llm", 144, 2)]),
    ],
    "transprune": [
        ("High: 504/360/72 after layers 7/9/12 (its default schedule)", 1.56, "TransPrune Tab. 1",
         [("llm", 504, 7), ("llm", 360, 9), ("llm", 72, 12)]),
    ],
}


def method_rows(name: str):
    for budget in BUDGETS:
        try:
            schedule = llava_7b_schedule(name, {"keep_tokens": budget})
        except (ValueError, RuntimeError) as err:
            yield budget, None, str(err).split("\n")[0]
            continue
        true = flops(LLAVA, schedule, text_tokens=DEFAULT_TEXT_TOKENS)
        paper = flops(LLAVA, schedule, convention="paper")
        yield budget, (schedule, true, paper), None


def stages_text(schedule) -> str:
    parts = [f"{s.site}{'' if s.layer is None else ':' + str(s.layer)}→{s.keep_tokens}" for s in schedule.stages]
    return ", ".join(parts) or "none"


def main(argv=None) -> None:
    out, command = report_output("method_flops", __doc__.split("\n\n")[0],
                                 "Markdown file to write (e.g. eval/results/method_flops.md)", argv)
    base_true = flops(LLAVA, None, text_tokens=DEFAULT_TEXT_TOKENS)
    base_paper = flops(LLAVA, None, convention="paper")
    lines = [
        "# LLaVA-1.5-7B FLOPs of each method's schedule",
        "",
        f"Produced by `{command}` from the shipped config (no weights).",
        f"True convention: all prefill FLOPs of one sample with {DEFAULT_TEXT_TOKENS} text tokens (2 FLOPs per"
        " multiply-add, vision tower, projector, LLM, LM head); scoring = the method's own extra work,"
        " included in the total. Paper convention: LLM multiply-adds over visual tokens only"
        " (4nd² + 2n²d + 3ndm per layer), the convention of the published TFLOPs tables.",
        "",
        f"Unpruned: {base_true.prefill / 1e12:.2f} TFLOPs true, {base_paper.prefill / 1e12:.2f} paper"
        " (published 3.82).",
        "",
        "| method | budget | stages (site:layer→tokens) | LLM-layer mean tokens | true TFLOPs | of which scoring |"
        " paper TFLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for name in strategy_names():
        cls = get_strategy(name)
        if name.startswith("_") or signals.ANNOTATIONS in cls.reads:
            continue
        for budget, found, error in method_rows(name):
            if found is None:
                skipped.append(f"- `{name}` at {budget}: {error}")
                continue
            schedule, true, paper = found
            lines.append(
                f"| {name} | {budget} | {stages_text(schedule)} | {true.mean_visual_tokens:.1f} |"
                f" {true.prefill / 1e12:.2f} | {true.scoring / 1e12:.3f} | {paper.prefill / 1e12:.2f} |"
            )
    lines += ["", "## Published figures reproduced from their schedules", "",
              "| method | schedule | published TFLOPs | ours (paper convention) | source |", "|---|---|---|---|---|"]
    for name, entries in PUBLISHED.items():
        for label, value, source, stages in entries:
            lines.append(f"| {name} | {label} | {value:.2f} | {paper_tflops(stages):.2f} | {source} |")
    lines += ["", "No published LLaVA-1.5-7B TFLOPs to compare with:", "",
              *(f"- {note}" for note in NO_PUBLISHED_LLAVA_7B),
              "", "Paper-convention figures above include each method's scoring work counted the same way"
              " (ZOO-Prune's 2m projector passes are most of its cost)."]
    if skipped:
        lines += ["", "Not reported (the method cannot run without more input):", "", *skipped]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


#: Why the other methods have no row above (from the papers, via ../shared/papers notes).
NO_PUBLISHED_LLAVA_7B = [
    "vflowopt: the paper prints TFLOPs for LLaVA-OneVision-7B only (71.4 unpruned, 37.2 / 19.1 / 7.7 at"
    " 50 / 25 / 10% kept), none for LLaVA-1.5-7B",
    "zoo_prune: no TFLOPs figure in the available sources (accuracy retained 98.3 / 97.6 / 95.2% at"
    " 192 / 128 / 64 tokens)",
    "repshift: the paper evaluates image classifiers (DeiT), no VLM",
    "tokenpacker: the paper reports throughput, not TFLOPs",
    "aif: removes no token (attention modulation); its cost is about one extra decoding step",
]


def paper_tflops(stages) -> float:
    """Paper-convention TFLOPs of a published schedule given as (site, kept tokens, layer) triples."""
    from vtoken.schedule import Schedule, Stage

    schedule = Schedule(tuple(Stage(*stage) for stage in stages))
    return flops(LLAVA, schedule, convention="paper").prefill / 1e12


if __name__ == "__main__":
    sys.exit(main())
