"""Allocators decide how many groups each layer keeps: ``uniform``, ``global`` (FLAP AL-AM), ``saap``
(importance-fluctuation layer ratios) and ``self-pruner`` (evolutionary search of layer rates)."""
from __future__ import annotations

import importlib

from ..errors import EdgepruneError
from .base import AllocOptions  # noqa: F401

ALLOCATORS = {"uniform": "uniform", "global": "global_", "saap": "saap", "self-pruner": "self_pruner"}


def allocate(name: str, scores, groups, opts, ctx=None):
    if name not in ALLOCATORS:
        raise EdgepruneError(f"unknown allocation '{name}'; choose one of: {', '.join(ALLOCATORS)}")
    try:
        mod = importlib.import_module(f"{__name__}.{ALLOCATORS[name]}")
    except ModuleNotFoundError as e:
        raise EdgepruneError(f"allocation '{name}' is not available in this build ({e.name})") from None
    plan = mod.allocate(scores, groups, opts, ctx)
    if getattr(opts, "uniform_kv", False) or getattr(opts, "uniform_shapes", False):
        from .constraints import constrain

        plan = constrain(plan, scores, groups, opts)
    plan.meta.setdefault("allocation", name)
    return plan
