"""What ``vtoken methods`` prints: each method's description from its module docstring, as plain text
(no reStructuredText markup), with where it runs."""

from __future__ import annotations

import re
import sys
import textwrap

WIDTH = 100
_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])")
_TITLE = re.compile(r"^``\w+``:\s*")


def plain(text: str) -> str:
    """``text`` without reStructuredText inline markup."""
    for pattern in (_ROLE, _LITERAL, _STRONG, _EMPHASIS):
        text = pattern.sub(r"\1", text)
    return text.replace("`", "")


def paragraphs(name: str) -> list[str]:
    """The paragraphs of ``name``'s module docstring, each on one line, markup removed."""
    from vtoken.registry import get_strategy

    doc = sys.modules[get_strategy(name).__module__].__doc__ or ""
    out = [" ".join(p.split()) for p in doc.strip().split("\n\n") if p.strip()]
    if out:
        out[0] = _TITLE.sub("", out[0])
    return [plain(p) for p in out]


def first_sentences(text: str, limit: int = 400) -> str:
    """Whole sentences of ``text`` up to about ``limit`` characters (at least one)."""
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", text)
    out = sentences[0]
    for sentence in sentences[1:]:
        if len(out) + 1 + len(sentence) > limit:
            break
        out += " " + sentence
    return out


def _families(method: dict) -> list[str]:
    runs = [family for family, verdict in method["families"].items() if verdict == "runs"]
    lines = [f"runs on: {', '.join(runs) if runs else 'no family yet'}"]
    why: dict[str, list[str]] = {}
    for family, verdict in method["families"].items():
        if verdict != "runs":
            why.setdefault(verdict, []).append(family)
    lines += [f"not on {', '.join(families)}: {verdict}" for verdict, families in why.items()]
    limits: dict[str, list[str]] = {}
    for family, limit in method.get("limits", {}).items():
        limits.setdefault(limit, []).append(family)
    lines += [f"on {', '.join(families)}: {limit}" for limit, families in limits.items()]
    return lines


def summary_lines() -> list[str]:
    """Every method: its paper, what it does (whole sentences), sites, default budget, families."""
    import vtoken

    lines = []
    for method in vtoken.methods():
        if method["name"].startswith("_"):  # internal strategies (tests, benchmarks) are not methods
            continue
        parts = paragraphs(method["name"])
        body = [parts[0]] + ([first_sentences(parts[1])] if len(parts) > 1 else [])
        facts = (f"sites: {', '.join(method['sites'])}; default keep: {method['default_keep']:.3g}"
                 + ("; needs trained weights" if method["trained"] else "")
                 + ("; needs the benchmark's annotations" if method["needs_annotations"] else ""))
        lines.append(method["name"])
        for text in [*body, facts, *_families(method)]:
            lines += textwrap.wrap(text, WIDTH, initial_indent="    ", subsequent_indent="      ",
                                   break_on_hyphens=False)
        lines.append("")
    lines.append("vtoken methods NAME prints one method's whole description and options.")
    return lines


def describe(name: str) -> str:
    """One method's whole description, its options with their defaults, and where it runs."""
    import vtoken

    method = next((m for m in vtoken.methods() if m["name"] == name), None)
    if method is None:
        from vtoken.registry import get_strategy

        get_strategy(name)  # raises: unknown method, with the known ones
    lines = [name, ""]
    for text in paragraphs(name):
        lines += textwrap.wrap(text, WIDTH, break_on_hyphens=False) + [""]
    lines.append("options (defaults):")
    lines += [f"    {key} = {value!r}" for key, value in method["options"].items()]
    lines.append("")
    lines += _families(method)
    return "\n".join(lines)
