"""Importance methods, one module each, registered by name (see :mod:`.base`)."""
from .base import REGISTRY, Context, Method, Scores, get_method, register  # noqa: F401


def _load_all():
    import importlib

    for mod in ("baselines", "saap", "mini_llm", "bip", "obs"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise

