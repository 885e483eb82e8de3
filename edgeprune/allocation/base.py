"""Allocators: turn group scores into a :class:`~edgeprune.groups.Plan` that removes ``ratio`` of the model's
**non-embedding parameters**.

Common constraints (:class:`AllocOptions`): layers in the skip range stay dense; each layer keeps at least
``min_kv`` KV groups (default 1: never an attention-free layer unless asked); each layer's kept MLP width is
rounded to a multiple of ``multiple`` (default 1; 256 suits llama.cpp K-quants) and kept >= ``multiple``.
Ties are broken by index, so the same scores always give the same plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import EdgepruneError
from ..groups import LayerGroups, Plan


@dataclass
class AllocOptions:
    ratio: float
    nonemb_params: int                 # denominator of the ratio: all parameters outside embeddings/head
    skip_first: int = 0
    skip_last: int = 0
    min_kv: int = 1
    multiple: int = 1
    extra: dict = field(default_factory=dict)
    uniform_kv: bool = False           # runtime constraint: same KV groups in every layer (see .constraints)
    uniform_shapes: bool = False       # runtime constraint: every layer the same shape

    def prunable(self, n_layers: int) -> list[int]:
        return [i for i in range(n_layers) if self.skip_first <= i < n_layers - self.skip_last]

    @property
    def target_removed(self) -> float:
        return self.ratio * self.nonemb_params


def topk_sorted(score: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores (ties → lower index), returned in ascending index order."""
    k = max(0, min(k, score.numel()))
    vals = score.detach().double().tolist()
    order = sorted(range(len(vals)), key=lambda j: (-vals[j], j))
    return sorted(order[:k])


def round_mlp(n_keep: int, n_total: int, multiple: int, allow_zero: bool = False) -> int:
    if multiple <= 1:
        return max(n_keep, 0 if allow_zero else 1)
    r = int(round(n_keep / multiple)) * multiple
    lo = 0 if allow_zero else min(multiple, n_total)
    return max(lo, min(r, n_total if n_total % multiple == 0 else (n_total // multiple) * multiple or n_total))


def per_layer_plan(attn: list[torch.Tensor], mlp: list[torch.Tensor], groups: list[LayerGroups],
                   layer_ratios: list[float], opts: AllocOptions) -> Plan:
    """Remove fraction ``layer_ratios[i]`` of layer i's prunable parameters, keeping its top-scored groups.

    KV groups removed: ``round(r·n_kv)`` (at most ``n_kv − min_kv``); MLP channels then make up the rest of the
    layer's parameter target, ``round((r·P_i − n_kv_removed·c_attn) / c_mlp)``.
    """
    keep_kv, keep_mlp = [], []
    for lg, a, m, r in zip(groups, attn, mlp, layer_ratios):
        r = min(max(float(r), 0.0), 1.0)
        p_layer = lg.n_kv * lg.attn_group_params + lg.n_mlp * lg.mlp_group_params
        kv_rm = min(int(round(r * lg.n_kv)), max(lg.n_kv - opts.min_kv, 0))
        mlp_rm = int(round((r * p_layer - kv_rm * lg.attn_group_params) / lg.mlp_group_params))
        mlp_rm = min(max(mlp_rm, 0), lg.n_mlp)
        n_mlp = round_mlp(lg.n_mlp - mlp_rm, lg.n_mlp, opts.multiple) if r > 0 else lg.n_mlp
        keep_kv.append(topk_sorted(a, lg.n_kv - kv_rm))
        keep_mlp.append(topk_sorted(m, n_mlp))
    return Plan(keep_kv, keep_mlp)


def uniform_layer_ratio(groups: list[LayerGroups], opts: AllocOptions) -> list[float]:
    """The single per-layer fraction that removes the target over the non-skipped layers."""
    idx = opts.prunable(len(groups))
    if not idx:
        raise EdgepruneError("every layer is in the skip range; lower --skip-first/--skip-last")
    pool = sum(groups[i].n_kv * groups[i].attn_group_params + groups[i].n_mlp * groups[i].mlp_group_params for i in idx)
    r = opts.target_removed / pool
    if r >= 1.0:
        raise EdgepruneError(f"ratio {opts.ratio} needs {r:.0%} of the prunable layers' parameters; lower --ratio or "
                             "the skipped layer range")
    return [r if i in idx else 0.0 for i in range(len(groups))]


def zscore(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return (s - s.mean()) / (s.std() + 1e-12) if s.numel() > 1 else torch.zeros_like(s)
