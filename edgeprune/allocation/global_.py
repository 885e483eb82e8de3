"""Global allocation (FLAP's AL-AM): rank every KV group and MLP channel of the non-skipped layers on one scale
and remove the lowest until the parameter target is met.

Scores not already standardized by their method are z-scored per layer and module first. Each unit carries
its parameter cost, so the threshold is set on removed *parameters* (a KV group costs (2·n_rep+2)·hd·H, a
channel 3·H). Constraints: ``min_kv`` groups per layer, MLP widths rounded to ``multiple``.
"""
from __future__ import annotations

import torch

from ..groups import Plan
from .base import AllocOptions, round_mlp, topk_sorted, zscore


def allocate(scores, groups, opts: AllocOptions, ctx=None) -> Plan:
    idx = opts.prunable(len(groups))
    std = (lambda s: s.detach().double()) if scores.standardized else (lambda s: zscore(s.detach()))
    units = []  # (score, kind, layer, index)
    for i in idx:
        units += [(float(v), 0, i, j) for j, v in enumerate(std(scores.attn[i]))]
        units += [(float(v), 1, i, j) for j, v in enumerate(std(scores.mlp[i]))]
    units.sort(key=lambda u: (u[0], u[1], u[2], u[3]))
    removed_kv = {i: set() for i in range(len(groups))}
    removed_mlp = {i: set() for i in range(len(groups))}
    removed = 0.0
    for s, kind, i, j in units:
        if removed >= opts.target_removed:
            break
        lg = groups[i]
        if kind == 0:
            if lg.n_kv - len(removed_kv[i]) <= opts.min_kv:
                continue
            if removed + lg.attn_group_params - opts.target_removed > lg.attn_group_params / 2:
                continue  # would overshoot by more than half a group: let finer MLP channels close the gap
            removed_kv[i].add(j)
            removed += lg.attn_group_params
        else:
            if lg.n_mlp - len(removed_mlp[i]) <= max(opts.multiple, 1):
                continue
            removed_mlp[i].add(j)
            removed += lg.mlp_group_params
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
