"""Speed of every method on a random-weight LLaVA-1.5 shape scaled to run on 2 CPU cores (issue
"Speed that holds up"), unpruned against pruned at 64 / 128 / 192 of 576 visual tokens (``--family``:
the same on Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT and LLaVA-OneVision shapes, see below):

- time to the first token at batch 1 (a prefill with the KV cache, logits of the last position);
- each method against its own oracle, at batch 1. The *replay* (``eval/replay_strategy.py``) runs the
  method once, records every stage's reduction, then runs the same stages handing those reductions
  back with no scoring and no signal (no attention rows, no observers, no probe step, no rerun of a
  mask stage's text): the method's
  schedule through vtoken's machinery, the fastest that schedule can be in vtoken; its logits must
  equal the method's (checked, ``--replay-atol``). ``scoring = method - replay``. Where the schedule
  sits in the vision tower, in front of the LLM or inside it, a hand-written *oracle*
  runs the unwrapped model on the same schedule (the tower's blocks on the patches still there, merged
  ones averaged by size as ToMe does, with its size bias on the attention; project; the LLM on the
  text and the kept visual tokens, gathering the kept rows before each pruning layer, or with the
  hidden visual tokens masked from the text queries from a mask stage's layer on, in one pass; merged
  vectors of other rules taken from the recording; its logits are compared too), and
  ``machinery = replay / oracle - 1``. Where the family's hand-written oracle does not cover a stage
  (``Family.hand_oracle``, ``speed_oracle.oracle_supported``: a merge whose members are not known) the
  replay is the oracle, and vtoken's
  fixed machinery cost is measured as the
  replay of the method's keep-all schedule (every stage installed, nothing dropped, nothing scored)
  against the unwrapped model run beside it in the same round. A profile (torch.profiler, one prefill) says where the largest scoring
  overheads go;
- generate throughput (tokens/s, 32 new tokens, greedy) at batch 1, 8 and 16 with prompts of mixed
  lengths and left padding, every method at 64 tokens, and each batch's speed-up against the
  batch-1 speed-up of the same measure;
- peak memory (CPU: the rise of the process's peak RSS, reset before each call through
  ``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``), the KV cache's bytes after a
  batch-1 prefill (read from the cache's layers) next to ``vtoken.kv_cache_bytes``'s prediction, and
  the decode latency per token at batch 1.

Targets (shown per method): machinery within 5% of the oracle; scoring under 2% of the unpruned
prefill for every training-free method, except where the paper's own algorithm costs more: its
scoring FLOPs from ``vtoken.flops`` are 2% or more of the unpruned prefill's, or its least work,
timed on the same shapes (``eval/scoring_floor.py``: a whole attention map's column mass, the
quicker here of its form without the row max (scores, exponentials, row sums and weighted column
sums) and torch's fused softmax then column sums; FLOPs count the scores), takes 2% or more of the unpruned prefill's time (the table gives every
share); the speed-up at batch 8 and 16 at least 90% of the batch-1 speed-up. Verdicts are the
medians'; each overhead also gets a 95% interval of its median (sign-test order statistics over the
rounds; with fewer than 6 rounds the min-max, named by its lower coverage, ``speed_stats.interval_name``), and
a verdict whose interval holds values on both sides of the target is marked *within noise*. Beside the
scoring estimate (method - replay, a difference of two prefills) the time inside the strategy's own calls is measured directly (``speed_timing.StrategyCallTime``; CPU only): a few milliseconds
timed as such, a lower bound of the scoring that the machine's noise hardly moves. Where the scoring
hands a layer the keys it projected (TransPrune's IGA: ``vtoken/adapters/key_reuse.py``), that layer's own
key projection is spared, so the LLM layers' key projections are timed in the method's and the
replay's prefills (``speed_timing.LayerKeyTime``, with the layers' input norms, handed over too) and the in-call
time is given net of what the layers were spared.

Two identical prefills timed back to back differ by about 9% here (one standard deviation), so a
dozen rounds cannot tell a 1% overhead from a 3% one. On a CPU every pair is therefore also measured
with the model's blocks matched out (``eval/block_time.py``): each run's wall time less its calls of
the vision and LLM transformer blocks that the other run of the pair makes too (same block, same
input shape and mask: the same work, and most of the noise). That residual difference decides a
verdict where the whole prefills cannot tell and it can; where the whole prefills do tell, they
decide (a difference inside matched blocks shows there only).

Model: CLIP tower 384 wide x 6 layers on 336 px (576 patch tokens), Llama 768 wide x 8 layers (GQA
12 / 4 heads), random weights; a 35-token system prompt and a 16-token question (8 to 24 tokens in a
batch). ``--family qwen2_vl``: a Qwen2-VL vision tower 128 wide x 4 blocks on 672 px (2304 patches of
14 px, merged 2 x 2 into 576 visual tokens) and the same LLM as a Qwen2 with M-RoPE; the prompt adds
the vision start and end tokens; there every method's replay is its oracle (the hand-written oracle
runs LLaVA). ``--family llava_7b``: LLaVA-1.5-7B's full shape (CLIP ViT-L/14-336, Vicuna-7B;
random weights), built on the device, for a GPU (``eval/device_check.sh``). ``--llm-layers N`` sets a
scaled family's LLM depth (default 8), ``--llm-layers real`` the real model's (32 for LLaVA-1.5 and NeXT,
28 for Qwen2-VL, Qwen2.5-VL and OneVision, 36 for Qwen3-VL): an in-LLM method's layers scale with the
depth, so on 8 layers its scoring weighs about four times what it does in the paper's model.
``--family llava_deep`` is ``--family llava --llm-layers real`` under the name its committed runs have. ``--family qwen2_5_vl`` and ``qwen3_vl``: the same with Qwen2.5-VL's tower (windowed
attention, full in blocks 1 and 3) and with Qwen3-VL's (16 px patches on 768 px, DeepStack) and its
Qwen3 LLM. ``--family llava_next`` and ``llava_onevision``: AnyRes images scaled down, a base view and a
2 x 2 grid of 168 px crops of a 336 x 336 image (144 tokens a view; 744 visual tokens with the
newlines; the 7B models have 2880 and more), through CLIP with the LLaVA LLM and through SigLIP
(``anyres_max_9``) with a Qwen2 LLM of the same size; budgets 83 / 165 / 248, the same shares of 744
as 64 / 128 / 192 of 576, and the replay is every method's oracle. Every configuration is timed in interleaved rounds in one process (each round runs every
configuration once; the first round warms up and is dropped), medians with min and max. Overheads
are medians of per-round pairs (the method and its replay timed back to back, the replay and the
oracle, the keep-all replay and its own unpruned run; which of the two runs first alternates from
round to round): the drift of a round cancels within a pair, not between two medians taken over
different rounds. ``--prefill-rounds`` (default ``--rounds``) sets the prefill rounds alone: they
are short, and the overheads are differences of a few percent.

This file runs the rounds and writes the report; the rest lives beside it in ``eval/``:
``speed_shapes.py`` (the families' models and prompts), ``speed_timing.py`` (clocks, the KV cache's
bytes, the time inside a strategy's calls, the profile line), ``speed_oracle.py`` (the hand-written
oracle), ``speed_stats.py`` (paired medians, intervals, targets and verdicts) and ``speed_report.py``
(the Markdown tables and the JSON).

    OMP_NUM_THREADS=1 python eval/bench_speed.py --out eval/results/bench_speed/cpu.md --overwrite   # the committed one
    OMP_NUM_THREADS=1 python eval/bench_speed.py --family qwen2_vl --out eval/results/bench_speed/cpu_qwen2_vl.md --overwrite
    OMP_NUM_THREADS=1 python eval/bench_speed.py --family qwen3_vl --out eval/results/bench_speed/cpu_qwen3_vl.md --overwrite
    OMP_NUM_THREADS=1 python eval/bench_speed.py --family llava_next --out eval/results/bench_speed/cpu_llava_next.md --overwrite
    python eval/bench_speed.py --device cuda --threads 8 --out eval/results/bench_speed/cuda.md
    python eval/bench_speed.py --family llava_7b --device cuda --dtype bfloat16 --replay-atol 1 --out eval/results/bench_speed/cuda_llava_7b.md
    OMP_NUM_THREADS=1 python eval/bench_speed.py --methods random,fastv,tome --budgets 64 --rounds 1 --batches 8 --out /tmp/speed.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vtoken  # noqa: E402
from vtoken import compat  # noqa: E402

import replay_strategy as replay  # noqa: E402
from block_time import BlockTime, RunSplit, residual, residual_difference, vtoken_hooks_outside  # noqa: E402
from output import add_output_arguments, claim_stem, environment_prefix  # noqa: E402  (eval/output.py)
from peak_memory import PeakMemory  # noqa: E402  (eval/peak_memory.py)
from scoring_floor import scoring_floor  # noqa: E402  (eval/scoring_floor.py)
from speed_oracle import OraclePlan, oracle_call, oracle_plan, oracle_supported  # noqa: E402  (eval/speed_oracle.py)
from speed_report import report  # noqa: E402  (eval/speed_report.py)
from speed_methods import MethodOptions  # noqa: E402  (eval/speed_methods.py)
from speed_shapes import FAMILIES, family_at  # noqa: E402  (eval/speed_shapes.py)
from speed_stats import paired_differences  # noqa: E402  (eval/speed_stats.py)
from speed_timing import (  # noqa: E402  (eval/speed_timing.py)
    Clock, LayerKeyTime, StepClock, StrategyCallTime, kv_cache_bytes, profile_scoring,
)

#: Environment variables that change the timings: torch's threads, and glibc's malloc (which by
#: default hands freed blocks back to the system, so a prefill's big tensors fault their pages in
#: again on every call; ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``
#: keeps them in the heap).
TIMING_ENVIRONMENT = ("OMP_NUM_THREADS", "GLIBC_TUNABLES")
#: Every method the bench times by default: the training-free ones, and TokenPacker with a packer of
#: random weights (``eval/speed_methods.py``; its budgets are those its scales give, the others are not run).
METHODS = ("random", "pool", "visionzip", "zoo_prune", "vflowopt", "repshift", "tome", "fastv", "transprune", "aif",
           "tokenpacker")
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


def to_device(x: dict, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """``x`` on ``device``, its floating tensors (the pixels) in ``dtype`` when one is given."""
    return {k: v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)
            for k, v in x.items()}


# --------------------------------------------------------------------------------------------------
# The runs


def ttft_call(model, x):
    """The first token's work: a prefill with the KV cache, logits of the last position only (what
    ``generate`` computes at its first step)."""
    return model(**x, use_cache=True, logits_to_keep=1).logits


def generate_runs(model, args, device, clock, meter, methods, options: MethodOptions) -> dict:
    """Per batch (1 and ``args.batches``), per configuration (``none`` and every method at
    ``args.generate_budget``): tokens/s, time to the first token and decode ms per token over
    interleaved rounds after a warm-up round, and the peak memory of the warm-up round's call (measured
    there because the meter hands freed heap back first, which would slow the timed calls)."""
    batches = sorted({1, *args.batches})
    inputs = {b: to_device(args.model_family.inputs(seed=1, batch=b), device, model.dtype) for b in batches}
    keys = ["none", *methods]
    out = {b: {k: {"tokens_per_s": [], "ttft_ms": [], "decode_ms": [], "peak_bytes": []} for k in keys} for b in batches}
    errors = {}

    def once(b: int, memory: bool) -> dict:
        steps = StepClock()
        x = inputs[b]

        def run():
            clock.sync()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(**x, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               suppress_tokens=list(args.model_family.special_tokens), streamer=steps)
            clock.sync()
            return start, time.perf_counter()

        if memory:
            peak, _ = meter.measure(run)
            return {"peak_bytes": peak}
        start, end = run()
        tokens = steps.times[1:]  # the first call is the prompt
        gaps = [1000 * (b2 - a) for a, b2 in zip(tokens, tokens[1:])]
        return {"tokens_per_s": b * args.new_tokens / (end - start), "ttft_ms": 1000 * (tokens[0] - start),
                "decode_ms": statistics.median(gaps) if gaps else float("nan")}

    for round_ in range(args.rounds + 1):
        memory = round_ == 0  # the warm-up round measures memory; the later ones are timed
        for b in batches:
            samples = {"none": once(b, memory)}
            for method in methods:
                if method in errors:
                    continue
                try:
                    with vtoken.pruned(model, method, **options(method, args.generate_budget)):
                        samples[method] = once(b, memory)
                except Exception as error:  # a method that cannot run here is reported, the rest measured
                    errors[method] = f"{type(error).__name__}: {error}"
            for key, sample in samples.items():
                for name, value in sample.items():
                    out[b][key][name].append(value)
        log(f"generate round {round_ + 1}/{args.rounds + 1} done")
    return {"batches": batches, "runs": out, "errors": errors}


@dataclass
class Config:
    method: str
    budget: int
    recording: replay.Recording
    replay_diff: float
    plan: OraclePlan | None = None
    oracle_diff: float | None = None
    #: Seconds per measured round: the method's prefill, its replay's, the oracle's, the time inside
    #: the strategy's own calls during the method's prefill, and the LLM layers' own input norms and key
    #: projections in the method's and the replay's prefills (CPU only); and, with the model's blocks matched out
    #: (``eval/block_time.py``, CPU only), the method's residual less the replay's (``scoring_split``,
    #: seconds) and the replay's residual less the oracle's over the oracle's time (``machinery_split``).
    times: dict[str, list[float]] = field(default_factory=lambda: {
        "method": [], "replay": [], "oracle": [], "strategy_calls": [], "method_keys": [], "replay_keys": [],
        "scoring_split": [], "scoring_matched": [], "machinery_split": []})
    #: True when the method's scoring handed an LLM layer its keys (the layer projected no row).
    keys_handed: bool = False


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="llava", choices=sorted(FAMILIES),
                        help="the model family whose scaled shape is timed (576 visual tokens in each, 744 in the "
                             "LLaVA-NeXT and OneVision ones)")
    parser.add_argument("--llm-layers", default=None,
                        help="the scaled LLM's decoder layers (default: the family's, 8), or 'real': the real model's "
                             "(32 for LLaVA-1.5 and NeXT, 28 for Qwen2-VL, Qwen2.5-VL and OneVision, 36 for Qwen3-VL), "
                             "where an in-LLM method's stages sit as in the paper's model")
    parser.add_argument("--budgets", default=None, help="visual tokens kept, comma separated (default: the family's "
                                                        "1/9, 2/9 and 1/3: 64,128,192 of 576; 83,165,248 of 744)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--prefill-rounds", type=int, default=None,
                        help="measured rounds of the batch-1 prefills (default: --rounds); they are short, and the "
                             "overheads they give are differences of a few percent, so more rounds pay")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (synchronized before and after each timing)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the model's dtype (a reduced one wants a looser --replay-atol)")
    parser.add_argument("--batches", default="8,16", help="generate batches besides 1 (0: no generate runs)")
    parser.add_argument("--generate-methods", default=None, help="methods of the generate runs (default: --methods)")
    parser.add_argument("--generate-budget", type=int, default=None, help="default: the family's first budget")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", default="auto",
                        help="methods whose scoring is profiled at the first budget: a list, 'auto' (the three "
                             "largest scoring overheads) or 'none'")
    parser.add_argument("--replay-atol", type=float, default=1e-4, help="largest logit difference replay vs method")
    parser.add_argument("--note", default="", help="what else ran on the machine, for the record")
    add_output_arguments(parser, "Markdown file (e.g. eval/results/bench_speed/cpu.md); a .json is written beside it")
    args = parser.parse_args(argv)
    if args.prefill_rounds is None:
        args.prefill_rounds = args.rounds
    if args.rounds < 1 or args.prefill_rounds < 1:
        parser.error("--rounds and --prefill-rounds must be at least 1 (the warm-up round is not counted)")
    try:
        args.model_family = family_at(args.family, args.llm_layers)
    except ValueError as error:
        parser.error(str(error))
    claim_stem(Path(args.out).with_suffix(""), args.overwrite)  # before any model is built
    # The environment that changes the timings goes into the command line that reproduces them.
    threads_env = environment_prefix(TIMING_ENVIRONMENT)
    words = [os.path.relpath(sys.argv[0]), *sys.argv[1:]] if argv is None else ["eval/bench_speed.py", *argv]
    command = threads_env + "python " + " ".join(shlex.quote(w) for w in words)
    load_at_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.batches = [int(b) for b in args.batches.split(",") if b.strip() and int(b) > 0]
    family = args.model_family
    budgets = list(family.budgets) if args.budgets is None else [int(b) for b in args.budgets.split(",") if b.strip()]
    if args.generate_budget is None:
        args.generate_budget = budgets[0]
    methods = [m for m in args.methods.split(",") if m]
    generate_methods = methods if args.generate_methods is None else [m for m in args.generate_methods.split(",") if m]
    text_tokens = family.text_tokens
    clock, meter = Clock(device), PeakMemory(device)
    dtype = getattr(torch, args.dtype)
    model = family.build(device, dtype)
    x = to_device(family.inputs(), device, dtype)
    options = MethodOptions(model)  # each method's wrap options at a budget (a trained one's weights too)

    # --- recordings, replay checks, oracle plans ---------------------------------------------------
    configs: list[Config] = []
    keep_all: dict[str, replay.Recording] = {}
    skipped: dict[tuple, str] = {}
    for method in methods:
        try:
            method_budgets = options.budgets(method, budgets)
        except Exception as error:  # TokenPacker's counts need a LLaVA patch grid; Qwen's towers have none
            skipped[(method, "every budget")] = f"{type(error).__name__}: {error}"
            continue
        for budget in method_budgets:
            try:
                recording = replay.record(model, method, x, **options(method, budget))
            except Exception as error:
                skipped[(method, budget)] = f"{type(error).__name__}: {error}"
                continue
            replayed = replay.replay_logits(model, recording, x)
            diff = replay.max_abs_diff(replayed, recording.logits)
            if not diff <= args.replay_atol:
                raise AssertionError(f"{method} at {budget}: the replay's logits differ from the method's by {diff:.3g} "
                                     f"(> {args.replay_atol}): it is not the same schedule")
            config = Config(method, budget, recording, diff)
            if oracle_supported(recording, family.hand_oracle, packed_tower=family.qwen is not None):
                config.plan = oracle_plan(recording, x, model)
                with torch.no_grad():
                    config.oracle_diff = replay.max_abs_diff(oracle_call(model, x, config.plan)[:, -1],
                                                             recording.logits[:, -1])
            configs.append(config)
        try:
            keep_all[method] = replay.record(model, method, x, **options(method, None))
        except Exception as error:
            skipped[(method, "keep-all")] = f"{type(error).__name__}: {error}"
    log(f"recorded and checked {len(configs)} configurations")

    # --- batch-1 prefill: interleaved rounds ---------------------------------------------------------
    times_none: list[float] = []
    # Each keep-all replay is timed beside an unpruned run of its own (its pair): a fixed cost of a
    # few percent must not be lost to the drift of a round (the heap after other methods' runs).
    times_keep_all: dict[str, dict[str, list[float]]] = {m: {"keep_all": [], "unpruned": [], "split": []} for m in keep_all}
    # Every pair (or trio, with a hand-written oracle) of runs, each run as (sample key, the context
    # it runs in, the call timed). Within a group the order alternates from round to round (method
    # then replay, then replay then method): a run that is slower for following another (the heap it
    # leaves) biases neither side.
    def prefill():
        return ttft_call(model, x)

    # The method's own calls are timed on a CPU only (on an accelerator they return before their
    # kernels finish, and a synchronisation inside them would slow the run they are part of).
    # The model's blocks are timed (and matched out of each overhead: eval/block_time.py) on a CPU
    # only, for the same reason.
    block_time = BlockTime(model) if device.type == "cpu" else None
    call_time = StrategyCallTime(block_time) if device.type == "cpu" else None
    key_time = LayerKeyTime(model, call_time) if call_time is not None else None

    def method_context(c: Config):
        if call_time is None:
            return vtoken.pruned(model, c.method, **options(c.method, c.budget))
        return call_time.pruned(model, c.method, **options(c.method, c.budget))

    groups = []
    for c in configs:
        runs = [((c.method, c.budget, "method"), lambda c=c: method_context(c), prefill),
                ((c.method, c.budget, "replay"), lambda c=c: replay.replaying(model, c.recording), prefill)]
        if c.plan is not None:
            runs.append(((c.method, c.budget, "oracle"), nullcontext, lambda c=c: oracle_call(model, x, c.plan)))
        groups.append(runs)
    for method, recording in keep_all.items():
        groups.append([((method, "keep-all pair"), nullcontext, prefill),
                       ((method, "keep-all"), lambda r=recording: replay.replaying(model, r), prefill)])
    keys_handed: set[tuple] = set()  # (method, budget) whose layers were handed keys by the scoring
    splits: dict[tuple, RunSplit] = {}  # this round's runs with their block calls
    hooks_outside = (lambda: vtoken_hooks_outside(block_time)) if block_time is not None else nullcontext
    for round_ in range(args.prefill_rounds + 1):
        sample = {("none",): clock.time(prefill)}
        for runs in groups:
            for key, context, call in (reversed(runs) if round_ % 2 == 1 else runs):
                timed_keys = key_time is not None and key[-1] in ("method", "replay")
                # vtoken's hooks are registered inside hooks_outside (they then run outside any
                # block's time), the block hooks after them (so they run inside vtoken's).
                with hooks_outside(), context(), (key_time.timing() if timed_keys else nullcontext()), \
                        (block_time.timing() if block_time is not None else nullcontext()):
                    sample[key] = clock.time(call)
                if block_time is not None:
                    splits[key] = RunSplit(sample[key], block_time.take())
                if call_time is not None and key[-1] == "method":
                    sample[(*key[:-1], "strategy_calls")] = call_time.take()
                if timed_keys:
                    sample[(*key[:-1], f"{key[-1]}_keys")], handed = key_time.take()
                    if handed:
                        keys_handed.add(key[:-1])
        if round_:
            times_none.append(sample[("none",)])
            for c in configs:
                for kind in c.times:
                    if (c.method, c.budget, kind) in sample:
                        c.times[kind].append(sample[(c.method, c.budget, kind)])
                if block_time is not None:
                    method_run, replay_run = splits[(c.method, c.budget, "method")], splits[(c.method, c.budget, "replay")]
                    c.times["scoring_split"].append(residual_difference(method_run, replay_run))
                    c.times["scoring_matched"].append(residual(method_run, replay_run)[1])
                    if c.plan is not None:
                        oracle_run = splits[(c.method, c.budget, "oracle")]
                        c.times["machinery_split"].append(residual_difference(replay_run, oracle_run) / oracle_run.wall)
            for method in keep_all:
                times_keep_all[method]["keep_all"].append(sample[(method, "keep-all")])
                times_keep_all[method]["unpruned"].append(sample[(method, "keep-all pair")])
                if block_time is not None:
                    unpruned_run = splits[(method, "keep-all pair")]
                    times_keep_all[method]["split"].append(
                        residual_difference(splits[(method, "keep-all")], unpruned_run) / unpruned_run.wall)
        log(f"prefill round {round_ + 1}/{args.prefill_rounds + 1} done")
    base = statistics.median(times_none)
    for c in configs:
        c.keys_handed = (c.method, c.budget) in keys_handed

    # --- memory and KV cache after a batch-1 prefill ------------------------------------------------
    def prefill_memory() -> tuple[int, int]:
        peak, out = meter.measure(lambda: model(**x, use_cache=True, logits_to_keep=1))
        return peak, kv_cache_bytes(compat.output_cache(out))

    memory = {"none": prefill_memory()}
    # The prompt's image size is not one every family assumes by default (Qwen3-VL's 768 px, not
    # its 672 px default), so the prediction is given the prompt's visual tokens.
    predicted = {"none": vtoken.kv_cache_bytes(model, text_tokens=text_tokens, dtype=model.dtype,
                                               visual_tokens=family.visual)}
    for c in configs:
        with vtoken.pruned(model, c.method, **options(c.method, c.budget)):
            prefill_memory()  # warm
            memory[(c.method, c.budget)] = prefill_memory()
            predicted[(c.method, c.budget)] = vtoken.kv_cache_bytes(model, text_tokens=text_tokens, dtype=model.dtype,
                                                                    visual_tokens=family.visual)
        with replay.replaying(model, c.recording):
            memory[(c.method, c.budget, "replay")] = prefill_memory()

    log("memory and KV cache measured")

    # --- scoring FLOPs of each method's own algorithm (vtoken.flops), for the scoring target --------
    unpruned = vtoken.flops(model, text_tokens=text_tokens)
    unpruned_flops = unpruned.prefill
    scoring_share = {}
    # ... and the least work of that algorithm, timed (eval/scoring_floor.py: a whole attention map's
    # column mass, the quicker of its exact forms here, whose exponentials and sums FLOPs do not
    # count), as a share of the unpruned prefill's time.
    floor_share, floor_cache = {}, {}
    for c in configs:
        with vtoken.pruned(model, c.method, **options(c.method, c.budget)):
            scoring_share[(c.method, c.budget)] = vtoken.flops(model, text_tokens=text_tokens).scoring / unpruned_flops
            costs = vtoken.schedule_of(model, visual_tokens=family.visual).scoring
        floor_share[(c.method, c.budget)] = scoring_floor(costs, family.vision_map, device, floor_cache) / base
    log("scoring FLOPs and floors measured")

    # --- profile of the largest scoring overheads ----------------------------------------------------
    first = [c for c in configs if c.budget == budgets[0]]
    scoring_ms = {c.method: statistics.median(paired_differences(c.times["method"], c.times["replay"])) for c in first}
    if args.profile == "auto":
        profiled = sorted(scoring_ms, key=scoring_ms.get, reverse=True)[:3]
    elif args.profile == "none":
        profiled = []
    else:
        profiled = [m for m in args.profile.split(",") if m in scoring_ms]
    profile_lines = []
    for method in profiled:
        c = next(c for c in first if c.method == method)
        try:
            profile_lines.append(profile_scoring(model, x, method, c.budget, options(method, c.budget), c.recording, device,
                                                      ttft_call))
        except Exception as error:
            profile_lines.append(f"- **{method}**: profile failed ({type(error).__name__}: {error})")

    log(f"profiled {', '.join(profiled) or 'nothing'}")

    # --- generate -------------------------------------------------------------------------------------
    generate = generate_runs(model, args, device, clock, meter, generate_methods, options) if args.batches else None

    text, data = report(args, command, load_at_start, device, meter, base, times_none, configs, keep_all, times_keep_all,
                        memory, predicted, scoring_share, floor_share, profile_lines, generate, skipped,
                        projector_share=unpruned.projector / unpruned_flops)
    print(text)
    out = Path(args.out)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
