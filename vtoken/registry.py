"""The strategy registry: one place that maps a method name to its implementation.

Strategies register themselves with ``@register``; a second registration under a taken name is refused,
so two files cannot silently claim the same method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from vtoken.strategies.base import Strategy

_STRATEGIES: dict[str, type["Strategy"]] = {}


def register(cls: type["Strategy"]) -> type["Strategy"]:
    """Class decorator: add a strategy under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    if name in _STRATEGIES and _STRATEGIES[name] is not cls:
        raise ValueError(f"a strategy named {name!r} is already registered ({_STRATEGIES[name].__qualname__})")
    _STRATEGIES[name] = cls
    return cls


def get_strategy(name: str) -> type["Strategy"]:
    """The strategy class registered as ``name``; an unknown name raises and lists the known ones."""
    _load_builtin_strategies()
    if not isinstance(name, str):
        raise ValueError(f"a method is named by a string, got {type(name).__name__} {name!r:.80}; known methods: "
                         f"{', '.join(sorted(_STRATEGIES))}")
    try:
        return _STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(_STRATEGIES))
        raise ValueError(f"unknown method {name!r}; known methods: {known}") from None


def strategy_names() -> list[str]:
    _load_builtin_strategies()
    return sorted(_STRATEGIES)


def _load_builtin_strategies() -> None:
    # Importing the package imports every strategy module, each of which registers itself.
    import vtoken.strategies  # noqa: F401
