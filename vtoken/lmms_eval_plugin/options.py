"""Split lmms-eval's ``--model_args`` into what loads the model and what configures the method.

lmms-eval hands every ``key=value`` of ``--model_args`` to the model's constructor, already converted
by ``lmms_eval.utils.handle_arg_string`` (``true`` -> True, ``64`` -> 64, ``0.25`` -> 0.25, anything
else a string). The plug-in keeps a fixed set of loading arguments (``LOADING_ARGS``) and passes every
other one to ``vtoken.wrap`` as an option of the method, so any option a method has works from the
command line (``keep_tokens=64``, ``layer=2``, ``site=projector``, ``stages='[...]'``).

One default differs from ``vtoken.wrap``: ``text_only="passthrough"`` (a method option every method has),
so a benchmark question without an image runs unpruned instead of stopping the whole evaluation;
``text_only=error`` restores vtoken's default.

Everything is checked here, before any weights are read: a typo in a 7B run should fail in a second,
with one line that names the problem and the fix, not after minutes of loading.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

# Arguments the plug-in itself reads (everything else is a method option). ``batch_size``,
# ``max_batch_size`` and ``device`` also arrive from lmms-eval's own --batch_size / --device flags.
DTYPES = ("auto", "bfloat16", "float16", "float32")
LOADING_ARGS = (
    "pretrained", "method", "config", "revision", "dtype", "device", "device_map", "attn_implementation",
    "trust_remote_code", "batch_size", "max_batch_size", "chat_template", "min_pixels", "max_pixels",
    "max_new_tokens", "use_cache",
)
UNPRUNED = ("none", "unpruned")  # method=none: the same plug-in, the model left as it is (the baseline row)
BUDGETS = ("keep", "keep_tokens")


class ModelArgsError(ValueError):
    """A bad ``--model_args`` entry; the message is one line naming the problem and the fix."""


@dataclass
class PluginArgs:
    """What ``--model_args`` asked for, checked: the method (``None`` = unpruned) and its options."""

    pretrained: str
    method: str | None
    options: dict[str, Any] = field(default_factory=dict)
    config: str | None = None  # a directory or file written by vtoken.save_config

    def describe(self) -> str:
        if self.config is not None:
            return f"vtoken config {self.config}"
        if self.method is None:
            return "unpruned"
        return self.method + "".join(f",{k}={v}" for k, v in sorted(self.options.items()))


def _literal(value: Any) -> Any:
    """A string that spells a Python literal (``[7, 9]``, ``(16, 1)``, ``None``) becomes that value;
    any other string (``projector``, ``1/9``) stays a string."""
    if not isinstance(value, str):
        return value
    try:
        read = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return value
    # stages='[...]' as the shell or a config file may leave its quotes on: the literal inside them
    return _literal(read) if isinstance(read, str) and read.strip() != value.strip() else read


def _budget(name: str, value: Any) -> Any:
    """``keep=1/9`` arrives as the string ``"1/9"``: read fractions here so the command line can say it."""
    if not isinstance(value, str):
        return value
    try:
        number = Fraction(value.strip())
    except (ValueError, ZeroDivisionError):
        raise ModelArgsError(
            f"vtoken --model_args: {name}={value!r} is not a number; write keep=0.25 or keep=1/9 (a fraction of "
            "each image's visual tokens) or keep_tokens=64 (a count)"
        ) from None
    if name == "keep_tokens":
        if number.denominator != 1:
            raise ModelArgsError(f"vtoken --model_args: keep_tokens={value!r} must be a whole count; "
                                 "use keep= for a fraction")
        return int(number)
    return float(number)


def parse(pretrained: Any, method: Any, config: Any, extra: dict[str, Any]) -> PluginArgs:
    """Check the method and its options against vtoken's registry without touching a model."""
    from vtoken.registry import get_strategy, strategy_names

    if not pretrained:
        raise ModelArgsError("vtoken --model_args: pretrained= is missing; give a model directory or hub id, "
                             "e.g. pretrained=llava-hf/llava-1.5-7b-hf")
    known = strategy_names()
    if config is not None:
        if method is not None or extra:
            raise ModelArgsError("vtoken --model_args: config= already names the method and its options; "
                                 "drop method= and the method options, or drop config=")
        import vtoken

        try:  # read now: a missing or broken config stops the run before any weights load
            saved = vtoken.load(str(config))
        except (ValueError, TypeError, OSError) as err:
            raise ModelArgsError(f"vtoken --model_args: config={config!r}: {err}") from None
        _refuse_annotated(saved.method)
        return PluginArgs(str(pretrained), None, {}, str(config))
    if method is None:
        raise ModelArgsError(f"vtoken --model_args: method= is missing; use one of {', '.join(known)} "
                             "(or method=none for the unpruned model)")
    name = str(method).strip().lower()
    if name in UNPRUNED:
        if extra:
            raise ModelArgsError(f"vtoken --model_args: method=none takes no method options, got "
                                 f"{', '.join(sorted(extra))}; drop them or name a method")
        return PluginArgs(str(pretrained), None, {})
    if name not in known:
        raise ModelArgsError(f"vtoken --model_args: unknown method {method!r}; use one of {', '.join(known)} "
                             "(or method=none for the unpruned model)")
    _refuse_annotated(name)
    config_cls = get_strategy(name).Config
    from vtoken.config import option_defaults

    allowed = option_defaults(config_cls)
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        raise ModelArgsError(
            f"vtoken --model_args: unknown argument(s) {', '.join(unknown)} for method {name!r}; its options are "
            f"{', '.join(sorted(allowed))}, and the plug-in's own are {', '.join(LOADING_ARGS)}"
        )
    options = {k: (_budget(k, v) if k in BUDGETS else _literal(v)) for k, v in extra.items()}
    if "text_only" in allowed:  # a benchmark's text-only question runs unpruned instead of stopping the run
        options.setdefault("text_only", "passthrough")
    try:  # the method's own validation (budget ranges, sites, layers), still without a model
        config_cls.from_options(**options)
    except (ValueError, TypeError) as err:
        raise ModelArgsError(f"vtoken --model_args: {err}") from None
    return PluginArgs(str(pretrained), name, options)


def _refuse_annotated(method: str) -> None:
    """A method that reads per-input annotations (the benchmark's oracle, its relevant patches) cannot
    run under lmms-eval, which annotates nothing: every request would fail after the model loaded."""
    from vtoken import signals
    from vtoken.registry import get_strategy

    if signals.ANNOTATIONS in get_strategy(method).reads:
        raise ModelArgsError(f"vtoken --model_args: {method} reads per-input annotations (vtoken.annotate) that "
                             "lmms-eval does not give; use a method that needs none (vtoken methods)")


def whole_number(name: str, value: Any, least: int = 1) -> int:
    """A count from ``--model_args`` (``max_new_tokens=64``), refused in one line unless it is one."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise ModelArgsError(f"vtoken --model_args: {name}={value!r} is not a whole number; e.g. {name}=64")
    number = int(value)
    if number < least:
        raise ModelArgsError(f"vtoken --model_args: {name}={number} must be at least {least}")
    return number


def switch(name: str, value: Any) -> bool:
    """A true/false ``--model_args`` entry (lmms-eval turns ``true`` / ``false`` into bools already)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ModelArgsError(f"vtoken --model_args: {name}={value!r} is not true or false; e.g. {name}=false")


def dtype_of(value: Any):
    """``dtype=auto`` (the checkpoint's), ``bfloat16``, ``float16`` or ``float32``."""
    import torch

    name = str(value or "auto")
    if name not in DTYPES:
        raise ModelArgsError(f"vtoken --model_args: dtype={value!r} is not one of {', '.join(DTYPES)}; e.g. dtype=bfloat16")
    return "auto" if name == "auto" else getattr(torch, name)


def batch_size_of(value: Any) -> int:
    """lmms-eval's ``--batch_size`` is a string (``"1"``, ``"auto"``); this plug-in takes a whole number."""
    if isinstance(value, str) and value.strip().startswith("auto"):
        raise ModelArgsError("vtoken: --batch_size auto is not supported; give a number, e.g. --batch_size 8")
    if isinstance(value, float) and not value.is_integer():  # (int(2.5) would be 2, silently)
        raise ModelArgsError(f"vtoken: batch_size={value!r} is not a whole number; e.g. --batch_size 8")
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ModelArgsError(f"vtoken: batch_size={value!r} is not a whole number; e.g. --batch_size 8") from None
    if size < 1:
        raise ModelArgsError(f"vtoken: batch_size={size} must be at least 1")
    return size
