"""Pruning strategies, one module per method. Every module in this package is imported (and so
registered) when the package is, so adding a method means adding one file here plus its tests."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
