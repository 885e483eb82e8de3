"""Global allocation (FLAP's AL-AM): rank every KV group and MLP channel of the non-skipped layers on one scale
and remove the lowest until the parameter target is met.

Scores not already standardized by their method are z-scored per layer and module first. Each unit carries
its parameter cost, so the threshold is set on removed *parameters* (a KV group costs (2·n_rep+2)·hd·H, a
channel 3·H). Constraints: ``min_kv`` groups per layer, MLP widths rounded to ``multiple``.

**Cost-aware** (``opts.cost``, :class:`~edgeprune.allocation.base.UnitCost`): units are removed in increasing order
of quality lost per unit of cost, ``key = (s − m) · p_u / c_u`` with ``s`` the (standardized) score, ``m =
min(0, min s)`` over the prunable units (so keys are >= 0 and a lower score stays a lower key), ``p_u`` the
parameters the unit owns and ``c_u`` its cost (bytes with the KV cache, or predicted ms); the threshold is set on
the removed cost. Standardized scores are per parameter (OBS: removal cost / parameters), so the key is the
estimated loss per byte (per ms); for z-scored scores it is the same rescaling [R: the rule is ours]. With
``c_u = p_u`` (parameter mode) the order is that of ``s``: parameter mode is the special case.
"""
from __future__ import annotations

import torch

from ..groups import Plan
from .base import AllocOptions, round_mlp, topk_sorted, zscore


def ranked_units(scores, groups, opts: AllocOptions, std) -> list[tuple[float, int, int, int]]:
    """(key, kind, layer, index) of every prunable unit, least important first (kind 0: KV group, 1: channel);
    the key is the score, or in cost-aware mode the score per unit of cost (module doc)."""
    units = []
    for i in opts.prunable(len(groups)):
        units += [(float(v), 0, i, j) for j, v in enumerate(std(scores.attn[i]))]
        units += [(float(v), 1, i, j) for j, v in enumerate(std(scores.mlp[i]))]
    if opts.cost is not None and units:
        m = min(0.0, min(u[0] for u in units))
        scale = {}
        for i in opts.prunable(len(groups)):
            lg, (c_kv, c_mlp) = groups[i], opts.unit_cost(i, groups[i])
            scale[(0, i)], scale[(1, i)] = lg.attn_group_params / c_kv, lg.mlp_group_params / c_mlp
        units = [((s - m) * scale[(kind, i)], kind, i, j) for s, kind, i, j in units]
    units.sort(key=lambda u: (u[0], u[1], u[2], u[3]))
    return units


def allocate(scores, groups, opts: AllocOptions, ctx=None) -> Plan:
    std = (lambda s: s.detach().double()) if scores.standardized else (lambda s: zscore(s.detach()))
    opts.check_cost(len(groups))
    units = ranked_units(scores, groups, opts, std)
    removed_kv = {i: set() for i in range(len(groups))}
    removed_mlp = {i: set() for i in range(len(groups))}
    removed = 0.0
    for _, kind, i, j in units:
        if removed >= opts.target_removed:
            break
        lg = groups[i]
        c_kv, c_mlp = opts.unit_cost(i, lg)
        if kind == 0:
            if lg.n_kv - len(removed_kv[i]) <= opts.min_kv:
                continue
            if removed + c_kv - opts.target_removed > c_kv / 2:
                continue  # would overshoot by more than half a group: let finer MLP channels close the gap
            removed_kv[i].add(j)
            removed += c_kv
        else:
            if lg.n_mlp - len(removed_mlp[i]) <= max(opts.multiple, 1):
                continue
            removed_mlp[i].add(j)
            removed += c_mlp
    keep_kv, keep_mlp, ratios = [], [], []
    for i, lg in enumerate(groups):
        keep_kv.append([j for j in range(lg.n_kv) if j not in removed_kv[i]])
        n = lg.n_mlp - len(removed_mlp[i])
        if removed_mlp[i]:
            n = round_mlp(n, lg.n_mlp, opts.multiple)
        keep_mlp.append(topk_sorted(std(scores.mlp[i]), n) if n != lg.n_mlp - len(removed_mlp[i])
                        else [j for j in range(lg.n_mlp) if j not in removed_mlp[i]])
        p = lg.n_kv * lg.attn_group_params + lg.n_mlp * lg.mlp_group_params
        ratios.append(1 - (len(keep_kv[-1]) * lg.attn_group_params + len(keep_mlp[-1]) * lg.mlp_group_params) / p)
    return Plan(keep_kv, keep_mlp, {"layer_ratios": ratios})
