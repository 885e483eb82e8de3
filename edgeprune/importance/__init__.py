"""Importance methods, one module each, registered by name (see :mod:`.base`).

Every module of this package is imported on first use (:func:`load_all`), so adding a method is adding one module
with a ``@register``-ed :class:`~.base.Method` subclass; nothing else lists the methods.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import EdgepruneError
from .base import REGISTRY, Context, Method, MethodOptions, Scores, option, register  # noqa: F401


def load_all() -> dict[str, type[Method]]:
    """Import every module of the package (each registers its methods); returns the registry."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


def method_names() -> list[str]:
    return sorted(load_all())


def get_method(name: str) -> Method:
    if name not in load_all():
        raise EdgepruneError(f"unknown method '{name}'; choose one of: {', '.join(method_names())}")
    return REGISTRY[name]()
