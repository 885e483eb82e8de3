"""Cost vectors for cost-aware allocation: what one KV group and one MLP channel of each layer cost against the
budget that binds (issue #14, item 2).

**Binding budget** of a quant on a profile (:func:`binding_budget`): the first the dense model is predicted to miss
in the order memory (with the KV cache at the profile's context), decode latency (at the full context), prefill;
``max_memory_mb`` when it meets every budget (then no pruning is needed anyway). Memory comes first when it is
missed, whatever the speed figures say, because it does not depend on the machine's load: a host calibration
measured on a busy machine must not change which units the allocator removes (issue #14: stable plans).

**Unit costs** (:func:`unit_cost`), per layer ``i``:

* memory — bytes on the runtime (:func:`~.tensor_bytes.group_bytes`): a KV group's q/k/v/o tensors at their runtime
  types *plus* its KV cache at the profile's context (``2 * head_dim * C * elem``, ``C`` padded as the runtime
  allocates it); an MLP channel its gate/up/down rows;
* decode latency — predicted ms per token (:func:`~.prediction.decode_terms_s`, the formula
  :func:`~.prediction.predict` uses): the group's weight bytes and its KV read at the full context over the
  bandwidth, plus its query heads' attention compute; a channel its weight bytes over the bandwidth;
* prefill — ``None``: prefill time is dominated by the matmul flops, ``2 * params`` per token, so parameters are
  the right cost (parameter mode).

The allocator then removes what costs least quality per byte (per ms) and meets ``ratio * total`` of the cost pool
(:class:`~edgeprune.allocation.base.UnitCost`); the planner bisects that ratio and prices the real shapes with
:func:`~.prediction.predict`.
"""
from __future__ import annotations

from ..allocation.base import UnitCost
from .judge import judge
from .prediction import attention_flops, decode_terms_s, kv_read_bytes, predict
from .shapes import ModelShape
from .tensor_bytes import group_bytes, kv_elem_bytes, layer_module_bytes

BUDGETS = ("max_memory_mb", "max_decode_ms_per_token", "min_prefill_tps")


def binding_budget(ms: ModelShape, quant: str, profile) -> str:
    """The first budget of :data:`BUDGETS` the dense model misses (``max_memory_mb`` if none; module doc)."""
    p = predict(ms, quant, profile)
    vals = {"peak_rss_mb": p.peak_rss_mb, "decode_ms": p.decode_ms, "prefill_tps": p.prefill_tps}
    v = judge(vals, profile, basis="projected")
    return next((k for k in BUDGETS if k in v and not v[k].ok), "max_memory_mb")


def memory_cost(ms: ModelShape, quant: str, profile) -> UnitCost:
    kv, mlp = group_bytes(ms, quant, profile.runtime, profile.context_length)
    return _pool(ms, kv, mlp, "bytes", f"{quant} on {profile.runtime}: weights + KV cache at "
                                       f"{profile.context_length} tokens")


def latency_cost(ms: ModelShape, quant: str, profile) -> UnitCost:
    rt, pos = profile.runtime, profile.context_length
    attn, mlp_b = layer_module_bytes(ms, quant, rt)
    elem = kv_elem_bytes(quant, rt)
    kv, mlp = [], []
    for a, m, s in zip(attn, mlp_b, ms.layers):
        n_rep = s.num_attention_heads // s.num_key_value_heads if s.num_key_value_heads else 0
        rd = (a / s.num_key_value_heads if s.num_key_value_heads else 0.0) + kv_read_bytes(1, ms.head_dim, pos, elem)
        t_mem, t_cmp = decode_terms_s(rd, attention_flops(n_rep, ms.head_dim) * pos, profile)
        kv.append((t_mem + t_cmp) * 1e3 if s.num_key_value_heads else 0.0)
        mlp.append(decode_terms_s(m / s.intermediate_size, 0, profile)[0] * 1e3 if s.intermediate_size else 0.0)
    return _pool(ms, kv, mlp, "ms", f"{quant} on {profile.runtime}: predicted decode ms at position {pos}")


def _pool(ms: ModelShape, kv: list[float], mlp: list[float], unit: str, basis: str) -> UnitCost:
    total = sum(s.num_key_value_heads * k + s.intermediate_size * m for s, k, m in zip(ms.layers, kv, mlp))
    return UnitCost(tuple(kv), tuple(mlp), float(total), unit, basis)


def unit_cost(ms: ModelShape, quant: str, profile, budget: str | None = None) -> UnitCost | None:
    """The cost vector for ``budget`` (default: the binding one); None (parameters) for the prefill budget."""
    budget = budget or binding_budget(ms, quant, profile)
    if budget == "max_memory_mb":
        return memory_cost(ms, quant, profile)
    if budget == "max_decode_ms_per_token":
        return latency_cost(ms, quant, profile)
    return None


def costs_for(ms: ModelShape, profile, quants) -> dict[str, UnitCost | None]:
    """Each quant's cost vector on ``profile`` (its binding budget's)."""
    return {q: unit_cost(ms, q, profile) for q in quants}
