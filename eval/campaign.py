"""What every random-case campaign (``eval/fuzz_models.py``, ``eval/fuzz_flops.py``) shares: its
command-line options, the quiet one-thread process it runs in, and its seeds, one after the other
until its minutes or its case count run out."""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch


def add_campaign_arguments(parser: argparse.ArgumentParser, log: str) -> None:
    """``--minutes``, ``--cases``, ``--first-seed`` and ``--log`` (default file name ``log``)."""
    parser.add_argument("--minutes", type=float, default=10.0, help="stop starting cases after this long")
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path(log), help="one JSON line per case")


def quiet_one_thread() -> None:
    """No warnings, transformers' errors only, one torch thread (the campaigns' figures are per core)."""
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)


def campaign_seeds(args: argparse.Namespace) -> Iterator[int]:
    """``args.first_seed``, the next, ... while ``args.minutes`` have not passed since the first and
    fewer than ``args.cases`` (when given) were handed out."""
    stop = time.time() + 60 * args.minutes
    seed = args.first_seed
    while time.time() < stop and (args.cases is None or seed < args.first_seed + args.cases):
        yield seed
        seed += 1
