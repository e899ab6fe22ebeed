"""Run the wrapped-model checks (``eval/wrap_checks.py``) over fresh random cases for a while.

    OMP_NUM_THREADS=1 python eval/fuzz_models.py --minutes 30 --first-seed 100000 --log /tmp/fuzz.jsonl

Each case is one seed: a random model of a family, a random batch, a method and its options
(``eval/random_models.py``; with ``--vits`` a random vision-only model, ``eval/random_vits.py``). One JSON line per case goes to ``--log`` (its results per check, and each
failure with its traceback); the failures are printed as they come and counted at the end. Rerun one
case with ``--first-seed S --cases 1``. The suite runs a fixed slice of seeds
(``tests/test_random_models.py``); this is the long campaign behind it.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from campaign import add_campaign_arguments, campaign_seeds, quiet_one_thread  # noqa: E402
from random_models import FAMILIES, RandomCase  # noqa: E402
from random_vits import check_vit_seed  # noqa: E402
from wrap_checks import check_seed  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_campaign_arguments(parser, log="fuzz_models.jsonl")
    parser.add_argument("--family", choices=FAMILIES, help="only this family")
    parser.add_argument("--method", help="only this method")
    parser.add_argument("--text-model", action="append", default=None, metavar="CONFIG",
                        help="only cases whose LLM config is of this class (e.g. Phi3Config, Gemma2Config; repeatable); "
                             "the other seeds are skipped")
    parser.add_argument("--vits", action="store_true",
                        help="vision-only models (eval/random_vits.py) instead of vision-language ones")
    args = parser.parse_args(argv)
    quiet_one_thread()
    outcomes: collections.Counter = collections.Counter()
    failed = skipped = 0
    seed = args.first_seed - 1  # (the last seed run)
    with args.log.open("a") as log:
        for seed in campaign_seeds(args):
            start = time.time()
            if args.vits:
                failures = check_vit_seed(seed, method=args.method)
                outcomes["FAIL" if failures else "pass"] += 1
                log.write(json.dumps({"seed": seed, "seconds": round(time.time() - start, 2), "failures": failures}) + "\n")
                log.flush()
                if failures:
                    failed += 1
                    print("\n".join(failures), flush=True)
                continue
            if args.text_model and RandomCase.draw(seed, args.family).drawn.get("text_model") not in args.text_model:
                skipped += 1
                continue
            try:
                report = check_seed(seed, args.family, args.method)
            except Exception as error:  # noqa: BLE001 - a case the random draw cannot build is reported, not fatal
                print(f"seed {seed}: the case itself failed to build: {type(error).__name__}: {error}", flush=True)
                log.write(json.dumps({"seed": seed, "error": f"{type(error).__name__}: {error}"}) + "\n")
                continue
            for result in report.results.values():
                outcomes[result.split(":")[0]] += 1
            log.write(json.dumps({"seed": seed, "case": report.case, "method": report.method,
                                  "options": repr(report.options), "seconds": round(time.time() - start, 2),
                                  "results": report.results, "failures": report.failures}, default=str) + "\n")
            log.flush()
            if report.failures:
                failed += 1
                print(report.summary(), flush=True)
    print(f"{seed + 1 - args.first_seed - skipped} cases (seeds {args.first_seed}..{seed}"
          f"{f', {skipped} skipped for --text-model' if skipped else ''}), {failed} with a failure; "
          f"checks: {dict(outcomes)}; log: {args.log}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
