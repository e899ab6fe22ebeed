"""Statistics and verdicts of the speed bench (``eval/bench_speed.py``): medians of per-round pairs,
the sign test's interval of a median and its real coverage, the targets of issue "Speed that holds
up" and how a verdict is reached (by the whole prefills, or by the split with the model's blocks
matched out where they cannot tell), and the batch target's ratio of speed-ups.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

MACHINERY_TARGET, SCORING_TARGET, BATCH_TARGET = 0.05, 0.02, 0.90
#: Coverage of the intervals given for the medians of per-round pairs (``median_interval``).
CONFIDENCE = 0.95


def median_spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _rounds(first: list[float], second: list[float]):
    if len(first) != len(second):
        raise ValueError(f"paired runs need one time each per round, got {len(first)} and {len(second)}")
    return zip(first, second)


def paired_differences(first: list[float], second: list[float]) -> list[float]:
    """``first[r] - second[r]`` of each round: two runs timed back to back in the same round share
    its drift (the machine's load, the heap after the round's other runs), which a difference of
    two medians taken over different rounds does not cancel."""
    return [a - b for a, b in _rounds(first, second)]


def paired_ratios(first: list[float], second: list[float]) -> list[float]:
    """``first[r] / second[r] - 1`` of each round (see :func:`paired_differences`)."""
    return [a / b - 1 for a, b in _rounds(first, second)]


def median_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values`` (one per independent round): the
    k-th smallest and the k-th largest value, k the largest rank whose tails each hold at most
    ``(1 - confidence) / 2`` of Binomial(n, 1/2) (the sign test's interval; 12 values: the 3rd and
    the 10th, 96.1%). Returns ``(low, high, coverage)``; with too few values for ``confidence`` (5 at
    95%) the interval is the min-max and the coverage it returns, ``1 - 2^(1 - n)``, is below it."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval needs at least one value")

    def tail(k: int) -> float:  # P(Binomial(n, 1/2) <= k - 1)
        return sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and tail(k + 1) <= (1 - confidence) / 2:
        k += 1
    return xs[k - 1], xs[n - k], 1 - 2 * tail(k)


def interval_coverage(rounds: int) -> float:
    """How often :func:`median_interval` over ``rounds`` values holds the median (it depends on the
    count alone): at least 95% from 6 rounds on, 75% for the min-max of 3."""
    return median_interval([0.0] * rounds)[2]


def interval_name(rounds: int) -> str:
    """What an interval of :func:`median_interval` over ``rounds`` values is, by its real coverage: the
    sign test's 95% interval from 6 rounds on; with fewer, the min-max of the rounds, which holds the
    median less often (3 rounds: 75%), and the tables say so rather than call it 95%."""
    coverage = interval_coverage(rounds)
    if coverage >= CONFIDENCE:
        return f"{CONFIDENCE:.0%} interval"
    return f"{coverage:.0%} interval (min-max of {rounds} rounds)"


def within_noise(low: float, high: float, target: float) -> bool:
    """Whether an estimate's interval holds values on both sides of its target: the rounds do not
    tell a pass from a fail, whatever the median says."""
    return low < target < high


def _verdict_text(ok: bool | None, within_noise: bool, decided_by: str | None) -> str:
    """pass / **FAIL**, then "(within noise)" and "(by the split)" where they apply."""
    return (_pf(ok) + (" (within noise)" if within_noise else "")
            + (" (by the split)" if decided_by == "split" else ""))


@dataclass(frozen=True)
class Verdict:
    """A target's verdict for one budget: ``ok`` (pass), ``within_noise`` (its interval holds
    values on both sides of the target), ``basis``: ``"prefill"`` (the whole prefills' pairs) or
    ``"split"`` (the same pairs with the model's blocks matched out, ``eval/block_time.py``: used
    only where the whole prefills cannot tell and the split can)."""

    ok: bool
    within_noise: bool
    basis: str


def verdict(value: float, interval: tuple[float, float], target: float,
            split: tuple[float, tuple[float, float]] | None = None, strict: bool = False) -> Verdict:
    """Pass when ``value`` is at most ``target`` (under it when ``strict``); decided by ``split`` (value, interval) instead when
    ``interval`` straddles the target and the split's does not. A difference inside the matched
    blocks is in the whole prefills only, so where they do tell, they decide."""
    if within_noise(*interval, target) and split is not None and not within_noise(*split[1], target):
        return Verdict(split[0] < target if strict else split[0] <= target, False, "split")
    return Verdict(value < target if strict else value <= target, within_noise(*interval, target), "prefill")


def _pf(ok: bool | None) -> str:
    return "n/a" if ok is None else ("pass" if ok else "**FAIL**")


def _batch_verdict(ratio: float, low: float, high: float) -> str:
    return _verdict_text(ratio >= BATCH_TARGET, within_noise(low, high, BATCH_TARGET), None)


def generate_speedup(runs: dict, batch: int, method: str) -> float:
    """A method's generate speed-up at ``batch``: the median over rounds of its tokens/s over the
    unpruned model's in the same round."""
    if method == "none":
        return 1.0
    return 1 + statistics.median(paired_ratios(runs[batch][method]["tokens_per_s"], runs[batch]["none"]["tokens_per_s"]))


def batch_ratio(runs: dict, batch: int, method: str) -> tuple[float, float, float]:
    """The issue's batch target for ``method``: its generate speed-up at ``batch`` over its batch-1
    speed-up, with an interval ``(ratio, low, high)``: the lowest and highest ratio the two speed-ups'
    median intervals (:func:`median_interval`) allow. A method that does not speed up (AIF, whose
    speed-up is 1 but for noise) has a ratio of two numbers near 1, which these rounds may not tell
    apart from the target; the interval says so."""
    def speedup_interval(b: int) -> tuple[float, float, float]:
        ratios = paired_ratios(runs[b][method]["tokens_per_s"], runs[b]["none"]["tokens_per_s"])
        low, high, _ = median_interval(ratios)
        return generate_speedup(runs, b, method), 1 + low, 1 + high

    at_batch, at_batch_low, at_batch_high = speedup_interval(batch)
    alone, alone_low, alone_high = speedup_interval(1)
    return at_batch / alone, at_batch_low / alone_high, at_batch_high / alone_low


def keep_all_ratios(pair: dict[str, list[float]]) -> list[float]:
    """The keep-all replay against the unpruned run timed beside it, per round."""
    return paired_ratios(pair["keep_all"], pair["unpruned"])


def keep_all_overhead(pair: dict[str, list[float]]) -> float:
    """The keep-all replay against the unpruned run timed beside it, median over rounds."""
    return statistics.median(keep_all_ratios(pair))
