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
    other = _STRATEGIES.get(name)
    if other is not None and other is not cls and not _redefined(other, cls):
        raise ValueError(f"a strategy named {name!r} is already registered ({other.__qualname__})")
    config = getattr(cls, "Config", None)
    method = getattr(config, "method", None)
    if config is not None and method != name:
        # wrap builds the strategy that Config.method names: a config class inherited from another
        # method's (FastVConfig) would silently run that method instead of this one.
        raise ValueError(f"strategy {name!r} has the config class {config.__name__}, whose method is {method!r}; give it "
                         f"`method = {name!r}` (a config dataclass of its own, subclassing {config.__name__} if you like)")
    _STRATEGIES[name] = cls
    return cls


def _redefined(old: type, new: type) -> bool:
    """The same class defined again outside vtoken (a notebook cell run twice, a module reloaded): the
    new definition replaces the old. A built-in method's name is never taken."""
    return (old.__module__ == new.__module__ and old.__qualname__ == new.__qualname__
            and not old.__module__.startswith("vtoken."))


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
