"""Uniform allocation: every non-skipped layer loses the same fraction of its parameters."""
from __future__ import annotations

from ..groups import Plan
from .base import AllocOptions, per_layer_plan, uniform_layer_ratio


def layer_ratios(groups, opts: AllocOptions) -> list[float]:
    """Per-layer: every non-skipped layer's fraction follows from the shapes alone."""
    return uniform_layer_ratio(groups, opts)


def allocate(scores, groups, opts: AllocOptions, ctx=None) -> Plan:
    ratios = layer_ratios(groups, opts)
    plan = per_layer_plan(scores.attn, scores.mlp, groups, ratios, opts)
    plan.meta["layer_ratios"] = ratios
    return plan
