"""Runtime shape constraints applied to any allocator's plan: ``uniform_kv`` (the same number of KV groups in every
layer, MLP widths free: what optimum's ONNX runtime needs) and ``uniform_shapes`` (every layer the same shape: what
stock ``from_pretrained``, llama.cpp's ``llama`` architecture and most model builders need).

Projection (a documented choice, not from a paper): given the allocator's plan with per-layer kept KV counts
``k_i`` and MLP widths ``m_i``,

* KV: every layer keeps ``k = round(mean_i k_i)`` groups (at least ``min_kv``, at most the smallest layer's
  ``n_kv``), its ``k`` top-scored ones. The allocator's per-layer parameter budget is kept by moving the difference
  into the MLP: ``m_i' = m_i + (k_i - k) * c_attn / c_mlp`` (unit costs in the allocation's pool: parameters,
  or bytes / ms in cost-aware mode) (then rounded to ``multiple`` and clamped to
  ``[multiple, n_mlp]``), keeping the top-scored channels. The total ratio therefore stays that of the allocator up
  to rounding; the skip range applies to the MLP only (a dense first layer would break the constraint).
* ``uniform_shapes``: additionally every layer keeps ``m = round(mean_i m_i')`` MLP channels (rounded to
  ``multiple``, at most the smallest ``n_mlp``).

Ties break by index (see :func:`~edgeprune.allocation.base.topk_sorted`), so the result is deterministic.
"""
from __future__ import annotations

from ..groups import Plan
from .base import round_mlp, topk_sorted


def constrain(plan: Plan, scores, groups, opts) -> Plan:
    """``plan`` projected onto the runtime constraints named in ``opts`` (unchanged when none is set)."""
    if not (opts.uniform_kv or opts.uniform_shapes):
        return plan
    kv_n = [len(k) for k in plan.keep_kv]
    k = max(opts.min_kv, round(sum(kv_n) / len(kv_n)))
    k = min(k, min(lg.n_kv for lg in groups))
    mult = max(opts.multiple, 1)
    widths = []
    for i, (lg, kn, keep) in enumerate(zip(groups, kv_n, plan.keep_mlp)):
        c_kv, c_mlp = opts.unit_cost(i, lg)      # parameters, or the cost vector's bytes / ms
        extra = (kn - k) * c_kv / c_mlp
        widths.append(min(lg.n_mlp, round_mlp(int(round(len(keep) + extra)), lg.n_mlp, mult)))
    if opts.uniform_shapes:
        m = round_mlp(int(round(sum(widths) / len(widths))), min(lg.n_mlp for lg in groups), mult)
        widths = [min(m, lg.n_mlp) for lg in groups]
    keep_kv = [topk_sorted(scores.attn[i], k) for i in range(len(groups))]
    keep_mlp = [list(plan.keep_mlp[i]) if w == len(plan.keep_mlp[i]) else topk_sorted(scores.mlp[i], w)
                for i, w in enumerate(widths)]
    meta = dict(plan.meta, runtime_constraint="uniform_shapes" if opts.uniform_shapes else "uniform_kv")
    return Plan(keep_kv, keep_mlp, meta)
