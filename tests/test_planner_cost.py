"""Issue #14 item 2: cost-aware allocation (bytes with the KV cache at the profile's context, or predicted ms).

Unit costs against independently computed bytes, parameter mode as the special case of cost mode, and on the
reference model: at equal bytes with a long context the cost-aware allocation keeps fewer KV groups relative to MLP
channels than the parameter-ratio one, and the planned bytes are the real GGUF's.
"""
from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch

from device_profiles import load_profile
from edgeprune import planner as P
from edgeprune.allocation import AllocOptions, UnitCost, allocate
from edgeprune.groups import LayerGroups
from edgeprune.planner.costs import binding_budget, costs_for, latency_cost, memory_cost

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def test_memory_cost_counts_weights_and_kv_cache(ref_model_dir):
    """One KV group of ref-llama-8m (8 q / 4 kv heads, head_dim 32, hidden 256) costs its q/k/v/o weights
    (2*n_rep + 2) * hd * H parameters plus 2 * hd * C * 2 bytes of F16 KV cache; an MLP channel 3 * H weights.
    At q8_0 a weight costs 34/32 bytes (Q8_0 block), the cache stays F16."""
    ms = P.model_shape(ref_model_dir)
    prof = load_profile("demo-tiny-budget")
    C = prof.context_length
    f16 = memory_cost(ms, "f16", prof)
    assert f16.kv == (6 * 32 * 256 * 2 + 2 * 32 * C * 2,) * 8 and f16.mlp == (3 * 256 * 2,) * 8
    q8 = memory_cost(ms, "q8_0", prof)
    assert q8.kv[0] == 6 * 32 * 256 * 34 / 32 + 2 * 32 * C * 2 and q8.mlp[0] == 3 * 256 * 34 / 32
    assert f16.total == sum(4 * k + 768 * m for k, m in zip(f16.kv, f16.mlp)) and f16.unit == "bytes"
    # the KV share grows with the context; llama.cpp allocates the context padded to 256
    long = memory_cost(ms, "f16", replace(prof, context_length=1000))
    assert long.kv[0] - 6 * 32 * 256 * 2 == 2 * 32 * 1024 * 2
    # decode latency: a KV group costs more ms per weight byte than a channel (its KV read and attention compute)
    lat = latency_cost(ms, "f16", prof)
    assert lat.unit == "ms" and lat.kv[0] / (6 * 32 * 256) > 2 * lat.mlp[0] / (3 * 256) > 0


def test_binding_budget_prefers_memory(ref_model_dir):
    """Memory binds whenever the dense model misses it, whatever the speed figures (they depend on load)."""
    ms = P.model_shape(ref_model_dir)
    prof = load_profile("demo-tiny-budget")
    assert binding_budget(ms, "f16", replace(prof, budgets=replace(prof.budgets, max_memory_mb=10.0))) == \
        "max_memory_mb"
    loose = replace(prof, budgets=replace(prof.budgets, max_memory_mb=1e6, max_decode_ms_per_token=1e-3))
    assert binding_budget(ms, "f16", loose) == "max_decode_ms_per_token"
    assert costs_for(ms, loose, ["f16"])["f16"].unit == "ms"


def _random_scores(groups, seed, standardized):
    from edgeprune.importance.base import Scores

    g = torch.Generator().manual_seed(seed)
    attn = [torch.rand(lg.n_kv, generator=g, dtype=torch.float64) for lg in groups]
    mlp = [torch.rand(lg.n_mlp, generator=g, dtype=torch.float64) for lg in groups]
    return Scores(attn, mlp, standardized=standardized)


@pytest.mark.parametrize("name", ["global", "uniform", "saap"])
def test_parameter_mode_is_cost_mode_with_parameter_costs(name):
    """A cost vector equal to each unit's parameters gives exactly the parameter-mode plan."""
    groups = [LayerGroups(n_kv=4, n_rep=2, head_dim=32, n_mlp=768 - 64 * i, hidden=256) for i in range(6)]
    nonemb = sum(lg.n_kv * lg.attn_group_params + lg.n_mlp * lg.mlp_group_params for lg in groups)
    pc = UnitCost(tuple(float(lg.attn_group_params) for lg in groups), tuple(float(lg.mlp_group_params)
                                                                          for lg in groups), float(nonemb), "params")
    for std in (True, False):
        s = _random_scores(groups, 3, std)
        for r in (0.1, 0.35):
            a = allocate(name, s, groups, AllocOptions(r, nonemb, multiple=32))
            b = allocate(name, s, groups, AllocOptions(r, nonemb, multiple=32, cost=pc))
            assert (a.keep_kv, a.keep_mlp) == (b.keep_kv, b.keep_mlp), (name, std, r)


@pytest.mark.parametrize("name", ["global", "uniform", "saap"])
def test_cost_mode_hits_the_cost_target(name):
    """In cost mode the removed cost (not parameters) is the target, to within one KV group of the layer."""
    groups = [LayerGroups(n_kv=4, n_rep=2, head_dim=32, n_mlp=768, hidden=256) for _ in range(6)]
    cost = UnitCost((360448.0,) * 6, (1536.0,) * 6, 6 * (4 * 360448.0 + 768 * 1536.0))
    s = _random_scores(groups, 5, True)
    for r in (0.2, 0.4):
        p = allocate(name, s, groups, AllocOptions(r, 1, cost=cost))
        removed = sum((4 - len(k)) * 360448.0 + (768 - len(m)) * 1536.0 for k, m in zip(p.keep_kv, p.keep_mlp))
        tol = 360448.0 * (1 if name == "global" else 6)   # per-layer rounding of KV groups in per-layer allocators
        assert abs(removed - r * cost.total) <= tol, (name, r, removed, r * cost.total)


@pytest.fixture(scope="module")
def ref_scored(ref_model_dir):
    """One OBS scoring of the reference model (run's default method and allocation: global), without the repair
    stage, so that plain surgery (no refit intercepts) gives the shapes the planner prices."""
    from edgeprune.models import load, load_tokenizer
    from edgeprune.prune import PruneConfig, score

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load(ref_model_dir)
        sc = score(model, load_tokenizer(ref_model_dir), PruneConfig("obs", 0.5, calib_samples=16, multiple=32, reconstruct="none"),
                   progress=False)
    finally:
        torch.set_num_threads(n)
    return sc, P.model_shape(model)


def _device_bytes(ms, prof, quant="f16") -> int:
    p = P.predict(ms, quant, prof)
    return p.weight_bytes + p.kv_bytes


def _counts(ms) -> tuple[int, int]:
    return sum(s.num_key_value_heads for s in ms.layers), sum(s.intermediate_size for s in ms.layers)


def test_cost_aware_keeps_fewer_kv_groups_at_equal_bytes(ref_scored):
    """Context 2048 (the model's longest): a KV group's cache (256 KiB) outweighs its weights (96 KiB), so for the
    same device bytes the cost-aware allocation removes more KV groups and fewer MLP channels."""
    from edgeprune.planner.fit import shape_at

    sc, dense = ref_scored
    prof = load_profile("demo-tiny-budget")
    cost = memory_cost(dense, "f16", prof)
    at = shape_at(sc, dense)
    for r in (0.3, 0.4):
        by_params = at(r)
        budget = _device_bytes(by_params, prof)
        rc = P.least_ratio(lambda x: _device_bytes(at(x, cost), prof) <= budget, 0.9)
        by_bytes = at(rc, cost)
        kv_p, mlp_p = _counts(by_params)
        kv_c, mlp_c = _counts(by_bytes)
        assert _device_bytes(by_bytes, prof) <= budget
        assert kv_c / mlp_c < kv_p / mlp_p and kv_c < kv_p and mlp_c > mlp_p, (r, (kv_p, mlp_p), (kv_c, mlp_c))


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_cost_aware_planned_bytes_are_the_real_gguf_bytes(ref_scored, tmp_path, quant):
    """The pruned shapes the planner prices (cost-aware allocation at 40% of the device bytes) are what surgery
    gives, and their predicted weight bytes are the GGUF's tensor bytes exactly (K-quant fallbacks included)."""
    import copy

    import exporters
    from edgeprune.models import layer_shapes, save
    from edgeprune.planner.fit import shape_at
    from edgeprune.surgery import apply_plan
    from test_planner import _tensor_bytes

    if quant != "f16" and not HAVE_LLAMA:
        pytest.skip("llama_cpp not installed")
    sc, dense = ref_scored
    prof = load_profile("demo-tiny-budget")
    cost = memory_cost(dense, quant, prof)
    planned = shape_at(sc, dense)(0.4, cost)
    m = copy.deepcopy(sc.ctx.model)
    apply_plan(m, sc.plan_at(0.4, cost), sc.scores.bias_means)
    assert tuple(layer_shapes(m)) == planned.layers
    save(m, tmp_path / "m", tokenizer_src=sc.ctx.model.name_or_path)
    f16 = tmp_path / "m-f16.gguf"
    exporters.export(str(tmp_path / "m"), "gguf", str(f16), quant="f16")
    art = f16
    if quant != "f16":
        from exporters.gguf import quantize

        art = tmp_path / f"m-{quant}.gguf"
        quantize(f16, art, quant)
    assert P.predict(planned, quant, prof).weight_bytes == _tensor_bytes(art)
    assert P.predict(planned, quant, prof).weight_bytes == P.weight_bytes(P.model_shape(tmp_path / "m"), quant)


def test_plan_is_cost_aware_only_when_asked(ref_scored):
    """``plan(cost_aware=True)`` bisects each quant's byte pool (memory binds on demo-tiny-budget) and prices the
    real shapes; the default stays the parameter ratio (off by default: benchmarks/planner.md)."""
    from edgeprune.planner.fit import shape_at

    sc, dense = ref_scored
    prof = load_profile("demo-tiny-budget")
    prof = replace(prof, budgets=replace(prof.budgets, max_memory_mb=P.predict(dense, "f16", prof).peak_rss_mb - 5,
                                         max_decode_ms_per_token=1e3, min_prefill_tps=1.0))
    at = shape_at(sc, dense)
    aware = P.plan(dense, prof, shape_at=at, cost_aware=True)
    plain = P.plan(dense, prof, shape_at=at)
    assert aware.chosen.ratio_of == "bytes" and plain.chosen.ratio_of == "params"
    assert aware.chosen.cost == memory_cost(dense, "f16", prof)
    for r in (aware, plain):
        assert r.chosen.feasible and r.chosen.ratio > 0
        assert r.chosen_shapes == at(r.chosen.ratio, r.chosen.cost)
        below = next(c for c in r.candidates if c.role == "below")
        assert not below.fits["max_memory_mb"]
    assert "of the layers' bytes" in aware.explanation and "cost-aware" in P.format_table(aware)
