"""SAAP allocation: non-uniform layer ratios from an importance-fluctuation indicator (works with any method).

Verified (SAAP abstract / secondary summaries): modules are ranked to decide *which layers to prune*, guided by an
"importance fluctuation indicator"; layer ratios are non-uniform. The rule itself is ours [R]:

1. Make scores comparable across layers and modules without using their scale: per module (attention groups,
   MLP channels), over all prunable layers, ``ŝ = (s − m) / mean(s − m)`` with ``m = min(0, min s)`` (a
   non-negative score is just divided by its module mean; z-scored scores are shifted to be non-negative).
2. Per layer ℓ, with every group weighted by its parameter cost c_g: the mean ``μ_ℓ = Σ c_g ŝ_g / Σ c_g`` and
   the fluctuation ``F_ℓ = std_c(ŝ) / μ_ℓ`` (cost-weighted coefficient of variation across the layer's groups).
3. Indicator ``K_ℓ = μ_ℓ · (1 + β·F_ℓ)`` (option ``saap_beta``, default 1; 0 uses the mean alone): a layer whose
   importance is low *and* stable is redundant and is pruned more.
4. ``r_ℓ = clip(−λ·z_ℓ + t, r_min, r_max)`` with ``z_ℓ`` the z-score of ``log K_ℓ`` over the prunable layers
   (option ``saap_lambda`` = λ, default 0.1 in ratio units, like OWL's λ), and the shift ``t`` found by bisection
   so that ``Σ_ℓ r_ℓ·P_ℓ`` equals the target exactly (P_ℓ: the layer's prunable parameters, or its pool of bytes / ms
   in cost-aware mode, :class:`~edgeprune.allocation.base.UnitCost`), as
   :func:`~edgeprune.allocation.base.per_layer_plan` counts it. Bounds: ``saap_min`` (0) and ``saap_max`` (0.9).
   Layers in the skip range (``skip_first`` / ``skip_last``) stay dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import EdgepruneError
from ..groups import LayerGroups, Plan
from ..typed_options import TypedOptions, option
from .base import AllocOptions, per_layer_plan


@dataclass(frozen=True)
class Options(TypedOptions):
    """The saap allocation's ``--opt`` options (module docstring, steps 3-4)."""

    OWNER = "the saap allocation"
    saap_beta: float = option(1.0, lo=0.0, doc="weight of the fluctuation F in the indicator K")
    saap_lambda: float = option(0.1, lo=0.0, doc="spread of the layer ratios around the budget (ratio units)")
    saap_min: float = option(0.0, lo=0.0, hi=1.0, doc="least removal fraction of a prunable layer")
    saap_max: float = option(0.9, lo=0.0, hi=1.0, doc="largest removal fraction of a prunable layer")

    def __post_init__(self):
        if self.saap_min > self.saap_max:
            raise EdgepruneError(f"--opt saap_min={self.saap_min} is above saap_max={self.saap_max}; give "
                                 "0 <= saap_min <= saap_max <= 1")


OPTIONS = (Options,)


def fluctuation(attn: list[torch.Tensor], mlp: list[torch.Tensor], groups: list[LayerGroups], idx: list[int]):
    """(μ_ℓ, F_ℓ) for the layers ``idx`` (steps 1–2 of the module docstring)."""
    def norm(ts):
        cat = torch.cat([t.double().reshape(-1) for t in ts])
        m = min(0.0, float(cat.min()))
        mean = float((cat - m).mean())
        return [(t.double() - m) / (mean if mean > 0 else 1.0) for t in ts]

    na, nm = norm([attn[i] for i in idx]), norm([mlp[i] for i in idx])
    mu, fl = [], []
    for k, i in enumerate(idx):
        lg = groups[i]
        s = torch.cat([na[k], nm[k]])
        c = torch.cat([torch.full((lg.n_kv,), float(lg.attn_group_params)), torch.full((lg.n_mlp,), float(lg.mlp_group_params))]).double()
        m = float((c * s).sum() / c.sum())
        sd = float(((c * (s - m) ** 2).sum() / c.sum()).sqrt())
        mu.append(m)
        fl.append(sd / m if m > 0 else 0.0)
    return mu, fl


def fit_budget(base: list[float], weights: list[float], target: float, lo: float, hi: float) -> list[float]:
    """Shift ``t`` with ``Σ w_ℓ·clip(base_ℓ + t, lo, hi) = target`` (bisection; exact up to float precision)."""
    tot = sum(weights)
    if not (lo * tot - 1e-9 <= target <= hi * tot + 1e-9):
        raise EdgepruneError(f"the parameter target cannot be met within layer-ratio bounds [{lo}, {hi}]; widen them")
    f = lambda t: sum(w * min(max(b + t, lo), hi) for b, w in zip(base, weights)) - target
    a, b = lo - max(base) - 1, hi - min(base) + 1
    for _ in range(200):
        mid = (a + b) / 2
        if f(mid) < 0:
            a = mid
        else:
            b = mid
    return [min(max(x + (a + b) / 2, lo), hi) for x in base]


def saap_ratios(attn, mlp, groups: list[LayerGroups], opts: AllocOptions) -> tuple[list[float], dict]:
    """Per-layer removal fractions (0 for skipped layers) and the indicator values behind them."""
    idx = opts.prunable(len(groups))
    if not idx:
        raise EdgepruneError("every layer is in the skip range; lower --skip-first/--skip-last")
    o = Options.parse(opts.extra)
    beta, lam, lo, hi = o.saap_beta, o.saap_lambda, o.saap_min, o.saap_max
    mu, fl = fluctuation(attn, mlp, groups, idx)
    k = torch.tensor([max(m * (1 + beta * f), 1e-12) for m, f in zip(mu, fl)], dtype=torch.float64).log()
    z = (k - k.mean()) / (k.std() + 1e-12) if len(idx) > 1 else torch.zeros(1, dtype=torch.float64)
    opts.check_cost(len(groups))
    w = [opts.layer_cost(i, groups[i]) for i in idx]     # parameters, or bytes / ms in cost-aware mode
    r = fit_budget([-lam * float(v) for v in z], w, opts.target_removed, lo, hi)
    ratios = [0.0] * len(groups)
    for i, v in zip(idx, r):
        ratios[i] = v
    return ratios, {"indicator_mean": mu, "indicator_cv": fl, "indicator_K": k.exp().tolist(), "saap_beta": beta,
                    "saap_lambda": lam, "bounds": [lo, hi]}


def allocate(scores, groups, opts: AllocOptions, ctx=None) -> Plan:
    ratios, info = saap_ratios(scores.attn, scores.mlp, groups, opts)
    plan = per_layer_plan(scores.attn, scores.mlp, groups, ratios, opts)
    plan.meta.update({"layer_ratios": ratios, "saap": info})
    return plan
