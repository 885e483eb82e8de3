"""Allocators: turn group scores into a :class:`~edgeprune.groups.Plan` that removes ``ratio`` of the model's
**non-embedding parameters** (``prune --ratio``), or, cost-aware, ``ratio`` of a **cost pool** (:class:`UnitCost`:
bytes on the device, weights + KV cache, or predicted decode ms) when a plan is fitted to a budget.

Cost-aware mode (``AllocOptions.cost``): every KV group of layer i costs ``cost.kv[i]`` and every MLP channel
``cost.mlp[i]`` instead of their parameters; the target is ``ratio * cost.total`` (the dense layers' pool,
``Σ_i n_kv_i·kv[i] + n_mlp_i·mlp[i]``). With ``cost=None`` the unit costs are the parameters a group owns, so
every allocator behaves exactly as in parameter mode.

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


@dataclass(frozen=True)
class UnitCost:
    """What removing one unit frees, per layer, in the budget's unit: ``kv[i]`` one KV group of layer i (its
    weights and, for memory, its KV cache at the profile's context), ``mlp[i]`` one MLP channel (its weights).
    ``total`` is the dense layers' pool (the ratio's denominator); ``unit`` 'bytes' or 'ms'; ``basis`` says how
    the figures were computed (:func:`edgeprune.planner.costs.unit_cost`)."""

    kv: tuple[float, ...]
    mlp: tuple[float, ...]
    total: float
    unit: str = "bytes"
    basis: str = ""

    def to_dict(self) -> dict:
        return {"kv": list(self.kv), "mlp": list(self.mlp), "total": self.total, "unit": self.unit,
                "basis": self.basis}

    @classmethod
    def from_dict(cls, d: dict | None) -> "UnitCost | None":
        if not d:
            return None
        return cls(tuple(float(x) for x in d["kv"]), tuple(float(x) for x in d["mlp"]), float(d["total"]),
                   str(d.get("unit", "bytes")), str(d.get("basis", "")))


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
    cost: UnitCost | None = None       # cost-aware mode (module doc); None: parameters

    def prunable(self, n_layers: int) -> list[int]:
        return [i for i in range(n_layers) if self.skip_first <= i < n_layers - self.skip_last]

    @property
    def target_removed(self) -> float:
        """The amount to remove: ``ratio`` of the non-embedding parameters, or of the cost pool."""
        return self.ratio * (self.cost.total if self.cost is not None else self.nonemb_params)

    def unit_cost(self, i: int, lg: LayerGroups) -> tuple[float, float]:
        """(one KV group, one MLP channel) of layer i: the cost vector's, else the parameters each owns."""
        if self.cost is None:
            return float(lg.attn_group_params), float(lg.mlp_group_params)
        return self.cost.kv[i], self.cost.mlp[i]

    def layer_cost(self, i: int, lg: LayerGroups) -> float:
        """Layer i's prunable pool: ``n_kv·c_kv + n_mlp·c_mlp``."""
        c_kv, c_mlp = self.unit_cost(i, lg)
        return lg.n_kv * c_kv + lg.n_mlp * c_mlp

    def check_cost(self, n_layers: int) -> None:
        if self.cost is not None and not (len(self.cost.kv) == len(self.cost.mlp) == n_layers):
            raise EdgepruneError(f"the cost vector has {len(self.cost.kv)} layers, the model {n_layers}; "
                                 "compute it from this model's shapes")


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
    """Remove fraction ``layer_ratios[i]`` of layer i's prunable pool (parameters, or the cost vector's bytes /
    ms), keeping its top-scored groups.

    KV groups removed: ``round(r·n_kv)`` (at most ``n_kv − min_kv``); MLP channels then make up the rest of the
    layer's target, ``round((r·P_i − n_kv_removed·c_attn) / c_mlp)`` with ``P_i``, ``c_attn``, ``c_mlp`` in the
    pool's unit (:meth:`AllocOptions.unit_cost`).
    """
    opts.check_cost(len(groups))
    keep_kv, keep_mlp = [], []
    for i, (lg, a, m, r) in enumerate(zip(groups, attn, mlp, layer_ratios)):
        r = min(max(float(r), 0.0), 1.0)
        c_kv, c_mlp = opts.unit_cost(i, lg)
        p_layer = opts.layer_cost(i, lg)
        kv_rm = min(int(round(r * lg.n_kv)), max(lg.n_kv - opts.min_kv, 0))
        mlp_rm = int(round((r * p_layer - kv_rm * c_kv) / c_mlp))
        mlp_rm = min(max(mlp_rm, 0), lg.n_mlp)
        n_mlp = round_mlp(lg.n_mlp - mlp_rm, lg.n_mlp, opts.multiple) if r > 0 else lg.n_mlp
        keep_kv.append(topk_sorted(a, lg.n_kv - kv_rm))
        keep_mlp.append(topk_sorted(m, n_mlp))
    return Plan(keep_kv, keep_mlp)


def uniform_layer_ratio(groups: list[LayerGroups], opts: AllocOptions) -> list[float]:
    """The single per-layer fraction that removes the target over the non-skipped layers (in the pool's unit)."""
    idx = opts.prunable(len(groups))
    if not idx:
        raise EdgepruneError("every layer is in the skip range; lower --skip-first/--skip-last")
    opts.check_cost(len(groups))
    pool = sum(opts.layer_cost(i, groups[i]) for i in idx)
    r = opts.target_removed / pool
    if r >= 1.0:
        what = "parameters" if opts.cost is None else opts.cost.unit
        raise EdgepruneError(f"ratio {opts.ratio} needs {r:.0%} of the prunable layers' {what}; lower --ratio or "
                             "the skipped layer range")
    return [r if i in idx else 0.0 for i in range(len(groups))]


def zscore(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return (s - s.mean()) / (s.std() + 1e-12) if s.numel() > 1 else torch.zeros_like(s)
