"""Where an eval script writes: an output it is given (``--out``, required), and never over a result
that is already there unless it is told to (``--overwrite``).

The eval scripts that write results (benchmarks, evaluations, reports, training runs) do::

    from output import add_output_arguments, claim

    add_output_arguments(parser, "the Markdown report")
    args = parser.parse_args(argv)
    out = claim(args.out, args.overwrite)            # before any model loads or any timing starts

``claim`` refuses with one line naming the file that is in the way and the ``--overwrite`` fix
(``SystemExit``: exit status 1, the line on stderr), so a result committed under ``eval/results/`` is
only rewritten by a command that says ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

__all__ = ["add_output_arguments", "claim", "claim_stem", "command_line", "report_output"]


def add_output_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--out`` (required; ``what`` says what it names) and ``--overwrite`` to ``parser``."""
    parser.add_argument("--out", required=True,
                        help=f"{what}; refused if a result is already there, unless --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a result already at --out (e.g. regenerate a committed one)")


def claim(path: str | os.PathLike, overwrite: bool = False, *names: str) -> Path:
    """Make ``path`` ready to be written and return it as a :class:`Path`.

    Without ``names`` ``path`` is the file the script writes: refused if it exists; its parent folder
    is created. With ``names`` ``path`` is a folder and ``names`` are the files the script writes into
    it (relative paths, glob patterns allowed: ``"*"`` claims a folder that must be empty): refused if
    any of them exists; the folder is created. ``overwrite`` turns the refusal off.

    The refusal is ``SystemExit`` with one line: the first file in the way, and how to proceed.
    """
    path = Path(path)
    if names and path.exists() and not path.is_dir():
        raise SystemExit(f"{path} is a file, not a folder: give a folder as --out")
    if not names and path.is_dir():
        raise SystemExit(f"{path} is a folder, not a file: give a file as --out")
    if not overwrite:
        taken = _taken(path, names)
        if taken is not None:
            raise SystemExit(f"{taken} already exists: pass --overwrite to replace it, or give another --out")
    folder = path if names else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file on the way to it, a place nobody can write
        raise SystemExit(f"cannot make the folder {folder} ({error.strerror or error}): give another --out") from None
    return path


def _taken(path: Path, names: tuple[str, ...]) -> Path | None:
    """The first existing file among those ``claim`` would write, else ``None``."""
    if not names:
        return path if path.exists() else None
    for name in names:
        found = sorted(path.glob(name)) if any(c in name for c in "*?[") else [path / name]
        for candidate in found:
            if candidate.exists():
                return candidate
    return None


def claim_stem(stem: str | os.PathLike, overwrite: bool = False, suffixes=(".md", ".json")) -> Path:
    """:func:`claim` the files ``stem`` names with each of ``suffixes`` (``eval/results/x`` ->
    ``x.md``, ``x.json``, as ``Path.with_suffix`` makes them); returns ``stem`` as a :class:`Path`."""
    stem = Path(stem)
    claim(stem.parent, overwrite, *(stem.with_suffix(suffix).name for suffix in suffixes))
    return stem


def report_output(script: str, description: str, what: str, argv: list[str] | None = None) -> tuple[Path, str]:
    """For a script whose only argument is its report: parse ``--out`` / ``--overwrite`` from ``argv``
    (default ``sys.argv[1:]``), claim the file, and return it with the command line that produced it
    (``python eval/<script>.py ...``, for the report's header)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=description)
    add_output_arguments(parser, what)
    args = parser.parse_args(argv)
    out = claim(args.out, args.overwrite)
    return out, command_line(script, argv)


def environment_prefix(names: tuple[str, ...]) -> str:
    """``NAME=value `` for each of ``names`` set in this process's environment (shell-quoted), in
    order: the settings that change a result, for the front of the command line that reproduces it."""
    return "".join(f"{name}={shlex.quote(os.environ[name])} " for name in names if name in os.environ)


def command_line(script: str, argv: list[str] | None = None, prefix: str = "") -> str:
    """The command that produced a result, as its header names it: ``python eval/<script>.py ARGS``
    (``argv``: default ``sys.argv[1:]``; ``prefix`` e.g. an environment setting)."""
    argv = sys.argv[1:] if argv is None else argv
    return f"{prefix}python eval/{script}.py " + " ".join(shlex.quote(a) for a in argv)
