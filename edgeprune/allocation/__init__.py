"""Allocators decide how many groups each layer keeps: ``uniform``, ``global`` (FLAP AL-AM), ``saap``
(importance-fluctuation layer ratios) and ``self-pruner`` (evolutionary search of layer rates)."""
from __future__ import annotations

import importlib

from ..errors import EdgepruneError
from .base import AllocOptions, UnitCost  # noqa: F401

ALLOCATORS = {"uniform": "uniform", "global": "global_", "saap": "saap", "self-pruner": "self_pruner"}


def check_allocation(name: str) -> None:
    if name not in ALLOCATORS:
        raise EdgepruneError(f"unknown allocation '{name}'; choose one of: {', '.join(ALLOCATORS)}")


def _module(name: str):
    check_allocation(name)
    try:
        return importlib.import_module(f"{__name__}.{ALLOCATORS[name]}")
    except ModuleNotFoundError as e:
        raise EdgepruneError(f"allocation '{name}' is not available in this build ({e.name})") from None


def option_classes(name: str) -> tuple:
    """The typed ``--opt`` options (:class:`~edgeprune.typed_options.TypedOptions` classes) allocator ``name``
    reads (its module's ``OPTIONS``; none for uniform and global)."""
    return tuple(getattr(_module(name), "OPTIONS", ()))


def per_layer_ratios(name: str, groups, opts) -> list[float] | None:
    """The per-layer removal fractions of a *per-layer* allocator (known before any score: the engine prunes each
    layer as soon as it is scored), or None for an allocator that needs every layer's scores first."""
    if name not in ALLOCATORS or getattr(opts, "uniform_kv", False) or getattr(opts, "uniform_shapes", False):
        return None   # a runtime shape constraint projects the whole plan (allocation.constraints)
    mod = _module(name)
    return mod.layer_ratios(groups, opts) if hasattr(mod, "layer_ratios") else None


def allocate(name: str, scores, groups, opts, ctx=None):
    """Scores -> :class:`~edgeprune.groups.Plan` (pure in the scores: call it for many ratios on one scoring)."""
    plan = _module(name).allocate(scores, groups, opts, ctx)
    if getattr(opts, "uniform_kv", False) or getattr(opts, "uniform_shapes", False):
        from .constraints import constrain

        plan = constrain(plan, scores, groups, opts)
    plan.meta.setdefault("allocation", name)
    return plan
