"""The speed bench's report (``eval/bench_speed.py``): the Markdown tables of time to first token,
overhead against the oracles with their verdicts, keep-all machinery, generate throughput, memory and
KV cache, and the JSON beside them, from the measured rounds.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
from pathlib import Path

import torch
import transformers

from speed_methods import is_trained  # eval/speed_methods.py
from speed_stats import (  # eval/speed_stats.py
    BATCH_TARGET, CONFIDENCE, MACHINERY_TARGET, SCORING_TARGET, _batch_verdict, _pf, _verdict_text, batch_ratio,
    generate_speedup, interval_coverage, interval_name, keep_all_overhead, keep_all_ratios, median_interval,
    median_spread, paired_differences, paired_ratios, verdict,
)


#: How a report names a site.
SITE_NAMES = {"vision": "vision", "projector": "projector", "llm": "LLM"}


def machine_text(args, device, load_at_start) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if names:
            cpu = f"{names[0].strip()} ({len(names)} logical CPUs)"
    except OSError:
        pass
    text = f"CPU {cpu}, {args.threads} torch thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    text += f", GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', 'unset')}"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    else:
        text += "; no GPU used"
    text += f"; model in {args.dtype}"
    load = ", ".join(f"{v:.2f}" for v in load_at_start)
    return (f"{text}; load average at start {load} (1, 5, 15 min); torch {torch.__version__}, transformers "
            f"{transformers.__version__}, Python {platform.python_version()}")


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def report(args, command, load_at_start, device, meter, base, times_none, configs, keep_all, times_keep_all, memory,
           predicted, scoring_share, floor_share, profile_lines, generate, skipped, projector_share: float | None = None):
    rows = []
    for c in configs:
        method_ms = 1000 * statistics.median(c.times["method"])
        replay_ms = 1000 * statistics.median(c.times["replay"])
        oracle_ms = 1000 * statistics.median(c.times["oracle"]) if c.times["oracle"] else None
        # Each overhead is the median of its per-round pairs (method and replay back to back; replay
        # and oracle; keep-all and its own unpruned run), not a difference of two medians.
        scoring_runs = [1000 * d for d in paired_differences(c.times["method"], c.times["replay"])]
        scoring = statistics.median(scoring_runs)
        scoring_low, scoring_high, _ = median_interval(scoring_runs)
        share, floor = scoring_share[(c.method, c.budget)], floor_share[(c.method, c.budget)]
        exempt = share >= SCORING_TARGET or floor >= SCORING_TARGET
        trained = is_trained(c.method)
        in_calls = 1000 * statistics.median(c.times["strategy_calls"]) if c.times["strategy_calls"] else None
        spared, spared_runs = None, [0.0] * len(c.times["scoring_split"])
        if in_calls is not None and c.keys_handed:
            # The keys the layers were handed: projected inside the strategy's calls, by the layers
            # themselves in the replay. Per round, what the calls took less what the layers were spared.
            spared_runs = paired_differences(c.times["replay_keys"], c.times["method_keys"])
            spared = 1000 * statistics.median(spared_runs)
            in_calls = 1000 * statistics.median([t - d for t, d in zip(c.times["strategy_calls"], spared_runs)])
        # The same pairs with the model's blocks matched out (eval/block_time.py). The layers' input
        # norms and key projections are inside matched blocks, so what they were spared comes off here too.
        split = split_interval = None
        if c.times["scoring_split"]:
            split_runs = [1000 * (d - k) for d, k in zip(c.times["scoring_split"], spared_runs)]
            split = statistics.median(split_runs)
            split_interval = median_interval(split_runs)[:2]
        to_share = 1 / (1000 * base)
        scoring_verdict = verdict(scoring * to_share, (scoring_low * to_share, scoring_high * to_share), SCORING_TARGET,
                                  None if split is None else (split * to_share, tuple(v * to_share for v in split_interval)),
                                  strict=True)  # "under 2%"
        paired = times_keep_all.get(c.method)
        if oracle_ms is not None:
            machinery_runs, machinery_basis = paired_ratios(c.times["replay"], c.times["oracle"]), "oracle"
        elif paired and paired["keep_all"]:
            machinery_runs, machinery_basis = keep_all_ratios(paired), "keep-all"
        else:
            machinery_runs, machinery_basis = None, None
        machinery = statistics.median(machinery_runs) if machinery_runs else None
        machinery_interval = median_interval(machinery_runs)[:2] if machinery_runs else None
        machinery_split_runs = (c.times["machinery_split"] if machinery_basis == "oracle" else
                                paired["split"] if machinery_basis == "keep-all" else [])
        machinery_split = statistics.median(machinery_split_runs) if machinery_split_runs else None
        machinery_split_interval = median_interval(machinery_split_runs)[:2] if machinery_split_runs else None
        machinery_verdict = None if machinery is None else verdict(
            machinery, machinery_interval, MACHINERY_TARGET,
            None if machinery_split is None else (machinery_split, machinery_split_interval))
        final = list(c.recording.selection[0].values())[-1] if c.recording.selection[0] else None
        rows.append({
            "method": c.method, "budget": c.budget, "kept": None if final is None else int(len(final)),
            "ms": method_ms, "min": 1000 * min(c.times["method"]), "max": 1000 * max(c.times["method"]),
            "speedup": base / (method_ms / 1000), "replay_ms": replay_ms,
            "replay_min": 1000 * min(c.times["replay"]), "replay_max": 1000 * max(c.times["replay"]),
            "oracle_ms": oracle_ms, "scoring_ms": scoring, "scoring_min": min(scoring_runs),
            "scoring_max": max(scoring_runs), "scoring_share": scoring / (1000 * base),
            "scoring_interval_share": (scoring_low / (1000 * base), scoring_high / (1000 * base)),
            "scoring_within_noise": scoring_verdict.within_noise, "scoring_decided_by": scoring_verdict.basis,
            "scoring_split_ms": split, "scoring_split_interval_share": None if split is None else
            tuple(v * to_share for v in split_interval),
            "scoring_split_matched": statistics.median(c.times["scoring_matched"]) if c.times["scoring_matched"] else None,
            "strategy_calls_ms": in_calls, "spared_key_projection_ms": spared,
            "strategy_calls_share": None if in_calls is None else in_calls / (1000 * base),
            "algorithm_scoring_flops_share": share, "algorithm_floor_share": floor, "scoring_exempt": exempt,
            # A trained method's learned reduction is the method itself (TokenPacker's packer is its projector),
            # not a scoring overhead: the target is for training-free methods; its time is reported all the same.
            "trained": trained,
            "scoring_pass": None if exempt or trained else scoring_verdict.ok,
            "machinery": machinery, "machinery_basis": machinery_basis, "machinery_interval": machinery_interval,
            "machinery_within_noise": machinery_verdict is not None and machinery_verdict.within_noise,
            "machinery_decided_by": None if machinery_verdict is None else machinery_verdict.basis,
            "machinery_pass": None if machinery_verdict is None else machinery_verdict.ok,
            "machinery_split": machinery_split, "machinery_split_interval": machinery_split_interval,
            "replay_logit_diff": c.replay_diff, "oracle_logit_diff": c.oracle_diff,
            "replayed_verbatim": sorted(c.recording.verbatim), "replayed_recomputed": sorted(c.recording.recompute),
            "times_s": c.times,
        })
    base_ms = 1000 * base
    family = args.model_family
    lines = [
        f"# Speed on {family.title}{'' if family.full_size else ' scaled to CPU'} ({device.type}): time to first token, "
        "overhead against oracles, batch throughput, memory",
        "",
        f"Produced by `{command}` ({args.prefill_rounds} interleaved rounds of the batch-1 prefills and "
        f"{f'{args.rounds} of the generate runs' if args.batches else 'no generate runs'}, each after a warm-up round, "
        f"in one process; medians "
        f"with min and max). Machine: {machine_text(args, device, load_at_start)}. {args.note}".rstrip(),
        "",
        f"Model: {family.description}, "
        f"{args.dtype}, on {device.type}; a 35-token system prompt and a 16-token question. Unpruned time to first token "
        f"{base_ms:.0f} ms (median of {len(times_none)}, min {1000 * min(times_none):.0f}, max {1000 * max(times_none):.0f}).",
    ]

    # summary of targets per method
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    gen_ratio = {}
    if generate:
        runs = generate["runs"]
        for b in generate["batches"]:
            if b == 1:
                continue
            for method, values in runs[b].items():
                if method == "none" or not values["tokens_per_s"] or not runs[1][method]["tokens_per_s"]:
                    continue
                gen_ratio[(method, b)] = batch_ratio(runs, b, method)

    def worst(method, key):
        values = [r[key] for r in by_method.get(method, []) if r[key] is not None]
        return None if not values else all(values)

    def judged(method, key) -> str:
        """pass / **FAIL** over a method's budgets, "(within noise)" when every failing budget's
        interval also holds passing values."""
        text = _pf(worst(method, f"{key}_pass"))
        failing = [r for r in by_method.get(method, []) if r[f"{key}_pass"] is False]
        if failing and all(r[f"{key}_within_noise"] for r in failing):
            text += " (within noise)"
        split = [str(r["budget"]) for r in by_method.get(method, [])
                 if r[f"{key}_pass"] is not None and r[f"{key}_decided_by"] == "split"]
        if split:
            text += f" (at {', '.join(split)}: by the split)"
        return text

    prefill_interval, prefill_coverage = interval_name(args.prefill_rounds), interval_coverage(args.prefill_rounds)
    few_rounds = ("" if prefill_coverage >= CONFIDENCE else
                  f" With {args.prefill_rounds} prefill rounds the batch-1 tables' intervals are each the min-max of the "
                  f"rounds and hold the median with probability {prefill_coverage:.0%} "
                  f"only (6 rounds are the fewest for {CONFIDENCE:.0%}): their verdicts are indicative.")
    lines += ["", "## Targets", "",
              f"Machinery within {MACHINERY_TARGET:.0%} of the oracle (every budget); scoring under {SCORING_TARGET:.0%} of the "
              f"unpruned prefill (every budget; *exempt* where the method's own algorithm needs {SCORING_TARGET:.0%} or more "
              f"of the unpruned prefill's FLOPs, or where its least work, timed here, takes {SCORING_TARGET:.0%} or more of the "
              f"unpruned prefill's time; every share in the overhead table; a trained method's scoring, its learned "
              f"module, is the method and no target: the summary gives its share); generate speed-up at batch 8 and 16 "
              f"at least {BATCH_TARGET:.0%} of the batch-1 speed-up (keep {args.generate_budget}). Each verdict is the "
              f"median's; *(within noise)*: every failing budget's {CONFIDENCE:.0%} interval of the median also holds "
              f"passing values (the rounds cannot tell; a pass whose interval reaches the target is marked so in the overhead "
              f"table); *by the split*: the whole prefills could not tell and the same pairs with the model's blocks "
              f"matched out could (their interval on one side of the target; see the overhead table).{few_rounds}", "",
              "| " + " | ".join(["method", "machinery", "scoring", *(f"batch {b} / batch 1" for b in
                                                                   (generate["batches"][1:] if generate else []))]) + " |",
              "|---|---|---|" + "---|" * len(generate["batches"][1:] if generate else [])]
    for method, method_rows in by_method.items():
        exempt = [r for r in method_rows if r["scoring_exempt"]]
        scoring = judged(method, "scoring")
        if method_rows[0]["trained"]:
            scoring = (f"not a target (trained: its learned projector is the method): it takes up to "
                       f"{100 * max(r['scoring_share'] for r in method_rows):.1f}% of the unpruned prefill's time, "
                       f"{100 * max(r['algorithm_scoring_flops_share'] for r in method_rows):.1f}% of its FLOPs")
        elif exempt:
            worst_share = max(r["algorithm_scoring_flops_share"] for r in exempt)
            worst_floor = max(r["algorithm_floor_share"] for r in exempt)
            measured = max(r["scoring_share"] for r in exempt)
            needs = [f"{100 * worst_share:.1f}% of the unpruned prefill's FLOPs"]
            if worst_floor > 0:
                needs.append(f"its least work (timed) {100 * worst_floor:.1f}% of the unpruned prefill's time")
            scoring = (f"exempt: its own scoring needs up to {'; '.join(needs)}; "
                       f"measured: up to {100 * measured:.1f}% of the unpruned prefill's time")
            if len(exempt) < len(method_rows):
                scoring += f"; other budgets {judged(method, 'scoring')}"
        basis = method_rows[0]["machinery_basis"]
        machinery = judged(method, "machinery") + (f" ({basis})" if basis else "")
        cells = [method, machinery, scoring]
        for b in (generate["batches"][1:] if generate else []):
            ratio = gen_ratio.get((method, b))
            cells.append("not run" if ratio is None else f"{_batch_verdict(*ratio)} ({ratio[0]:.2f})")
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Time to first token, batch 1", "",
              "| method | budget | kept tokens | ms (median) | min | max | speed-up |", "|---|---|---|---|---|---|---|",
              f"| none | {family.visual} | {family.visual} | {base_ms:.0f} | {1000 * min(times_none):.0f} | {1000 * max(times_none):.0f} | 1.00x |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['kept'] if r['kept'] is not None else ''} | {r['ms']:.0f} | "
                     f"{r['min']:.0f} | {r['max']:.0f} | {r['speedup']:.2f}x |")

    lines += ["", "## Overhead against the oracle, batch-1 prefill", "",
              "*replay*: the method's recorded reductions replayed through vtoken with no scoring and no signal (its logits "
              "equal the method's: Δ replay); *scoring* = method - replay, the median over rounds of the two runs timed back to back in "
              "each round, in alternating order (min-max of those differences), as a share of the unpruned prefill, beside the "
              f"share of the unpruned prefill's FLOPs the method's own scoring needs (`vtoken.flops`) and the share of its time the "
              f"least work of that scoring takes, timed here (*floor*, `eval/scoring_floor.py`: a whole attention map's "
              f"column mass, the quicker here of its form without the row max (scores, exponentials, row sums, weighted column sums) and torch's fused softmax then column sums; blank where FLOPs are the only measure); *{prefill_interval}*: of the median of the "
              f"per-round pairs (sign-test order statistics); *in strategy calls*: the time inside the strategy's own calls "
              f"(reduce, observe, observe_attention) during the method's prefill, median over rounds, a direct measure of most "
              f"of the scoring (a lower bound: vtoken's hooks outside those calls are not in it), net of the keys the scoring "
              f"normalised, projected and handed to the layers, which compute them themselves in the replay (their input "
              f"norms and key projections timed in both, per round); *oracle*: the "
              "unwrapped model hand-run on the same schedule (Δ oracle: its first-token logits against the method's), "
              "*machinery* = replay / oracle - 1 (median over rounds of the pair); where no hand-written oracle exists the replay is the oracle and the "
              "machinery is the keep-all replay against the unwrapped model (next table). *Blocks matched out* "
              "(`eval/block_time.py`): the same pairs of runs, each run's wall time less its calls of the model's "
              "transformer blocks that the other run makes too (same block, same input shape and mask, in call order: the "
              "same work), which is most of the noise; what is left is the embedding, projector and head, transformers' "
              "glue, vtoken's hooks, the strategy's calls and any block call only one run makes; median of the per-round "
              "differences with its interval (the scoring net of the keys handed over; *matched*: the share of the "
              "method's prefill matched out). It decides a verdict only where the whole prefills cannot tell: a "
              "difference inside matched blocks shows in the whole prefills only.", "",
              f"| method | budget | method ms | replay ms (min-max) | scoring ms (min-max) | scoring / unpruned | {prefill_interval} | "
              "blocks matched out | in strategy calls | algorithm FLOPs share | floor | scoring target | oracle ms | machinery | "
              f"{prefill_interval} | blocks matched out | machinery target | Δ replay | Δ oracle |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        scoring_target = ("trained" if r["trained"] else "exempt" if r["scoring_exempt"] else
                          _verdict_text(r["scoring_pass"], r["scoring_within_noise"], r["scoring_decided_by"]))
        scoring_split = "" if r["scoring_split_ms"] is None else (
            f"{r['scoring_split_ms']:.1f} ms ({100 * r['scoring_split_ms'] / base_ms:.1f}%; "
            f"{100 * r['scoring_split_interval_share'][0]:.1f}% to {100 * r['scoring_split_interval_share'][1]:.1f}%; "
            f"matched {100 * r['scoring_split_matched']:.0f}%)")
        machinery_split = "" if r["machinery_split"] is None else (
            f"{100 * r['machinery_split']:+.1f}% ({100 * r['machinery_split_interval'][0]:+.1f}% to "
            f"{100 * r['machinery_split_interval'][1]:+.1f}%)")
        low, high = r["scoring_interval_share"]
        in_calls = "" if r["strategy_calls_ms"] is None else f"{r['strategy_calls_ms']:.1f} ms ({100 * r['strategy_calls_share']:.1f}%)"
        if r["spared_key_projection_ms"] is not None:
            in_calls += f" (net of {r['spared_key_projection_ms']:.1f} ms of normed rows and keys handed to the layers)"
        floor = f"{100 * r['algorithm_floor_share']:.1f}%" if r["algorithm_floor_share"] else ""
        machinery_interval = ("" if r["machinery_interval"] is None else
                              f"{100 * r['machinery_interval'][0]:+.1f}% to {100 * r['machinery_interval'][1]:+.1f}%")
        machinery_target = _verdict_text(r["machinery_pass"], r["machinery_within_noise"], r["machinery_decided_by"])
        oracle = f"{r['oracle_ms']:.0f}" if r["oracle_ms"] is not None else "= replay"
        machinery = "" if r["machinery"] is None else f"{100 * r['machinery']:+.1f}%"
        if r["machinery_basis"] == "keep-all":
            machinery += " (keep-all)"
        oracle_diff = "" if r["oracle_logit_diff"] is None else f"{r['oracle_logit_diff']:.1e}"
        lines.append(f"| {r['method']} | {r['budget']} | {r['ms']:.0f} | {r['replay_ms']:.0f} ({r['replay_min']:.0f}-"
                     f"{r['replay_max']:.0f}) | {r['scoring_ms']:.0f} ({r['scoring_min']:.0f} to {r['scoring_max']:.0f}) | {100 * r['scoring_share']:.1f}% | "
                     f"{100 * low:.1f}% to {100 * high:.1f}% | {scoring_split} | {in_calls} | "
                     f"{100 * r['algorithm_scoring_flops_share']:.2f}% | {floor} | {scoring_target} | {oracle} | {machinery} | "
                     f"{machinery_interval} | {machinery_split} | {machinery_target} | {r['replay_logit_diff']:.1e} | {oracle_diff} |")
    verbatim = sorted({(r["method"], s) for r in rows for s in r["replayed_verbatim"]})
    recomputed = sorted({(r["method"], s) for r in rows for s in r["replayed_recomputed"]})
    lines += ["", "Merges: " + ("; ".join(f"{m} {s}" for m, s in recomputed) + " are replayed by recomputing the size-weighted "
              "means from the live features (the averaging stays in the replay's time)" if recomputed else
              "no stage's merged vectors are recomputed") + ("; " + "; ".join(f"{m} {s}" for m, s in verbatim) +
              " hand back the recorded merged vectors (not a size-weighted mean of `merged_into`, or no `merged_into`: "
              "the method computes them, weighted by its scores or, TokenPacker, by its packer), so computing them counts "
              "as scoring" if verbatim else "") + "."]

    if keep_all:
        lines += ["", "## Machinery at keep-all: every stage installed, nothing dropped, nothing scored", "",
                  "Each keep-all replay runs beside an unpruned run of its own in every round (alternately after and before it); *unpruned ms* is "
                  "the median of those paired runs, *overhead* the median over rounds of keep-all / its pair - 1.", "",
                  "| method | stages installed at keep 1 | keep-all replay ms | min | max | unpruned ms | overhead | "
                  "blocks matched out | target |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, pair in times_keep_all.items():
            values = pair["keep_all"]
            if not values:
                continue
            median = 1000 * statistics.median(values)
            unpruned_ms = 1000 * statistics.median(pair["unpruned"])
            overhead = keep_all_overhead(pair)
            stages = ", ".join(keep_all[method].reductions) or "none (the method has no stage at keep 1: hooks only)"
            split_text, split = "", None
            if pair["split"]:
                split_low, split_high, _ = median_interval(pair["split"])
                split = (statistics.median(pair["split"]), (split_low, split_high))
                split_text = f"{100 * split[0]:+.1f}% ({100 * split_low:+.1f}% to {100 * split_high:+.1f}%)"
            decided = verdict(overhead, median_interval(keep_all_ratios(pair))[:2], MACHINERY_TARGET, split)
            target = _verdict_text(decided.ok, decided.within_noise, decided.basis)
            lines.append(f"| {method} | {stages} | {median:.0f} | {1000 * min(values):.0f} | {1000 * max(values):.0f} | "
                         f"{unpruned_ms:.0f} | {100 * overhead:+.1f}% | {split_text} | {target} |")

    if profile_lines:
        lines += ["", f"## Where the scoring time goes (torch.profiler, one batch-1 prefill at {rows[0]['budget'] if rows else ''} "
                  "tokens against one of its replay; times inflated by the profiler, compare them with each other)", "",
                  *profile_lines]

    if generate:
        runs, batches = generate["runs"], generate["batches"]
        header = "| method | TTFT speed-up (batch 1) | " + " | ".join(
            f"batch {b} tokens/s (min-max) | speed-up" + ("" if b == 1 else f" | / batch 1 | ≥ {BATCH_TARGET:.2f}")
            for b in batches) + " |"
        columns = 2 + sum(2 if b == 1 else 4 for b in batches)
        lines += ["", f"## Generate throughput ({args.new_tokens} new tokens, greedy; prompts of mixed lengths, left padding; "
                  f"keep {args.generate_budget} of {family.visual})", "",
                  "Speed-ups against the unpruned model in the same rounds (median over rounds of the pair); */ batch 1*: the batch's speed-up over the batch-1 "
                  "generate speed-up (the same measure at batch 1), the issue's target, with the lowest and highest ratio "
                  f"the two speed-ups' {CONFIDENCE:.0%} intervals of the median allow (*within noise* where they hold the target). The TTFT speed-up is the "
                  "batch-1 prefill's, for reference (decoding gains less from pruning than the prefill).", "",
                  header, "|" + "---|" * columns]
        ttft = {r["method"]: r["speedup"] for r in rows if r["budget"] == args.generate_budget}
        for method in ["none", *[m for m in runs[batches[0]] if m != "none"]]:
            cells = [method, "1.00x" if method == "none" else (f"{ttft[method]:.2f}x" if method in ttft else "")]
            for b in batches:
                values = runs[b][method]["tokens_per_s"]
                if not values:
                    cells += ["not run", ""] + ([] if b == 1 else ["", ""])
                    continue
                median, low, high = median_spread(values)
                speedup = generate_speedup(runs, b, method)
                cells += [f"{median:.1f} ({low:.1f}-{high:.1f})", f"{speedup:.2f}x"]
                if b != 1:
                    ratio = gen_ratio.get((method, b)) if method != "none" else None
                    cells += ["" if ratio is None else f"{ratio[0]:.2f} ({ratio[1]:.2f} to {ratio[2]:.2f})",
                              "" if ratio is None else _batch_verdict(*ratio)]
            lines.append("| " + " | ".join(cells) + " |")
        if generate["errors"]:
            lines += ["", "Not run: " + "; ".join(f"{m} ({e})" for m, e in generate["errors"].items())]

    lines += ["", "## Memory and decode latency", "",
              f"Peak memory: {meter.how}. KV cache: the bytes of every key and value tensor in the cache a batch-1 prefill "
              "returns (read from its layers), beside `vtoken.kv_cache_bytes` for the method's schedule.", "",
              "| method | budget | prefill peak MiB | replay's peak MiB | KV cache after prefill, MiB (bytes) | "
              "vtoken.kv_cache_bytes, MiB |", "|---|---|---|---|---|---|",
              f"| none | {family.visual} | {_mib(memory['none'][0])} | | {_mib(memory['none'][1])} ({memory['none'][1]}) | "
              f"{_mib(predicted['none'])} |"]
    for r in rows:
        key = (r["method"], r["budget"])
        r["prefill_peak_bytes"], r["kv_cache_bytes"] = memory[key]
        r["replay_peak_bytes"] = memory[key + ("replay",)][0]
        r["kv_cache_bytes_predicted"] = predicted[key]
        lines.append(f"| {r['method']} | {r['budget']} | {_mib(r['prefill_peak_bytes'])} | {_mib(r['replay_peak_bytes'])} | "
                     f"{_mib(r['kv_cache_bytes'])} ({r['kv_cache_bytes']}) | {_mib(r['kv_cache_bytes_predicted'])} |")
    if generate:
        runs, batches = generate["runs"], generate["batches"]
        lines += ["", f"Generate at keep {args.generate_budget} ({args.new_tokens} new tokens): decode latency per token "
                  "(median gap between consecutive new tokens after the first; median over rounds) and time to the first token at "
                  "batch 1, peak memory of one generate call at each batch (the warm-up round's).", "",
                  "| method | decode ms/token (batch 1) | generate TTFT ms (batch 1) | " +
                  " | ".join(f"peak MiB batch {b}" for b in batches) + " |", "|---|---|---|" + "---|" * len(batches)]
        for method in runs[batches[0]]:
            one = runs[1][method]
            if not one["decode_ms"]:
                continue
            peaks = [(_mib(statistics.median(runs[b][method]["peak_bytes"])) if runs[b][method]["peak_bytes"] else "")
                     for b in batches]
            lines.append(f"| {method} | {statistics.median(one['decode_ms']):.1f} | {statistics.median(one['ttft_ms']):.0f} | "
                         + " | ".join(peaks) + " |")

    not_run = [f"{m} at {b} ({e})" for (m, b), e in skipped.items()]
    lines += ["", "## Not measured here", "",
              (f"- The real model's weights ({family.real_model}): its shape with random weights, in {args.dtype}; "
               "the prompt is the scaled shapes' (random ids), so accuracy is not measured here."
               if family.full_size else
               f"- The real model ({family.real_model}): a random-weight shape "
               f"scaled to run on 2 CPU cores (width cut, "
               f"{'the LLM at its depth' if family.llm_layers == family.real_llm_layers else 'depth cut'}"
               f"{'' if family.anyres else ', 576 tokens'} and the prompt "
               f"kept), {args.dtype}; `--family llava_7b --device cuda --dtype bfloat16` runs LLaVA-1.5-7B's full shape "
               "on a GPU."),
              *([] if "vision" in family.hand_oracle else [
                  "- Hand-written oracles (they run the unwrapped model by hand): "
                  + ("on this family every method's replay is its oracle" if not family.hand_oracle else
                     f"on this family they cover {' and '.join(SITE_NAMES[site] for site in family.hand_oracle)} stages; a method with a stage "
                     "elsewhere (inside the vision tower, not hand-run on this family yet) has its replay as "
                     "its oracle")
                  + " (the schedule with no scoring, inside vtoken), and its machinery is the keep-all replay "
                  "against the unwrapped model, which bounds vtoken's fixed cost but not the cost of realising the "
                  "merges or drops themselves."]),
              "- Time to first token and overheads at batch > 1 (the overhead tables are batch 1); memory peaks are "
              "single calls, not repeated to a spread.",
              "- Scoring of a merge whose weights are scores (VFlowOpt's recycling, Representation Shift's merge mode) "
              "includes its averaging: the replay hands the recorded vectors back."]
    if projector_share is not None and "tokenpacker" in by_method:
        lines.append(f"- A model built with TokenPacker as its projector: vtoken keeps the model unmodified, so its own "
                     f"projector still runs on every patch and the packed tokens replace its outputs "
                     f"({100 * projector_share:.1f}% of the unpruned prefill's FLOPs, which such a model does not spend); "
                     "the replay and the hand-written oracle run it too, so the machinery column does not show it.")
    if not_run:
        lines.append("- Not run (the method refused the point): " + "; ".join(not_run))
    text = "\n".join(lines) + "\n"
    data = {"command": command, "machine": machine_text(args, device, load_at_start), "device": str(device),
            "unpruned_ms": base_ms, "unpruned_times_s": times_none, "rows": rows,
            "keep_all_times_s": times_keep_all, "memory_method": meter.how,
            "kv_cache_bytes_unpruned": memory["none"][1], "prefill_peak_bytes_unpruned": memory["none"][0],
            "profile": profile_lines, "generate": generate, "skipped": {f"{m}@{b}": e for (m, b), e in skipped.items()},
            "args": {k: v for k, v in vars(args).items() if k != "model_family"}}
    return text, data

