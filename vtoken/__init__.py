"""vtoken: prune and merge the visual tokens of vision-language models.

    import vtoken
    vtoken.wrap(model, "fastv", keep=0.25)     # in place
    out = model.generate(**inputs)
    vtoken.selection(model)                     # what each stage kept
    vtoken.unwrap(model)                        # exactly the original again
"""

# The public names load on first use (PEP 562), so ``import vtoken.cli`` (``vtoken --help``) does not
# import torch and transformers; ``from vtoken import wrap`` and ``vtoken.wrap`` work as usual.
_LAZY = {
    **dict.fromkeys(
        ("annotate", "config_of", "diagnostics", "is_wrapped", "load", "methods", "pruned", "save_config",
         "schedule_of", "selection", "strategy_of", "unwrap", "wrap"),
        "vtoken.api",
    ),
    **dict.fromkeys(("FlopsReport", "flops", "kv_cache_bytes"), "vtoken.accounting"),
    **dict.fromkeys(("PruneConfig", "StageSpec"), "vtoken.config"),
    **dict.fromkeys(("Schedule", "ScoringCost", "Stage"), "vtoken.schedule"),
    "tune": "vtoken.tuning",
}


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # ``vtoken.accounting`` after ``import vtoken``
    raise AttributeError(f"module 'vtoken' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"


def show(model, image, path, sample: int = 0, image_in_sample: int = 0):
    """Draw the visual tokens of ``sample``'s image (its ``image_in_sample``-th, for a prompt of several)
    that survived the last forward over ``image`` and save a PNG at ``path``."""
    from vtoken.drawing import show as _show

    return _show(model, image, path, sample=sample, image_in_sample=image_in_sample)


def train_projector(model, data, **options):
    """Train a TokenPacker projector for ``model`` (see :func:`vtoken.packer_training.train_projector`)."""
    from vtoken.packer_training import train_projector as _train

    return _train(model, data, **options)


__all__ = [
    "wrap", "unwrap", "pruned", "methods", "selection", "show", "save_config", "load", "config_of",
    "strategy_of", "is_wrapped", "schedule_of", "flops", "kv_cache_bytes", "FlopsReport", "PruneConfig", "StageSpec", "Schedule", "ScoringCost", "Stage",
]
__all__ += ["train_projector", "annotate", "diagnostics"]
__all__ += ["tune"]
